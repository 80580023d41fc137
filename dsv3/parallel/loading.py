"""Sharded loading: turning a meta-device model into this rank's shard (shard_model, which also yields the window
of every split checkpoint tensor to read), widening FP8 windows to whole scale blocks and cropping them after the
read, and load_sharded, which reads only this rank's slices straight from a Hugging Face checkpoint
(weights.load_weights' select hook).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..kernels import fp8
from ..model.layers import Linear
from ..model.moe import MoE, StackedLinear
from ..model.transformer import Transformer, build_model
from .experts import Placement, contiguous_placement, resolve_placement
from .layers import ParallelHead, ParallelMoE, RowParallelLinear, TiedParallelHead, VocabParallelEmbedding, split_mlp
from .state import ParallelState, split


def _window_of(owned: list[int]) -> slice | list[int]:
    # A contiguous run is read as one range; anything else expert by expert.
    return slice(owned[0], owned[-1] + 1) if owned == list(range(owned[0], owned[-1] + 1)) else list(owned)


def shard_model(model: Transformer, ps: ParallelState, placement: dict[int, Placement] | None = None
                ) -> dict[str, tuple]:
    """Turn a model built on the meta device into this rank's shard, in place: layers replaced by their parallel
    forms with local shapes. Returns, per model tensor that is split, its window of the full checkpoint tensor
    (what weights.load_weights' `select` hook takes); tensors not listed are replicated."""
    cfg = model.cfg
    if ps.world_size == 1:
        return {}
    E, D, H = cfg.n_routed_experts, cfg.hidden_size, cfg.num_attention_heads
    problems = []
    if cfg.num_attention_heads < ps.tp_size:
        problems.append(f"{H} attention heads cannot be split across tp={ps.tp_size} ranks")
    if cfg.vocab_size < ps.tp_size:
        problems.append(f"vocab_size {cfg.vocab_size} < tp={ps.tp_size}")
    if any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)) and cfg.intermediate_size < ps.tp_size:
        problems.append(f"intermediate_size {cfg.intermediate_size} < tp={ps.tp_size}")
    if cfg.has_moe:
        if E < ps.ep_size:
            problems.append(f"{E} routed experts cannot be split across ep={ps.ep_size} ranks")
        if cfg.moe_intermediate_size < ps.tp_size:
            problems.append(f"moe_intermediate_size {cfg.moe_intermediate_size} < tp={ps.tp_size}")
        if cfg.n_shared_experts and cfg.shared_intermediate_size < ps.world_size:
            problems.append(f"the shared experts' width {cfg.shared_intermediate_size} < {ps.world_size} ranks")
    if problems:
        raise ValueError("this model cannot be split this way: " + "; ".join(problems))
    placement = placement or {}
    windows: dict[str, tuple] = {}
    tp, r = ps.tp_size, ps.tp_rank
    vsizes = [b - a for a, b in (split(cfg.vocab_size, tp, j) for j in range(tp))]
    v0, v1 = split(cfg.vocab_size, tp, r)
    with torch.device("meta"):
        model.model.embed_tokens = embed = VocabParallelEmbedding(v1 - v0, D, v0, ps)
        windows["model.embed_tokens.weight"] = (slice(v0, v1),)
        if model.lm_head is None:
            model.lm_head = TiedParallelHead(embed, vsizes, ps)
        else:
            model.lm_head = ParallelHead(D, vsizes, ps)
            windows["lm_head.weight"] = (slice(v0, v1),)
        h0, h1 = split(H, tp, r)
        for i, layer in enumerate(model.model.layers):
            p = f"model.layers.{i}."
            attn = layer.self_attn
            attn.n_heads = h = h1 - h0
            qk, kv, v = cfg.qk_head_dim, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.v_head_dim
            q_name = "q_proj" if hasattr(attn, "q_proj") else "q_b_proj"
            setattr(attn, q_name, Linear(getattr(attn, q_name).in_features, h * qk))
            windows[f"{p}self_attn.{q_name}.weight"] = (slice(h0 * qk, h1 * qk),)
            attn.kv_b_proj = Linear(cfg.kv_lora_rank, h * kv)
            windows[f"{p}self_attn.kv_b_proj.weight"] = (slice(h0 * kv, h1 * kv),)
            attn.o_proj = RowParallelLinear(h * v, D, ps, "tp")
            windows[f"{p}self_attn.o_proj.weight"] = (slice(None), slice(h0 * v, h1 * v))
            if isinstance(layer.mlp, MoE):
                owned = placement.get(i, contiguous_placement(E, ps.ep_size))[ps.ep_rank]
                layer.mlp = moe = ParallelMoE(cfg, ps, owned)
                a, b = split(cfg.moe_intermediate_size, tp, r)
                ex = _window_of(moe.experts.owned)
                for proj in ("gate_proj", "up_proj"):
                    windows[f"{p}mlp.experts.{proj}.weight"] = (ex, slice(a, b))
                windows[f"{p}mlp.experts.down_proj.weight"] = (ex, slice(None), slice(a, b))
                if moe.shared_experts is not None:
                    a, b = split(cfg.shared_intermediate_size, ps.world_size, ps.rank)
                    _mlp_windows(windows, f"{p}mlp.shared_experts.", a, b)
            else:
                a, b = split(cfg.intermediate_size, tp, r)
                layer.mlp = split_mlp(D, b - a, ps, "tp")
                _mlp_windows(windows, f"{p}mlp.", a, b)
    return windows


def _mlp_windows(windows: dict, prefix: str, a: int, b: int) -> None:
    windows[f"{prefix}gate_proj.weight"] = (slice(a, b),)
    windows[f"{prefix}up_proj.weight"] = (slice(a, b),)
    windows[f"{prefix}down_proj.weight"] = (slice(None), slice(a, b))


