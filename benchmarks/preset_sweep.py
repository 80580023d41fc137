#!/usr/bin/env python3
"""Which model shape learns most per CPU-hour: each candidate is trained from scratch by `dsv3 train` for the same
wall-clock budget, on the same data and tokenizer, with its cosine schedule fitted to that budget, then compared on
the training split's held-out loss at the end.

Candidates are the embedded model's shape (train-medium: 8 layers x 256) and variations inside the range issue 24
names (8-12 layers, hidden 256-384); `--candidates` picks some. A calibration run of --calib-steps steps measures each
candidate's tokens/s on this machine; its real run then gets steps = budget x tokens/s / tokens per step, so every
run ends annealed inside the budget rather than being cut off mid-schedule. Nothing else may run beside it (two
cores: a build or a test run halves a candidate's budget). Prints a table (parameters, steps, tokens, CPU-hours of the steps,
held-out nats/token and bits/byte, MTP top-1) and a JSON line; the run directories stay under --out.

  python benchmarks/preset_sweep.py [--minutes 20] [--candidates medium,deep12,wide320,wide384] [--data code]
                                    [--tokenizer dsv3/assets/default-model] [--threads 2] [--out runs/sweep]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Overrides of train-medium (dsv3/train/configs.py); head dims stay (32 + 16 per head, 32 values).
CANDIDATES: dict[str, dict] = {
    "medium": {},
    "deep12": dict(num_hidden_layers=12),
    "wide320": dict(hidden_size=320, intermediate_size=1280, moe_intermediate_size=160, q_lora_rank=160,
                    kv_lora_rank=80, num_attention_heads=5, num_key_value_heads=5),
    "wide384": dict(hidden_size=384, intermediate_size=1536, moe_intermediate_size=192, q_lora_rank=192,
                    kv_lora_rank=96, num_attention_heads=6, num_key_value_heads=6),
}
BATCH, SEQ = 16, 256


def write_config(name: str, out: str) -> tuple[str, dict]:
    from dsv3.train.configs import resolve_model_config

    cfg = resolve_model_config("train-medium").with_overrides(**CANDIDATES[name])
    path = os.path.join(out, f"{name}.config.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    return path, cfg.param_counts()


def train(config: str, out: str, steps: int, a, warmup: int, eval_windows: int) -> float:
    """Runs `dsv3 train`; returns its wall seconds."""
    cmd = [sys.executable, "-m", "dsv3", "train", "--config", config, "--data", *a.data, "--tokenizer", a.tokenizer,
           "--out", out, "--steps", str(steps), "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--lr", str(a.lr),
           "--warmup", str(warmup), "--threads", str(a.threads), "--seed", str(a.seed), "--eval-every", "0",
           "--eval-windows", str(eval_windows), "--save-every", "0", "--csv", "--no-plot"]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"dsv3 train failed for {config}:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t


def tokens_per_s(run: str, skip: int) -> float:
    """Median tokens/s of a run's steps after the first `skip` (start-up and allocator warm-up)."""
    with open(os.path.join(run, "metrics.csv"), encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("tokens_per_s")]
    rates = [float(r["tokens_per_s"]) for r in rows[skip:]] or [float(r["tokens_per_s"]) for r in rows]
    if not rates:
        raise SystemExit(f"{run}/metrics.csv has no tokens_per_s column: cannot calibrate")
    return statistics.median(rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget per candidate")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--data", nargs="+", default=["code"])
    ap.add_argument("--tokenizer", default=os.path.join(REPO, "dsv3", "assets", "default-model"))
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-steps", type=int, default=15)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "sweep"))
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args()
    names = [n.strip() for n in a.candidates.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or not names:
        ap.error(f"unknown candidate(s) {unknown}; choose from {', '.join(CANDIDATES)}")
    if a.minutes <= 0 or a.calib_steps < 3:
        ap.error("--minutes must be > 0 and --calib-steps >= 3")
    os.makedirs(a.out, exist_ok=True)
    results = []
    for name in names:
        config, params = write_config(name, a.out)
        calib = os.path.join(a.out, f"{name}-calibration")
        train(config, calib, a.calib_steps, a, warmup=1, eval_windows=2)
        rate = tokens_per_s(calib, skip=min(5, a.calib_steps - 2))
        steps = max(10, int(a.minutes * 60 * rate / (BATCH * SEQ)))
        run = os.path.join(a.out, name)
        wall = train(config, run, steps, a, warmup=max(10, steps // 40), eval_windows=a.eval_windows)
        with open(os.path.join(run, "result.json"), encoding="utf-8") as f:
            ev = json.load(f)["eval"]
        run_rate = tokens_per_s(run, skip=5)  # the steps' own rate (wall_s adds start-up and the final evaluation)
        row = {"candidate": name, "overrides": CANDIDATES[name], "params_total": params["main"] + params["mtp_unique"],
               "params_active": params["active_read_per_token"], "tokens_per_s": run_rate, "steps": steps,
               "tokens": steps * BATCH * SEQ, "wall_s": wall,
               "cpu_hours": steps * BATCH * SEQ / run_rate * a.threads / 3600,
               "heldout_loss": ev["loss"], "heldout_bpb": ev.get("bpb"), "mtp_top1": (ev.get("mtp_top1") or [None])[0]}
        results.append(row)
        print(f"{name}: {steps} steps, loss {ev['loss']:.3f}", flush=True)
    print(f"\n{'candidate':<10} {'params':>8} {'active':>8} {'tok/s':>7} {'steps':>6} {'tokens':>8} {'CPU-h':>6} "
          f"{'held-out':>9} {'bpb':>6} {'MTP top-1':>9}")
    for r in results:
        print(f"{r['candidate']:<10} {r['params_total'] / 1e6:>7.2f}M {r['params_active'] / 1e6:>7.2f}M "
              f"{r['tokens_per_s']:>7.0f} {r['steps']:>6} {r['tokens'] / 1e6:>7.2f}M {r['cpu_hours']:>6.2f} "
              f"{r['heldout_loss']:>9.3f} {r['heldout_bpb'] or float('nan'):>6.3f} {r['mtp_top1'] or float('nan'):>9.3f}")
    out = {"minutes": a.minutes, "threads": a.threads, "data": a.data, "lr": a.lr, "results": results}
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
