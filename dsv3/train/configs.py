"""Small DeepSeek-V3-architecture configs for training on one machine, and how `--config` is resolved.

Every preset keeps the V3 structure (MLA with q_lora, YaRN rope, dense first layer(s), group-limited sigmoid routing
with the noaux_tc bias, a shared expert, MTP); only the sizes shrink. vocab_size is a request: training sets it to
the tokenizer's actual size.
"""
from __future__ import annotations

import os

from ..config import ModelConfig
from ..presets import PRESETS

_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32, "beta_slow": 1,
         "mscale": 1.0, "mscale_all_dim": 1.0}

_BASE = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], topk_method="noaux_tc", scoring_func="sigmoid",
    norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=_YARN,
    max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16",
)

TRAIN_PRESETS: dict[str, dict] = {
    # Unit tests: seconds per step on one thread.
    "train-tiny": dict(
        _BASE, vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, num_nextn_predict_layers=1),
    # The balancing experiment (benchmarks/balancing.py): many small experts so imbalance is visible.
    "train-bench": dict(
        _BASE, vocab_size=2048, hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=64, kv_lora_rank=32,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_nextn_predict_layers=1),
    # The embedded default model (dsv3/assets/default-model): ~10M parameters, < 20 MB in FP8.
    "train-small": dict(
        _BASE, vocab_size=4096, hidden_size=256, intermediate_size=1024, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, q_lora_rank=128,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_nextn_predict_layers=1),
    # The embedded default model from 2026-12-07 on: train-small's widths, 8 layers, so the MTP module is 1/9 of the
    # model's depth (train-small: 1/5), which bounds what speculation can gain on the CPU.
    "train-medium": dict(
        _BASE, vocab_size=4096, hidden_size=256, intermediate_size=1024, moe_intermediate_size=128,
        num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, q_lora_rank=128,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_nextn_predict_layers=1),
}


def resolve_model_config(spec: "str | dict | ModelConfig") -> ModelConfig:
    """A ModelConfig, a config dict, a config.json / checkpoint directory, or a preset name (training presets and
    the published family members) -> ModelConfig."""
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, dict):
        return ModelConfig.from_dict(spec, source="model config")
    if os.path.exists(spec):
        return ModelConfig.from_pretrained(spec)
    key = spec.lower()
    if key in TRAIN_PRESETS:
        return ModelConfig.from_dict(dict(TRAIN_PRESETS[key]), source=f"preset {key}")
    if key in PRESETS:
        cfg = dict(PRESETS[key])
        cfg.pop("quantization_config", None)  # training holds real-valued weights; FP8 is an export format
        return ModelConfig.from_dict(cfg, source=f"preset {key}")
    if spec.endswith(".json") or os.sep in spec:
        raise FileNotFoundError(f"model config {spec!r} does not exist")
    raise ValueError(f"unknown model config {spec!r}: pass a config.json, a checkpoint directory, or a preset name "
                     f"({', '.join(sorted(TRAIN_PRESETS) + sorted(PRESETS))})")
