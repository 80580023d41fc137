#!/usr/bin/env python3
"""MTP speculative decoding vs plain decoding on the same model, in the same run.

For batch 1 and batch 8 (default), greedy decoding of held-out prompts with speculation off and on: tokens/s,
speedup, draft acceptance rate and tokens per verification step. Greedy outputs are checked to be identical.
Default model: the embedded one (trained with an MTP module, see docs/training.md).

  python benchmarks/speculative.py [--model PATH] [--batch-sizes 1,8] [--max-tokens 96] [--draft 1,2] [--device cuda]
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import sys
import sysconfig
import time

import torch


def held_out_prompts(n: int, chars: int = 300) -> list[str]:
    """Openings of standard-library files from the end of the sorted list (the training split keeps those out
    when it holds out the last files; the point here is only that prompts are real code)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[::-1]
    out = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            text = fh.read(chars * 4)
        body = text[len(text) // 4:][:chars] if len(text) > chars * 2 else text[:chars]
        if len(body) >= chars // 2:
            out.append(body)
        if len(out) == n:
            break
    return out


def run(llm, prompts, max_tokens: int, bs: int) -> tuple[float, list[list[int]]]:
    from dsv3.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tokens, total, elapsed = [], 0, 0.0
    for i in range(0, len(prompts), bs):
        t = time.perf_counter()
        outs = llm.generate(prompts[i:i + bs], params)
        elapsed += time.perf_counter() - t
        tokens += [o.token_ids for o in outs]
        total += sum(len(o.token_ids) for o in outs)
    return total / elapsed, tokens


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--draft", default="1", help="comma list of draft lengths to try")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu", help="cpu or cuda (issue 10's GPU target: >= 1.6x at batch 1)")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from dsv3.engine.llm import LLM

    prompts = held_out_prompts(a.prompts)
    common = dict(dtype=a.dtype, device=a.device, progress=False, max_num_seqs=64, num_blocks=4096,
                  enable_prefix_caching=False)
    plain = LLM(a.model, speculative="off", **common)
    gc.collect()
    gc.freeze()  # as the dsv3 commands do after loading (docs/engine.md)
    rows, result = [], {"model": plain.path, "dtype": a.dtype, "threads": a.threads, "runs": []}
    for bs in [int(b) for b in a.batch_sizes.split(",")]:
        run(plain, prompts[:bs], 8, bs)  # warm-up
        base_tps, base_tokens = run(plain, prompts, a.max_tokens, bs)
        for k in [int(d) for d in a.draft.split(",")]:
            spec = LLM(a.model, speculative="mtp", num_draft_tokens=k, **common)
            gc.collect()
            gc.freeze()
            run(spec, prompts[:bs], 8, bs)
            s0 = dict(spec.engine.stats)
            tps, tokens = run(spec, prompts, a.max_tokens, bs)
            d = spec.engine.stats["spec_drafted"] - s0["spec_drafted"]
            acc = spec.engine.stats["spec_accepted"] - s0["spec_accepted"]
            steps = spec.engine.stats["spec_verify_steps"] - s0["spec_verify_steps"]
            same = tokens == base_tokens
            r = {"batch": bs, "draft_tokens": k, "plain_tokens_per_s": base_tps, "spec_tokens_per_s": tps,
                 "speedup": tps / base_tps, "acceptance": acc / d if d else None,
                 "tokens_per_step": (acc + steps) / steps if steps else None, "identical_greedy_output": same}
            result["runs"].append(r)
            rows.append(r)
    where = f"{a.threads} threads" if a.device == "cpu" else torch.cuda.get_device_name()
    print(f"model {result['model']} ({a.dtype}, {where}, {len(prompts)} prompts x {a.max_tokens} tokens)")
    print(f"{'batch':>5} {'k':>3} {'plain tok/s':>12} {'mtp tok/s':>10} {'speedup':>8} {'accept':>7} "
          f"{'tok/step':>8} {'same':>5}")
    for r in rows:
        print(f"{r['batch']:>5} {r['draft_tokens']:>3} {r['plain_tokens_per_s']:>12.1f} {r['spec_tokens_per_s']:>10.1f} "
              f"{r['speedup']:>7.2f}x {r['acceptance'] or 0:>7.1%} {r['tokens_per_step'] or 0:>8.2f} "
              f"{str(r['identical_greedy_output']):>5}")
    print(json.dumps(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if all(r["identical_greedy_output"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
