"""The planner's tensor inventory and byte model: every weight tensor a model of the family holds (Tensor,
model_tensors), its bytes at each precision (linear_bytes, tensor_bytes), the predicted weight, checkpoint and latent
cache sizes, and ModelTotals, the byte and FLOP totals the layouts are costed from. Pure arithmetic on a
ModelConfig; docs/plan.md states every formula.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..checkpoint.quantized import HEAD_BITS
from ..config import ModelConfig
from ..hardware import GIB
from ..kernels import quant

PRECISIONS = ("fp8", "bf16", "int8", "int4")
CACHE_DTYPES = {"bf16": 2, "fp8": 1}
FP8_BLOCK = 128  # the official checkpoints' 128x128 weight blocks, one float32 scale each
# int8/int4 are the formats `--quantize` loads and `dsv3 quantize` writes (dsv3/kernels/quant.py): int8 codes, or
# int4 codes two to a byte, plus one float16 scale per QUANT_GROUP input values of a row, no zero point.
QUANT_GROUP = quant.GROUP_SIZE
QUANT_SCALE_BYTES = quant.SCALE_DTYPE.itemsize
QUANT_PRECISIONS = tuple(quant.SCHEMES)  # int8, int4
# The output head's precision when the projections are int8/int4 (dsv3/checkpoint/quantized.py HEAD_BITS: int8).
HEAD_PRECISION = {p: f"int{HEAD_BITS[s.bits]}" for p, s in quant.SCHEMES.items()}
COMPONENTS = ("embedding", "attention", "dense_mlp", "routed_experts", "shared_experts", "router", "head", "mtp")


@dataclass(frozen=True)
class Tensor:
    """One kind of weight tensor, repeated `count` times (over layers, experts)."""

    component: str
    role: str  # linear (quantised at the chosen precision) | norm | router | bias | embed | head | bf16
    shard: str  # how the GPU layout splits it: heads | tp | vocab | experts | replicated
    shape: tuple[int, ...]
    count: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.count


def _layer_tensors(cfg: ModelConfig, moe: bool, n: int, comp: str | None) -> list[Tensor]:
    D, H, C, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    c = (lambda name: comp or name)
    # The down-projections (q_a, kv_a) produce one latent per token shared by all heads: tensor-parallel engines
    # replicate them rather than split them; everything per head splits by heads.
    ts = [Tensor(c("attention"), "norm", "replicated", (D,), 2 * n)]
    if cfg.q_lora_rank is None:
        ts.append(Tensor(c("attention"), "linear", "heads", (H * cfg.qk_head_dim, D), n))
    else:
        ts += [Tensor(c("attention"), "linear", "replicated", (cfg.q_lora_rank, D), n),
               Tensor(c("attention"), "norm", "replicated", (cfg.q_lora_rank,), n),
               Tensor(c("attention"), "linear", "heads", (H * cfg.qk_head_dim, cfg.q_lora_rank), n)]
    ts += [Tensor(c("attention"), "linear", "replicated", (C + R, D), n),
           Tensor(c("attention"), "norm", "replicated", (C,), n),
           Tensor(c("attention"), "linear", "heads", (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), C), n),
           Tensor(c("attention"), "linear", "heads", (D, H * cfg.v_head_dim), n)]
    if moe:
        E, I, S = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.shared_intermediate_size
        ts.append(Tensor(c("router"), "router", "replicated", (E, D), n))
        if cfg.uses_score_bias:
            ts.append(Tensor(c("router"), "bias", "replicated", (E,), n))
        ts += [Tensor(c("routed_experts"), "linear", "experts", (I, D), 2 * E * n),
               Tensor(c("routed_experts"), "linear", "experts", (D, I), E * n)]
        if S:
            ts += [Tensor(c("shared_experts"), "linear", "tp", (S, D), 2 * n),
                   Tensor(c("shared_experts"), "linear", "tp", (D, S), n)]
    else:
        I = cfg.intermediate_size
        ts += [Tensor(c("dense_mlp"), "linear", "tp", (I, D), 2 * n), Tensor(c("dense_mlp"), "linear", "tp", (D, I), n)]
    return ts


def model_tensors(cfg: ModelConfig, with_mtp: bool = False) -> list[Tensor]:
    """Every weight the model holds in memory (MTP layers share the main embedding and head, as load_model does).
    The MTP layers' tensors come last, after everything of the main model."""
    D, V = cfg.hidden_size, cfg.vocab_size
    kinds = cfg.layer_kinds
    ts = [Tensor("embedding", "embed", "vocab", (V, D))]
    ts += _layer_tensors(cfg, False, kinds.count("dense"), None) if kinds.count("dense") else []
    ts += _layer_tensors(cfg, True, kinds.count("moe"), None) if kinds.count("moe") else []
    ts.append(Tensor("head", "norm", "replicated", (D,)))
    if not cfg.tie_word_embeddings:
        ts.append(Tensor("head", "head", "vocab", (V, D)))
    if with_mtp:
        for k in range(cfg.num_nextn_predict_layers):
            ts += _layer_tensors(cfg, cfg.is_moe_layer(cfg.num_hidden_layers + k), 1, "mtp")
            ts += [Tensor("mtp", "norm", "replicated", (D,), 3),  # enorm, hnorm, shared_head.norm
                   Tensor("mtp", "bf16", "replicated", (D, 2 * D))]  # eh_proj: bf16 in the official checkpoint
    return ts


