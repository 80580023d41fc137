"""GGUF metadata (`deepseek2.*` keys, as llama.cpp's convert_hf_to_gguf.py writes them for DeepseekV2/V3, R1, V3.1,
Kimi-K2 and V2-Lite) -> ModelConfig, through the Hugging Face config.json fields ModelConfig already validates.

Where GGUF says less than config.json, the choices are llama.cpp's own reading of the same keys:
- MLA is written as MQA (head_count_kv 1); key_length_mla / value_length_mla hold the per-head dims. Files from
  before those keys existed have key_length = nope + rope, value_length = v.
- expert_gating_func (1 = softmax, 2 = sigmoid) absent: sigmoid when the file has the expert-bias tensor
  (exp_probs_b exists only in the V3 family, which scores with sigmoid; the converter leaves the key out when
  config.json does not spell scoring_func, as transformers' own DeepseekV3Config does), else softmax (llama.cpp's
  rule for old V2 files; llama.cpp applies it to the first case too, which mis-scores such V3 files).
- The routing rule: an expert-bias tensor (exp_probs_b) means noaux_tc (V3); else groups > 1 means
  group_limited_greedy (V2); else greedy (V2-Lite).
- YaRN: the converter stores 0.1 * mscale_all_dim as yarn_log_multiplier and no mscale; every published member has
  mscale == mscale_all_dim, which is what is assumed (it makes YaRN's cos/sin factor 1).
- block_count counts the MTP layers (nextn_predict_layers) after the main ones.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..config import ModelConfig
from .files import GGUFError, GGUFModel

ARCH = "deepseek2"
_GATING = {1: "softmax", 2: "sigmoid"}


def _f32(v: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07): the shortest one
    that rounds to the same float32, which is what a config.json would have said."""
    return float(str(np.float32(v)))


def gguf_config(g: GGUFModel) -> ModelConfig:
    """The ModelConfig of a GGUF model; a GGUFError naming the file and the key for anything missing or foreign."""
    meta = g.metadata
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise GGUFError(f"{g.path}: general.architecture is {arch!r}; dsv3 runs the DeepSeek-V3 family, which "
                        f"llama.cpp's converter writes as {ARCH!r} (DeepSeek-V2/V2-Lite/V3/R1/V3.1, Kimi-K2)")

    def key(name: str, default: Any = KeyError) -> Any:
        full = f"{ARCH}.{name}"
        if full in meta:
            return meta[full]
        if default is KeyError:
            raise GGUFError(f"{g.path}: metadata key {full!r} is missing; it is required to build the model (was the "
                            f"file written by llama.cpp's convert_hf_to_gguf.py?)")
        return default

    layers_all = int(key("block_count"))
    nextn = int(key("nextn_predict_layers", 0))
    rope_dim = int(key("rope.dimension_count"))
    if f"{ARCH}.attention.key_length_mla" in meta:
        nope = int(key("attention.key_length_mla")) - rope_dim
        v_dim = int(key("attention.value_length_mla"))
    else:
        nope = int(key("attention.key_length")) - rope_dim
        v_dim = int(key("attention.value_length"))
    vocab = key("vocab_size", None)
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise GGUFError(f"{g.path}: neither {ARCH}.vocab_size nor tokenizer.ggml.tokens is present, so the "
                            f"vocabulary size is unknown")
        vocab = len(tokens)
    n_experts = key("expert_count", None)
    has_bias = any(n.endswith(".exp_probs_b.bias") for n in g.tensors)
    gating = int(key("expert_gating_func", 2 if has_bias else 1))
    if gating not in _GATING:
        raise GGUFError(f"{g.path}: {ARCH}.expert_gating_func is {gating}; dsv3 supports 1 (softmax) and 2 (sigmoid)")
    groups = int(key("expert_group_count", 1) or 1)
    topk_method = "noaux_tc" if has_bias else ("group_limited_greedy" if groups > 1 else "greedy")
    raw: dict[str, Any] = dict(
        model_type="deepseek_v3" if gating == 2 else "deepseek_v2",
        vocab_size=int(vocab),
        hidden_size=int(key("embedding_length")),
        intermediate_size=int(key("feed_forward_length")),
        moe_intermediate_size=int(key("expert_feed_forward_length", 0) or key("feed_forward_length")),
        num_hidden_layers=layers_all - nextn,
        first_k_dense_replace=int(key("leading_dense_block_count", 0)) if n_experts else layers_all - nextn,
        num_attention_heads=int(key("attention.head_count")),
        num_key_value_heads=int(key("attention.head_count")),
        n_routed_experts=int(n_experts) if n_experts else None,
        n_shared_experts=int(key("expert_shared_count", 0)) or None,
        num_experts_per_tok=int(key("expert_used_count", 1)),
        n_group=groups,
        topk_group=int(key("expert_group_used_count", 1) or 1),
        topk_method=topk_method,
        scoring_func=_GATING[gating],
        norm_topk_prob=bool(key("expert_weights_norm", False)),
        routed_scaling_factor=_f32(key("expert_weights_scale", 1.0)),
        q_lora_rank=int(key("attention.q_lora_rank")) if f"{ARCH}.attention.q_lora_rank" in meta else None,
        kv_lora_rank=int(key("attention.kv_lora_rank")),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=v_dim,
        rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length")),
        num_nextn_predict_layers=nextn,
        tie_word_embeddings="output.weight" not in g.tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        hidden_act="silu",
    )
    if raw["q_lora_rank"] == 0:
        raw["q_lora_rank"] = None
    scaling = key("rope.scaling.type", "none")
    if scaling == "yarn":
        mscale = _f32(key("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1
        raw["rope_scaling"] = {
            "type": "yarn", "factor": _f32(key("rope.scaling.factor")),
            "original_max_position_embeddings": int(key("rope.scaling.original_context_length")),
            "beta_fast": _f32(key("rope.scaling.yarn_beta_fast", 32.0)),
            "beta_slow": _f32(key("rope.scaling.yarn_beta_slow", 1.0)),
            "mscale": mscale, "mscale_all_dim": mscale}
    elif scaling not in ("none", None):
        raise GGUFError(f"{g.path}: {ARCH}.rope.scaling.type is {scaling!r}; the DeepSeek family uses 'yarn' or none")
    try:
        return ModelConfig.from_dict(raw, source=f"{g.path} (GGUF metadata)")
    except ValueError as e:
        raise GGUFError(str(e)) from None
