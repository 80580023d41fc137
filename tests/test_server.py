"""`dsv3 serve` end to end: real server processes on 127.0.0.1, the official openai client (sync and async,
streaming and not) and raw HTTP for malformed requests. Greedy answers are checked against LLM.generate/chat on
the same checkpoint, in the same dtype."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from prometheus_client.parser import text_string_to_metric_families

from dsv3.engine.llm import LLM
from dsv3.engine.sampling import SamplingParams
from dsv3.server.metrics import parse_metrics

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny"
KEY = "sk-test-secret"
DTYPE = "float32"  # the server and the in-process reference must compute alike for greedy equality
READY_TIMEOUT = 180  # a loaded shared CPU can take long to import torch and load the model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, ckpt, log_path: Path, *extra: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - open for the server's whole life, closed in stop()
        cmd = [sys.executable, "-m", "dsv3", "serve", "--model", str(ckpt), "--port", str(self.port),
               "--served-model-name", NAME, "--dtype", DTYPE, *extra]
        full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pytest.fail(f"server not healthy after {READY_TIMEOUT} s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)


@pytest.fixture(scope="module")
def servers(tiny_ckpt, tmp_path_factory):
    logs = tmp_path_factory.mktemp("server-logs")
    # Both start at once: loading overlaps. The second one is tight on purpose (queue 1, one sequence at a time).
    main = ServerProcess(tiny_ckpt, logs / "main.log")
    keyed = ServerProcess(tiny_ckpt, logs / "keyed.log", "--max-queue", "1", "--max-num-seqs", "1",
                          env={"DSV3_API_KEY": KEY})
    try:
        main.wait_ready()
        keyed.wait_ready()
        yield main, keyed
    finally:
        main.stop()
        keyed.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def keyed(servers):
    return servers[1]


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return LLM(tiny_ckpt, dtype=DTYPE)


@pytest.fixture
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield c
    c.close()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def assert_error(response: httpx.Response, status: int, param: str | None = "", code: str | None = "") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param != "":
        assert err["param"] == param, err
    if code != "":
        assert err["code"] == code, err
    return err


# ---- basics -----------------------------------------------------------------------------------------------------

def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME


def test_completion_matches_llm_generate(server, client, llm):
    prompt = "def fibonacci(n):"
    ref = llm.generate(prompt, greedy(12))[0]
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == NAME
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ref.prompt_token_ids), 12)

    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"

    ids = ref.prompt_token_ids[1:]  # token-id prompts are taken as they are, without a bos
    ref_ids = llm.generate(ids, greedy(6))[0]
    out = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == ref_ids.text and out.usage.prompt_tokens == len(ids)


def test_chat_matches_llm_chat(server, client, llm):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}]
    ref = llm.chat(messages, greedy(10))[0]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion" and out.created > 0
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids) and out.usage.completion_tokens == 10
    assert out.usage.total_tokens == out.usage.prompt_tokens + 10

    # Content as a list of text parts, streamed, with usage in a last chunk.
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "Name a prime."}]}]
    stream = client.chat.completions.create(model=NAME, messages=parts, max_completion_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.id == chunks[0].id for c in chunks)


def test_raw_stream_ends_with_done(server):
    body = {"model": NAME, "prompt": "import os", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all("choices" in json.loads(e[6:]) for e in events[:-1])


def test_async_client_n_and_seed(server, llm):
    messages = [{"role": "user", "content": "Count to three."}]
    ref = llm.chat(messages, greedy(6))[0].text

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120) as c:
            both = await c.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0, n=2,
                                                   extra_body={"ignore_eos": True})
            stream = await c.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0,
                                                     n=2, stream=True, extra_body={"ignore_eos": True})
            texts = ["", ""]
            async for chunk in stream:
                for ch in chunk.choices:
                    texts[ch.index] += ch.delta.content or ""
            sampled = [await c.completions.create(model=NAME, prompt="class", max_tokens=8, temperature=1.0,
                                                  seed=1234, n=n) for n in (2, 2, 1)]
            return both, texts, sampled

    both, texts, sampled = asyncio.run(run())
    assert [ch.index for ch in both.choices] == [0, 1]
    assert [ch.message.content for ch in both.choices] == [ref, ref]
    assert texts == [ref, ref]
    a, b, single = ([ch.text for ch in s.choices] for s in sampled)
    assert a == b  # a seed makes sampling reproducible
    assert single[0] == a[0]  # completion 0 of n uses the seed itself


def test_logprobs(server, client, llm):
    ref = llm.generate("while True:", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3))[0]
    out = client.completions.create(model=NAME, prompt="while True:", max_tokens=5, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.token_logprobs == pytest.approx([e.logprob for e in ref.logprobs], abs=1e-4)
    assert all(len(top) <= 3 for top in lp.top_logprobs)
    assert "".join(lp.tokens).encode("utf-8", "replace") and lp.text_offset[0] == 0

    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy picks the most likely
        assert entry.bytes is not None


def test_stop_string(server, client, llm):
    full = llm.generate("def main():", greedy(16))[0].text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 1) if full[i:i + 2].strip() and full[i:i + 2] not in
                full[:i + 1])
    out = client.completions.create(model=NAME, prompt="def main():", max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == full[:full.index(stop)]


# ---- concurrency and cancellation --------------------------------------------------------------------------------

PROMPTS = [f"Client {i} asks: what is {i} + {i}?" for i in range(16)]


async def _stream_chat(c, prompt: str, max_tokens: int, stop_after: int | None = None) -> tuple[str, str | None]:
    stream = await c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=max_tokens, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
    text, reason, n = "", None, 0
    async for chunk in stream:
        for ch in chunk.choices:
            text += ch.delta.content or ""
            reason = ch.finish_reason or reason
        n += 1
        if stop_after is not None and n >= stop_after:
            await stream.close()  # the client goes away mid-stream
            return text, "disconnected"
    return text, reason


def _wait_idle(server, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = (m["dsv3_cache_blocks_used"], m["dsv3_num_requests_running"], m["dsv3_num_requests_waiting"],
                m["dsv3_num_requests_in_flight"]) == (0, 0, 0, 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_64_concurrent_streams(server, llm):
    refs = [o.text for o in llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], greedy(8))]

    async def run():
        limits = httpx.Limits(max_connections=128)
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300,
                                      http_client=openai.DefaultAsyncHttpxClient(limits=limits)) as c:
            return await asyncio.gather(*(_stream_chat(c, PROMPTS[i % 16], 8) for i in range(64)))

    results = asyncio.run(run())
    for i, (text, reason) in enumerate(results):
        assert (text, reason) == (refs[i % 16], "length"), f"client {i}"
    m = _wait_idle(server)
    assert m["dsv3_cache_blocks_used"] == 0


def test_disconnect_half_frees_cache(server, llm):
    refs = [o.text for o in llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], greedy(8))]
    aborted_before = server.metrics().get('dsv3_request_finished_total{reason="abort"}', 0)

    async def run():
        limits = httpx.Limits(max_connections=128)
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300,
                                      http_client=openai.DefaultAsyncHttpxClient(limits=limits)) as c:
            # Odd clients ask for far more than they read, then hang up after a few chunks.
            return await asyncio.gather(*(
                _stream_chat(c, PROMPTS[i % 16], 8) if i % 2 == 0 else _stream_chat(c, PROMPTS[i % 16], 1500, 3)
                for i in range(64)))

    results = asyncio.run(run())
    for i, (text, reason) in enumerate(results):
        if i % 2 == 0:
            assert (text, reason) == (refs[i % 16], "length"), f"client {i}"
        else:
            assert reason == "disconnected"
    m = _wait_idle(server)
    assert (m["dsv3_cache_blocks_used"], m["dsv3_num_requests_running"], m["dsv3_num_requests_waiting"],
            m["dsv3_num_requests_in_flight"]) == (0, 0, 0, 0)
    # They were cancelled, not run to their 1500 tokens.
    assert m['dsv3_request_finished_total{reason="abort"}'] - aborted_before == 32
    assert httpx.get(server.url + "/health").status_code == 200


# ---- errors -----------------------------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path,content,param,code", [
    (CHAT, b'{"messages": [', None, "invalid_json"),
    (CHAT, b"", None, "invalid_json"),
    (CHAT, b"[1, 2]", None, "invalid_request"),
    (CHAT, b'{"model": "tiny"}', "messages", "invalid_value"),
    (CHAT, b'{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role", "invalid_value"),
    (CHAT, b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     "messages[0].content[0].type", "invalid_value"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "temperature",
     "invalid_value"),
    (COMPLETIONS, b'{"prompt": 5}', "prompt", "invalid_value"),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": true}', "max_tokens", "invalid_value"),
])
def test_malformed_requests_400(server, path, content, param, code):
    r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"})
    err = assert_error(r, 400, param, code)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,param", [
    ({"messages": USER, "temperature": -1}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "n": 0}, "n"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "presence_penalty": 3}, "presence_penalty"),
    ({"messages": USER, "top_k": -5}, "top_k"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": USER, "stop": [""]}, "stop"),
    ({"messages": USER, "seed": -1}, "seed"),
    ({"messages": USER, "tools": [{"type": "function"}]}, "tools[0].function"),
    ({"messages": USER, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": USER, "temperature": 1e308}, "temperature"),
    ({"messages": []}, "messages"),
    ({"prompt": [], "max_tokens": 2}, "prompt"),
    ({"prompt": [[1, 2], [99999]], "max_tokens": 2}, "prompt"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
])
def test_bad_values_400(server, body, param):
    path = CHAT if "messages" in body else COMPLETIONS
    assert_error(httpx.post(server.url + path, json=body), 400, param)


def test_unknown_model_404(server, client):
    err = assert_error(httpx.post(server.url + CHAT, json={"model": "gpt-9", "messages": USER}), 404, "model",
                       "model_not_found")
    assert "gpt-9" in err["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=USER)
    assert_error(httpx.get(server.url + "/v1/models/gpt-9"), 404, "model", "model_not_found")


def test_context_overflow_400_says_numbers(server, client, llm):
    n_prompt = len(llm.chat_prompt(USER))
    err = assert_error(httpx.post(server.url + CHAT, json={"messages": USER, "max_tokens": 4000}), 400, "messages",
                       "context_length_exceeded")
    assert "2048" in err["message"] and f"{n_prompt + 4000}" in err["message"] and "4000" in err["message"]
    long_prompt = list(range(2, 300)) * 7  # 2086 token ids, over the 2048 context on its own
    err = assert_error(httpx.post(server.url + COMPLETIONS, json={"prompt": long_prompt, "max_tokens": None}), 400,
                       "prompt", "context_length_exceeded")
    assert "2086" in err["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x", max_tokens=5000)


def test_unknown_routes_openai_shape(server):
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_error(httpx.get(server.url + CHAT), 405)


def test_metrics_exposition(server):
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("dsv3_requests_total", "dsv3_prompt_tokens_total", "dsv3_generation_tokens_total",
                 "dsv3_time_to_first_token_seconds", "dsv3_inter_token_latency_seconds",
                 "dsv3_num_requests_waiting", "dsv3_num_requests_running", "dsv3_cache_blocks_used",
                 "dsv3_cache_blocks_total", "dsv3_cache_usage_ratio", "dsv3_spec_decode_acceptance_ratio",
                 "dsv3_spec_decode_draft_tokens_total", "dsv3_spec_decode_accepted_tokens_total",
                 "dsv3_spec_decode_verify_steps_total", "dsv3_spec_decode_tokens_per_step"):
        assert f"# TYPE {name} " in text, name
    # The names and types /metrics has always exported, read back with prometheus_client's own parser.
    fams = {f.name + ("_total" if f.type == "counter" else ""): f.type for f in text_string_to_metric_families(text)}
    assert fams == {
        "dsv3_requests_total": "counter", "dsv3_request_finished_total": "counter",
        "dsv3_prompt_tokens_total": "counter", "dsv3_generation_tokens_total": "counter",
        "dsv3_time_to_first_token_seconds": "histogram", "dsv3_inter_token_latency_seconds": "histogram",
        "dsv3_request_latency_seconds": "histogram", "dsv3_num_requests_waiting": "gauge",
        "dsv3_num_requests_running": "gauge", "dsv3_num_requests_in_flight": "gauge",
        "dsv3_cache_blocks_used": "gauge", "dsv3_cache_blocks_total": "gauge", "dsv3_cache_usage_ratio": "gauge",
        "dsv3_prefix_cache_hit_ratio": "gauge", "dsv3_preemptions_total": "counter",
        "dsv3_spec_decode_draft_tokens_total": "counter", "dsv3_spec_decode_accepted_tokens_total": "counter",
        "dsv3_spec_decode_acceptance_ratio": "gauge", "dsv3_spec_decode_verify_steps_total": "counter",
        "dsv3_spec_decode_tokens_per_step": "gauge"}
    assert "_created" not in text
    m = parse_metrics(text)
    assert m['dsv3_requests_total{endpoint="/v1/chat/completions",status="200"}'] > 0
    assert m['dsv3_requests_total{endpoint="/v1/chat/completions",status="400"}'] > 0
    assert m["dsv3_generation_tokens_total"] > 0 and m["dsv3_prompt_tokens_total"] > 0
    assert m["dsv3_time_to_first_token_seconds_count"] > 0 and m["dsv3_inter_token_latency_seconds_count"] > 0
    assert m['dsv3_time_to_first_token_seconds_bucket{le="+Inf"}'] == m["dsv3_time_to_first_token_seconds_count"]
    assert m["dsv3_cache_blocks_total"] > 0
    if m["dsv3_spec_decode_verify_steps_total"] > 0:  # speculation ran (the fixture's model has an MTP module)
        steps, accepted = m["dsv3_spec_decode_verify_steps_total"], m["dsv3_spec_decode_accepted_tokens_total"]
        assert m["dsv3_spec_decode_tokens_per_step"] == pytest.approx((accepted + steps) / steps)


# ---- the keyed, tightly limited server ---------------------------------------------------------------------------

def test_api_key(keyed):
    url = keyed.url
    err = assert_error(httpx.get(url + "/v1/models"), 401, code="missing_api_key")
    assert "API key" in err["message"]
    assert_error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401,
                 code="invalid_api_key")
    assert_error(httpx.post(url + CHAT, json={"messages": USER}, headers={"Authorization": f"Basic {KEY}"}), 401,
                 code="invalid_api_key")
    assert httpx.get(url + "/health").status_code == 200  # probes need no key
    with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as bad, \
            pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120) as good:
        out = good.chat.completions.create(model=NAME, messages=USER, max_tokens=2)
        assert out.usage.completion_tokens <= 2


def _open_stream(http: httpx.Client, body: dict):
    ctx = http.stream("POST", "/v1/completions", json=dict(body, stream=True))
    response = ctx.__enter__()
    assert response.status_code == 200, response.read()
    return ctx, response


def test_queue_limit_429(keyed):
    headers = {"Authorization": f"Bearer {KEY}"}
    long = {"prompt": "def run():", "max_tokens": 1500, "ignore_eos": True}
    with httpx.Client(base_url=keyed.url, headers=headers, timeout=120) as http:
        # One running (--max-num-seqs 1) and one waiting (--max-queue 1) fill the server.
        ctx_a, a = _open_stream(http, long)
        lines_a = a.iter_lines()
        next(line for line in lines_a if line.startswith("data: "))
        ctx_b, _ = _open_stream(http, long)  # headers come back once the engine queued it
        try:
            r = httpx.post(keyed.url + COMPLETIONS, json={"prompt": "x", "max_tokens": 2}, headers=headers)
            err = assert_error(r, 429, code="queue_full")
            assert int(r.headers["retry-after"]) >= 1
            assert "overloaded" in err["message"]
            with openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0) as c, \
                    pytest.raises(openai.RateLimitError):
                c.completions.create(model=NAME, prompt="x", max_tokens=2)
        finally:
            ctx_a.__exit__(None, None, None)
            ctx_b.__exit__(None, None, None)
    m = _wait_idle(keyed)
    assert m["dsv3_cache_blocks_used"] == 0 and m["dsv3_num_requests_in_flight"] == 0
    with openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        assert c.completions.create(model=NAME, prompt="x", max_tokens=2).choices[0].finish_reason


def test_sigterm_finishes_in_flight_then_exits(keyed):
    # Last test of the module: this server is gone afterwards.
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "for i in range(10):", "max_tokens": 128, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", keyed.url + COMPLETIONS, json=body, headers=headers, timeout=120) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        keyed.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    events = [first] + rest
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 128  # finished, not cut off
    keyed.proc.wait(60)
    with pytest.raises(httpx.ConnectError):
        httpx.get(keyed.url + "/health", timeout=5)
    log = keyed.output()
    assert "Waiting for connections to close" in log  # the stream was still open when the signal came
    assert "engine stopped" in log and "Traceback" not in log
