"""Tool-call parsers and the reasoning split on exact text in each family's format (whole, streamed in every
chunking, malformed, cut off), chat_output's OpenAI shapes, and the family templates rendering tool conversations
through the tokenizer."""
from __future__ import annotations

import json
import random

import pytest

from dsv3.server.chat_output import ChatOutputMode, ChoiceOutput, tool_choice_guided
from dsv3.server.protocol import ChatCompletionRequest
from dsv3.server.reasoning import ReasoningSplitter, starts_in_reasoning, template_reasons
from dsv3.server.tool_parsers import FORMATS, StreamingToolParser, detect_tool_format

from family_templates import FAMILY

W = '{"city": "Paris", "days": [1, 2]}'
T = '{"tz": "CET"}'

# (format, model output, expected content, expected [(name, arguments)]): the documented forms.
CASES = {
    "deepseek_v3": (
        "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n" + W +
        "\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n" + T +
        "\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    "deepseek_v31": (
        "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>" + W +
        "<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>" + T + "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    "kimi_k2": (
        "Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        "<|tool_call_argument_begin|>" + W + "<|tool_call_end|><|tool_call_begin|>functions.get_time:1"
        "<|tool_call_argument_begin|>" + T + "<|tool_call_end|><|tool_calls_section_end|>"),
}
TOOLS = ["get_weather", "get_time"]


def _stream(fmt, text: str, cuts: list[int]) -> tuple[str, list]:
    p = StreamingToolParser(fmt, TOOLS)
    events, last = [], 0
    for c in sorted(cuts) + [len(text)]:
        events += p.feed(text[last:c])
        last = c
    events += p.flush()
    content = "".join(v for k, v in events if k == "content")
    return content, [v for k, v in events if k == "call"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_whole_output_parses_to_calls(name):
    fmt = FORMATS[name]
    content, calls = fmt.parse(CASES[name], TOOLS)
    assert content == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", W), ("get_time", T)]
    assert all(json.loads(c.arguments) for c in calls)
    if name == "kimi_k2":  # Kimi's call ids are its own
        assert [c.id for c in calls] == ["functions.get_weather:0", "functions.get_time:1"]
    else:
        assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


@pytest.mark.parametrize("name", sorted(CASES))
def test_stream_in_any_chunking_equals_whole(name):
    fmt = FORMATS[name]
    text = CASES[name]
    want_content, want = fmt.parse(text, TOOLS)
    rng = random.Random(0)
    for trial in range(60):
        cuts = list(range(1, len(text))) if trial == 0 else rng.sample(range(1, len(text)), rng.randint(1, 30))
        content, calls = _stream(fmt, text, cuts)
        assert content == want_content
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in want]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("breakage", ["bad_json", "unknown_tool", "cut_off", "garbage_in_section"])
def test_malformed_output_is_content(name, breakage):
    fmt = FORMATS[name]
    text = CASES[name]
    if breakage == "bad_json":
        text = text.replace(T, '{"tz": CET')
    elif breakage == "unknown_tool":
        text = text.replace("get_time", "rm_rf")
    elif breakage == "cut_off":
        text = text[:text.index(T) + 4]
    else:
        text = text.replace(fmt.call_begin, "oops " + fmt.call_begin, 1)
    assert fmt.parse(text, TOOLS) is None  # the whole output goes back as content (chat_output)
    msg, finish = ChoiceOutput(ChatOutputMode(tool_format=fmt, tool_names=TOOLS)).message(text, "stop")
    assert msg["content"] == text and msg["tool_calls"] == [] and finish == "stop"
    # Streamed, nothing is lost: content plus the calls that were complete and valid cover the text.
    content, calls = _stream(fmt, text, list(range(1, len(text), 7)))
    assert len(calls) <= 1 and (breakage != "garbage_in_section" or not calls)
    assert text.endswith(content[-10:]) and "Let me check." in content


