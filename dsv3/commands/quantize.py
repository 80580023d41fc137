"""`dsv3 quantize SRC DST --to int8|int4`: an int8/int4 copy of a checkpoint that loads without re-quantising."""
from __future__ import annotations

from .. import convert
from .convert import human_bytes


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="write an int8/int4 weight-only quantised copy of a checkpoint",
                       description="Quantise a checkpoint's projections (attention, dense and shared MLPs, routed "
                                   "experts; the output head to int8) in groups of 32 weights with float16 scales, "
                                   "one matrix at a time. The result is safetensors with the method in config.json's "
                                   "quantization_config; dsv3 loads it with no flag. DST is written under a "
                                   "temporary name and appears only when complete; SRC is never modified.")
    p.add_argument("src", help="source checkpoint directory: bf16, fp32 or the official FP8 format (only read)")
    p.add_argument("dst", help="destination directory (created; must be empty unless --overwrite)")
    p.add_argument("--to", required=True, choices=["int8", "int4"], help="the weight format")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the tensors that stay unquantised (embeddings, norms; default bfloat16)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST that holds a checkpoint")
    p.add_argument("--progress", action="store_true", default=None, help="always show the progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        info = convert.quantize_checkpoint(args.src, args.dst, args.to, args.dtype, args.overwrite, args.progress)
    except OSError as e:  # disk full, permissions: DST is untouched, say so instead of a traceback
        raise RuntimeError(f"writing {args.dst} failed: {e}; it was left as it was") from e
    q = info["quantization"]
    print(f"wrote {info['path']} (int{q['bits']}, groups of {q['group_size']}, lm_head "
          f"{'int%d' % q['lm_head_bits'] if q['lm_head_bits'] else 'unquantised'}): {info['files']} files, "
          f"{info['tensors']} tensors, {human_bytes(info['bytes'])}")
    if info["copied"]:
        print(f"  copied: {', '.join(info['copied'])}")
    return 0
