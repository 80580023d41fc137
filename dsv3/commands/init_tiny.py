"""`dsv3 init-tiny DIR`: a small random-weight DeepSeek-V3 checkpoint in the exact official FP8 format."""
from __future__ import annotations

from .convert import human_bytes


def add_parser(sub) -> None:
    p = sub.add_parser("init-tiny", help="write a small random DeepSeek-V3 checkpoint in the official FP8 format",
                       description="Write a ~2.6 MB random-weight DeepSeek-V3 checkpoint (FP8 block-scaled weights, "
                                   "sharded index, MTP layer, group routing, YaRN, a BPE tokenizer with DeepSeek's "
                                   "special tokens and chat template). Deterministic for a given seed.")
    p.add_argument("dir", help="output directory (created; must be empty unless --overwrite)")
    p.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR that holds a checkpoint")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..tiny import write_tiny_checkpoint

    try:
        info = write_tiny_checkpoint(args.dir, seed=args.seed, overwrite=args.overwrite)
    except OSError as e:
        raise RuntimeError(f"writing {args.dir} failed: {e}; it was left as it was") from e
    print(f"wrote {info['path']}: tiny DeepSeek-V3 (seed {info['seed']}), {info['files']} shard files, "
          f"{info['tensors']} tensors, {human_bytes(info['bytes'])}; tokenizer of {info['tokenizer_vocab']} tokens")
    return 0