def test_plain_text_passes_through_and_partial_markers_are_released():
    fmt = FORMATS["deepseek_v3"]
    for text in ["hello <｜tool", "a < b and <｜tool▁calls", "no tools here"]:
        assert fmt.parse(text, TOOLS) == (text, [])
        assert _stream(fmt, text, list(range(1, len(text)))) == (text, [])


def test_detect_format_from_templates():
    assert detect_tool_format(FAMILY["deepseek_v3"]).name == "deepseek_v3"
    assert detect_tool_format(FAMILY["deepseek_r1"]).name == "deepseek_v3"
    assert detect_tool_format(FAMILY["deepseek_v31"]).name == "deepseek_v31"
    assert detect_tool_format(FAMILY["kimi_k2"]).name == "kimi_k2"
    assert detect_tool_format("{{ messages }}") is None and detect_tool_format(None) is None
    assert template_reasons(FAMILY["deepseek_r1"]) and template_reasons(FAMILY["deepseek_v31"])
    assert not template_reasons(FAMILY["kimi_k2"])


@pytest.mark.parametrize("text,in_reasoning,want", [
    ("plan it</think>The answer.", True, ("plan it", "The answer.")),
    ("<think>plan it</think>The answer.", False, ("plan it", "The answer.")),
    ("\n<think>x</think>", False, ("x", "")),
    ("just an answer", False, ("", "just an answer")),
    ("still thinking", True, ("still thinking", "")),  # cut off inside the think block
    ("<thi", False, ("", "<thi")),
    ("a </thin", True, ("a </thin", "")),
    ("</think></think>", True, ("", "</think>")),
])
def test_reasoning_split_whole_and_streamed(text, in_reasoning, want):
    assert ReasoningSplitter(in_reasoning).split(text) == want
    rng = random.Random(1)
    for _ in range(30):
        s = ReasoningSplitter(in_reasoning)
        r = c = ""
        last = 0
        for cut in sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8)))) + [len(text)]:
            dr, dc = s.feed(text[last:cut])
            r, c, last = r + dr, c + dc, cut
        dr, dc = s.flush()
        assert (r + dr, c + dc) == want


def test_chat_output_stream_deltas_reassemble_to_message():
    fmt = FORMATS["deepseek_v31"]
    text = "<think>hmm</think>" + CASES["deepseek_v31"]
    mode = ChatOutputMode(reasoning=True, tool_format=fmt, tool_names=TOOLS)
    msg, finish = ChoiceOutput(mode).message(text, "stop")
    assert finish == "tool_calls" and msg["reasoning_content"] == "hmm" and msg["content"] == "Let me check."
    out = ChoiceOutput(mode)
    deltas = [d for i in range(0, len(text), 3) for d in out.feed(text[i:i + 3])]
    rest, stream_finish = out.finish("stop")
    deltas += rest
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            c = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
            c["id"] = tc.get("id", c["id"])
            c["name"] += tc.get("function", {}).get("name", "")
            c["arguments"] += tc["function"].get("arguments", "")
    assert stream_finish == "tool_calls"
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "hmm"
    assert "".join(d.get("content", "") for d in deltas) == "Let me check."
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]]


def _request(**kw) -> ChatCompletionRequest:
    tools = [{"type": "function", "function": {"name": n, "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}} for n in TOOLS]
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "q"}], "tools": tools,
                                                 **kw})


