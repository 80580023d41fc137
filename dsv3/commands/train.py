"""`dsv3 train`: train a DeepSeek-V3-architecture model with the paper's recipe (see docs/training.md).

Under torchrun every rank runs the same command; data parallelism is picked up from the environment."""
from __future__ import annotations

import json
import os

# Flag -> TrainConfig field, for flags whose name differs or whose value needs converting.
_FIELDS = ["steps", "batch_size", "grad_accum", "seq_len", "lr", "min_lr_ratio", "warmup", "weight_decay",
           "grad_clip", "balance", "gamma", "gamma_until", "alpha", "mtp_lambda", "mtp_lambda_late", "mtp_switch",
           "precision", "device", "seed", "threads", "eval_every", "eval_windows", "save_every", "keep_checkpoints",
           "tokenizer", "cache_dir", "holdout_percent", "stop_at", "init_from"]


def add_parser(sub) -> None:
    from ..train.balance import BALANCE_MODES
    from ..train.trainer import PRECISIONS

    p = sub.add_parser("train", help="train a model (aux-loss-free balancing, MTP) on text files or the stdlib",
                       description="Train a DeepSeek-V3-architecture model. Defaults follow the paper's recipe "
                                   "scaled down; flags left out keep the TrainConfig defaults (or, with --resume, "
                                   "the run's saved values).")
    p.add_argument("--config", help="model config: a config.json, a checkpoint directory or a preset name "
                                    "(train-tiny, train-bench, train-small, deepseek-v3, ...); default train-tiny")
    p.add_argument("--data", nargs="+", help="'stdlib' (the Python standard library's sources, the default), "
                                             "'code' (stdlib + permissively licensed installed packages), "
                                             "'site:NAME' (one installed distribution), 'heldout-packages', "
                                             "and/or text files, directories, glob patterns")
    p.add_argument("--list-sources", action="store_true",
                   help="list the installed distributions, their licenses and what --data code takes, and exit")
    p.add_argument("--tokenizer", help="tokenizer.json or checkpoint directory to use instead of training a BPE")
    p.add_argument("--out", help="run directory (checkpoints, logs, final model); default runs/train")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="windows per optimizer step, over all ranks and micro-batches")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step and rank")
    p.add_argument("--seq-len", type=int, help="tokens per window")
    p.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr-ratio", type=float, help="final lr / peak lr of the cosine decay")
    p.add_argument("--warmup", type=int, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float, help="global gradient-norm clip (0: off)")
    p.add_argument("--balance", choices=BALANCE_MODES, help="expert balancing: none, aux (auxiliary loss) or "
                                                           "aux-free (bias update + sequence-wise loss)")
    p.add_argument("--gamma", type=float, help="bias update speed (aux-free; paper 0.001)")
    p.add_argument("--gamma-until", type=float, help="fraction of training after which gamma is 0")
    p.add_argument("--alpha", type=float, help="balance-loss weight: sequence-wise with aux-free (default 1e-4), "
                                               "batch-wise with aux (default 1e-2); 0 disables")
    p.add_argument("--mtp-lambda", type=float, help="MTP loss weight early in training (paper 0.3)")
    p.add_argument("--mtp-lambda-late", type=float, help="MTP loss weight late in training (paper 0.1)")
    p.add_argument("--mtp-switch", type=float, help="fraction of training where lambda switches")
    p.add_argument("--precision", choices=PRECISIONS, help="bf16 autocast or fp32 (auto: bf16 on GPUs)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations (0: only at the end)")
    p.add_argument("--eval-windows", type=int, help="held-out windows per evaluation")
    p.add_argument("--save-every", type=int, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, help="how many recent checkpoints to keep")
    p.add_argument("--cache-dir", help="where tokenizers and token streams are cached (default ~/.cache/dsv3/train)")
    p.add_argument("--holdout-percent", type=int, help="percent of files held out for evaluation")
    p.add_argument("--stop-at", type=int, help="stop after this step with a checkpoint (resume later)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue the run in --out from its newest checkpoint (or from CHECKPOINT)")
    p.add_argument("--init-from", metavar="CHECKPOINT", help="start from this model checkpoint's weights (bf16 or "
                   "FP8, e.g. a run's final/ or the embedded model) with a fresh optimizer and schedule; without "
                   "--config the model config is the checkpoint's")
    p.add_argument("--mtp-only", action="store_true", help="a draft stage after training (with --init-from): train "
                   "only the MTP module(s) on the frozen main model's own next-token distributions, which is what "
                   "speculative decoding accepts")
    p.add_argument("--csv", action="store_true", help="also write metrics.csv")
    p.add_argument("--no-plot", action="store_true", help="do not draw curves.png (needs matplotlib anyway)")
    p.add_argument("--export-fp8", action="store_true", help="write the final model in the official FP8 format")
    p.add_argument("--print-config", action="store_true", help="print the resolved TrainConfig and exit")
    p.set_defaults(func=run)


def build_config(args):
    from ..train.trainer import TrainConfig

    base: dict = {}
    if args.resume:
        out = args.out or TrainConfig.out
        saved = os.path.join(out, "train_config.json")
        if not os.path.exists(saved):
            raise FileNotFoundError(f"--resume: {saved} does not exist (is --out the run's directory?)")
        with open(saved, encoding="utf-8") as f:
            base = json.load(f)
        base = {k: v for k, v in base.items() if k in TrainConfig.__dataclass_fields__}
    for name in _FIELDS:
        v = getattr(args, name, None)
        if v is not None:
            base[name] = v
    if args.config is not None:
        base["model"] = args.config
    elif getattr(args, "init_from", None) and not args.resume:
        base["model"] = args.init_from
    if args.data is not None:
        base["data"] = args.data
    if args.out is not None:
        base["out"] = args.out
    if args.csv:
        base["log_csv"] = True
    if args.no_plot:
        base["plot"] = False
    if args.export_fp8:
        base["export_fp8"] = True
    if getattr(args, "mtp_only", False):
        base["mtp_only"] = True
    base["resume"] = args.resume if args.resume is not None else False
    if "betas" in base:
        base["betas"] = tuple(base["betas"])
    cfg = TrainConfig(**base)
    cfg.validate()
    return cfg


def run(args) -> int:
    import dataclasses

    from ..train import train

    if args.list_sources:
        from ..train.sources import format_sources_table, sources_table

        print(format_sources_table(sources_table()))
        return 0
    cfg = build_config(args)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
        return 0
    result = train(cfg)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return 0
    ev = result.get("eval") or {}
    if ev:
        print(f"step {result['step']}: held-out loss {ev['loss']:.4f} (unigram baseline "
              f"{result['unigram_baseline']:.4f}), bits/byte {ev['bpb']:.4f}, MTP top-1 "
              f"{', '.join(f'{a:.3f}' for a in ev['mtp_top1']) or '-'}, MaxVio {ev['maxvio_global']:.3f}")
    if result.get("final"):
        print(f"final model: {result['final']}")
    return 0
