#!/usr/bin/env python3
"""MTP speculative decoding vs plain decoding on the same model, in the same run.

For batch 1 and batch 8 (default), decoding of held-out prompts with speculation off and on: tokens/s end to end
(prompt included) and in the decode phase alone (after each request's first token: what speculation changes),
speedups, draft acceptance rate and tokens per verification step. Greedy outputs are checked to be identical;
--temperature adds seeded sampled runs (their outputs differ from plain decoding's draw by draw, not in
distribution, which tests/test_speculative.py checks). Plain and speculative decoding alternate batch by batch
(each batch of prompts goes through every engine in turn, the first engine rotating), for --repeats rounds over
all prompts; speedups are medians of the per-round ratios, so a drift of the machine's speed hits both sides alike.
Default model: the embedded one (trained with an MTP module, see docs/training.md).

  python benchmarks/speculative.py [--model PATH] [--batch-sizes 1,8] [--max-tokens 96] [--draft 1,2] [--repeats 3]
                                   [--temperature 0.8] [--device cuda [--eager]] [--speculative-max-batch N]
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import statistics
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


def run_batch(llm, prompts, max_tokens: int, seed0: int, temperature: float = 0.0) -> dict:
    """Generate for one batch of prompts: its tokens, time, and the decode phase's tokens and time."""
    from dsv3.engine.sampling import SamplingParams

    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True, seed=seed0 + j)
              for j in range(len(prompts))]
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t
    # The decode phase of a batch: from its last first token to its end (every sequence decoding).
    first = max(o.metrics["arrival_time"] + o.metrics["time_to_first_token"] for o in outs)
    end = max(o.metrics["arrival_time"] + o.metrics["elapsed"] for o in outs)
    return {"tokens": sum(len(o.token_ids) for o in outs), "time": elapsed,
            "decode_tokens": sum(len(o.token_ids) - 1 for o in outs), "decode_time": end - first,
            "ids": [o.token_ids for o in outs]}


