#!/usr/bin/env python3
"""Where the C++ decoder blocks spend a decode step, section by section, plain vs MTP speculative decoding.

Builds a profiling variant of the CPU kernels (namespace dsv3_cpu_timing, -DDSV3_TIMING: block_forward times its
sections) and decodes held-out prompts greedily with speculation off and on. Prints microseconds per step summed
over the blocks a step runs (the main model's, plus the MTP block when speculating) and a JSON line.

  python benchmarks/cpu_sections.py [--model PATH] [--prompts 8] [--max-tokens 96] [--threads 2] [--modes off,mtp]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys

import torch

from speculative import held_out_prompts

SECTIONS = ["norm+qkv", "latents", "q", "attention", "o_proj+add", "norm", "ffn", "add"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--modes", default="off,mtp", help="off (plain decoding), mtp (speculative), or both")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from dsv3.kernels import cpu_ext

    reason = cpu_ext.unsupported_reason()
    if reason:
        print(f"the C++ CPU kernels cannot run here: {reason}", file=sys.stderr)
        return 2
    timing = cpu_ext.build("dsv3_cpu_timing", ("-DDSV3_TIMING",))
    cpu_ext.load = lambda: timing  # the engine packs its model for the profiling build
    from dsv3.engine.llm import LLM
    from dsv3.engine.sampling import SamplingParams

    prompts = held_out_prompts(a.prompts)
    result = {"threads": a.threads, "modes": {}}
    modes = a.modes.split(",")
    for mode in modes:
        llm = LLM(a.model, speculative=mode, num_draft_tokens=1, dtype="bfloat16", progress=False,
                  enable_prefix_caching=False)
        gc.collect()
        eng, total, steps = llm.engine, [0.0] * len(SECTIONS), 0
        for p in prompts:
            eng.add_request(p, SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True))
            eng.step()  # the prompt (not a decode step)
            timing.section_times()
            while eng.has_unfinished():
                eng.step()
                steps += 1
            total = [t + s for t, s in zip(total, timing.section_times())]
        result["modes"][mode] = {"steps": steps, "us_per_step": {n: t / steps * 1e6 for n, t in zip(SECTIONS, total)}}
        result["model"] = llm.path
    print(f"model {result['model']} (bf16, {a.threads} threads): microseconds per decode step in the blocks")
    per = [result["modes"][m]["us_per_step"] for m in modes]
    print(f"{'section':<12} " + " ".join(f"{'plain' if m == 'off' else m:>8}" for m in modes))
    for n in SECTIONS:
        print(f"{n:<12} " + " ".join(f"{u[n]:>8.1f}" for u in per))
    print(f"{'sum':<12} " + " ".join(f"{sum(u.values()):>8.1f}" for u in per))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