def _checkpoint_name(model: Transformer, name: str) -> str:
    """The checkpoint tensor behind model tensor `name` (for stacked experts: expert 0's, same dtype as all)."""
    mod_name, _, attr = name.rpartition(".")
    if isinstance(model.get_submodule(mod_name), StackedLinear):
        prefix, proj = mod_name.rsplit(".", 1)
        return f"{prefix}.0.{proj}.{attr}"
    return name


def _align_fp8_windows(model: Transformer, windows: dict[str, tuple], layout) -> dict[str, tuple[int, ...]]:
    """fp8_mode='keep' keeps whole 128x128 scale blocks, so a window that cuts through a block is widened to block
    boundaries here (reading at most one partial block more per edge), and cut back after loading by exact
    dequantisation (see _crop). Returns the crops: name -> (row offset, col offset, rows, cols)."""
    b = fp8.BLOCK
    crops = {}
    for name, win in windows.items():
        info = layout.tensors.get(_checkpoint_name(model, name))
        if info is None or info.dtype != fp8.FP8_DTYPE:
            continue
        stacked = isinstance(model.get_submodule(name.rpartition(".")[0]), StackedLinear)
        lead, rest = (win[:1], win[1:]) if stacked else ((), win)
        rest = tuple(rest) + (slice(None),) * (2 - len(rest))
        dims = info.shape[-2:]
        exact = [s.indices(d)[:2] for s, d in zip(rest, dims)]
        wide = [(lo - lo % b, min(d, -(-hi // b) * b)) for (lo, hi), d in zip(exact, dims)]
        if wide == exact:
            continue
        windows[name] = lead + tuple(slice(lo, hi) for lo, hi in wide)
        crops[name] = (exact[0][0] - wide[0][0], exact[1][0] - wide[1][0], exact[0][1] - exact[0][0],
                       exact[1][1] - exact[1][0])
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        shape = (*getattr(mod, attr).shape[:-2], *(hi - lo for lo, hi in wide))
        setattr(mod, attr, nn.Parameter(torch.empty(shape, device="meta")))
    return crops


@torch.no_grad()
def _crop(model: Transformer, crops: dict[str, tuple[int, ...]], dtype: torch.dtype) -> None:
    for name, (ro, co, nr, nc) in crops.items():
        mod = model.get_submodule(name.rpartition(".")[0])
        w = mod.dense(slice(None), dtype) if isinstance(mod, StackedLinear) else mod.effective_weight(dtype)
        mod._buffers.pop("weight_scale_inv", None)
        mod.weight_scale_inv = None
        mod.weight = nn.Parameter(w[..., ro:ro + nr, co:co + nc].contiguous(), requires_grad=False)


def load_sharded(path: str | os.PathLike, ps: ParallelState, dtype: str | torch.dtype = torch.bfloat16,
                 device: str | torch.device | None = None, fp8_mode: str = "dequantize", with_mtp: bool | None = None,
                 attn_impl: str = "naive", progress: bool | None = None, placement: Any = None,
                 quantize: str | None = None) -> Transformer:
    """This rank's shard of a Hugging Face checkpoint: the model is built on the meta device, sharded, then only
    the rank's slices are read (FP8 weights with the scales of the blocks they touch). With fp8_mode='dequantize'
    any slice is dequantised exactly; with 'keep', slices on 128-block boundaries stay FP8 with their scales sliced
    alike, and a slice that cuts a block (a head split of 192-row heads, say) is read block-aligned, dequantised
    exactly and cut. placement: see resolve_placement. device: default the rank's device. quantize: int8/int4
    weights, each rank quantising its own slices (splits of the input dimension must fall on group boundaries).
    A GGUF path (dsv3/gguf) loads the same way: each rank reads only its windows' blocks."""
    from ..checkpoint.load import load_weights, open_checkpoint
    from ..devices import parse_dtype
    from ..gguf.files import is_gguf_path

    dtype = parse_dtype(dtype)
    if is_gguf_path(path):
        return _load_sharded_gguf(path, ps, dtype, device, with_mtp, attn_impl, progress, placement, quantize)
    path, cfg, layout, with_mtp = open_checkpoint(path, with_mtp)
    model = build_model(cfg, "meta", with_mtp=with_mtp, attn_impl=attn_impl)
    windows = shard_model(model, ps, resolve_placement(placement, cfg, ps.ep_size))
    crops = _align_fp8_windows(model, windows, layout) if fp8_mode == "keep" else {}
    load_weights(model, path, dtype, device if device is not None else ps.device, fp8_mode, progress,
                 select=lambda name, shape: windows.get(name), layout=layout, quantize=quantize)
    _crop(model, crops, dtype)
    return model


def _load_sharded_gguf(path, ps: ParallelState, dtype: torch.dtype, device, with_mtp, attn_impl: str,
                       progress, placement, quantize) -> Transformer:
    """This rank's shard of a GGUF model: quantised projections keep their codes (column splits must fall on the
    type's blocks: 32 values, 256 for the K types), everything else as load_gguf_model does it."""
    from ..gguf.load import load_gguf_weights, open_gguf

    if quantize is not None:
        raise ValueError(f"{os.fspath(path)} is a GGUF file, whose weights run as they are stored: drop "
                         f"quantize={quantize!r} (to change their types, requantise with llama-quantize)")
    g, cfg, with_mtp = open_gguf(path, with_mtp)
    model = build_model(cfg, "meta", with_mtp=with_mtp, attn_impl=attn_impl)
    windows = shard_model(model, ps, resolve_placement(placement, cfg, ps.ep_size))
    return load_gguf_weights(model, g, dtype, device if device is not None else ps.device, progress, windows)
