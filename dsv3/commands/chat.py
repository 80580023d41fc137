"""`dsv3 chat`: an interactive multi-turn conversation (/clear resets it, /exit leaves)."""
from __future__ import annotations

import sys
import time

from ..server.reasoning import ReasoningSplitter, starts_in_reasoning, template_reasons
from ._common import (add_model_args, add_sampling_args, checkpoint_defaults, make_llm, sampling_params,
                      spec_summary)

HELP = "commands: /clear (forget the conversation), /exit (leave), /help"


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat with a model")
    p.add_argument("--system", help="system prompt")
    add_model_args(p)
    add_sampling_args(p, max_tokens=256)
    p.set_defaults(func=run)


def run(args) -> int:
    params = sampling_params(args, checkpoint_defaults(args))
    params.validate()
    llm = make_llm(args)
    if llm.tokenizer is None:
        raise ValueError(f"{llm.path} has no tokenizer, so it cannot chat")
    # Reasoning models (R1, V3.1 thinking): the think block is shown dimmed and left out of the history.
    reasons = template_reasons(llm.tokenizer.chat_template_source()) if llm.tokenizer.chat_templates else False
    if reasons:
        params.skip_special_tokens = False  # the think tags may be special tokens
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    print(f"dsv3 chat with {llm.path} ({HELP})", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/clear":
            messages = list(start)
            print("[conversation cleared]", file=sys.stderr)
            continue
        if cmd == "/help":
            print(HELP, file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        t0 = time.perf_counter()
        reply, n, out = "", 0, None
        prompt_text = llm.tokenizer.apply_chat_template(messages, True)
        show = _Shown(reasons, starts_in_reasoning(prompt_text), sys.stdout.isatty())
        try:
            for out in llm.stream(llm.tokenizer.encode(prompt_text, add_bos=False), params):
                reply += show.write(out.new_text)
                n += 1
            reply += show.write("", final=True)
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
        dt = time.perf_counter() - t0
        messages.append({"role": "assistant", "content": reply})
        cached = out.num_cached_tokens if out else 0
        print(f"\n[{n} tokens, {n / dt:.1f} tokens/s, {cached} prompt tokens reused from cache{spec_summary(out)}]",
              file=sys.stderr)


class _Shown:
    """Writes a reply as it streams: reasoning dimmed (on a terminal; elsewhere between "[thinking]" and
    "[answer]" lines), the answer plain. write() returns the answer's part of the text, for the history."""

    DIM, RESET = "\033[2m", "\033[0m"

    def __init__(self, reasons: bool, in_reasoning: bool, tty: bool):
        self.splitter = ReasoningSplitter(in_reasoning) if reasons else None
        self.tty = tty
        self.thinking = False

    def write(self, delta: str, final: bool = False) -> str:
        if self.splitter is None:
            sys.stdout.write(delta)
            sys.stdout.flush()
            return delta
        reasoning, content = self.splitter.feed(delta)
        if final:
            r, c = self.splitter.flush()
            reasoning, content = reasoning + r, content + c
        if reasoning:
            if not self.thinking:
                sys.stdout.write(self.DIM if self.tty else "[thinking]\n")
                self.thinking = True
            sys.stdout.write(reasoning)
        if (content or final) and self.thinking:
            sys.stdout.write(self.RESET if self.tty else "\n[answer]\n")
            self.thinking = False
        sys.stdout.write(content)
        sys.stdout.flush()
        return content
