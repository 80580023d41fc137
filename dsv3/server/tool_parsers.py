"""Tool calls in each DeepSeek family member's own output format, whole and streamed.

Formats (what the families' chat templates write for an assistant turn that calls tools; the model answers in
the same form):
- DeepSeek-V3 / R1: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```
  <｜tool▁call▁end｜> (further calls after a newline) <｜tool▁calls▁end｜>
- DeepSeek-V3.1: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...
  <｜tool▁calls▁end｜>
- Kimi-K2: <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGS
  <|tool_call_end|>...<|tool_calls_section_end|> (the id functions.NAME:IDX is the call's id)
ARGS is a JSON object. Text before the section is the message content. Output that does not follow the format
(unknown tool, arguments that are not a JSON object, a section cut off) is returned as content, as vLLM does.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ToolCall", "ToolFormat", "FORMATS", "detect_tool_format", "StreamingToolParser", "new_call_id"]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of an object, as OpenAI's function.arguments
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = new_call_id()

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolFormat:
    name: str
    section_begin: str
    section_end: str
    call_begin: str
    call_end: str
    call: re.Pattern  # one whole call, from call_begin to call_end; groups "name" (or "id"), "args"

    def parse_call(self, m: re.Match, tools: Iterable[str] | None) -> ToolCall | None:
        if "id" in m.groupdict() and m.group("id") is not None:
            call_id = m.group("id").strip()
            body = call_id.split(".", 1)[1] if call_id.startswith("functions.") else call_id
            name, call_id = body.rsplit(":", 1)[0], call_id
        else:
            name, call_id = m.group("name").strip(), ""
        args = m.group("args").strip()
        try:
            parsed = json.loads(args)
        except ValueError:
            return None
        if not isinstance(parsed, dict) or not name or (tools is not None and name not in tools):
            return None
        return ToolCall(name, args, call_id)

    def parse(self, text: str, tools: Iterable[str] | None = None) -> tuple[str, list[ToolCall]] | None:
        """Whole output -> (content, calls); (text, []) without a tool section; None when the section does not
        follow the format (the caller then returns everything as content)."""
        start = text.find(self.section_begin)
        if start < 0:
            return text, []
        rest = text[start + len(self.section_begin):]
        end = rest.find(self.section_end)
        if end < 0:
            return None
        body, after = rest[:end], rest[end + len(self.section_end):]
        tools = set(tools) if tools is not None else None
        calls, pos = [], 0
        for m in self.call.finditer(body):
            if body[pos:m.start()].strip():
                return None
            call = self.parse_call(m, tools)
            if call is None:
                return None
            calls.append(call)
            pos = m.end()
        if body[pos:].strip() or not calls:
            return None
        return text[:start] + after.strip(), calls


_S = re.DOTALL
DEEPSEEK_V3 = ToolFormat(
    "deepseek_v3", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    re.compile(r"<｜tool▁call▁begin｜>[^<]*?<｜tool▁sep｜>(?P<name>[^\n<]*)\n```(?:json)?\n(?P<args>.*?)\n```\s*"
               r"<｜tool▁call▁end｜>", _S))
DEEPSEEK_V31 = ToolFormat(
    "deepseek_v31", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    re.compile(r"<｜tool▁call▁begin｜>(?P<name>[^<]*?)<｜tool▁sep｜>(?P<args>.*?)<｜tool▁call▁end｜>", _S))
KIMI_K2 = ToolFormat(
    "kimi_k2", "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
    "<|tool_call_end|>",
    re.compile(r"<\|tool_call_begin\|>(?P<id>[^<]*?)<\|tool_call_argument_begin\|>(?P<args>.*?)<\|tool_call_end\|>",
               _S))
FORMATS = {f.name: f for f in (DEEPSEEK_V3, DEEPSEEK_V31, KIMI_K2)}


def detect_tool_format(template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template writes (None: it renders no tool calls)."""
    if not template:
        return None
    if KIMI_K2.section_begin in template:
        return KIMI_K2
    if DEEPSEEK_V3.section_begin in template:
        # V3/R1 fence the arguments as ```json; V3.1 writes them right after the separator.
        return DEEPSEEK_V3 if "```json" in template else DEEPSEEK_V31
    return None


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker (held back while streaming)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class StreamingToolParser:
    """Content deltas in, events out: ("content", text) and ("call", ToolCall), in output order. Text that may
    begin a tool section is held back until it is known; each call is emitted once it is complete. A call that
    does not follow the format goes out as content, as does whatever is left when the stream ends."""

    def __init__(self, fmt: ToolFormat, tools: Iterable[str] | None = None):
        self.fmt = fmt
        self.tools = set(tools) if tools is not None else None
        self.buf = ""
        self.state = "content"  # -> "section" -> "content" (after the section) or "plain" (malformed)
        self.num_calls = 0

    def feed(self, delta: str) -> list[tuple[str, object]]:
        self.buf += delta
        events: list[tuple[str, object]] = []
        while True:
            before = (self.state, len(self.buf))
            if self.state == "plain":
                if self.buf:
                    events.append(("content", self.buf))
                self.buf = ""
            elif self.state == "content":
                i = self.buf.find(self.fmt.section_begin)
                if i >= 0:
                    if i:
                        events.append(("content", self.buf[:i]))
                    self.buf = self.buf[i + len(self.fmt.section_begin):]
                    self.state = "section"
                else:
                    keep = _partial_suffix(self.buf, self.fmt.section_begin) if self.num_calls == 0 else 0
                    if len(self.buf) > keep:
                        events.append(("content", self.buf[:len(self.buf) - keep]))
                        self.buf = self.buf[len(self.buf) - keep:]
            else:
                self._section(events)
            if (self.state, len(self.buf)) == before:
                return events

    def _section(self, events: list) -> None:
        body = self.buf.lstrip()
        f = self.fmt
        if body.startswith(f.section_end):
            self.buf = body[len(f.section_end):]
            self.state = "content"
            return
        if not body or f.section_end.startswith(body) or f.call_begin.startswith(body):
            return  # not yet known
        if not body.startswith(f.call_begin):
            self._malformed()
            return
        end = body.find(f.call_end)
        if end < 0:
            return
        raw = body[:end + len(f.call_end)]
        m = f.call.fullmatch(raw)
        call = f.parse_call(m, self.tools) if m else None
        if call is None:
            self._malformed()
            return
        self.num_calls += 1
        events.append(("call", call))
        self.buf = body[len(raw):]

    def _malformed(self) -> None:
        # What is left of the section goes out as text (with the marker, so nothing the model wrote is lost).
        self.buf = self.fmt.section_begin + self.buf
        self.state = "plain"

    def flush(self) -> list[tuple[str, object]]:
        if self.state == "section":
            self._malformed()
        out = [("content", self.buf)] if self.buf else []
        self.buf = ""
        return out
