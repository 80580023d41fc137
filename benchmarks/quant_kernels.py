#!/usr/bin/env python3
"""The C++ kernels' products one by one: bf16 packed vs int8 vs int4 blobs (and, with --formats, int6k: GGUF's Q6_K),
per call and in GB/s of weight bytes.

Each case is a matrix shape of a bench model (hf_anchor.py's bench-small / bench-medium: routed experts' gate+up and
down, attention's q_b and o_proj, the head) against T input rows (1 = decode, 16 = 16 concurrent sequences, 512 =
prefill). So that the weights stream from memory as in a decode step rather than sit in cache, every call takes the
next of enough distinct copies of the matrix to fill --pool-mb. Reports the median of --reps timed passes.

  python benchmarks/quant_kernels.py [--shape bench-medium] [--tokens 1,16,512] [--formats bf16,int8,int4,int6k]
                                    [--threads 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def cases(shape: dict) -> dict[str, tuple[int, int]]:
    h, inter = shape["hidden_size"], shape["moe_intermediate_size"]
    heads, qk = shape["num_attention_heads"], shape["qk_nope_head_dim"] + shape["qk_rope_head_dim"]
    return {"expert gate+up": (2 * inter, h), "expert down": (h, inter), "q_b": (heads * qk, shape["q_lora_rank"]),
            "o_proj": (h, heads * shape["v_head_dim"]), "head": (4096, h)}


def blobs(ops, rows: int, cols: int, fmt: str, count: int) -> list[torch.Tensor]:
    from dsv3.kernels import quant, quant_cpu

    out = []
    for i in range(count):
        w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(i)) * 0.02
        if fmt == "bf16":
            out.append(ops.pack(w.to(torch.bfloat16).contiguous()))
        elif fmt == "int6k":  # GGUF's Q6_K: codes in [-32, 31], float16 d per 256 x int8 sc per 16 (kind int6k)
            if cols % 256:
                return []  # Q6_K's super-blocks need inputs in multiples of 256: no such case
            g = torch.Generator().manual_seed(i)
            d = (torch.rand(rows, cols // 256, generator=g) * 1e-3 + 1e-4).to(torch.float16).float()
            sc = torch.randint(-127, 128, (rows, cols // 16), generator=g).float()
            sc[:, ::16] = -128  # llama.cpp's d: the super-block's largest scale over -128
            codes = torch.randint(-32, 32, (rows, cols), dtype=torch.int8, generator=g)
            out.append(quant_cpu.pack_int8x(codes, (d.repeat_interleave(16, -1) * sc).contiguous(),
                                            torch.zeros(rows, cols // 32)))
        else:
            s = quant.scheme(fmt)
            out.append(quant_cpu.pack(*quant.quantize(w, s), s))
    return out


def time_case(ops, mats: list[torch.Tensor], x: torch.Tensor, rows: int, reps: int) -> float:
    """Median seconds per call over `reps` passes through the pool."""
    for m in mats:  # warm-up (and the first-call quantisation buffers)
        ops.linear(x, m, rows)
    per_call = []
    for _ in range(reps):
        t = time.perf_counter()
        for m in mats:
            ops.linear(x, m, rows)
        per_call.append((time.perf_counter() - t) / len(mats))
    return statistics.median(per_call)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="bench-medium")
    ap.add_argument("--tokens", default="1,16,512")
    ap.add_argument("--formats", default="bf16,int8,int4")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--pool-mb", type=float, default=96.0, help="bytes of distinct bf16 copies per case")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "bench"))
    from hf_anchor import SHAPES

    from dsv3.kernels import cpu_ext

    ops = cpu_ext.load()
    if ops is None:
        raise SystemExit(f"the C++ CPU kernels are not available here: {cpu_ext.status()}")
    fmts = a.formats.split(",")
    results = []
    print(f"{a.shape}, {a.threads} threads, {cpu_ext.status()}")
    print(f"{'case':<16} {'[R, D]':>12} {'T':>4} " + " ".join(f"{f + ' us':>10} {f + ' GB/s':>10}" for f in fmts))
    for name, (rows, cols) in cases(SHAPES[a.shape]).items():
        count = max(2, int(a.pool_mb * 2**20 / (rows * cols * 2)))
        pools = {f: blobs(ops, rows, cols, f, count) for f in fmts}
        for t in (int(v) for v in a.tokens.split(",")):
            x = torch.randn(t, cols).to(torch.bfloat16)
            row = {"case": name, "rows": rows, "cols": cols, "tokens": t}
            for f in fmts:
                if not pools[f]:
                    row[f] = {"us": float("nan"), "weight_gb_s": float("nan")}
                    continue
                sec = time_case(ops, pools[f], x, rows, a.reps if t < 64 else max(1, a.reps // 2))
                nbytes = pools[f][0].numel() * pools[f][0].element_size()
                row[f] = {"us": sec * 1e6, "weight_gb_s": nbytes / sec / 1e9}
            results.append(row)
            print(f"{name:<16} {str([rows, cols]):>12} {t:>4} " +
                  " ".join(f"{row[f]['us']:>10.1f} {row[f]['weight_gb_s']:>10.1f}" for f in fmts), flush=True)
    print(json.dumps({"shape": a.shape, "threads": a.threads, "kernels": cpu_ext.status(), "results": results}))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