def run_round(engines: dict, prompts, max_tokens: int, bs: int, temperature: float, shift: int) -> dict:
    """All prompts, bs at a time, every engine on each batch in turn before the next batch (the starting engine
    rotates), so a drift of the machine's speed hits every engine alike. Per engine: tokens/s end to end and in
    the decode phase, the token ids."""
    keys = list(engines)
    acc = {k: {"tokens": 0, "time": 0.0, "decode_tokens": 0, "decode_time": 0.0, "ids": []} for k in keys}
    for n, i in enumerate(range(0, len(prompts), bs)):
        for j in range(len(keys)):
            k = keys[(j + n + shift) % len(keys)]
            r = run_batch(engines[k], prompts[i:i + bs], max_tokens, i, temperature)
            for f in ("tokens", "time", "decode_tokens", "decode_time"):
                acc[k][f] += r[f]
            acc[k]["ids"] += r["ids"]
    return {k: {"tps": v["tokens"] / v["time"], "decode_tps": v["decode_tokens"] / v["decode_time"],
                "tokens": v["ids"]} for k, v in acc.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--draft", default="1", help="comma list of draft lengths to try")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="alternating plain/speculative rounds (median ratio)")
    ap.add_argument("--temperature", type=float, default=None, help="also measure seeded sampling at this temperature")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu", help="cpu or cuda (issue 10's GPU target: >= 1.6x at batch 1)")
    ap.add_argument("--speculative-max-batch", type=int, default=0,
                    help="the engines' drafting limit (default 0: draft at every batch size, to measure speculation "
                         "itself; -1: the device's default policy, what a user gets)")
    ap.add_argument("--eager", action="store_true",
                    help="on CUDA, run every step eagerly (default: decode and greedy one-draft speculative steps "
                         "replay CUDA graphs, engine/graphs.py)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    torch.set_num_threads(a.threads)
    from dsv3.engine.llm import LLM
    from dsv3.devices import parse_device

    try:
        parse_device(a.device)
    except ValueError as e:
        ap.error(str(e))

    prompts = held_out_prompts(a.prompts)
    common = dict(dtype=a.dtype, device=a.device, progress=False, max_num_seqs=64, num_blocks=4096,
                  enable_prefix_caching=False)
    drafts = [int(d) for d in a.draft.split(",")]
    engines = {0: LLM(a.model, speculative="off", **common)}
    for k in drafts:
        engines[k] = LLM(a.model, speculative="mtp", num_draft_tokens=k,
                         speculative_max_batch=a.speculative_max_batch, **common)
    if a.device == "cuda" and not a.eager:
        top = max(int(b) for b in a.batch_sizes.split(","))
        for llm in engines.values():
            llm.engine.runner.enable_decode_graphs(max_batch=top, max_model_len=llm.engine.max_model_len)
    gc.collect()
    gc.freeze()  # as the dsv3 commands do after loading (docs/engine.md)
    temps = [0.0] + ([a.temperature] if a.temperature else [])
    rows, result = [], {"model": engines[0].path, "dtype": a.dtype, "threads": a.threads, "repeats": a.repeats,
                        "speculative_max_batch": a.speculative_max_batch, "runs": []}
    for temp in temps:
        for bs in [int(b) for b in a.batch_sizes.split(",")]:
            for llm in engines.values():
                run_batch(llm, prompts[:bs], 8, 0, temp)  # warm-up
            fields = ("spec_drafted", "spec_accepted", "spec_verify_steps")
            s0 = {k: dict(llm.engine.stats) for k, llm in engines.items()}
            rounds = {k: [] for k in engines}
            for n in range(a.repeats):
                for k, r in run_round(engines, prompts, a.max_tokens, bs, temp, n).items():
                    rounds[k].append(r)
            base = rounds[0]
            for k in drafts:
                d, acc, steps = (engines[k].engine.stats[f] - s0[k][f] for f in fields)
                spec = rounds[k]
                r = {"temperature": temp, "batch": bs, "draft_tokens": k,
                     "plain_tokens_per_s": statistics.median(x["tps"] for x in base),
                     "spec_tokens_per_s": statistics.median(x["tps"] for x in spec),
                     "speedup": statistics.median(s["tps"] / b["tps"] for s, b in zip(spec, base)),
                     "speedup_rounds": [round(s["tps"] / b["tps"], 4) for s, b in zip(spec, base)],
                     "plain_decode_tokens_per_s": statistics.median(x["decode_tps"] for x in base),
                     "spec_decode_tokens_per_s": statistics.median(x["decode_tps"] for x in spec),
                     "decode_speedup": statistics.median(s["decode_tps"] / b["decode_tps"] for s, b in zip(spec, base)),
                     "acceptance": acc / d if d else None,
                     "tokens_per_step": (acc + steps) / steps if steps else None,
                     "identical_greedy_output": all(s["tokens"] == b["tokens"] for s, b in zip(spec, base))
                     if temp == 0.0 else None}
                result["runs"].append(r)
                rows.append(r)
    where = f"{a.threads} threads" if a.device == "cpu" else (torch.cuda.get_device_name() +
                                                              (", eager" if a.eager else ", CUDA graphs"))
    print(f"model {result['model']} ({a.dtype}, {where}, {len(prompts)} prompts x {a.max_tokens} tokens, "
          f"median of {a.repeats} rounds, engines alternating batch by batch)")
    print(f"{'temp':>4} {'batch':>5} {'k':>2} {'plain tok/s':>11} {'mtp tok/s':>9} {'speedup':>7} "
          f"{'decode: plain':>13} {'mtp':>7} {'speedup':>7} {'accept':>6} {'tok/step':>8} {'same':>5}")
    for r in rows:
        same = "n/a" if r["identical_greedy_output"] is None else str(r["identical_greedy_output"])
        print(f"{r['temperature']:>4.1f} {r['batch']:>5} {r['draft_tokens']:>2} {r['plain_tokens_per_s']:>11.1f} "
              f"{r['spec_tokens_per_s']:>9.1f} {r['speedup']:>6.2f}x {r['plain_decode_tokens_per_s']:>13.1f} "
              f"{r['spec_decode_tokens_per_s']:>7.1f} {r['decode_speedup']:>6.2f}x {r['acceptance'] or 0:>6.1%} "
              f"{r['tokens_per_step'] or 0:>8.2f} {same:>5}")
    print(json.dumps(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if all(r["identical_greedy_output"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
