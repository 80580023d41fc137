"""`dsv3 generate [PROMPT ...]`: complete prompts with the embedded model or a checkpoint."""
from __future__ import annotations

import json
import sys
import time

from ._common import (add_model_args, add_sampling_args, checkpoint_defaults, make_llm, sampling_params,
                      spec_summary)


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from prompts")
    p.add_argument("prompts", nargs="*", help="prompt text (several prompts run batched); '-' reads stdin")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt (token ids, text, timing)")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    prompts = [sys.stdin.read() if p == "-" else p for p in args.prompts]
    if not prompts:
        raise ValueError("give at least one prompt, e.g. dsv3 generate 'def fibonacci(n):'")
    if any(not p for p in prompts):
        raise ValueError("a prompt is empty")
    params = sampling_params(args, checkpoint_defaults(args))
    params.validate()
    llm = make_llm(args)
    if args.chat:
        prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
    if len(prompts) == 1 and not args.json:
        t0 = time.perf_counter()
        n = 0
        text = prompts[0] if isinstance(prompts[0], str) else ""
        sys.stdout.write(text)
        for out in llm.stream(prompts[0], params):
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
            n += 1
        dt = time.perf_counter() - t0
        print(f"\n[{n} tokens in {dt:.2f}s, {n / dt:.1f} tokens/s, finish: {out.finish_reason}{spec_summary(out)}]",
              file=sys.stderr)
        return 0
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    for prompt, out in zip(prompts, outs):
        if args.json:
            print(json.dumps({"prompt": prompt if isinstance(prompt, str) else None,
                              "prompt_token_ids": out.prompt_token_ids, "token_ids": out.token_ids,
                              "text": out.text, "finish_reason": out.finish_reason,
                              "time_to_first_token_s": out.metrics.get("time_to_first_token"),
                              "elapsed_s": out.metrics.get("elapsed"),
                              "spec_acceptance": out.metrics.get("spec_acceptance"),
                              "spec_tokens_per_step": out.metrics.get("spec_tokens_per_step")}, ensure_ascii=False))
        else:
            print(f"--- {prompt!r}\n{out.text}\n[{len(out.token_ids)} tokens, finish: {out.finish_reason}]")
    total = sum(len(o.token_ids) for o in outs)
    print(f"[{len(outs)} prompts, {total} tokens in {dt:.2f}s, {total / dt:.1f} tokens/s]", file=sys.stderr)
    return 0
