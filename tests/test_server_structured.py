"""Structured outputs, tool calls and logit_bias through the official openai client against a real `dsv3 serve`
on the embedded model (its checkpoint with a DeepSeek-V3-format chat template that renders tools)."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from family_templates import DEEPSEEK_V3, checkpoint_with_template
from test_server import NAME, ServerProcess

from dsv3.tokenizer import Tokenizer

EMBEDDED = Path(__file__).resolve().parents[1] / "dsv3" / "assets" / "default-model"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                  "floor": {"type": "integer", "minimum": 0, "maximum": 50}},
                 "required": ["city", "floor"], "additionalProperties": False},
    },
    "required": ["name", "age", "kind", "home"],
    "additionalProperties": False,
}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET", "PST"]}}, "required": ["tz"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return checkpoint_with_template(EMBEDDED, tmp_path_factory.mktemp("v3tpl") / "ckpt", DEEPSEEK_V3)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    s = ServerProcess(ckpt, tmp_path_factory.mktemp("logs") / "structured.log")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=180)
    yield c
    c.close()


def test_json_schema_50_seeded_sampled_requests_validate(server):
    async def run():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
        try:
            return await asyncio.gather(*[c.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": f"Describe pet {i}."}], temperature=1.0,
                seed=i, max_tokens=200, response_format=fmt) for i in range(50)])
        finally:
            await c.close()

    outs = asyncio.run(run())
    texts = []
    for r in outs:
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        texts.append(choice.message.content)
    assert len(set(texts)) > 25


def _check_calls(calls, allowed=SCHEMAS):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.function.arguments), allowed[c.function.name])


@pytest.mark.parametrize("seed", range(4))
def test_tool_choice_required_and_named_validate(client, seed):
    r = client.chat.completions.create(model=NAME, messages=USER, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=120)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    assert len(ch.message.tool_calls) == 1
    _check_calls(ch.message.tool_calls)
    named = client.chat.completions.create(
        model=NAME, messages=USER, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    ch = named.choices[0]
    assert ch.finish_reason == "tool_calls" and [c.function.name for c in ch.message.tool_calls] == ["get_time"]
    _check_calls(ch.message.tool_calls, {"get_time": TIME})


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_calls_reassemble_to_the_unstreamed(client, choice):
    kw = dict(model=NAME, messages=USER, tools=TOOLS, tool_choice=choice, temperature=1.0, seed=7, max_tokens=150)
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for tc in ch.delta.tool_calls or []:
                c = calls.setdefault(tc.index, {"name": "", "arguments": "", "id": None})
                c["id"] = tc.id or c["id"]
                if tc.function is not None:
                    c["name"] += tc.function.name or ""
                    c["arguments"] += tc.function.arguments or ""
    assert finish == whole.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_tool_results_render_through_the_template(client, ckpt):
    conversation = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    r = client.chat.completions.create(model=NAME, messages=conversation, tools=TOOLS, max_tokens=4,
                                       temperature=0)
    tok = Tokenizer.from_pretrained(ckpt)
    text = tok.apply_chat_template(conversation, True, tools=TOOLS)
    assert "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>18 degrees, sunny" in text
    assert '<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris", "unit": "C"}\n```' in text
    assert r.usage.prompt_tokens == len(tok.encode(text, add_bos=False))


def test_other_constraints_and_logit_bias(client, ckpt):
    r = client.chat.completions.create(model=NAME, messages=USER, max_tokens=10, temperature=1.0, seed=3,
                                       extra_body={"guided_choice": ["sunny", "rainy"]})
    assert r.choices[0].message.content in ("sunny", "rainy")
    r = client.chat.completions.create(model=NAME, messages=USER, max_tokens=10, temperature=1.0, seed=4,
                                       extra_body={"structured_outputs": {"choice": ["up", "down"]}})
    assert r.choices[0].message.content in ("up", "down")
    r = client.completions.create(model=NAME, prompt="Date:", max_tokens=30, temperature=1.0, seed=3,
                                  extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]"})
    assert len(r.choices[0].text) == 7 and r.choices[0].text.startswith("20")
    r = client.chat.completions.create(model=NAME, messages=USER, max_tokens=80, temperature=0,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    tok = Tokenizer.from_pretrained(ckpt)
    forced = tok.encode(" the", add_bos=False)[0]
    r = client.completions.create(model=NAME, prompt="x", max_tokens=5, temperature=1.0,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == tok.decode([forced] * 5)


@pytest.mark.parametrize("body,param,code", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice",
     "invalid_value"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"guided_json": {"type": "object", "properties": 3}}, "guided_json", "invalid_grammar"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "invalid_grammar"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema",
     "invalid_value"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "invalid_value"),
    ({"logit_bias": {"5": 250}}, "logit_bias", "invalid_value"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "invalid_value"),
    ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs", "invalid_grammar"),
    ({"logit_bias": {"999999": 1}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"9" * 5000: 1}}, "logit_bias", "invalid_value"),
    ({"temperature": 1e308}, "temperature", "invalid_value"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name",
     "invalid_value"),
])
def test_refused_before_any_work(server, body, param, code):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == code and err["type"] == "invalid_request_error", err


def test_n_streaming_and_logprobs_under_a_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    kw = dict(model=NAME, messages=USER, temperature=1.0, seed=11, max_tokens=200, response_format=fmt)
    r = client.chat.completions.create(n=3, **kw)
    texts = [c.message.content for c in r.choices]
    for t in texts:
        jsonschema.validate(json.loads(t), PERSON)
    assert len(set(texts)) > 1  # each copy has its own sample and its own grammar state
    streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(stream=True, **kw))
    assert streamed == texts[0]  # completion 0 of a seeded request = the same request with n = 1, streamed or not
    # The mask rules tokens out: their logprobs are -inf inside, -9999 on the wire (JSON has no -inf).
    r = client.chat.completions.create(model=NAME, messages=USER, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=5, extra_body={"guided_choice": ["yes", "no"]})
    entries = r.choices[0].logprobs.content
    assert r.choices[0].message.content in ("yes", "no") and entries
    assert all(-9999.0 <= t.logprob <= 0 for e in entries for t in e.top_logprobs)
