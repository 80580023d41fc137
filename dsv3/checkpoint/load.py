"""Loading a checkpoint into a model: build on the meta device, plan (targets.py), then stream every tensor, in file
order, into its final place and dtype (reader.py); FP8 weights dequantised exactly while loading or kept with their
block scales; int8/int4 weights read as stored (quantized.py) or quantised while loading, one matrix at a time."""
from __future__ import annotations

import logging
import math
import os

import torch

from ..config import ModelConfig
from ..devices import parse_device, parse_dtype
from ..kernels import fp8, quant
from ..model.transformer import Transformer, build_model
from .fp8 import FP8_MODES, SCALE_ATTR, SCALE_SUFFIX
from .layout import CheckpointError, CheckpointLayout
from .quantized import SCALE_SUFFIX as QSCALE_SUFFIX
from .quantized import Quantization
from .reader import TensorReader
from .targets import Select, Target, plan_load

log = logging.getLogger(__name__)


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor, is_param: bool) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if is_param:
        mod._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


def _chosen_experts(t: Target, infos: list) -> list:
    return [infos[e] for e in t.experts] if t.experts is not None else infos[t.window[0][0]:t.window[0][1]]


def _window_bytes(layout: CheckpointLayout, t: Target) -> int:
    infos = [layout.tensors[s] for s in t.sources]
    win = t.window[1:] if t.stacked else t.window
    chosen = _chosen_experts(t, infos) if t.stacked else infos
    total = 0
    if t.stored_quant:
        s, n = t.quant, math.prod(b - a for a, b in win)
        return len(chosen) * (n * s.bits // 8 + n // s.group_size * quant.SCALE_DTYPE.itemsize)
    for info in chosen:
        total += math.prod(b - a for a, b in win) * info.dtype.itemsize
        if info.dtype == fp8.FP8_DTYPE:
            scale = layout.tensors[info.name + SCALE_SUFFIX]
            total += math.prod(-(-b // fp8.BLOCK) - a // fp8.BLOCK for a, b in win[-2:]) * scale.dtype.itemsize
    return total


def load_weights(model: Transformer, path: str | os.PathLike, dtype: str | torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", fp8_mode: str = "dequantize", progress: bool | None = None,
                 select: Select | None = None, layout: CheckpointLayout | None = None,
                 quantize: str | None = None) -> Transformer:
    """Materialise a model built on the meta device from checkpoint `path` (see load_model for the options).

    select: the hook for tensor/expert parallelism. `select(model_name, full_shape)` returns the window of the full
      checkpoint tensor this process holds, as a tuple of slices (for stacked experts full_shape is [E, O, I] and the
      first slice picks experts; a list of expert ids there picks those, in that order), or None for all of it.
      Only the window's bytes are read, and the model (built by the caller with its local shapes) must have
      parameters of exactly the window's shape."""
    path = os.fspath(path)
    if fp8_mode not in FP8_MODES:
        raise ValueError(f"fp8_mode {fp8_mode!r}: choose one of {FP8_MODES}")
    dtype, device = parse_dtype(dtype), torch.device(device)
    cfg = model.cfg
    layout = layout or CheckpointLayout.read(path)
    order = plan_load(cfg, layout, model, bool(model.mtp_layers), fp8_mode, select,
                      Quantization.named(quantize) if quantize is not None else None)
    bar = progress_bar(sum(_window_bytes(layout, t) for t in order),
                       f"loading {os.path.basename(os.path.normpath(path))}", progress)
    reader = TensorReader(layout, bar.update)
    try:
        with torch.no_grad():
            for t in order:
                _load_target(model, reader, layout, t, dtype, device, fp8_mode)
    finally:
        bar.close()
        reader.close()
    model.eval()
    return model


def _load_target(model: Transformer, reader: TensorReader, layout: CheckpointLayout, t: Target, dtype: torch.dtype,
                 device: torch.device, fp8_mode: str) -> None:
    infos = [layout.tensors[s] for s in t.sources]
    stacked = t.stacked
    win = t.window[1:] if stacked else t.window
    if stacked:
        infos = _chosen_experts(t, infos)
    if t.quant is not None:
        _load_quantized(model, reader, t, infos, win, device)
        return
    is_fp8 = infos[0].dtype == fp8.FP8_DTYPE
    keep = is_fp8 and fp8_mode == "keep"
    out_dtype = torch.float32 if t.kind == "float32" else (fp8.FP8_DTYPE if keep else dtype)
    dest = torch.empty(t.shape, dtype=out_dtype, device=device)
    rows, cols = (win[0], win[1]) if len(win) == 2 else ((0, 1), win[0] if win else (0, 1))
    scales = []
    for i, info in enumerate(infos):
        part = (dest[i] if stacked else dest).view(rows[1] - rows[0], cols[1] - cols[0])
        scale = reader.read_scale(info.name, rows, cols, device) if is_fp8 else None
        if keep:
            scales.append(scale)
            scale = None
        reader.fill(part, info.name, rows, cols, scale)
    _set_tensor(model, t.model_name, dest, t.is_param)
    if keep:
        mod = model.get_submodule(t.model_name.rpartition(".")[0])
        if SCALE_ATTR not in mod._buffers:
            # Linear/StackedLinear start with a plain `weight_scale_inv = None` attribute, which register_buffer
            # refuses to replace; drop it first (a no-op once they register a None buffer instead).
            mod.__dict__.pop(SCALE_ATTR, None)
        mod.set_fp8(torch.stack(scales) if stacked else scales[0])


_QUANT_CHUNK_BYTES = 2 * 2**20


def _load_quantized(model: Transformer, reader: TensorReader, t: Target, infos: list, win: list[tuple[int, int]],
                    device: torch.device) -> None:
    """An int8/int4 weight: its codes and scales read as stored, or each matrix (one expert's at a time) read in
    float32 and quantised a few rows at a time (_QUANT_CHUNK_BYTES of float32: the quantiser's temporaries are a few
    times that), so the load's extra memory stays small beside the quantised model whatever the matrix size."""
    s = t.quant
    (r0, r1), (c0, c1) = win
    shape = (r1 - r0, c1 - c0)
    lead = (len(infos),) if t.stacked else ()
    codes = torch.empty((*lead, *s.code_shape(shape)), dtype=s.code_dtype, device=device)
    scales = torch.empty((*lead, *s.scale_shape(shape)), dtype=quant.SCALE_DTYPE, device=device)
    scratch = None
    for i, info in enumerate(infos):
        c, sc = (codes[i], scales[i]) if t.stacked else (codes, scales)
        if t.stored_quant:
            reader.fill(c, info.name, (r0, r1), (c0 * s.bits // 8, c1 * s.bits // 8))
            reader.fill(sc, info.name + QSCALE_SUFFIX, (r0, r1), (c0 // s.group_size, c1 // s.group_size))
            continue
        rows = max(fp8.BLOCK, _QUANT_CHUNK_BYTES // (4 * shape[1]) // fp8.BLOCK * fp8.BLOCK)
        if scratch is None:
            scratch = torch.empty(min(rows, shape[0]), shape[1], dtype=torch.float32, device=device)
        is_fp8 = info.dtype == fp8.FP8_DTYPE
        for a in range(r0, r1, rows):
            b = min(r1, a + rows)
            part = scratch[:b - a]
            reader.fill(part, info.name, (a, b), (c0, c1),
                        reader.read_scale(info.name, (a, b), (c0, c1), device) if is_fp8 else None)
            qc, qs = quant.quantize(part, s)
            c[a - r0:b - r0].copy_(qc)
            sc[a - r0:b - r0].copy_(qs)
    if t.stored_quant and not torch.isfinite(scales).all():
        raise CheckpointError(f"{reader.layout.path}: the scales of {t.model_name} hold non-finite values (NaN or "
                              f"inf): the file is corrupted; quantise the original checkpoint again")
    model.get_submodule(t.model_name.rpartition(".")[0]).set_quantized(codes, scales, s)


def load_model(path: str | os.PathLike, dtype: str | torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               fp8_mode: str = "dequantize", with_mtp: bool | None = None, attn_impl: str = "naive",
               progress: bool | None = None, quantize: str | None = None) -> Transformer:
    """Load a Hugging Face DeepSeek-V3-family checkpoint directory, or a GGUF file (a .gguf file, the first part
    of a split set, or a directory holding one: dsv3/gguf/load.py).

    dtype: compute dtype for everything not kept in FP8 (router weights and bias stay float32).
    fp8_mode: for FP8 checkpoints, "dequantize" (exact, to `dtype`, while loading) or "keep" (FP8 + block scales in
      memory, dequantised block-wise inside each matmul).
    with_mtp: load the MTP module(s) (num_nextn_predict_layers); False reads none of their bytes; None (the
      default) loads them when the checkpoint has them (transformers' save_pretrained drops them).
    progress: a bar of bytes read (None: only on a terminal).
    quantize: "int8" or "int4": the projections (and the head, see checkpoint/quantized.py) quantised while
      loading, one matrix at a time (the unquantised model is never held whole); a checkpoint written by
      `dsv3 quantize` is read as stored without it.
    """
    if fp8_mode not in FP8_MODES:
        raise ValueError(f"fp8_mode {fp8_mode!r}: choose one of {FP8_MODES}")
    from ..gguf.files import is_gguf_path

    if is_gguf_path(path):
        if quantize is not None:
            raise ValueError(f"{os.fspath(path)} is a GGUF file, whose weights run as they are stored: drop "
                             f"quantize={quantize!r} (to change their types, requantise with llama-quantize)")
        from ..gguf.load import load_gguf_model

        return load_gguf_model(path, dtype, device, with_mtp, attn_impl, progress)
    if quantize is not None:
        quant.scheme(quantize)  # an unknown name fails before anything is read
    dtype = parse_dtype(dtype)
    device = parse_device(device)
    path, cfg, layout, with_mtp = open_checkpoint(path, with_mtp)
    model = build_model(cfg, "meta", with_mtp=with_mtp, attn_impl=attn_impl)
    load_weights(model, path, dtype, device, fp8_mode, progress, layout=layout, quantize=quantize)
    q = Quantization.from_config(cfg) or (Quantization.named(quantize) if quantize else None)
    log.info("loaded %s: %.2f GB in %s%s on %s", path, model_bytes(model) / 1e9, dtype,
             f" with {q.name} weights" if q else "", device)
    return model


def open_checkpoint(path: str | os.PathLike, with_mtp: bool | None) -> tuple[str, ModelConfig, CheckpointLayout, bool]:
    """A checkpoint directory's config and tensor layout, and whether to load its MTP layers (None: when it has
    them; transformers' save_pretrained drops them even when config.json declares them)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    cfg = ModelConfig.from_pretrained(path)
    layout = CheckpointLayout.read(path)
    if with_mtp is None:
        with_mtp = cfg.num_nextn_predict_layers > 0 and any(
            n.startswith(f"model.layers.{cfg.num_hidden_layers}.") for n in layout.tensors)
        if cfg.num_nextn_predict_layers and not with_mtp:
            log.warning("%s: config.json declares %d MTP layer(s) but the checkpoint holds none; loading without MTP",
                        path, cfg.num_nextn_predict_layers)
    return path, cfg, layout, with_mtp


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def progress_bar(total: int, desc: str, enabled: bool | None):
    from tqdm.auto import tqdm

    disable = (not enabled) if enabled is not None else None  # None: tqdm decides (off when not a terminal)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=disable,
                leave=False)
