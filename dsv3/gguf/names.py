"""GGUF tensor names (llama.cpp's `deepseek2` architecture, gguf.constants MODEL_TENSOR) -> dsv3's parameter names.

GGUF stores routed experts stacked [E, rows, cols], as dsv3 holds them, so every tensor maps to one parameter, except
the attention's kv_b, which current converters write split for llama.cpp's absorbed MLA: attn_k_b [H, C, nope]
(transposed per head) and attn_v_b [H, v, C]; dsv3 rebuilds kv_b_proj [H * (nope + v), C] from the two
(compose_kv_b). The MTP layers (blk.<n_layers + k>.nextn.*) hold copies of the embedding and head in some files;
dsv3's MTP modules share the main ones, so those copies are not read.
"""
from __future__ import annotations

import re

import torch

TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}
BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj.weight",
    "ffn_up_exps.weight": "mlp.experts.up_proj.weight",
    "ffn_down_exps.weight": "mlp.experts.down_proj.weight",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
}
MTP = {"nextn.eh_proj.weight": "eh_proj.weight", "nextn.enorm.weight": "enorm.weight",
       "nextn.hnorm.weight": "hnorm.weight", "nextn.shared_head_norm.weight": "shared_head.norm.weight"}
MTP_SHARED = ("nextn.embed_tokens.weight", "nextn.shared_head_head.weight")  # dsv3 shares the main ones
SPLIT_KV_B = ("attn_k_b.weight", "attn_v_b.weight")
IGNORED = ("rope_freqs.weight",)  # llama.cpp's precomputed rotary factors; dsv3 computes its own from the metadata
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def model_name(name: str, n_layers: int) -> str | None:
    """The dsv3 parameter a GGUF tensor fills; None for tensors not read (MTP copies, split kv_b halves, ignored);
    KeyError for a name this architecture does not have."""
    if name in TOP:
        return TOP[name]
    if name in IGNORED:
        return None
    m = _BLK.match(name)
    if not m:
        raise KeyError(name)
    layer, rest = int(m[1]), m[2]
    if rest in SPLIT_KV_B or rest in MTP_SHARED:
        return None
    if rest in MTP:
        if layer < n_layers:
            raise KeyError(name)
        return f"model.layers.{layer}.{MTP[rest]}"
    if rest in BLOCK:
        return f"model.layers.{layer}.{BLOCK[rest]}"
    raise KeyError(name)


def layer_of(name: str) -> int | None:
    m = _BLK.match(name)
    return int(m[1]) if m else None


def compose_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """attn_k_b [H, C, nope] and attn_v_b [H, v, C] -> kv_b_proj [H * (nope + v), C] (per head: nope rows, then v)."""
    h, c, nope = k_b.shape
    return torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(h * (nope + v_b.shape[1]), c)
