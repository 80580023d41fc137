"""Fuzz the OpenAI endpoints: hypothesis-generated request bodies (valid, nearly valid and garbage, for every field
the server reads) against the in-process app on the embedded model; counts the answers by status and fails on any
5xx (or a stream that ends with a server error event).

    PYTHONPATH=. python benchmarks/fuzz_server.py --requests 2000

tests/test_fuzz_server.py runs the same strategies with fewer requests.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]

_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False,
                       allow_infinity=False), st.text(max_size=12))
junk = st.recursive(_json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                    max_leaves=10)
small_float = st.one_of(st.floats(-3, 3), st.sampled_from([0.0, 1.0, 1e-9, 1e308, -1e308, 100.0, 100.5, 2.0]))
schema = st.one_of(
    st.just({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
    st.just({"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2}),
    st.just({"type": "object", "properties": 3}),
    st.just({"type": "string", "pattern": "[a-z]{2}"}),
    st.just({"$ref": "#/nope"}),
    st.dictionaries(st.sampled_from(["type", "properties", "items", "enum", "required", "minimum", "anyOf"]),
                    junk, max_size=3),
    junk)
function = st.fixed_dictionaries({"name": st.one_of(st.sampled_from(["get_weather", "f", "bad name", ""]),
                                                    st.text(max_size=8))},
                                  optional={"parameters": schema, "description": st.text(max_size=8),
                                            "strict": st.booleans()})
tool = st.one_of(st.fixed_dictionaries({"type": st.just("function"), "function": function}), junk)
tool_call = st.fixed_dictionaries({"id": st.text(max_size=6), "type": st.just("function"),
                                   "function": st.fixed_dictionaries({"name": st.text(max_size=6),
                                                                      "arguments": st.text(max_size=12)})})
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "bot"]),
                           "content": st.one_of(st.text(max_size=20), st.none(),
                                                st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                "text": st.text(max_size=8)}),
                                                         max_size=2), junk)},
                          optional={"tool_calls": st.lists(tool_call, max_size=2), "tool_call_id": st.text(max_size=5),
                                    "name": st.text(max_size=5), "reasoning_content": st.text(max_size=5)}),
    junk)
response_format = st.one_of(
    st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}, {"type": "xml"}]),
    st.fixed_dictionaries({"type": st.just("json_schema"),
                           "json_schema": st.fixed_dictionaries({"name": st.text(max_size=5)},
                                                                optional={"schema": schema, "strict": st.booleans()})}),
    junk)
tool_choice = st.one_of(st.sampled_from(["auto", "none", "required", "always"]),
                        st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
                            {"name": st.sampled_from(["get_weather", "f", "missing"])})}), junk)
regex = st.one_of(st.sampled_from(["[a-z]{1,3}", "(yes|no)", "(", "a{2,1}", "\\", ".*", "[0-9]+"]),
                  st.text(max_size=8))
grammar = st.one_of(st.sampled_from(['root ::= "a" | "b"', "root ::= ", 'root ::= x\nx ::= "1"+',
                                     'start ::= "a"']), st.text(max_size=10))
max_tokens = st.one_of(st.integers(1, 6), st.sampled_from([0, -1, 10**9, 5000]), junk)

COMMON = {
    "model": st.one_of(st.just("tiny"), st.text(max_size=5), junk),
    "n": st.one_of(st.integers(-1, 3), st.just(1000), junk),
    "temperature": st.one_of(small_float, junk),
    "top_p": st.one_of(small_float, junk),
    "top_k": st.one_of(st.integers(-3, 50), junk),
    "min_p": st.one_of(small_float, junk),
    "presence_penalty": st.one_of(small_float, junk),
    "frequency_penalty": st.one_of(small_float, junk),
    "repetition_penalty": st.one_of(small_float, junk),
    "seed": st.one_of(st.integers(-5, 2**65), junk),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=20), junk),
    "stop_token_ids": st.one_of(st.lists(st.integers(-2, 5000), max_size=3), junk),
    "ignore_eos": st.one_of(st.booleans(), junk),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), junk),
    "logit_bias": st.one_of(st.dictionaries(st.one_of(st.integers(-5, 5000).map(str), st.text(max_size=3)),
                                            st.one_of(small_float, st.integers(-300, 300)), max_size=4), junk),
    "response_format": response_format,
    "guided_json": st.one_of(schema, st.text(max_size=10)),
    "guided_regex": regex,
    "guided_choice": st.one_of(st.lists(st.text(max_size=4), max_size=4), junk),
    "guided_grammar": grammar,
    "structured_outputs": st.one_of(st.fixed_dictionaries({}, optional={"json": schema, "regex": regex,
                                                                       "choice": st.lists(st.text(max_size=3)),
                                                                       "grammar": grammar,
                                                                       "json_object": st.booleans()}), junk),
}
CHAT = {
    "logprobs": st.one_of(st.booleans(), junk),
    "top_logprobs": st.one_of(st.integers(-1, 25), junk),
    "tools": st.one_of(st.lists(tool, max_size=3), junk),
    "tool_choice": tool_choice,
    "parallel_tool_calls": st.one_of(st.booleans(), junk),
    "chat_template_kwargs": st.one_of(st.fixed_dictionaries({"thinking": st.booleans()}),
                                      st.dictionaries(st.text(max_size=8), junk, max_size=2), junk),
    "max_completion_tokens": max_tokens,
}
COMPLETION = {
    "echo": st.one_of(st.booleans(), junk),
    "logprobs": st.one_of(st.integers(-1, 25), junk),
    "suffix": st.one_of(st.none(), st.text(max_size=3)),
    "best_of": st.one_of(st.none(), st.integers(0, 3)),
}


# Values the server accepts: half the bodies draw only from these, so generation, constraints and tools run too.
_tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"]}}},
          {"type": "function", "function": {"name": "f"}}]
VALID = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1), "top_k": st.integers(-1, 40),
    "min_p": st.floats(0, 0.5), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2), "seed": st.integers(0, 2**64 - 1), "n": st.integers(1, 3),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=3), "ignore_eos": st.booleans(),
    "stream": st.booleans(), "stop_token_ids": st.lists(st.integers(0, 4095), max_size=2),
    "logit_bias": st.dictionaries(st.integers(0, 4095).map(str), st.floats(-100, 100), max_size=3),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema",
                                        "json_schema": {"name": "a", "schema": {"type": "object", "properties": {
                                            "a": {"type": "integer"}}, "required": ["a"]}, "strict": True}}]),
    "guided_regex": st.sampled_from(["[a-z]{1,3}", "(yes|no)", "[0-9]+"]),
    "guided_choice": st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=3),
    "guided_grammar": st.just('root ::= "a" | "b"'),
    "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20),
    "tools": st.just(_tools), "tool_choice": st.sampled_from(["auto", "none", "required", {
        "type": "function", "function": {"name": "get_weather"}}]),
    "parallel_tool_calls": st.booleans(), "chat_template_kwargs": st.fixed_dictionaries({"thinking": st.booleans()}),
    "echo": st.booleans(),
}


@st.composite
def request_bodies(draw) -> tuple[str, bytes]:
    """(path, raw body): JSON objects with a few fields set (all valid, or each valid or not), sometimes not
    JSON."""
    chat = draw(st.booleans())
    fields = dict(COMMON, **(CHAT if chat else COMPLETION))
    valid = draw(st.booleans())
    if valid:
        fields = {k: v for k, v in VALID.items() if k in fields}
    keys = draw(st.lists(st.sampled_from(sorted(fields)), max_size=5, unique=True))
    body = {k: draw(fields[k]) for k in keys}
    if valid:
        if chat:
            body["messages"] = [{"role": "user", "content": draw(st.text(min_size=1, max_size=20))}]
        else:
            body["prompt"] = draw(st.one_of(st.text(min_size=1, max_size=20),
                                            st.lists(st.integers(5, 4095), min_size=1, max_size=6)))
    elif chat:
        if draw(st.integers(0, 9)):
            body["messages"] = draw(st.one_of(st.lists(message, min_size=1, max_size=4),
                                              st.just([{"role": "user", "content": "hi"}])))
    elif draw(st.integers(0, 9)):
        body["prompt"] = draw(st.one_of(st.text(max_size=20), st.lists(st.integers(-3, 5000), max_size=6),
                                        st.lists(st.text(max_size=5), max_size=3), junk))
    # Runtime stays bounded: a generation limit unless this body fuzzes it (the default would run to the context).
    body.setdefault("max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                    draw(st.integers(1, 6)))
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if draw(st.integers(0, 30)) == 0:
        return path, draw(st.sampled_from([b"", b"{", b"[]", b"null", b'{"messages": NaN}', b"\xff\xfe"]))
    return path, json.dumps(body).encode()


def make_client(tmp: Path):
    """A TestClient over the app on the embedded model, with a DeepSeek-V3.1-format template (tools, thinking)."""
    from starlette.testclient import TestClient

    sys.path.insert(0, str(ROOT / "tests"))
    from family_templates import DEEPSEEK_V31, checkpoint_with_template

    from dsv3.engine.llm import LLM
    from dsv3.server.app import create_app

    ckpt = checkpoint_with_template(ROOT / "dsv3" / "assets" / "default-model", tmp / "ckpt", DEEPSEEK_V31)
    llm = LLM(ckpt, dtype="float32", max_num_seqs=16)
    return TestClient(create_app(llm.engine, "tiny"), raise_server_exceptions=False)


def send(client, path: str, body: bytes) -> int:
    """The status, or 599 for a stream that ended with a server-side error event (its status was already 200)."""
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data: {") and '"error"' in line[:20]:
                if json.loads(line[6:])["error"].get("type") == "server_error":
                    return 599
    return r.status_code


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    from hypothesis import HealthCheck, Phase, given, settings

    statuses: collections.Counter = collections.Counter()
    bad = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, make_client(Path(tmp)) as client:
        @settings(max_examples=args.requests, deadline=None, database=None, derandomize=True,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(request_bodies())
        def fuzz(case):
            path, body = case
            status = send(client, path, body)
            statuses[status] += 1
            if status >= 500:
                bad.append((status, path, body[:300]))

        fuzz()
    dt = time.perf_counter() - t0
    total = sum(statuses.values())
    print(f"{total} requests in {dt:.0f} s; by status: {dict(sorted(statuses.items()))}")
    print(json.dumps({"requests": total, "5xx": sum(v for k, v in statuses.items() if k >= 500),
                      "statuses": {str(k): v for k, v in sorted(statuses.items())}, "seconds": round(dt, 1)}))
    for status, path, body in bad[:20]:
        print(status, path, body)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
