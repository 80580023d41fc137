"""The OpenAI endpoints never answer 5xx to generated bodies (benchmarks/fuzz_server.py's strategies; the
benchmark runs >= 2,000 of them), and a failure inside the engine that concerns one request answers that request
with an OpenAI-shaped error while the others of the same steps complete. Also the reasoning split through the
server with V3.1's thinking switch."""
from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("xgrammar")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, Phase, given, settings

ROOT = Path(__file__).resolve().parents[1]
# Loaded by file path: putting benchmarks/ on sys.path would let benchmarks/gguf.py shadow the gguf package.
_spec = importlib.util.spec_from_file_location("fuzz_server", ROOT / "benchmarks" / "fuzz_server.py")
_fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fuzz)
make_client, request_bodies, send = _fuzz.make_client, _fuzz.request_bodies, _fuzz.send

from dsv3.engine import sampling as sampling_mod  # noqa: E402

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with make_client(tmp_path_factory.mktemp("fuzz")) as c:
        yield c


def test_generated_bodies_never_get_a_5xx(client):
    seen = []

    @settings(max_examples=150, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(request_bodies())
    def fuzz(case):
        path, body = case
        status = send(client, path, body)
        seen.append(status)
        assert status < 500, (path, body)

    fuzz()
    assert len(seen) == 150
    assert any(s == 200 for s in seen) and any(s == 400 for s in seen)  # both kinds were exercised


def test_engine_failure_in_one_row_ends_only_that_request(client, monkeypatch):
    real = sampling_mod.Sampler._sample

    def poisoned(self, logits, batch):
        states = batch.states if isinstance(batch, sampling_mod.SamplingBatch) else list(batch)
        if any(s.params.seed == 13 for s in states):
            raise RuntimeError("forced failure in one row")
        return real(self, logits, batch)

    monkeypatch.setattr(sampling_mod.Sampler, "_sample", poisoned)
    bodies = [{"messages": USER, "max_tokens": 24, "ignore_eos": True, "temperature": 0}] * 3 + [
        {"messages": USER, "max_tokens": 24, "ignore_eos": True, "temperature": 1.0, "seed": 13},
        {"messages": USER, "max_tokens": 24, "ignore_eos": True, "temperature": 1.0, "seed": 13, "stream": True}]
    with ThreadPoolExecutor(len(bodies)) as pool:
        rs = list(pool.map(lambda b: client.post("/v1/chat/completions", json=b), bodies))
    ok = [r.json() for r in rs[:3]]
    assert all(r.status_code == 200 for r in rs[:3])
    assert len({o["choices"][0]["message"]["content"] for o in ok}) == 1  # greedy: all the same, all complete
    assert all(o["usage"]["completion_tokens"] == 24 for o in ok)
    err = rs[3].json()["error"]
    assert rs[3].status_code == 500 and err["type"] == "server_error" and "forced failure" in err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    assert '"type":"server_error"' in rs[4].text and "forced failure" in rs[4].text  # the stream's error event
    monkeypatch.undo()
    assert client.post("/v1/chat/completions", json=bodies[3]).status_code == 200  # the server goes on
    from dsv3.server.metrics import parse_metrics

    m = parse_metrics(client.get("/metrics").text)
    assert m['dsv3_request_finished_total{reason="error"}'] >= 2


def test_reasoning_content_with_the_thinking_switch(client):
    think = {"messages": USER, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
             "chat_template_kwargs": {"thinking": True}}
    r = client.post("/v1/chat/completions", json=think).json()["choices"][0]["message"]
    # V3.1's prompt opened the think block and the model never closed it: all of it is reasoning.
    assert r["reasoning_content"] and r["content"] == ""
    stream = client.post("/v1/chat/completions", json={**think, "stream": True}).text
    import json

    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in stream.splitlines()
              if line.startswith("data: {")]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == r["reasoning_content"]
    off = client.post("/v1/chat/completions", json={**think, "chat_template_kwargs": {"thinking": False}}).json()
    msg = off["choices"][0]["message"]
    assert msg["content"] and msg["reasoning_content"] is None


def test_grammar_compilation_does_not_hold_up_other_requests(client, monkeypatch):
    import time

    from dsv3.engine.guided import GrammarBackend

    real = GrammarBackend._compile

    def slow(self, spec):
        if spec.kind == "regex" and spec.regex == "slow[0-9]":
            time.sleep(3.0)
        return real(self, spec)

    monkeypatch.setattr(GrammarBackend, "_compile", slow)
    done = {}

    def post(name, body):
        r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4, **body})
        done[name] = (time.perf_counter(), r.status_code, r.json())

    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(post, "slow", {"guided_regex": "slow[0-9]"})
        time.sleep(0.3)  # the slow compile is under way
        b = pool.submit(post, "free", {"temperature": 0})
        a.result()
        b.result()
    assert done["free"][1] == 200 and done["slow"][1] == 200
    assert done["free"][0] < done["slow"][0] - 1.0  # answered while the other grammar was still compiling
    assert done["slow"][2]["choices"][0]["message"]["content"] in {f"slow{i}" for i in range(10)}
