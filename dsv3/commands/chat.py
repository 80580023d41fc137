"""`dsv3 chat`: an interactive multi-turn conversation (/clear resets it, /exit leaves)."""
from __future__ import annotations

import sys
import time

from ._common import add_model_args, add_sampling_args, make_llm, sampling_params, spec_summary

HELP = "commands: /clear (forget the conversation), /exit (leave), /help"


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat with a model")
    p.add_argument("--system", help="system prompt")
    add_model_args(p)
    add_sampling_args(p, max_tokens=256)
    p.set_defaults(func=run)


def run(args) -> int:
    params = sampling_params(args)
    params.validate()
    llm = make_llm(args)
    if llm.tokenizer is None:
        raise ValueError(f"{llm.path} has no tokenizer, so it cannot chat")
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
        try:
            for out in llm.stream(llm.chat_prompt(messages), params):
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
                reply += out.new_text
                n += 1
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
        dt = time.perf_counter() - t0
        messages.append({"role": "assistant", "content": reply})
        cached = out.num_cached_tokens if out else 0
        print(f"\n[{n} tokens, {n / dt:.1f} tokens/s, {cached} prompt tokens reused from cache{spec_summary(out)}]",
              file=sys.stderr)
