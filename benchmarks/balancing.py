"""The balancing experiment: one small DeepSeek-V3-architecture model, one data set, three ways to balance experts.

  (a) none      no balancing at all
  (b) aux       the classic batch-wise auxiliary loss alpha * sum_i f_i P_i (alpha 1e-2)
  (c) aux-free  DeepSeek-V3: bias update b_i += gamma * sign(mean - load_i) (gamma 1e-3) + the sequence-wise loss
                with alpha 1e-4
  (d) aux-free  the same with gamma 1e-2

Everything else (model init, data order, recipe) is identical. Reports held-out loss and MaxVio (per training batch
over training, and global on the held-out set) as a Markdown table, writes results.json and, with matplotlib, a PNG.

    python benchmarks/balancing.py --steps 300 --out runs/balancing
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dsv3.train import TrainConfig, train  # noqa: E402
from dsv3.train.runlog import plot_runs, read_jsonl  # noqa: E402

RUNS = [("a", "none", {}), ("b", "aux", {}), ("c", "aux-free", {}),
        # The paper's gamma is tuned for runs of many thousand steps; a faster bias shows what a short run allows.
        ("d", "aux-free", {"gamma": 1e-2})]


def summarize(out: str, steps: int) -> dict:
    recs = read_jsonl(os.path.join(out, "metrics.jsonl"))
    st = [r for r in recs if "ce" in r]
    ev = [r for r in recs if "eval" in r]
    last = ev[-1]["eval"]
    tail = st[-max(1, steps // 5):]
    return {
        "heldout_loss": last["loss"], "heldout_bpb": last["bpb"], "mtp_top1": last["mtp_top1"],
        "maxvio_batch_mean": sum(r["maxvio"] for r in st) / len(st),
        "maxvio_batch_last20pct": sum(r["maxvio"] for r in tail) / len(tail),
        "maxvio_global_heldout": last["maxvio_global"],
        "maxvio_global_layers": last["maxvio_global_layers"],
        "curve": [(r["step"], r["eval"]["loss"], r["eval"]["maxvio_global"]) for r in ev],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--config", default="train-bench")
    p.add_argument("--data", nargs="+", default=["stdlib"])
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/balancing")
    p.add_argument("--only", nargs="*", help="run only these of a b c")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    results = {}
    for tag, mode, extra in RUNS:
        if args.only and tag not in args.only:
            continue
        out = os.path.join(args.out, f"{tag}-{mode}")
        label = mode if tag != "d" else f"{mode} (gamma {extra['gamma']:g})"
        kw = dict(extra)
        cfg = TrainConfig(model=args.config, data=args.data, out=out, steps=args.steps, batch_size=args.batch_size,
                          seq_len=args.seq_len, lr=args.lr, warmup=max(1, args.steps // 20), balance=mode,
                          eval_every=max(1, args.steps // 6), eval_windows=args.eval_windows, save_every=0,
                          threads=args.threads, seed=0, plot=False, progress=False, **kw)
        t0 = time.time()
        train(cfg)
        results[tag] = dict(summarize(out, args.steps), mode=label, dir=out, alpha=cfg.resolved_alpha(),
                            gamma=cfg.gamma if mode == "aux-free" else 0.0, seconds=time.time() - t0)
        print(f"({tag}) {mode}: held-out loss {results[tag]['heldout_loss']:.4f}, MaxVio global "
              f"{results[tag]['maxvio_global_heldout']:.3f}, batch MaxVio mean {results[tag]['maxvio_batch_mean']:.3f}"
              f" ({results[tag]['seconds']:.0f} s)", flush=True)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)
        f.write("\n")
    png = plot_runs({f"({t}) {r['mode']}": os.path.join(r["dir"], "metrics.jsonl")
                     for t, r in results.items()}, os.path.join(args.out, "balancing.png"))
    print()
    print("| run | balancing | alpha | gamma | held-out loss | bits/byte | MaxVio batch (mean over training) "
          "| MaxVio batch (last 20%) | MaxVio global (held-out) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for t, r in results.items():
        print(f"| ({t}) | {r['mode']} | {r['alpha']:g} | {r['gamma']:g} | {r['heldout_loss']:.4f} | "
              f"{r['heldout_bpb']:.4f} | {r['maxvio_batch_mean']:.3f} | {r['maxvio_batch_last20pct']:.3f} | "
              f"{r['maxvio_global_heldout']:.3f} |")
    if png:
        print(f"\nplot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
