"""What a chat completion's text becomes in the response: reasoning_content, content and tool_calls, whole or as
stream deltas.

Tool choice (OpenAI's tool_choice with the request's tools):
- "auto": the model may call tools in its family's own format (tool_parsers.py); the calls are parsed out of the
  text, and text that does not follow the format stays content;
- "required" / a named function: decoding is constrained by a JSON schema built from the tools (as vLLM does): a
  named function's output is its arguments object; "required" is a JSON array of {"name", "parameters"} objects
  (one at most when parallel_tool_calls is false), each name one of the tools and its parameters that tool's
  schema. The calls are read from that JSON, so they are always well-formed;
- "none": tools are shown to the template but no call is parsed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..engine.guided import GuidedDecoding
from .reasoning import ReasoningSplitter
from .tool_parsers import StreamingToolParser, ToolCall, ToolFormat

__all__ = ["ChatOutputMode", "tool_choice_guided", "ChoiceOutput"]


def _parameters(function: Any) -> dict:
    return function.parameters if function.parameters is not None else {"type": "object", "properties": {}}


def tool_choice_guided(tools: list, choice: Any, parallel: bool) -> GuidedDecoding | None:
    """The output constraint of tool_choice "required" or a named function (None for "auto"/"none")."""
    if not tools or choice in (None, "auto", "none"):
        return None
    if choice == "required":
        items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                                   "parameters": _parameters(t.function)},
                  "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
        schema: dict = {"type": "array", "minItems": 1,
                        "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not parallel:
            schema["maxItems"] = 1
        return GuidedDecoding(json=schema)
    named = next(t for t in tools if t.function.name == choice.function.name)
    return GuidedDecoding(json=_parameters(named.function))


@dataclass
class ChatOutputMode:
    """How one request's outputs are read (the same for each of its n choices)."""

    reasoning: bool = False  # split think blocks out
    starts_in_reasoning: bool = False
    tool_format: ToolFormat | None = None  # tool_choice auto with a template that writes tool calls
    tool_names: list[str] = field(default_factory=list)
    forced: str | None = None  # "required", or the named function (output is the constraint's JSON)
    parallel: bool = True  # parallel_tool_calls: false keeps the first call an "auto" answer makes

    @property
    def parses(self) -> bool:
        return self.reasoning or self.tool_format is not None or self.forced is not None


def _forced_calls(mode: ChatOutputMode, text: str) -> list[ToolCall] | None:
    try:
        parsed = json.loads(text)
    except ValueError:
        return None  # cut off by max_tokens: the text is returned as content
    if mode.forced != "required":
        return [ToolCall(mode.forced, text.strip())] if isinstance(parsed, dict) else None
    if not isinstance(parsed, list):
        return None
    calls = []
    for item in parsed:
        if not isinstance(item, dict) or item.get("name") not in mode.tool_names:
            return None
        calls.append(ToolCall(item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False)))
    return calls


class ChoiceOutput:
    """One choice's text through the reasoning split and the tool parser: whole (message) or as deltas."""

    def __init__(self, mode: ChatOutputMode):
        self.mode = mode
        self.splitter = ReasoningSplitter(mode.starts_in_reasoning) if mode.reasoning else None
        self.tools = StreamingToolParser(mode.tool_format, mode.tool_names) if mode.tool_format else None
        self.forced_text = ""  # the constrained JSON, read when the output ends
        self.num_calls = 0

    # -- whole ----------------------------------------------------------------------------------------------------
    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """(fields of the response message, the finish reason: "tool_calls" when the answer calls tools)."""
        reasoning = None
        if self.splitter is not None:
            reasoning, text = self.splitter.split(text)
            reasoning = reasoning or None
        calls: list[ToolCall] | None = None
        content: str | None = text
        if self.mode.forced is not None:
            calls = _forced_calls(self.mode, text)
            if calls:
                content = None
        elif self.mode.tool_format is not None:
            parsed = self.mode.tool_format.parse(text, self.mode.tool_names)
            if parsed is not None and parsed[1]:
                content, calls = parsed[0] or None, parsed[1] if self.mode.parallel else parsed[1][:1]
        msg: dict[str, Any] = {"content": content, "reasoning_content": reasoning,
                               "tool_calls": [c.openai() for c in calls or []]}
        return msg, ("tool_calls" if calls and finish_reason == "stop" else finish_reason)

    # -- stream ---------------------------------------------------------------------------------------------------
    def feed(self, delta: str) -> list[dict[str, Any]]:
        """The delta objects for new text (none while something is held back)."""
        reasoning, content = self.splitter.feed(delta) if self.splitter is not None else ("", delta)
        return self._deltas(reasoning, content, final=False)

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        reasoning, content = self.splitter.flush() if self.splitter is not None else ("", "")
        deltas = self._deltas(reasoning, content, final=True)
        return deltas, ("tool_calls" if self.num_calls and finish_reason == "stop" else finish_reason)

    def _deltas(self, reasoning: str, content: str, final: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if reasoning:
            out.append({"reasoning_content": reasoning})
        if self.mode.forced is not None:
            self.forced_text += content
            if final:
                calls = _forced_calls(self.mode, self.forced_text)
                if calls:
                    out += self._call_deltas(calls)
                elif self.forced_text:
                    out.append({"content": self.forced_text})
            return out
        if self.tools is None:
            if content:
                out.append({"content": content})
            return out
        events = self.tools.feed(content) + (self.tools.flush() if final else [])
        for kind, value in events:
            if kind == "content":
                if out and "content" in out[-1]:
                    out[-1]["content"] += value
                else:
                    out.append({"content": value})
            elif self.mode.parallel or not self.num_calls:
                out += self._call_deltas([value])
        return out

    def _call_deltas(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        # As OpenAI streams a call: first its id, type and name with empty arguments, then the arguments.
        out = []
        for c in calls:
            k = self.num_calls
            self.num_calls += 1
            out.append({"tool_calls": [{"index": k, "id": c.id, "type": "function",
                                        "function": {"name": c.name, "arguments": ""}}]})
            out.append({"tool_calls": [{"index": k, "function": {"arguments": c.arguments}}]})
        return out
