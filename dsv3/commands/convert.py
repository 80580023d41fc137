"""`dsv3 convert`: FP8 -> bf16 (or fp16/fp32) and bf16/fp32 -> the official FP8 block format, streaming on the CPU."""
from __future__ import annotations

from .. import convert


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between FP8 and bf16/fp16/fp32",
                       description="Convert a checkpoint directory, one tensor chunk at a time (memory stays small "
                                   "whatever the model size). DST is written under a temporary name and appears only "
                                   "when complete; SRC is never modified.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    a = kinds.add_parser("fp8-to-bf16", help="dequantise FP8 weights exactly; drops quantization_config so "
                                             "transformers and other tools load the result")
    a.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the result (default bfloat16; float32 keeps the dequantised values exact)")
    b = kinds.add_parser("to-fp8", help="quantise bf16/fp32 projections to float8_e4m3fn with 128x128 block scales")
    b.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "keep"],
                   help="dtype of the tensors that stay unquantised (default bfloat16, as published; keep: unchanged)")
    for q in (a, b):
        q.add_argument("src", help="source checkpoint directory (only read)")
        q.add_argument("dst", help="destination directory (created; must be empty unless --overwrite)")
        q.add_argument("--overwrite", action="store_true", help="replace a non-empty DST that holds a checkpoint")
        q.add_argument("--progress", action="store_true", default=None, help="always show the progress bar")
        q.set_defaults(func=run)


def run(args) -> int:
    try:
        if args.kind == "fp8-to-bf16":
            info = convert.fp8_to_dtype(args.src, args.dst, args.dtype, args.overwrite, args.progress)
        else:
            info = convert.to_fp8(args.src, args.dst, args.dtype, args.overwrite, args.progress)
    except OSError as e:  # disk full, permissions: DST is untouched, say so instead of a traceback
        raise RuntimeError(f"writing {args.dst} failed: {e}; it was left as it was") from e
    print(report(info))
    return 0


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return ""


def report(info: dict) -> str:
    lines = [f"wrote {info['path']} ({'FP8 -> ' + info['dtype'] if info['direction'] == 'dequantize' else 'FP8'})"]
    width = max(len(f["file"]) for f in info["files"])
    for f in info["files"]:
        lines.append(f"  {f['file']:<{width}}  {f['tensors']:>6} tensors  {human_bytes(f['bytes']):>10}")
    lines.append(f"  total: {len(info['files'])} files, {info['tensors']} tensors, {human_bytes(info['bytes'])}")
    lines.append(f"  {convert.INDEX_FILE}: rewritten; config.json: {info['config']}")
    if info["copied"]:
        lines.append(f"  copied: {', '.join(info['copied'])}")
    if info["skipped"]:
        lines.append(f"  not copied (not plain files): {', '.join(info['skipped'])}")
    return "\n".join(lines)