def linear_bytes(out_features: int, in_features: int, precision: str) -> int:
    """Bytes of one [out, in] projection: bf16; fp8 with a float32 scale per 128x128 block; int8 (int4) codes of 8
    (4) bits with a float16 scale per 32 inputs of a row, i.e. 8.5 (4.5) bits per weight. dsv3 needs `in` to be a
    multiple of 32 to quantise (a partial group would count as a whole one here)."""
    n = out_features * in_features
    if precision == "bf16":
        return 2 * n
    if precision == "fp8":
        return n + 4 * -(-out_features // FP8_BLOCK) * -(-in_features // FP8_BLOCK)
    if precision in QUANT_PRECISIONS:
        s = quant.SCHEMES[precision]
        groups = out_features * -(-in_features // s.group_size)
        return out_features * -(-in_features * s.bits // 8) + QUANT_SCALE_BYTES * groups
    raise ValueError(f"precision {precision!r}: choose one of {PRECISIONS}")


def tensor_bytes(t: Tensor, precision: str, on_disk: bool = False) -> int:
    """Resident bytes (what load_model allocates with dtype bf16): projections at `precision`; the output head at
    int8 when the projections are int8/int4, else bf16; norms, embedding and the MTP eh_proj in bf16 (the official
    FP8 checkpoint keeps them so); the router weight and bias in float32 (routing decisions are precision sensitive).
    On disk the router weight is bf16 as the published checkpoints store it, float32 in what `dsv3 quantize`
    writes (the loaded model's)."""
    if t.role == "linear":
        return linear_bytes(*t.shape, precision) * t.count
    if t.role == "head" and precision in HEAD_PRECISION:
        return linear_bytes(*t.shape, HEAD_PRECISION[precision]) * t.count
    if t.role == "router":
        return t.numel * (2 if on_disk and precision not in QUANT_PRECISIONS else 4)
    if t.role == "bias":
        return t.numel * 4
    return t.numel * 2


def predicted_weight_bytes(cfg: ModelConfig, precision: str, with_mtp: bool = False) -> int:
    return sum(tensor_bytes(t, precision) for t in model_tensors(cfg, with_mtp))


def predicted_checkpoint_bytes(cfg: ModelConfig, precision: str, with_mtp: bool = True) -> int:
    """Size of the safetensors files (int8/int4: those `dsv3 quantize` writes): the MTP layers carry their own copies
    of the embedding (bf16) and of the head (in the head's format; the embedding's when the two are tied)."""
    n = sum(tensor_bytes(t, precision, on_disk=True) for t in model_tensors(cfg, with_mtp))
    if with_mtp:
        V, D = cfg.vocab_size, cfg.hidden_size
        head = 2 * V * D if cfg.tie_word_embeddings else tensor_bytes(Tensor("head", "head", "vocab", (V, D)),
                                                                      precision)
        n += cfg.num_nextn_predict_layers * (2 * V * D + head)
    return n


def predicted_cache_bytes(cfg: ModelConfig, tokens: int, cache_dtype: str = "bf16", with_mtp: bool = False) -> int:
    """Latent cache bytes for `tokens` cached positions: (kv_lora_rank + qk_rope_head_dim) x layers x element size.
    The hook the engine's cache test compares its allocation against."""
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype {cache_dtype!r}: choose one of {sorted(CACHE_DTYPES)}")
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0)
    return tokens * cfg.kv_cache_values_per_token_per_layer * layers * CACHE_DTYPES[cache_dtype]


def expected_experts_touched(n_experts: int, top_k: int, batch: float) -> float:
    """Distinct experts one MoE layer reads for `batch` tokens, routing uniform and independent per token."""
    return n_experts * (1 - (1 - top_k / n_experts) ** batch)


class ModelTotals:
    """Byte and FLOP totals of one model at one precision, grouped the ways the layouts need them."""

    def __init__(self, cfg: ModelConfig, precision: str, cache_dtype: str, with_mtp: bool):
        self.cfg, self.precision = cfg, precision
        self.kv_tok = predicted_cache_bytes(cfg, 1, cache_dtype)
        self.kv_all = predicted_cache_bytes(cfg, 1, cache_dtype, with_mtp)
        self.tensors = model_tensors(cfg, with_mtp)
        self.main = model_tensors(cfg, False)
        self.n_moe = cfg.layer_kinds.count("moe")
        I, D = cfg.moe_intermediate_size, cfg.hidden_size
        self.expert_bytes = linear_bytes(I, D, precision) * 2 + linear_bytes(D, I, precision) if cfg.has_moe else 0
        counts = cfg.param_counts()
        self.expert_flops_tok = 2 * self.n_moe * cfg.num_experts_per_tok * (cfg.expert_params() if cfg.has_moe else 0)
        self.other_flops_tok = 2 * counts["active_read_per_token"] - self.expert_flops_tok

    def bytes(self, tensors: list[Tensor], keep=lambda t: True, frac=lambda t: 1.0) -> float:
        return sum(tensor_bytes(t, self.precision) * frac(t) for t in tensors if keep(t))

    def attn_flops_tok(self, position: float, absorbed: bool) -> float:
        # Scores plus weighted values, per head and attended position: naive form in qk/v head dims; the absorbed
        # (decode) form attends over the latent, C + R for scores and C for values.
        cfg = self.cfg
        dims = (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) if absorbed else (cfg.qk_head_dim + cfg.v_head_dim)
        return 2 * cfg.num_hidden_layers * cfg.num_attention_heads * position * dims


def gib(n: float) -> str:
    """Bytes as the report writes them: GiB with one decimal."""
    return f"{n / GIB:.1f} GiB"
