"""Run logs: one JSON line per step and per evaluation (metrics.jsonl), an optional CSV of the scalar columns, and a
PNG of the loss and balance curves when matplotlib is installed (an optional dependency)."""
from __future__ import annotations

import csv
import json
import logging
import os

log = logging.getLogger(__name__)

CSV_COLUMNS = ["step", "loss", "ce", "balance_loss", "lr", "gamma", "mtp_lambda", "grad_norm", "tokens_per_s",
               "maxvio", "mtp_ce_1", "eval_loss", "eval_bpb", "eval_mtp_top1", "eval_maxvio_global"]


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class RunLog:
    def __init__(self, out: str, enabled: bool = True, write_csv: bool = False, resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(out, "metrics.jsonl")
        self.csv_path = os.path.join(out, "metrics.csv") if write_csv else None
        self._f = self._csv = self._csv_f = None
        if not enabled:
            return
        if resume_step is not None and os.path.exists(self.path):
            # Drop what was logged after the checkpoint: those steps are about to be run again.
            keep = [r for r in read_jsonl(self.path) if r["step"] <= resume_step]
            with open(self.path, "w", encoding="utf-8") as f:
                for r in keep:
                    f.write(json.dumps(r) + "\n")
            mode = "a"
        else:
            mode = "w"
        self._f = open(self.path, mode, encoding="utf-8")
        if self.csv_path:
            rows = []
            if mode == "a" and os.path.exists(self.csv_path):
                with open(self.csv_path, encoding="utf-8") as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            self._csv_f = open(self.csv_path, "w", encoding="utf-8", newline="")
            self._csv = csv.DictWriter(self._csv_f, CSV_COLUMNS, extrasaction="ignore")
            self._csv.writeheader()
            self._csv.writerows(rows)

    def step(self, rec: dict) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._csv:
            row = dict(rec)
            if rec.get("mtp_ce"):
                row["mtp_ce_1"] = rec["mtp_ce"][0]
            self._csv.writerow(row)
            self._csv_f.flush()

    def eval(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps({"step": step, "eval": metrics}) + "\n")
        self._f.flush()
        if self._csv:
            self._csv.writerow({"step": step, "eval_loss": metrics["loss"], "eval_bpb": metrics["bpb"],
                                "eval_mtp_top1": (metrics["mtp_top1"] or [None])[0],
                                "eval_maxvio_global": metrics["maxvio_global"]})
            self._csv_f.flush()

    def close(self) -> None:
        for f in (self._f, self._csv_f):
            if f:
                f.close()
        self._f = self._csv_f = None

    def plot(self, png: str) -> str | None:
        return plot_runs({"run": self.path}, png)


def plot_runs(runs: dict[str, str], png: str, smooth: int = 10) -> str | None:
    """Train CE, held-out loss and MaxVio of one or more runs (label -> metrics.jsonl) in one PNG; None without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: skipping the plot %s", png)
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, path in runs.items():
        recs = read_jsonl(path)
        steps = [r for r in recs if "ce" in r]
        evals = [r for r in recs if "eval" in r]
        xs = [r["step"] for r in steps]

        def smoothed(v: list[float]) -> list[float]:
            return [sum(v[max(0, i - smooth + 1): i + 1]) / len(v[max(0, i - smooth + 1): i + 1])
                    for i in range(len(v))]

        axes[0].plot(xs, smoothed([r["ce"] for r in steps]), label=label)
        axes[1].plot([r["step"] for r in evals], [r["eval"]["loss"] for r in evals], marker="o", label=label)
        axes[2].plot(xs, smoothed([r["maxvio"] for r in steps]), label=label)
    for ax, title in zip(axes, ["train cross-entropy (smoothed)", "held-out loss", "MaxVio per batch (smoothed)"]):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
