"""`dsv3 info`: a checkpoint's architecture and parameter counts (the embedded default model without --model)."""
from __future__ import annotations

import json

from ..assets import resolve_model
from ..config import ModelConfig


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="summarise a checkpoint's architecture and size")
    p.add_argument("--model", help="checkpoint directory, config.json or GGUF file (default: the embedded model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def summary(cfg: ModelConfig) -> dict:
    counts = cfg.param_counts()
    return {
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "dense_layers": cfg.layer_kinds.count("dense"),
        "moe_layers": cfg.layer_kinds.count("moe"),
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "routed_experts": cfg.n_routed_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "shared_experts": cfg.n_shared_experts,
        "routing": f"{cfg.scoring_func}/{cfg.topk_method} groups {cfg.n_group} keep {cfg.topk_group}",
        "vocab_size": cfg.vocab_size,
        "rope": "yarn x%g" % cfg.rope.factor if cfg.rope.is_yarn else "default",
        "softmax_scale": cfg.softmax_scale,
        "mtp_modules": cfg.num_nextn_predict_layers,
        "fp8": cfg.is_fp8,
        "quantization": _quantization(cfg),
        "params_main": counts["main"],
        "params_active_per_token": counts["active_per_token"],
        "params_mtp_unique": counts["mtp_unique"],
        "kv_cache_bytes_per_token_bf16": cfg.kv_cache_bytes_per_token(2),
    }


def _quantization(cfg: ModelConfig) -> str:
    q = cfg.quantization_config
    if q is None:
        return "none"
    if cfg.is_fp8:
        return f"fp8 {q.get('fmt', 'e4m3')}, {'x'.join(map(str, q.get('weight_block_size', [128, 128])))} blocks"
    head = q.get("lm_head_bits")
    return (f"{q['quant_method']}: int{q['bits']} weights, groups of {q['group_size']} with float16 scales, lm_head "
            f"{'int%d' % head if head else 'unquantised'}")


def run(args) -> int:
    from ..gguf.files import is_gguf_path

    path = resolve_model(args.model)
    if is_gguf_path(path):
        from ..gguf import gguf_config, read_gguf

        g = read_gguf(path)
        cfg = gguf_config(g)
        s = summary(cfg)
        s["quantization"] = f"GGUF {g.describe_types()}"
        s["gguf_files"] = len(g.files)
        s["gguf_bytes"] = g.total_bytes
    else:
        cfg = ModelConfig.from_pretrained(path)
        s = summary(cfg)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    width = max(map(len, s))
    for k, v in s.items():
        if k.startswith("params_"):
            v = f"{v / 1e9:.3f}B" if v >= 1e8 else f"{v / 1e6:.3f}M"
        print(f"{k:<{width}}  {v}")
    return 0