def test_forced_tool_choice_schemas_and_parsing():
    req = _request(tool_choice="required", parallel_tool_calls=False)
    g = tool_choice_guided(req.tools, req.tool_choice, req.parallel_tool_calls)
    assert g.json["maxItems"] == 1 and len(g.json["items"]["anyOf"]) == 2
    mode = ChatOutputMode(tool_names=TOOLS, forced="required")
    msg, finish = ChoiceOutput(mode).message('[{"name": "get_time", "parameters": {"x": 3}}]', "stop")
    assert finish == "tool_calls" and msg["content"] is None
    assert msg["tool_calls"][0]["function"] == {"name": "get_time", "arguments": '{"x": 3}'}
    msg, finish = ChoiceOutput(mode).message('[{"name": "get_ti', "length")  # cut off: content, as vLLM
    assert msg["content"] == '[{"name": "get_ti' and finish == "length"
    named = _request(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    g = tool_choice_guided(named.tools, named.tool_choice, True)
    assert g.json == named.tools[0].function.parameters
    msg, _ = ChoiceOutput(ChatOutputMode(tool_names=TOOLS, forced="get_weather")).message('{"x": 1}', "stop")
    assert msg["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"x": 1}'}


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": W}}]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
]


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_family_templates_render_tool_results(tiny_ckpt, family):
    from dsv3.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tiny_ckpt)
    tok.chat_templates = {"default": FAMILY[family]}
    req = ChatCompletionRequest.model_validate({"messages": CONVERSATION})
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = tok.apply_chat_template(req.conversation(), True, tools=tools, thinking=True)
    fmt = detect_tool_format(FAMILY[family])
    # The assistant's earlier call is written in the family's own format, so the parser reads it back.
    section = text[text.index(fmt.section_begin):text.index(fmt.section_end) + len(fmt.section_end)]
    _, calls = fmt.parse(section, ["get_weather"])
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", W)]
    assert "sunny" in text and "Be brief." in text and "## Tools" in text
    assert starts_in_reasoning(text) == (family in ("deepseek_r1", "deepseek_v31"))
    if family == "deepseek_v31":
        off = tok.apply_chat_template(req.conversation(), True, thinking=False)
        assert off.endswith("</think>") and not starts_in_reasoning(off)


def test_dsv3_chat_shows_reasoning_apart_and_keeps_only_the_answer(capsys):
    from dsv3.commands.chat import _Shown

    show = _Shown(reasons=True, in_reasoning=True, tty=False)
    kept = "".join(show.write(d) for d in ["pla", "n it</th", "ink>The ", "answer."]) + show.write("", final=True)
    assert kept == "The answer."
    assert capsys.readouterr().out == "[thinking]\nplan it\n[answer]\nThe answer."
    tty = _Shown(reasons=True, in_reasoning=False, tty=True)
    assert tty.write("<think>x</think>y", final=True) == "y"
    assert capsys.readouterr().out == "\033[2mx\033[0my"


def test_parallel_tool_calls_false_keeps_the_first_auto_call():
    fmt = FORMATS["deepseek_v31"]
    mode = ChatOutputMode(tool_format=fmt, tool_names=TOOLS, parallel=False)
    msg, finish = ChoiceOutput(mode).message(CASES["deepseek_v31"], "stop")
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather"] and finish == "tool_calls"
    out = ChoiceOutput(mode)
    deltas = out.feed(CASES["deepseek_v31"]) + out.finish("stop")[0]
    assert {tc["index"] for d in deltas for tc in d.get("tool_calls", [])} == {0}


def test_server_parser_overrides():
    from types import SimpleNamespace

    pytest.importorskip("fastapi")
    from dsv3.server.app import create_app
    from dsv3.server.serving_chat import _output_mode

    req = _request(tool_choice="auto")
    v31 = FAMILY["deepseek_v31"]

    def mode(tools: str, reasoning: str, template=v31, prompt="<｜Assistant｜><think>"):
        return _output_mode(SimpleNamespace(tool_call_parser=tools, reasoning_parser=reasoning), req, prompt,
                            template, None)

    m = mode("auto", "auto")
    assert m.tool_format.name == "deepseek_v31" and m.reasoning and m.starts_in_reasoning
    m = mode("none", "none")
    assert m.tool_format is None and not m.reasoning
    m = mode("kimi_k2", "think", template="{{ messages }}", prompt="x")  # a template without any markers
    assert m.tool_format.name == "kimi_k2" and m.reasoning and not m.starts_in_reasoning
    with pytest.raises(ValueError, match="tool_call_parser 'hermes'"):
        create_app(None, "x", tool_call_parser="hermes")
