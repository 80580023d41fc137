#!/usr/bin/env python3
"""Two builds of the C++ CPU kernels on one model, in one process, in alternating rounds: A/B ratios that survive
this VM's drift (its speed wanders by up to 1.6x between runs, more than most kernel changes are worth).

Each side is a source tree of dsv3/kernels/csrc - `worktree` (the files as they are now) or a git revision (`HEAD`,
a commit, a branch: its csrc/ taken with `git archive`) - plus optional compiler flags (e.g. -DSOME_SWITCH=0). Both
are built under their own op namespaces, the model is loaded and packed once per side, the sides' greedy tokens are
compared, then each round runs the same held-out prompts on both sides, taking turns per prompt (or per batch of
them) in the order A B, B A, ... Prints each side's median tokens/s,
the median of the per-round ratios A/B and their range, and a JSON line.

  python benchmarks/ab_kernels.py [--model PATH] [--a worktree] [--b HEAD] [--a-flags ...] [--b-flags ...]
                                  [--rounds 10] [--prompts 6] [--max-tokens 64] [--batch 1] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import torch

from speculative import held_out_prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = "dsv3/kernels/csrc"


def source_dir(spec: str, scratch: str) -> str:
    """The csrc/ directory of `spec`: the working tree's, or a git revision's extracted under scratch."""
    from dsv3.kernels import cpu_ext

    if spec == "worktree":
        return cpu_ext.SOURCE_DIR
    try:
        blob = subprocess.run(["git", "-C", REPO, "archive", spec, CSRC], check=True, capture_output=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"--a/--b {spec!r}: not a revision git can archive here ({e.stderr.decode().strip()})")
    dest = os.path.join(scratch, spec.replace("/", "_"))
    path = os.path.join(dest, "src.tar")
    os.makedirs(dest, exist_ok=True)
    with open(path, "wb") as f:
        f.write(blob)
    with tarfile.open(path) as t:
        t.extractall(dest, filter="data")
    return os.path.join(dest, CSRC)


def load_side(model: str | None, namespace: str, src: str, flags: str):
    import dsv3
    from dsv3.kernels import cpu_ext

    ops = cpu_ext.build(namespace, tuple(flags.split()), source_dir=src)
    with cpu_ext.override(ops):
        llm = dsv3.LLM(model) if model else dsv3.LLM()
    if not getattr(llm.model, "cpu_kernels", False):
        raise SystemExit(f"side {namespace}: the model did not pack for the C++ kernels (nothing to compare)")
    return llm


def one_round(sides: dict, prompts: list[str], params, batch: int, flip: bool) -> dict[str, float]:
    """Tokens per second of each side over the prompts, `batch` at a time, the sides taking turns per batch of
    prompts (A B, B A, ...: the drift of this VM is slower than one batch, so each pair runs in the same conditions)."""
    secs, toks = {k: 0.0 for k in sides}, {k: 0 for k in sides}
    for j, i in enumerate(range(0, len(prompts), batch)):
        order = list(sides) if (j % 2 == 0) != flip else list(sides)[::-1]
        for k in order:
            t = time.perf_counter()
            outs = sides[k].generate(prompts[i:i + batch], params)
            secs[k] += time.perf_counter() - t
            toks[k] += sum(len(o.token_ids) for o in outs)
    return {k: toks[k] / secs[k] for k in sides}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint or GGUF file (default: the embedded model)")
    ap.add_argument("--a", default="worktree", help="worktree, or a git revision")
    ap.add_argument("--b", default="HEAD")
    ap.add_argument("--a-flags", default="", help="extra compiler flags of side A, space-separated")
    ap.add_argument("--b-flags", default="")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="prompts decoded together (1: one at a time)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    if a.rounds < 2 or a.batch < 1 or a.prompts < 1:
        ap.error("--rounds must be >= 2, --batch and --prompts >= 1")
    torch.set_num_threads(a.threads)
    import dsv3

    with tempfile.TemporaryDirectory() as scratch:
        sides = {}
        for name, spec, flags in (("a", a.a, a.a_flags), ("b", a.b, a.b_flags)):
            sides[name] = load_side(a.model, f"dsv3_cpu_ab_{name}", source_dir(spec, scratch), flags)
    prompts = held_out_prompts(a.prompts)
    params = dsv3.SamplingParams(max_tokens=a.max_tokens, temperature=0.0)
    tokens = {k: [o.token_ids for o in llm.generate(prompts[:2], params)] for k, llm in sides.items()}
    rates: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(a.rounds):
        got = one_round(sides, prompts, params, a.batch, flip=r % 2 == 1)
        for k in rates:
            rates[k].append(got[k])
    ratios = [x / y for x, y in zip(rates["a"], rates["b"])]
    res = {"model": a.model or "embedded", "threads": a.threads, "batch": a.batch, "rounds": a.rounds,
           "a": {"source": a.a, "flags": a.a_flags, "tok_s": statistics.median(rates["a"])},
           "b": {"source": a.b, "flags": a.b_flags, "tok_s": statistics.median(rates["b"])},
           "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
           "same_greedy_tokens": tokens["a"] == tokens["b"]}
    print(f"{'side':<4} {'source':<12} {'flags':<24} {'tok/s (median)':>14}")
    for k in ("a", "b"):
        print(f"{k.upper():<4} {res[k]['source']:<12} {res[k]['flags'] or '-':<24} {res[k]['tok_s']:>14.0f}")
    print(f"A/B {res['ratio_median']:.3f} (rounds {res['ratio_min']:.3f}-{res['ratio_max']:.3f}, {a.rounds} "
          f"rounds, sides taking turns per batch of {a.batch}); same greedy tokens: {res['same_greedy_tokens']}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
