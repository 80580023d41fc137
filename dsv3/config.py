"""ModelConfig: the architecture of one DeepSeek-V3-family checkpoint, read from its config.json.

Field names are the Hugging Face ones so a config.json maps onto this class one to one. Everything that can be
derived (layer kinds, head dims, softmax scale, parameter counts) is a property here, so the model, the planner and
the engine all read the same numbers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "kimi_k2", "deepseek_v2")
SUPPORTED_TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
INT_QUANT_METHOD = "dsv3_int"  # quantization_config.quant_method of checkpoints written by `dsv3 quantize`
# Fields that only exist in models we do not implement; their presence means the checkpoint is something else.
_FOREIGN_FIELDS = {
    "index_n_heads": "DeepSeek-V3.2's sparse-attention indexer",
    "index_head_dim": "DeepSeek-V3.2's sparse-attention indexer",
    "index_topk": "DeepSeek-V3.2's sparse-attention indexer",
}


def yarn_mscale(scale: float, mscale: float) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @property
    def is_yarn(self) -> bool:
        return self.kind == "yarn"

    @property
    def cos_sin_scale(self) -> float:
        if not self.is_yarn:
            return 1.0
        return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)

    @property
    def softmax_scale_factor(self) -> float:
        if not self.is_yarn:
            return 1.0
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2


@dataclass(frozen=True)
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_routed_experts: int | None = 256
    n_shared_experts: int | None = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 163840
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    quantization_config: dict | None = None
    torch_dtype: str | None = None
    # The untouched config.json, kept so converters can write it back with only the fields they mean to change.
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    # ----------------------------------------------------------------------------------------------------------
    # Reading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read a checkpoint directory's config.json (or the path of a config.json itself)."""
        path = os.fspath(path)
        cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(
                f"no config.json at {cfg_path!r}: pass a Hugging Face checkpoint directory (with config.json) "
                f"or the path of a config.json"
            )
        try:
            with open(cfg_path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{cfg_path} must hold a JSON object, found {type(raw).__name__}")
        return cls.from_dict(raw, source=cfg_path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "ModelConfig":
        raw = dict(raw)
        for key, what in _FOREIGN_FIELDS.items():
            if key in raw:
                raise ValueError(
                    f"{source}: field {key!r} belongs to {what}, a different model that dsv3 does not implement "
                    f"(supported: model_type in {SUPPORTED_MODEL_TYPES})"
                )
        archs = raw.get("architectures") or []
        for a in archs:
            if "V32" in a or "V3_2" in a:
                raise ValueError(
                    f"{source}: field 'architectures' is {archs}: DeepSeek-V3.2 adds a sparse-attention indexer and "
                    f"is a different model that dsv3 does not implement"
                )
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: field 'model_type' is {model_type!r}; dsv3 supports {list(SUPPORTED_MODEL_TYPES)} "
                f"(DeepSeek-V3/V3-0324/R1/V3.1, Moonlight, Kimi-K2, DeepSeek-V2/V2-Lite)"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: field 'hidden_act' is {raw['hidden_act']!r}; only 'silu' is supported")
        if raw.get("attention_bias", False):
            raise ValueError(f"{source}: field 'attention_bias' is true; the DeepSeek family has no attention biases")

        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        if model_type == "deepseek_v2":
            # V2 configs omit the V3-only fields; their meaning in V2 is: softmax scores, no bias, no MTP.
            defaults.update(topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, n_group=1,
                            topk_group=1, routed_scaling_factor=1.0, num_nextn_predict_layers=0)
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in ("rope", "raw"):
                continue
            if f.name in raw:
                kw[f.name] = raw[f.name]
            elif f.name in defaults:
                kw[f.name] = defaults[f.name]
        if "num_nextn_predict_layers" not in raw and "num_mtp_layers" in raw:
            kw["num_nextn_predict_layers"] = raw["num_mtp_layers"]
        if kw.get("n_group") is None:
            kw["n_group"] = 1
        if kw.get("topk_group") is None:
            kw["topk_group"] = 1
        kw["rope"] = _read_rope(raw, source)
        cfg = cls(raw=raw, **kw)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{source}: field {name!r} = {getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(name, "must be a positive integer")
        if self.qk_nope_head_dim < 0 or not isinstance(self.qk_nope_head_dim, int):
            raise bad("qk_nope_head_dim", "must be a non-negative integer")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "rotary pairs need an even dimension")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise bad("q_lora_rank", "must be a positive integer or null")
        if self.num_key_value_heads != self.num_attention_heads:
            raise bad("num_key_value_heads", f"MLA has one latent per token; must equal num_attention_heads "
                                             f"({self.num_attention_heads})")
        if self.topk_method not in SUPPORTED_TOPK_METHODS:
            raise bad("topk_method", f"supported: {list(SUPPORTED_TOPK_METHODS)}")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise bad("scoring_func", "supported: 'sigmoid', 'softmax'")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise bad("first_k_dense_replace", f"must be within [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.has_moe:
            E = self.n_routed_experts
            if not isinstance(E, int) or E <= 0:
                raise bad("n_routed_experts", "must be a positive integer (or null for a dense model)")
            if not 1 <= self.num_experts_per_tok <= E:
                raise bad("num_experts_per_tok", f"must be within [1, n_routed_experts={E}]")
            if self.n_group < 1 or E % self.n_group:
                raise bad("n_group", f"must divide n_routed_experts={E}")
            if not 1 <= self.topk_group <= self.n_group:
                raise bad("topk_group", f"must be within [1, n_group={self.n_group}]")
            if self.uses_group_routing and self.topk_group * (E // self.n_group) < self.num_experts_per_tok:
                raise bad("topk_group", f"{self.topk_group} groups of {E // self.n_group} experts cannot supply "
                                        f"num_experts_per_tok={self.num_experts_per_tok}")
            if self.topk_method == "noaux_tc" and self.n_group > 1 and E // self.n_group < 2:
                raise bad("n_group", "noaux_tc ranks groups by their top-2 scores, so groups need >= 2 experts")
            if self.moe_intermediate_size <= 0:
                raise bad("moe_intermediate_size", "must be a positive integer")
        if self.num_nextn_predict_layers < 0:
            raise bad("num_nextn_predict_layers", "must be >= 0")
        q = self.quantization_config
        if q is not None and q.get("quant_method") == INT_QUANT_METHOD:
            for key, allowed in (("bits", (4, 8)), ("group_size", (32,)), ("lm_head_bits", (None, 4, 8))):
                if q.get(key) not in allowed:
                    raise ValueError(f"{source}: quantization_config.{key} = {q.get(key)!r}; dsv3's int format "
                                     f"supports {' or '.join(map(str, allowed))}")
        elif q is not None:
            method = q.get("quant_method")
            if method != "fp8":
                raise ValueError(f"{source}: quantization_config.quant_method = {method!r}; supported are the "
                                 f"official 'fp8' block format and dsv3's {INT_QUANT_METHOD!r} (dsv3 quantize)")
            if list(q.get("weight_block_size", [128, 128])) != [128, 128]:
                raise ValueError(f"{source}: quantization_config.weight_block_size = {q.get('weight_block_size')}; "
                                 f"only [128, 128] blocks are supported")
            if q.get("fmt", "e4m3") != "e4m3":
                raise ValueError(f"{source}: quantization_config.fmt = {q.get('fmt')!r}; only 'e4m3' is supported")

    # ----------------------------------------------------------------------------------------------------------
    # Derived values
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim ** -0.5 * self.rope.softmax_scale_factor

    @property
    def has_moe(self) -> bool:
        return bool(self.n_routed_experts)

    @property
    def uses_group_routing(self) -> bool:
        return self.topk_method in ("noaux_tc", "group_limited_greedy") and self.n_group > 1

    @property
    def uses_score_bias(self) -> bool:
        # Only the auxiliary-loss-free recipe (noaux_tc) carries e_score_correction_bias.
        return self.topk_method == "noaux_tc"

    @property
    def is_fp8(self) -> bool:
        """The checkpoint stores its projections in the official FP8 block format."""
        return self.quantization_config is not None and self.quantization_config.get("quant_method") == "fp8"

    @property
    def int_quantization(self) -> dict | None:
        """The quantization_config of a checkpoint written by `dsv3 quantize` (int8/int4 codes), else None."""
        q = self.quantization_config
        return q if q is not None and q.get("quant_method") == INT_QUANT_METHOD else None

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        if e is None:
            return []
        return list(e) if isinstance(e, (list, tuple)) else [e]

    def is_moe_layer(self, layer: int) -> bool:
        """Layer kind; MTP layers (index >= num_hidden_layers) are MoE blocks whenever the model has experts."""
        return self.has_moe and layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def layer_kinds(self) -> list[str]:
        return ["moe" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers)]

    @property
    def shared_intermediate_size(self) -> int:
        return (self.n_shared_experts or 0) * self.moe_intermediate_size

    @property
    def kv_cache_values_per_token_per_layer(self) -> int:
        """The MLA latent: normalised c_kv plus the rotated shared k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def kv_cache_bytes_per_token(self, element_bytes: int = 2) -> int:
        return self.kv_cache_values_per_token_per_layer * self.num_hidden_layers * element_bytes

    def with_overrides(self, **kw: Any) -> "ModelConfig":
        cfg = dataclasses.replace(self, **kw)
        cfg.validate("override")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """A config.json for this architecture (HF spelling: rope_scaling and a top-level rope_theta)."""
        out = dict(self.raw)
        for f in dataclasses.fields(self):
            if f.name in ("rope", "raw"):
                continue
            out[f.name] = getattr(self, f.name)
        if out.get("quantization_config") is None:
            out.pop("quantization_config", None)
        out["rope_theta"] = self.rope.theta
        out.pop("rope_parameters", None)
        if self.rope.is_yarn:
            out["rope_scaling"] = {
                "type": "yarn", "factor": self.rope.factor,
                "original_max_position_embeddings": self.rope.original_max_position_embeddings,
                "beta_fast": self.rope.beta_fast, "beta_slow": self.rope.beta_slow,
                "mscale": self.rope.mscale, "mscale_all_dim": self.rope.mscale_all_dim,
            }
        else:
            out["rope_scaling"] = None
        out.setdefault("architectures",
                       ["DeepseekV2ForCausalLM" if self.model_type == "deepseek_v2" else "DeepseekV3ForCausalLM"])
        out.setdefault("hidden_act", "silu")
        out.setdefault("attention_bias", False)
        return out

    # ----------------------------------------------------------------------------------------------------------
    # Parameter counts (used by tests against the published 671B / 37B / 11.5B figures and by the planner)
    def attention_params(self) -> int:
        D, H = self.hidden_size, self.num_attention_heads
        n = 0
        if self.q_lora_rank is None:
            n += D * H * self.qk_head_dim
        else:
            n += D * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
        n += D * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        n += self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
        n += H * self.v_head_dim * D
        return n

    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def expert_params(self) -> int:
        """One routed expert."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def shared_expert_params(self) -> int:
        return 3 * self.hidden_size * self.shared_intermediate_size

    def router_params(self) -> int:
        E = self.n_routed_experts or 0
        return E * self.hidden_size + (E if self.uses_score_bias else 0)

    def layer_params(self, layer: int, active_only: bool = False) -> int:
        n = self.attention_params() + 2 * self.hidden_size
        if self.is_moe_layer(layer):
            k = self.num_experts_per_tok if active_only else self.n_routed_experts
            n += k * self.expert_params() + self.shared_expert_params() + self.router_params()
        else:
            n += self.dense_mlp_params()
        return n

    def param_counts(self) -> dict[str, int]:
        """Parameters by component. `main` excludes MTP; `mtp_unique` excludes the shared embedding and head."""
        D, V = self.hidden_size, self.vocab_size
        embed = V * D
        head = 0 if self.tie_word_embeddings else V * D
        layers = [self.layer_params(i) for i in range(self.num_hidden_layers)]
        moe_layers = [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]
        routed = len(moe_layers) * (self.n_routed_experts or 0) * self.expert_params()
        main = embed + sum(layers) + D + head
        active_layers = sum(self.layer_params(i, active_only=True) for i in range(self.num_hidden_layers))
        mtp_layer = self.num_hidden_layers  # MTP blocks share the kind rule of layer index >= first_k_dense_replace
        mtp_block = self.layer_params(mtp_layer)
        mtp_unique = self.num_nextn_predict_layers * (mtp_block + 2 * D + 2 * D * D + D)
        return {
            "embedding": embed,
            "attention": self.num_hidden_layers * (self.attention_params() + 2 * D),
            "dense_mlp": (self.num_hidden_layers - len(moe_layers)) * self.dense_mlp_params(),
            "routed_experts": routed,
            "shared_experts": len(moe_layers) * self.shared_expert_params(),
            "router": len(moe_layers) * self.router_params(),
            "final_norm": D,
            "lm_head": head,
            "main": main,
            # The published "37B activated" counts the whole embedding matrix; a decode step reads only one row of it.
            "active_per_token": embed + active_layers + D + head,
            "active_read_per_token": D + active_layers + D + head,
            "mtp_unique": mtp_unique,
            "mtp_block": self.num_nextn_predict_layers * mtp_block,
        }


def _read_rope(raw: dict, source: str) -> RopeConfig:
    # Published checkpoints write rope_scaling + top-level rope_theta; transformers 5.x writes rope_parameters.
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    if params and not scaling and params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    theta = raw.get("rope_theta") or params.get("rope_theta") or 10000.0
    if not scaling:
        return RopeConfig(theta=float(theta))
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind != "yarn":
        raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported (the DeepSeek family uses 'yarn')")
    try:
        return RopeConfig(
            theta=float(theta), kind="yarn", factor=float(scaling["factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            beta_fast=float(scaling.get("beta_fast") or 32), beta_slow=float(scaling.get("beta_slow") or 1),
            mscale=float(scaling.get("mscale", 1.0) or 0.0), mscale_all_dim=float(scaling.get("mscale_all_dim", 0.0) or 0.0),
        )
    except KeyError as e:
        raise ValueError(f"{source}: rope_scaling of type yarn lacks field {e.args[0]!r}") from None
