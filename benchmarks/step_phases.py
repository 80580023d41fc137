#!/usr/bin/env python3
"""Where an engine decode step spends its time, plain vs MTP speculative decoding (microseconds per step).

Wraps the engine's phases with timers (scheduling, context tables, the C++ blocks, the rest of the forward, the MTP
pass, verification, sampling, appending tokens) and decodes held-out prompts one at a time, greedy or sampled.
Prompt steps are left out: the numbers are per decode step, averaged over the decode steps of a round; the fastest
of the rounds is reported for each mode (this VM's speed drifts). Nested phases are included in their parents
(e.g. `runner.run` holds `context tables` and `blocks`). With the C++ kernels and plain decoding among --drafts, also
the speedup of each draft length and its bound: the speedup if speculation cost nothing beyond the extra rows in the
blocks and the MTP passes (the work it cannot avoid). Prints a table and a JSON line.

  python benchmarks/step_phases.py [--model PATH] [--drafts 0,1] [--prompts 8] [--max-tokens 96] [--temperature 0]
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import sys
import time

import torch

from speculative import held_out_prompts

PHASES = [  # (owner, attribute, label)
    ("engine", "step", "step"),
    ("scheduler", "schedule", "schedule"),
    ("runner", "run", "runner.run (forward)"),
    ("runner", "build_context", "  context tables"),
    ("model", "cpu_blocks", "  blocks (C++)"),
    ("model", "cpu_model_step", "  model step (C++)"),  # (blocks + embedding, norm, head: then no blocks line)
    ("engine", "_verify_and_draft_in_step", "verify + MTP in the step"),
    ("model", "cpu_mtp_draft", "  MTP pass (C++)"),
    ("module", "verify_rows", "  verify_rows"),
    ("engine", "_draft", "MTP after the step"),
    ("engine", "_draft_more", "further drafts"),
    ("engine", "_propose", "draws of sampled drafts"),
    ("sampler", "sample", "sampling (plain)"),
    ("engine", "_append", "appending tokens"),
    ("scheduler", "after_step", "after_step"),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--drafts", default="0,1", help="comma list: 0 = plain decoding, k = k MTP drafts")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    try:
        ks = [int(k) for k in a.drafts.split(",")]
    except ValueError:
        ap.error(f"--drafts must be a comma list of integers (0 = plain decoding), got {a.drafts!r}")
    if any(k < 0 for k in ks) or a.rounds < 1 or a.prompts < 1:
        ap.error("--drafts must be >= 0 and --rounds/--prompts >= 1")
    torch.set_num_threads(a.threads)
    import dsv3.engine.spec_verify as engine_module
    from dsv3.engine.llm import LLM
    from dsv3.engine.sampling import SamplingParams

    acc: dict[str, float] = collections.defaultdict(float)

    def timed(owner, name: str, label: str) -> None:
        f = getattr(owner, name, None)
        if f is None:
            return

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                acc[label] += time.perf_counter() - t

        setattr(owner, name, wrapper)

    llms = {}
    for k in ks:
        llm = LLM(a.model, speculative="mtp" if k else "off", num_draft_tokens=max(k, 1), dtype="bfloat16",
                  progress=False, enable_prefix_caching=False)
        eng = llm.engine
        owners = {"engine": eng, "scheduler": eng.scheduler, "runner": eng.runner, "model": eng.model,
                  "sampler": eng.sampler}
        for owner, name, label in PHASES:
            if owner != "module":
                timed(owners[owner], name, label)
        llms[k] = llm
    timed(engine_module, "verify_rows", "  verify_rows")  # (the engine module's name, shared by the engines)
    gc.collect()
    gc.freeze()  # as the dsv3 commands do after loading
    prompts = held_out_prompts(a.prompts)
    best: dict[int, dict] = {}
    for _ in range(a.rounds):
        for k in ks:
            eng = llms[k].engine
            total: dict[str, float] = collections.defaultdict(float)
            steps = tokens = 0
            for p in prompts:
                eng.add_request(p, SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature,
                                                  ignore_eos=True, seed=5))
                eng.step()  # the prompt step (not counted)
                acc.clear()
                while eng.has_unfinished():
                    tokens += len(eng.step())
                    steps += 1
                for label, v in acc.items():
                    total[label] += v
            us = {label: v / steps * 1e6 for label, v in total.items()}
            us["tokens per step"] = tokens / steps
            if k not in best or us["step"] < best[k]["step"]:
                best[k] = us
    print(f"model {llms[ks[0]].path} (bf16, {a.threads} threads, {a.prompts} prompts x {a.max_tokens} tokens, "
          f"temperature {a.temperature}): microseconds per decode step, fastest of {a.rounds} rounds")
    labels = [label for _, _, label in PHASES if any(label in best[k] for k in ks)] + ["tokens per step"]
    print(f"{'phase':28s}" + "".join(f"{'plain' if k == 0 else f'{k} draft(s)':>12s}" for k in ks))
    for label in labels:
        print(f"{label:28s}" + "".join(f"{best[k].get(label, 0.0):12.1f}" if label != "tokens per step" else
                                       f"{best[k][label]:12.2f}" for k in ks))
    bounds = {}
    main = next((m for m in ("  model step (C++)", "  blocks (C++)") if 0 in best and m in best[0]), None)
    if main is not None:
        plain = best[0]
        print("speedup over plain (tokens per step x plain step / step), measured, and its bound if speculation added "
              "only the extra rows in the blocks and the MTP passes (no verification, glue or extra bookkeeping):")
        for k in ks:
            if k == 0:
                continue
            b = best[k]
            floor = plain["step"] + b.get(main, 0.0) - plain[main] + b.get("  MTP pass (C++)", 0.0)
            bounds[str(k)] = {"measured": b["tokens per step"] * plain["step"] / b["step"],
                              "bound": b["tokens per step"] * plain["step"] / floor}
            print(f"  {k} draft(s): {bounds[str(k)]['measured']:.2f}x measured, {bounds[str(k)]['bound']:.2f}x bound")
    print(json.dumps({"temperature": a.temperature, "threads": a.threads, "us_per_step": {str(k): best[k] for k in ks},
                      "speedup": bounds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
