"""Reasoning content: the text between <think> and </think> goes to `reasoning_content`, the rest to `content`.

DeepSeek-R1 and V3.1's thinking mode write their reasoning first and close it with </think>. The opening tag is
either in the prompt (R1-0528's and V3.1's templates end the generation prompt with <think>, so the output starts
inside the reasoning) or the first thing the model writes (the original R1 template). V3.1 with thinking off ends
the prompt with </think>: the whole output is content.
"""
from __future__ import annotations

__all__ = ["THINK_START", "THINK_END", "ReasoningSplitter", "template_reasons", "starts_in_reasoning"]

THINK_START = "<think>"
THINK_END = "</think>"


def template_reasons(template: str | None) -> bool:
    """Whether a chat template belongs to a reasoning model (it knows the think tags)."""
    return bool(template) and THINK_END in template


def starts_in_reasoning(prompt_text: str) -> bool:
    """The rendered prompt opened a think block that the output continues."""
    tail = prompt_text.rstrip()
    return tail.endswith(THINK_START)


class ReasoningSplitter:
    """Text deltas in, (reasoning delta, content delta) out. A tag split across deltas is held back until it is
    known; split(text) on a whole output gives the same as feeding it in any pieces."""

    def __init__(self, in_reasoning: bool):
        self.state = "reasoning" if in_reasoning else "start"  # start -> reasoning -> content
        self.buf = ""

    def feed(self, delta: str) -> tuple[str, str]:
        self.buf += delta
        reasoning = content = ""
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(THINK_START):
                self.buf = head[len(THINK_START):]
                self.state = "reasoning"
            elif not head or THINK_START.startswith(head):
                return "", ""  # may still become <think>
            else:
                self.state = "content"
        if self.state == "reasoning":
            i = self.buf.find(THINK_END)
            if i >= 0:
                reasoning, self.buf = self.buf[:i], self.buf[i + len(THINK_END):]
                self.state = "content"
            else:
                keep = _partial_suffix(self.buf, THINK_END)
                reasoning, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        if self.state == "content":
            content, self.buf = self.buf, ""
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """The end of the output: what was held back (an unclosed think block stays reasoning)."""
        rest, self.buf = self.buf, ""
        if self.state == "reasoning":
            return rest, ""
        return "", rest

    def split(self, text: str) -> tuple[str, str]:
        r1, c1 = self.feed(text)
        r2, c2 = self.flush()
        return r1 + r2, c1 + c2


def _partial_suffix(text: str, marker: str) -> int:
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
