"""`dsv3 plan`: does a model fit the hardware, in which layout, how fast (upper bounds) and at what cost."""
from __future__ import annotations

import json
import os

from ..config import ModelConfig
from ..hardware import resolve_hardware
from ..plan import CACHE_DTYPES, PRECISIONS, PlanRequest, plan, render
from ..presets import PRESETS, preset


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="memory, layout, speed bounds and cost of a model on given hardware")
    p.add_argument("--model", default="deepseek-v3",
                   help=f"preset name ({', '.join(sorted(PRESETS))}), checkpoint directory, config.json or GGUF file "
                        f"(default: deepseek-v3)")
    p.add_argument("--precision", help=f"weight precision: {', '.join(PRECISIONS)} (int8/int4: what --quantize loads, "
                                       f"8.5/4.5 bits per weight with the head int8; default: the checkpoint's own)")
    p.add_argument("--cache-dtype", default="bf16", help=f"KV cache dtype: {', '.join(CACHE_DTYPES)} (default bf16)")
    p.add_argument("--gpus", help="COUNTxNAME, e.g. 8xH200, 2xRTX4090, or 'none' (default: detected)")
    p.add_argument("--cpu-mem", help="CPU memory, e.g. 512GB (default: detected)")
    p.add_argument("--cpu-bandwidth", help="CPU memory bandwidth, e.g. 200GB/s (default: measured, a few 100 ms)")
    p.add_argument("--cpu-tflops", type=float, help="CPU matmul throughput in TFLOPS (default: measured)")
    p.add_argument("--context", type=int, default=8192, help="tokens per sequence (default 8192)")
    p.add_argument("--concurrency", type=int, default=1, help="sequences served at once (default 1)")
    mtp = p.add_mutually_exclusive_group()
    mtp.add_argument("--mtp", dest="mtp", action="store_true", default=None, help="count the MTP module")
    mtp.add_argument("--no-mtp", dest="mtp", action="store_false", help="leave the MTP module out")
    p.add_argument("--gpu-hour-price", type=float, help="price of one GPU-hour, for the cost comparison")
    p.add_argument("--api-price-per-mtok", type=float, help="hosted API price per million output tokens")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def resolve_config(arg: str) -> tuple[ModelConfig, bool]:
    """The config and whether it came from a preset (a checkpoint path wins over a preset of the same name)."""
    from ..gguf.files import is_gguf_path

    if is_gguf_path(arg) and os.path.exists(arg):
        return _gguf_plan_config(arg), False
    if os.path.exists(arg):
        return ModelConfig.from_pretrained(arg), False
    if arg.lower() in PRESETS:
        return preset(arg), True
    raise ValueError(f"--model {arg!r} is neither an existing checkpoint directory or config.json nor a preset; "
                     f"presets: {', '.join(sorted(PRESETS))}")


# The plan's byte model knows dsv3's own precisions; a GGUF file is planned as the nearest one (Q8_0: int8's 8.5 bits
# per weight exactly; Q4_0 and Q4_K: int4's 4.5; Q5_K, Q6_K: int8, an upper bound), declared as stored so the plan's
# command carries no --quantize (a GGUF file runs as stored).
_GGUF_PRECISION = {"Q8_0": 8, "Q6_K": 8, "Q5_K": 8, "Q4_0": 4, "Q4_K": 4}


def _gguf_plan_config(path: str) -> ModelConfig:
    from ..config import INT_QUANT_METHOD
    from ..gguf import gguf_config, read_gguf

    g = read_gguf(path)
    cfg = gguf_config(g)
    main = next((t for t in g.type_bytes() if t in _GGUF_PRECISION), None)
    if main is None:  # BF16 / F16 / F32 files: planned as bf16
        return cfg
    return cfg.with_overrides(quantization_config={"quant_method": INT_QUANT_METHOD, "bits": _GGUF_PRECISION[main],
                                                   "group_size": 32, "lm_head_bits": 8, "gguf": main})


def run(args) -> int:
    cfg, is_preset = resolve_config(args.model)
    # Check the cheap arguments before any hardware measurement runs.
    req = PlanRequest(precision=args.precision, cache_dtype=args.cache_dtype, context=args.context,
                      concurrency=args.concurrency, with_mtp=args.mtp, gpu_hour_price=args.gpu_hour_price,
                      api_price_per_mtok=args.api_price_per_mtok, model_arg=args.model)
    req.validate()
    hw = resolve_hardware(args.gpus, args.cpu_mem, args.cpu_bandwidth, args.cpu_tflops)
    report = plan(cfg, hw, req, model_name=args.model, is_preset=is_preset)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0
