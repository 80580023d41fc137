"""Test helpers: tiny configs of the family and the transformers reference models built from them."""
from __future__ import annotations

import copy

import torch

BASE_V3 = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=256, hidden_size=64,
    intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, first_k_dense_replace=1,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=2, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
    routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=12, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512, num_nextn_predict_layers=1,
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, hidden_act="silu", attention_bias=False,
    rope_scaling=None,
)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def v3(**kw) -> dict:
    c = copy.deepcopy(BASE_V3)
    c.update(kw)
    return c


def v2(**kw) -> dict:
    c = v3(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], scoring_func="softmax",
           topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, num_nextn_predict_layers=0)
    c.update(kw)
    return c


def hf_model(cfg: dict, seed: int = 0):
    """A transformers model for the config with random weights (non-trivial norms and routing bias)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    c = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    torch.manual_seed(seed)
    if cfg["model_type"] == "deepseek_v2":
        c.pop("num_nextn_predict_layers", None)
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**c))
    else:
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**c))
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() >= 2:
                p.normal_(0, 0.08)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    return model


def run_all(engine, prompts, params):
    """Drive an LLMEngine until every prompt finished; the final outputs in prompt order."""
    from dsv3.engine.request import run_to_completion

    return run_to_completion(engine, prompts, [params] * len(prompts))
