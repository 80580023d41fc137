"""Loading a GGUF model (a .gguf file, a split set or a directory holding one) into dsv3: config from the metadata,
the model built on the meta device, every tensor checked (name, shape, type) before any data is read, then each
decoded from the memory-mapped file a few rows at a time into its final place:
- projections (Linear / stacked experts) in Q8_0, Q4_0, Q4_K, Q5_K or Q6_K keep their codes, repacked losslessly
  into a quant.Scheme (blocks.py), and run on dsv3's quantised products;
- BF16 / F16 / F32 tensors are converted to the compute dtype (the router and its bias to float32);
- quantised tensors that are not projections (an embedding, a router) are dequantised exactly, to the same dtypes;
- a kv_b stored split (attn_k_b / attn_v_b) is dequantised and rebuilt (names.compose_kv_b) in the compute dtype.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import torch

from ..config import ModelConfig
from ..devices import parse_device, parse_dtype
from ..model.transformer import Transformer, build_model
from . import blocks, names
from .config import gguf_config
from .files import GGUFError, GGUFModel, GGUFTensor, read_gguf

log = logging.getLogger(__name__)
_CHUNK_BYTES = 4 * 2**20  # GGUF bytes decoded at a time: bounds the load's temporaries


def open_gguf(path: str | os.PathLike, with_mtp: bool | None = None) -> tuple[GGUFModel, ModelConfig, bool]:
    """The checked files, the config, and whether to load MTP (None: when the file has its layers)."""
    g = read_gguf(path)
    cfg = gguf_config(g)
    has_mtp = any(n.startswith(f"blk.{cfg.num_hidden_layers}.nextn.") for n in g.tensors)
    if with_mtp is None:
        with_mtp = cfg.num_nextn_predict_layers > 0 and has_mtp
    elif with_mtp and not has_mtp:
        raise GGUFError(f"{g.path}: MTP layers were asked for, but the file holds none (llama.cpp's converter leaves "
                        f"them out); load with with_mtp=False")
    return g, cfg, with_mtp


def plan(g: GGUFModel, cfg: ModelConfig, model: Transformer, windows: dict[str, tuple] | None = None
         ) -> dict[str, list[str]]:
    """dsv3 parameter -> the GGUF tensors it is made of, after checking that every parameter has its tensors, that
    no tensor is unknown, that every type is supported and every shape is what the metadata implies (for a
    sharded model: that this rank's window of it has the shard's shape)."""
    want = dict(model.state_dict())
    n_main = cfg.num_hidden_layers
    sources: dict[str, list[str]] = {}
    unknown, bad_type = [], []
    for name, t in g.tensors.items():
        try:
            target = names.model_name(name, n_main)
        except KeyError:
            unknown.append(name)
            continue
        layer = names.layer_of(name)
        if layer is not None and layer >= n_main and not model.mtp_layers:
            continue
        if target is None and name.endswith(names.SPLIT_KV_B):
            target = f"model.layers.{layer}.self_attn.kv_b_proj.weight"
            if f"blk.{layer}.attn_kv_b.weight" in g.tensors:
                continue  # both layouts present: the unsplit one is read
        if target is None:
            continue
        if t.type_name not in blocks.SUPPORTED:
            bad_type.append(f"{g.where(name)}: {t.type_name}")
        sources.setdefault(target, []).append(name)
    if unknown:
        raise GGUFError(f"{g.path}: tensors that the deepseek2 architecture does not have: "
                        f"{', '.join(sorted(unknown)[:20])}; is this a DeepSeek-family file?")
    if bad_type:
        raise GGUFError(f"{g.path}: tensor types dsv3 does not run: {'; '.join(bad_type[:10])}"
                        f"{' ...' if len(bad_type) > 10 else ''}. Supported: {', '.join(blocks.SUPPORTED)} (llama.cpp's "
                        f"BF16, F16, Q8_0, Q4_0, Q4_K_M, Q5_K_M and Q6_K files); requantise to one of those with "
                        f"llama-quantize")
    missing = sorted(set(want) - set(sources))
    if missing:
        raise GGUFError(f"{g.path}: the model needs tensors this file lacks: {', '.join(missing[:20])}"
                        f"{' ...' if len(missing) > 20 else ''}; a partial or foreign file?")
    for target, srcs in sources.items():
        if target not in want:
            raise GGUFError(f"{g.path}: {', '.join(srcs)} has no place in the model the metadata describes "
                            f"({target}); the metadata and the tensors disagree")
        shape = tuple(want[target].shape)
        if len(srcs) == 1:
            t = g.tensors[srcs[0]]
            win = (windows or {}).get(target)
            got = _window_bounds(t, win, _is_stacked(model, target))[3] if win else t.shape
            if got != shape:
                raise GGUFError(f"{g.path}: tensor {g.where(t.name)} is {list(t.shape)} but the metadata implies "
                                f"{list(shape)} for {target}; the metadata and the tensors disagree")
    return sources


def _is_stacked(model: Transformer, target: str) -> bool:
    from ..model.moe import StackedLinear

    return isinstance(model.get_submodule(target.rpartition(".")[0]), StackedLinear)


def _block(t: GGUFTensor) -> tuple[int, int]:
    """(values, entries of t.data's last dim) of one block of t's type: the gguf reader types F32/F16 data by
    element and leaves BF16 and the quantised types as bytes."""
    if t.type_name in blocks.FLOAT_TYPES:
        return 1, 1 if t.data.dtype != np.uint8 else blocks.FLOAT_TYPES[t.type_name].itemsize
    return blocks.BLOCK[t.type_name]


def _window_bounds(t: GGUFTensor, win: tuple, stacked: bool) -> tuple[object, slice, slice | None, tuple]:
    """(experts, rows, block-aligned column bytes or None, windowed shape) of parallel.shard_model's window `win`
    of t, checked (a column window must fall on the type's block boundaries); no data is touched."""
    shape = list(t.shape)
    ex = None
    if stacked:
        ex, win = win[0], win[1:]
        shape[0] = len(ex) if isinstance(ex, list) else len(range(*ex.indices(shape[0])))
    r0, r1, _ = (win[0] if win else slice(None)).indices(shape[-2])
    shape[-2] = r1 - r0
    cols = None
    if len(win) > 1:
        c0, c1, _ = win[1].indices(shape[-1])
        vals, size = _block(t)
        if c0 % vals or c1 % vals:
            raise GGUFError(f"{t.file}: tensor {t.name!r} is {t.type_name}, whose blocks hold {vals} values of a "
                            f"row, but this rank's share of it is columns {c0}:{c1}, which cut a block; choose a "
                            f"--tp that splits {shape[-1]} into multiples of {vals}")
        cols, shape[-1] = slice(c0 // vals * size, c1 // vals * size), c1 - c0
    return ex, slice(r0, r1), cols, tuple(shape)


def window(t: GGUFTensor, win: tuple | None, stacked: bool) -> GGUFTensor:
    """The part of tensor t a sharded model's rank holds (parallel.shard_model's window: for stacked experts
    (experts, rows[, cols]), else (rows[, cols]), slices or, for experts, a list), as a GGUFTensor whose data views
    only those bytes. A column window must fall on the type's block boundaries."""
    if not win:
        return t
    ex, rows, cols, shape = _window_bounds(t, win, stacked)
    data = t.data
    if ex is not None:
        data = data[np.asarray(ex)] if isinstance(ex, list) else data[ex]
    data = data[..., rows, :]
    if cols is not None:
        data = data[..., cols]
    return dataclasses.replace(t, shape=shape, data=data, nbytes=int(data.nbytes))


def _rows_per_chunk(t) -> int:
    row_bytes = max(1, t.data.shape[-1])
    return max(1, _CHUNK_BYTES // row_bytes)


def _load_quantized(mod, t, device: torch.device) -> None:
    """A projection's codes and scales, decoded chunk by chunk (per expert for stacked ones)."""
    s = blocks.SCHEMES[t.type_name]
    shape = t.shape
    codes = torch.empty(s.code_shape(shape), dtype=s.code_dtype, device=device)
    scales = torch.empty(s.scale_shape(shape), dtype=s.scale_dtype, device=device)
    data = t.data.reshape(-1, shape[-2], t.data.shape[-1])
    c3 = codes.view(-1, *codes.shape[-2:])
    s3 = scales.view(-1, *scales.shape[len(shape) - 2:])
    step = _rows_per_chunk(t)
    for e in range(data.shape[0]):
        for r in range(0, shape[-2], step):
            c, sc = blocks.decode(t.type_name, data[e, r:r + step])
            c3[e, r:r + step].copy_(c)
            s3[e, r:r + step].copy_(sc)
    if not torch.isfinite(scales).all():
        raise GGUFError(f"{t.file}: tensor {t.name!r} holds non-finite scales (NaN or inf): the file is corrupted; "
                        f"download it again")
    mod.set_quantized(codes, scales, s)


def _load_float(t, out_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    dest = torch.empty(t.shape, dtype=out_dtype, device=device)
    if len(t.shape) == 1:
        dest.copy_(blocks.to_float(t.type_name, t.data.reshape(1, -1), (1, t.shape[0]))[0])
        return dest
    # [lead, rows, bytes]: merging only leading dims keeps a windowed (strided) view a view.
    data = t.data.reshape(-1, t.data.shape[-2], t.data.shape[-1])
    d3 = dest.view(-1, *t.shape[-2:])
    step = _rows_per_chunk(t)
    for e in range(data.shape[0]):
        for r in range(0, t.shape[-2], step):
            part = data[e, r:r + step]
            d3[e, r:r + step].copy_(blocks.to_float(t.type_name, part, (part.shape[0], t.shape[-1])))
    return dest


def _set(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if attr in mod._parameters:
        mod._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


def load_gguf_weights(model: Transformer, g: GGUFModel, dtype: torch.dtype, device: torch.device,
                      progress: bool | None = None, windows: dict[str, tuple] | None = None) -> Transformer:
    """Fill `model` (on the meta device) from g; windows: a sharded model's parts of each split tensor
    (parallel.shard_model), of which only those bytes are read."""
    from ..model.layers import Linear
    from ..model.moe import Gate, StackedLinear

    windows = windows or {}
    sources = plan(g, model.cfg, model, windows)
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(g.tensors[s].nbytes for srcs in sources.values() for s in srcs), unit="B", unit_scale=True,
               unit_divisor=1024, desc=f"loading {os.path.basename(g.path)}", leave=False,
               disable=(not progress) if progress is not None else None)
    try:
        with torch.no_grad():
            for target, srcs in sources.items():
                mod_name, _, attr = target.rpartition(".")
                mod = model.get_submodule(mod_name)
                if len(srcs) == 2:  # kv_b from attn_k_b / attn_v_b
                    k_b, v_b = (g.tensors[n] for n in sorted(srcs))
                    kv_b = names.compose_kv_b(blocks.to_float(k_b.type_name, k_b.data, k_b.shape),
                                              blocks.to_float(v_b.type_name, v_b.data, v_b.shape))
                    if target in windows:
                        kv_b = kv_b[windows[target]]
                    want = tuple(mod.weight.shape)
                    if tuple(kv_b.shape) != want:
                        raise GGUFError(f"{g.path}: {', '.join(srcs)} make a kv_b of {list(kv_b.shape)}, but the "
                                        f"metadata implies {list(want)}")
                    _set(model, target, kv_b.to(device=device, dtype=dtype))
                else:
                    t = window(g.tensors[srcs[0]], windows.get(target), isinstance(mod, StackedLinear))
                    is_proj = isinstance(mod, (Linear, StackedLinear)) and attr == "weight"
                    if is_proj and t.type_name in blocks.SCHEMES:
                        _load_quantized(mod, t, device)
                    else:
                        _set(model, target, _load_float(t, torch.float32 if isinstance(mod, Gate) else dtype,
                                                        device))
                for s in srcs:
                    g.release(g.tensors[s])
                bar.update(sum(g.tensors[s].nbytes for s in srcs))
    finally:
        bar.close()
    model.eval()
    return model


def load_gguf_model(path: str | os.PathLike, dtype: str | torch.dtype = torch.bfloat16,
                    device: str | torch.device = "cpu", with_mtp: bool | None = None, attn_impl: str = "naive",
                    progress: bool | None = None) -> Transformer:
    """Run a GGUF file as it is (see the module docstring); what load_model does for a .gguf path."""
    dtype, device = parse_dtype(dtype), parse_device(device)
    g, cfg, with_mtp = open_gguf(path, with_mtp)
    model = build_model(cfg, "meta", with_mtp=with_mtp, attn_impl=attn_impl)
    load_gguf_weights(model, g, dtype, device, progress)
    kinds: dict[str, int] = {}
    for t in g.tensors.values():
        kinds[t.type_name] = kinds.get(t.type_name, 0) + 1
    log.info("loaded %s (%s): %.2f GB of GGUF tensors (%s) in %s on %s", g.path,
             f"{len(g.files)} parts" if len(g.files) > 1 else "1 file", g.total_bytes / 1e9,
             ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())), dtype, device)
    return model
