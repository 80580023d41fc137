#!/usr/bin/env python3
"""Can a second thread hide a kernel call behind the engine's Python bookkeeping on this machine?

The question behind it: an MTP pass (~0.1 ms at batch 1) could run on a worker thread while the engine appends
tokens and schedules the next step, if handing work to a thread and back is cheap. This times, after each call a
two-thread parallel region (as a decode step's blocks leave the OpenMP pool): a kernel burst of about an MTP pass
(four products against a 4096 x 256 bf16 matrix, the LM head's shape) alone, a slice of Python work alone, both in
sequence, the burst handed to a waiting worker thread and back, and the burst on the worker overlapped with the
Python work. Medians in microseconds, at 2 and 1 torch threads. Needs the C++ CPU kernels (AVX-512).

  python benchmarks/handoff.py [--calls 300]
"""
from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import threading
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    a = ap.parse_args()
    from dsv3.kernels import cpu_ext

    ops = cpu_ext.load()
    if ops is None:
        print("handoff.py needs the C++ CPU kernels (an AVX-512 CPU and a compiler)", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    head = ops.pack(torch.randn(4096, 256, generator=g).bfloat16())
    x = torch.randn(1, 256, generator=g).bfloat16()
    wide = ops.pack(torch.randn(2048, 512, generator=g).bfloat16())
    rows = torch.randn(64, 512, generator=g).bfloat16()

    def kernel() -> None:
        for _ in range(4):
            ops.linear(x, head, 4096)

    def python_work() -> dict:
        d = {}
        for i in range(400):
            d[i] = [i, i + 1]
        return d

    todo: queue.SimpleQueue = queue.SimpleQueue()
    done: queue.SimpleQueue = queue.SimpleQueue()

    def worker() -> None:
        while (f := todo.get()) is not None:
            f()
            done.put(None)

    def handed() -> None:
        todo.put(kernel)
        done.get()

    def overlapped() -> None:
        todo.put(kernel)
        python_work()
        done.get()

    cases = {"kernel": kernel, "python": python_work, "in sequence": lambda: (kernel(), python_work()),
             "handed to a thread": handed, "overlapped": overlapped}

    def median_us(f) -> float:
        ts = []
        for _ in range(a.calls):
            ops.linear(rows, wide, 2048)  # a parallel region first, as a decode step's blocks
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e6

    th = threading.Thread(target=worker, daemon=True)
    th.start()
    result = {}
    for n in (2, 1):
        torch.set_num_threads(n)
        result[n] = {name: median_us(f) for name, f in cases.items()}
    todo.put(None)
    th.join()
    print(f"{'threads':>7} " + " ".join(f"{name:>18}" for name in cases) + "   (median microseconds)")
    for n, r in result.items():
        print(f"{n:>7} " + " ".join(f"{r[name]:>18.1f}" for name in cases))
    print(json.dumps({"calls": a.calls, "us": {str(n): r for n, r in result.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
