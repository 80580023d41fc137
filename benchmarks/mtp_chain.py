#!/usr/bin/env python3
"""Draft acceptance of a model with several MTP modules: DeepSeek's chain vs the recurrent convention.

With D >= 2 modules the engine drafts as the MTP objective trains them (module j at the last verified position on
module j-1's output, LLMEngine._draft_chain). Before, module j ran one position further each time, like a single
module run recurrently, over a cache layer written only at draft time; `--compare` runs that convention too (the
engine's chain turned off: module 1's pass as for one module, then `_draft_more`). Greedy decoding of held-out
prompts; prints acceptance and tokens per verification step for 1..k drafts, the conditional acceptance of each
further draft, and a JSON line. Acceptance only (no timing): the output is the same either way.

  python benchmarks/mtp_chain.py --model runs/d2/final [--drafts 2] [--prompts 16] [--max-tokens 96] [--compare]

A model to try: `dsv3 train --config CONFIG.json ...` with num_nextn_predict_layers 2 in the config (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import sys


from speculative import held_out_prompts


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--drafts", type=int, default=2, help="the most drafts per step to try (1..k)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compare", action="store_true", help="also run the recurrent convention for modules 2..D")
    a = ap.parse_args()
    if a.drafts < 1 or a.prompts < 1 or a.max_tokens < 1:
        ap.error("--drafts, --prompts and --max-tokens must be at least 1")
    from dsv3.engine.llm import LLM
    from dsv3.engine.sampling import SamplingParams

    prompts = held_out_prompts(a.prompts)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
    modes = [("chain", True)] + ([("recurrent", False)] if a.compare else [])
    result = {"model": a.model, "runs": []}
    outputs = {}
    for name, chain in modes:
        for k in range(1, a.drafts + 1):
            llm = LLM(a.model, speculative="mtp", num_draft_tokens=k, dtype=a.dtype, progress=False)
            n_mtp = len(llm.engine.model.mtp_layers)
            if n_mtp < 2:
                print(f"{a.model} has {n_mtp} MTP module(s): the chain needs 2 or more", file=sys.stderr)
                return 2
            if not chain:
                llm.engine.chain = 0
            outs = llm.generate(prompts, params)
            outputs.setdefault(k, []).append([o.token_ids for o in outs])
            s = llm.engine.spec_stats()
            result["runs"].append({"mode": name, "drafts": k, "acceptance": s["acceptance_rate"],
                                   "tokens_per_step": s["tokens_per_step"]})
    print(f"model {a.model} ({a.dtype}, {a.prompts} prompts x {a.max_tokens} tokens, greedy)")
    print(f"{'mode':10s} {'k':>2s} {'accept':>7s} {'tok/step':>8s} {'draft k accepted | k-1 accepted':>32s}")
    for name, _ in modes:
        # Drafts are accepted in order, so with k drafts E[accepted] = T_k - 1 = sum over j <= k of P(drafts 1..j
        # all kept): P(1..j kept) ~ T_j - T_{j-1} (T_0 = 1), and draft j's acceptance given 1..j-1 kept is the
        # ratio of consecutive ones (estimates: each k is its own run over the same prompts).
        tps = {0: 1.0, -1: 0.0}
        for r in [r for r in result["runs"] if r["mode"] == name]:
            k = r["drafts"]
            tps[k] = r["tokens_per_step"]
            r["conditional_acceptance"] = (tps[k] - tps[k - 1]) / max(1e-9, tps[k - 1] - tps[k - 2])
            print(f"{name:10s} {k:2d} {r['acceptance']:7.3f} {r['tokens_per_step']:8.3f} "
                  f"{r['conditional_acceptance']:32.3f}")
    result["identical_outputs"] = all(all(o == outs[0] for o in outs) for outs in outputs.values())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
