#!/usr/bin/env python3
"""The absorbed decode attention (ops.mla_decode) alone, two builds of the C++ CPU kernels side by side.

One query row (batch 1) over --layers layers' random kv_b_proj weights of a model shape's attention dims
(bench-medium's by default: 16 heads, latent 256, nope 64, rope 32, v 64), as bf16 and as dsv3's int4 codes, at
several context lengths; "hot" runs the layers back to back (their weights stay in cache), "cold" reads 64 MB
between passes so the weights stream from memory as in a real decode step. Each side (`worktree` or a git revision,
as in benchmarks/ab_kernels.py) is built under its own namespace; the sides' outputs must be identical. Prints the
median microseconds per layer of each side (the better of --rounds alternating rounds) and a JSON line.

  python benchmarks/mla_decode.py [--a worktree] [--b HEAD] [--contexts 1,33,150] [--layers 12] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from ab_kernels import source_dir

DIMS = {"bench-medium": (16, 64, 32, 64, 256), "bench-small": (8, 64, 32, 64, 128)}  # H, N, R, V, C


def time_layers(ops, weights, q, cache, L: int, V: int, cold: torch.Tensor | None,
                reps: int) -> tuple[float, torch.Tensor]:
    """Median us per layer of `reps` passes over the layers' (kv_b, scales) at context length L, and the output."""
    H = q.size(1)
    slots = torch.arange(L).view(1, L)
    tok, seq, lens = torch.tensor([0]), torch.tensor([0]), torch.tensor([L])
    out = torch.empty(1, H, V, dtype=torch.bfloat16)
    times = []
    for _ in range(reps):
        if cold is not None:
            cold.sum()
        t = time.perf_counter()
        for w, scales in weights:
            ops.mla_decode(q, cache, tok, seq, lens, slots, w, V, 0.1, out, scales)
        times.append((time.perf_counter() - t) / len(weights) * 1e6)
    return statistics.median(times), out.clone()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", default="worktree")
    ap.add_argument("--b", default="HEAD")
    ap.add_argument("--shape", default="bench-medium", choices=sorted(DIMS))
    ap.add_argument("--contexts", default="1,33,150")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from dsv3.kernels import cpu_ext, quant

    if cpu_ext.unsupported_reason():
        print(f"the C++ CPU kernels cannot run here: {cpu_ext.unsupported_reason()}", file=sys.stderr)
        return 2
    scratch = tempfile.mkdtemp(prefix="dsv3-mla-")
    sides = {"A": cpu_ext.build("dsv3_mla_a", (), source_dir(a.a, scratch)),
             "B": cpu_ext.build("dsv3_mla_b", (), source_dir(a.b, scratch))}
    H, N, R, V, C = DIMS[a.shape]
    torch.manual_seed(0)
    s = quant.scheme("int4")
    codes = [quant.quantize(torch.randn(H * (N + V), C) * 0.05, s) for _ in range(a.layers)]
    forms = {"bf16": [(quant.dequantize(c, sc, s, torch.bfloat16), None) for c, sc in codes],
             "int4": codes}
    q = torch.randn(1, H, N + R).to(torch.bfloat16)
    cache = (torch.randn(1024, C + R) * 0.5).to(torch.bfloat16)
    evict = torch.randn(16 << 20)  # 64 MB
    rows = []
    print(f"mla_decode, {a.shape} attention dims (H {H}, C {C}), {a.layers} layers, {a.threads} threads; "
          f"A = {a.a}, B = {a.b}; us per layer")
    print(f"{'weights':<6} {'cache':<5} {'context':>7} {'A':>8} {'B':>8} {'B/A':>6}")
    for state in ("hot", "cold"):
        for L in (int(x) for x in a.contexts.split(",")):
            for form, weights in forms.items():
                best = {"A": [], "B": []}
                outs = {}
                for r in range(a.rounds):
                    for side in (("A", "B") if r % 2 == 0 else ("B", "A")):
                        t, outs[side] = time_layers(sides[side], weights, q, cache, L, V,
                                                    evict if state == "cold" else None, a.reps)
                        best[side].append(t)
                if not torch.equal(outs["A"], outs["B"]):
                    print(f"the sides' outputs differ ({form}, context {L})", file=sys.stderr)
                    return 1
                ta, tb = min(best["A"]), min(best["B"])
                rows.append({"weights": form, "cache": state, "context": L, "A_us": ta, "B_us": tb})
                print(f"{form:<6} {state:<5} {L:>7} {ta:>8.1f} {tb:>8.1f} {tb / ta:>6.2f}", flush=True)
    print(json.dumps({"shape": a.shape, "threads": a.threads, "a": a.a, "b": a.b, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
