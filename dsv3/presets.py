"""config.json values of the published members of the family (architecture fields only), for `dsv3 plan` and tests.

Sources: each model's config.json as published on its Hugging Face model page (values copied as facts).
"""
from __future__ import annotations

from .config import ModelConfig

_FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}

DEEPSEEK_V3 = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=129280, hidden_size=7168,
    intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=3,
    num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1,
    num_experts_per_tok=8, n_group=8, topk_group=4, topk_method="noaux_tc", scoring_func="sigmoid",
    norm_topk_prob=True, routed_scaling_factor=2.5, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, rms_norm_eps=1e-6, rope_theta=10000,
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    max_position_embeddings=163840, num_nextn_predict_layers=1, tie_word_embeddings=False, bos_token_id=0,
    eos_token_id=1, quantization_config=_FP8, torch_dtype="bfloat16",
)

KIMI_K2 = dict(
    DEEPSEEK_V3, model_type="kimi_k2", vocab_size=163840, first_k_dense_replace=1, num_attention_heads=64,
    num_key_value_heads=64, n_routed_experts=384, n_group=1, topk_group=1, routed_scaling_factor=2.827,
    rope_theta=50000.0,
    rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
                  "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    max_position_embeddings=131072, num_nextn_predict_layers=0, bos_token_id=163584, eos_token_id=163585,
)

MOONLIGHT = dict(
    DEEPSEEK_V3, vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
    num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
    routed_scaling_factor=2.446, q_lora_rank=None, rope_theta=50000.0, rope_scaling=None,
    max_position_embeddings=8192, num_nextn_predict_layers=0, bos_token_id=163584, eos_token_id=163585,
    quantization_config=None,
)

DEEPSEEK_V2_LITE = dict(
    model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=102400, hidden_size=2048,
    intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1,
    num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
    n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
    routed_scaling_factor=1.0, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, rms_norm_eps=1e-6, rope_theta=10000,
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    max_position_embeddings=163840, tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001,
    torch_dtype="bfloat16",
)

DEEPSEEK_V2 = dict(
    DEEPSEEK_V2_LITE, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=60,
    num_attention_heads=128, num_key_value_heads=128, n_routed_experts=160, n_group=8, topk_group=3,
    topk_method="group_limited_greedy", routed_scaling_factor=16.0, q_lora_rank=1536,
)

PRESETS: dict[str, dict] = {
    "deepseek-v3": DEEPSEEK_V3,
    "deepseek-v3-0324": DEEPSEEK_V3,
    "deepseek-r1": DEEPSEEK_V3,
    "deepseek-v3.1": DEEPSEEK_V3,
    "kimi-k2": KIMI_K2,
    "moonlight-16b-a3b": MOONLIGHT,
    "deepseek-v2": DEEPSEEK_V2,
    "deepseek-v2-lite": DEEPSEEK_V2_LITE,
}


def preset(name: str) -> ModelConfig:
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)} or pass a checkpoint "
                         f"directory / config.json")
    return ModelConfig.from_dict(dict(PRESETS[key]), source=f"preset {key}")
