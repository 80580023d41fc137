"""A small random-weight DeepSeek-V3 checkpoint in the exact official format, for tests and as the embedded default
model until a trained one replaces it.

Official format: config.json with quantization_config, a sharded model.safetensors.index.json, float8_e4m3fn
projections each followed by a float32 weight_scale_inv per 128x128 block, bf16 embeddings/norms/router/head/eh_proj,
a float32 router bias, an MTP layer (num_nextn_predict_layers 1) holding its own copies of the embedding and the head,
group-limited routing and YaRN; plus tokenizer.json / tokenizer_config.json / generation_config.json from
dsv3.tokenizer_build. The dimensions put some projections above 128 and off multiples of 128, so partial FP8 blocks
are exercised, while the whole checkpoint stays under 3 MB.

Deterministic: the weights depend only on the seed (and the torch version's generator); the tokenizer is trained on
the Zen of Python and a fixed list of standard-library sources, so it can differ slightly between Python versions.
"""
from __future__ import annotations

import codecs
import contextlib
import copy
import io
import os
from typing import Any, Iterator

import torch

from .config import ModelConfig
from .kernels import fp8
from .model.transformer import build_model
from .tokenizer_build import save_tokenizer_files, train_bpe
from .checkpoint.fp8 import FP8_QUANTIZATION_CONFIG, SCALE_SUFFIX, official_fp8
from .checkpoint.write import checkpoint_tensors, output_directory, write_checkpoint

TINY_CONFIG: dict[str, Any] = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=320, hidden_size=160,
    intermediate_size=320, moe_intermediate_size=64, num_hidden_layers=3, first_k_dense_replace=1,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
    n_group=4, topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
    routed_scaling_factor=2.5, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, rms_norm_eps=1e-6, rope_theta=10000.0,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    max_position_embeddings=2048, num_nextn_predict_layers=1, tie_word_embeddings=False, bos_token_id=0,
    eos_token_id=1, hidden_act="silu", attention_bias=False, torch_dtype="bfloat16",
    quantization_config=FP8_QUANTIZATION_CONFIG,
)
# Small, old standard-library modules: present in every CPython since 3.x began, so the corpus exists everywhere.
_CORPUS_MODULES = ("abc", "bisect", "calendar", "colorsys", "copy", "fnmatch", "heapq", "keyword", "string",
                   "textwrap")
_INIT_STD = 0.05  # large enough for non-uniform logits and routing in a 160-wide model


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """The tiny model's config.json fields, with `overrides` applied (quantization_config=None: bf16 weights)."""
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg.update(copy.deepcopy(overrides))
    return cfg


def tokenizer_corpus() -> Iterator[str]:
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen of Python
        import this
    yield codecs.decode(this.s, "rot13")
    stdlib = os.path.dirname(os.__file__)
    for name in sorted(_CORPUS_MODULES):
        p = os.path.join(stdlib, name + ".py")
        if os.path.exists(p):  # some stripped-down Pythons ship only bytecode
            with open(p, encoding="utf-8") as f:
                yield f.read()


def random_checkpoint_tensors(cfg: ModelConfig, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Seeded random tensors for every checkpoint name of `cfg` (with MTP), one at a time, in checkpoint order and
    official dtypes: FP8 projections with scales when cfg.quantization_config is set, bf16 elsewhere, a float32
    router bias. Norm weights near 1 and a non-zero bias keep every path of the model busy."""
    gen = torch.Generator().manual_seed(seed)
    shared: dict[str, torch.Tensor] = {}
    meta = build_model(cfg, "meta", with_mtp=True)
    for name, like in checkpoint_tensors(meta):
        if name != "model.embed_tokens.weight" and name.endswith(".embed_tokens.weight"):
            yield name, shared["model.embed_tokens.weight"]
            continue
        if name.endswith(".shared_head.head.weight"):
            yield name, shared["lm_head.weight"]
            continue
        if name.endswith("e_score_correction_bias"):
            yield name, (torch.rand(like.shape, generator=gen) - 0.5) * 0.1
            continue
        if like.dim() == 1:  # RMSNorm weights
            w = 0.8 + 0.4 * torch.rand(like.shape, generator=gen)
        else:
            w = torch.randn(like.shape, generator=gen) * _INIT_STD
        if cfg.is_fp8 and official_fp8(name):
            q, s = fp8.quantize(w)
            yield name, q
            yield name + SCALE_SUFFIX, s
        else:
            w = w.to(torch.bfloat16)
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                shared[name] = w
            yield name, w


def write_tiny_checkpoint(path: str | os.PathLike, seed: int = 0, *, overwrite: bool = False,
                          max_shard_bytes: int = 1_000_000, **overrides: Any) -> dict:
    """Write the tiny checkpoint (config fields overridable, e.g. num_hidden_layers=2 or quantization_config=None)
    into `path`, atomically. Returns a summary: path, files, tensors, bytes, tokenizer vocabulary size."""
    raw = tiny_config(**overrides)
    cfg = ModelConfig.from_dict(raw, source="tiny config")
    tok = train_bpe(tokenizer_corpus(), cfg.vocab_size)
    if tok.get_vocab_size() > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.get_vocab_size()} tokens but vocab_size is {cfg.vocab_size}")
    with output_directory(path, overwrite) as tmp:
        info = write_checkpoint(tmp, cfg, random_checkpoint_tensors(cfg, seed), max_shard_bytes,
                                dtype_name=raw.get("torch_dtype") or "bfloat16")
        save_tokenizer_files(tok, tmp, model_max_length=cfg.max_position_embeddings)
    return dict(info, path=os.fspath(path), tokenizer_vocab=tok.get_vocab_size(), seed=seed)
