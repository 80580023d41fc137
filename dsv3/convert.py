"""Checkpoint conversion, one chunk of one tensor at a time: FP8 -> bf16/fp16/fp32 and bf16/fp32 -> official FP8.

Both directions keep the source's shard files (same names, same tensors, converted), rewrite the index, write
config.json with only the quantisation fields changed and copy the other top-level files (tokenizer, generation
config, ...). Output shards are written by a streaming safetensors writer: the header is computed from the source
headers, then the data follows tensor by tensor, so memory stays at one chunk whatever the shard size.
Everything goes into a staging directory that replaces DST in one rename at the end: a failed or interrupted
convert leaves DST as it was, and SRC is only ever read.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .config import ModelConfig
from .kernels import fp8, quant
from .checkpoint.fp8 import FP8_QUANTIZATION_CONFIG, SCALE_SUFFIX, fp8_scale_problems, official_fp8
from .checkpoint.layout import INDEX_FILE, ST_NAMES, CheckpointError, CheckpointLayout, TensorInfo
from .checkpoint.load import load_model, progress_bar
from .checkpoint.reader import TensorReader
from .checkpoint.write import model_quantization, output_directory, save_model, write_json
from .devices import parse_dtype

log = logging.getLogger(__name__)

_CHUNK_BYTES = 64 * 2**20
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KEEP_FLOAT32 = ("e_score_correction_bias",)  # the official checkpoints keep the router bias in float32


@dataclass
class _Out:
    """One output tensor: its header entry and a generator of its data in row chunks."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape if len(shape) == 2 else (1, math.prod(shape))


def _row_ranges(rows: int, row_bytes: int, block_aligned: bool) -> Iterator[tuple[int, int]]:
    per = max(1, _CHUNK_BYTES // max(1, row_bytes))
    if block_aligned:
        per = max(fp8.BLOCK, per - per % fp8.BLOCK)
    for r in range(0, rows, per):
        yield r, min(rows, r + per)


def _cast(reader: TensorReader, info: TensorInfo, dtype: torch.dtype) -> _Out:
    rows, cols = _rows_cols(info.shape)

    def chunks():
        for r0, r1 in _row_ranges(rows, cols * max(dtype.itemsize, info.dtype.itemsize), False):
            out = torch.empty(r1 - r0, cols, dtype=dtype)
            reader.fill(out, info.name, (r0, r1), (0, cols))
            yield out
    return _Out(info.name, dtype, info.shape, chunks)


def _dequantized(reader: TensorReader, info: TensorInfo, dtype: torch.dtype) -> _Out:
    rows, cols = info.shape

    def chunks():
        scale = reader.read_scale(info.name, (0, rows), (0, cols))
        b = fp8.BLOCK
        for r0, r1 in _row_ranges(rows, cols * 4, True):
            out = torch.empty(r1 - r0, cols, dtype=dtype)
            reader.fill(out, info.name, (r0, r1), (0, cols), scale[r0 // b: -(-r1 // b)])
            yield out
    return _Out(info.name, dtype, info.shape, chunks)


def _quantized(reader: TensorReader, info: TensorInfo) -> tuple[_Out, _Out]:
    rows, cols = info.shape
    scales: list[torch.Tensor] = []

    def weight_chunks():
        # Blocks never straddle chunks (whole 128-row groups), so quantising chunk by chunk equals quantising at once.
        for r0, r1 in _row_ranges(rows, cols * 4, True):
            w = torch.empty(r1 - r0, cols, dtype=torch.float32)
            reader.fill(w, info.name, (r0, r1), (0, cols))
            q, s = fp8.quantize(w)
            scales.append(s)
            yield q

    def scale_chunks():  # written right after its weight, whose chunks filled `scales`
        yield torch.cat(scales)
        scales.clear()
    return (_Out(info.name, fp8.FP8_DTYPE, info.shape, weight_chunks),
            _Out(info.name + SCALE_SUFFIX, torch.float32, fp8.scale_shape(info.shape), scale_chunks))


def _write_safetensors(fpath: str, entries: list[_Out]) -> int:
    """Write a safetensors file whose header is known before its data; returns the data bytes written."""
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for e in entries:
        header[e.name] = {"dtype": ST_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    with open(fpath, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for e in entries:
            written = 0
            for chunk in e.chunks():
                data = chunk.contiguous().view(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                written += data.nbytes
            assert written == e.nbytes, (e.name, written, e.nbytes)
        f.flush()
        os.fsync(f.fileno())
    return pos


def _plan_dequantize(layout: CheckpointLayout, reader: TensorReader, dtype: torch.dtype) -> dict[str, list[_Out]]:
    fp8_names = [n for n, i in layout.tensors.items() if i.dtype == fp8.FP8_DTYPE]
    if not fp8_names:
        raise CheckpointError(f"{layout.path} holds no FP8 (float8_e4m3fn) weights; there is nothing to dequantise")
    problems = [f"FP8 tensor {layout.where(n)} has shape {list(layout.tensors[n].shape)}; FP8 weights are matrices"
                for n in fp8_names if len(layout.tensors[n].shape) != 2]
    problems += fp8_scale_problems(layout, fp8_names)
    used_scales = {n + SCALE_SUFFIX for n in fp8_names}
    orphans = [layout.where(n) for n in layout.tensors if n.endswith(SCALE_SUFFIX) and n not in used_scales]
    if orphans:
        problems.append(f"scales without an FP8 weight ({len(orphans)}): {', '.join(sorted(orphans))}")
    if problems:
        raise CheckpointError(f"{layout.path}: cannot dequantise:\n  " + "\n  ".join(problems))
    plan: dict[str, list[_Out]] = {f: [] for f in layout.files}
    for info in sorted(layout.tensors.values(), key=lambda i: (i.file, i.offset)):
        if info.name in used_scales:
            continue
        if info.dtype == fp8.FP8_DTYPE:
            plan[info.file].append(_dequantized(reader, info, dtype))
        elif info.dtype in _FLOATS and not info.name.endswith(_KEEP_FLOAT32):
            plan[info.file].append(_cast(reader, info, dtype))
        else:
            plan[info.file].append(_cast(reader, info, info.dtype))
    return plan


def _plan_quantize(layout: CheckpointLayout, reader: TensorReader, other: torch.dtype | None
                   ) -> dict[str, list[_Out]]:
    already = sorted(layout.where(n) for n, i in layout.tensors.items()
                     if i.dtype in (torch.float8_e4m3fn, torch.float8_e5m2))
    already = already or sorted(layout.where(n) for n in layout.tensors if n.endswith(SCALE_SUFFIX))
    if already:
        raise CheckpointError(f"{layout.path} is already quantised (e.g. {', '.join(already[:3])}); "
                              f"convert it with `dsv3 convert fp8-to-bf16` first if you want to requantise it")
    targets = [n for n in layout.tensors if official_fp8(n)]
    if not targets:
        raise CheckpointError(f"{layout.path} has no projection weights (*_proj.weight) to quantise; is it a "
                              f"DeepSeek-V3-family checkpoint?")
    bad = [f"{layout.where(n)} {list(layout.tensors[n].shape)} {ST_NAMES[layout.tensors[n].dtype]}" for n in targets
           if len(layout.tensors[n].shape) != 2 or layout.tensors[n].dtype not in _FLOATS]
    if bad:
        raise CheckpointError(f"{layout.path}: these projection weights are not float matrices: {', '.join(bad)}")
    plan: dict[str, list[_Out]] = {f: [] for f in layout.files}
    for info in sorted(layout.tensors.values(), key=lambda i: (i.file, i.offset)):
        if official_fp8(info.name):
            plan[info.file].extend(_quantized(reader, info))
        elif info.name.endswith(_KEEP_FLOAT32) or other is None or info.dtype not in _FLOATS:
            plan[info.file].append(_cast(reader, info, info.dtype))
        else:
            plan[info.file].append(_cast(reader, info, other))
    return plan


def _convert(src: str | os.PathLike, dst: str | os.PathLike, direction: str, dtype: torch.dtype | None,
             overwrite: bool, progress: bool | None) -> dict:
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source checkpoint directory {src!r} does not exist")
    ModelConfig.from_pretrained(src)  # refuses what is not a DeepSeek-family config before any work
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        config = json.load(f)  # written back verbatim except for the fields this conversion changes
    layout = CheckpointLayout.read(src)
    bar = progress_bar(layout.total_bytes, f"converting {os.path.basename(os.path.normpath(src))}", progress)
    reader = TensorReader(layout, bar.update)
    try:
        if direction == "dequantize":
            plan = _plan_dequantize(layout, reader, dtype)
            config.pop("quantization_config", None)
            dtype_name = str(dtype).removeprefix("torch.")
            change = "dropped quantization_config"
        else:
            plan = _plan_quantize(layout, reader, dtype)
            config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
            dtype_name = str(dtype).removeprefix("torch.") if dtype else config.get("torch_dtype")
            change = "added quantization_config (fp8 e4m3, 128x128 blocks)"
        if dtype_name:
            config["torch_dtype"] = dtype_name
            if "dtype" in config:  # transformers 5 spelling
                config["dtype"] = dtype_name
        plan = {f: entries for f, entries in plan.items() if entries}
        copies, skipped = _other_files(src)
        need = sum(e.nbytes for es in plan.values() for e in es) + sum(
            os.path.getsize(os.path.join(src, n)) for n in copies)
        parent = os.path.dirname(os.path.abspath(dst))
        free = shutil.disk_usage(parent if os.path.isdir(parent) else ".").free
        if need > free:
            raise RuntimeError(f"not enough disk space for {dst}: the conversion writes {need / 1e9:.2f} GB and "
                               f"{free / 1e9:.2f} GB are free")
        files, weight_map, total = [], {}, 0
        with output_directory(dst, overwrite, sources=[src]) as tmp:
            for fname, entries in plan.items():
                nbytes = _write_safetensors(os.path.join(tmp, fname), entries)
                files.append({"file": fname, "tensors": len(entries), "bytes": nbytes})
                weight_map.update({e.name: fname for e in entries})
                total += nbytes
            write_json(os.path.join(tmp, INDEX_FILE), {"metadata": {"total_size": total},
                                                       "weight_map": dict(sorted(weight_map.items()))})
            write_json(os.path.join(tmp, "config.json"), config)
            for n in copies:
                shutil.copy2(os.path.join(src, n), os.path.join(tmp, n))
    finally:
        bar.close()
        reader.close()
    if skipped:
        log.info("not copied (directories or special files): %s", ", ".join(skipped))
    return {"path": dst, "direction": direction, "dtype": dtype_name, "files": files, "tensors": len(weight_map),
            "bytes": total, "copied": copies, "skipped": skipped, "config": change}


def _other_files(src: str) -> tuple[list[str], list[str]]:
    """The top-level entries of checkpoint `src` besides its weights, index and config.json: the plain files a
    converted copy takes along (tokenizer, generation config, ...), and the rest (directories, special files)."""
    others = sorted(n for n in os.listdir(src) if n not in (INDEX_FILE, "config.json")
                    and not n.endswith(".safetensors"))
    copies = [n for n in others if os.path.isfile(os.path.join(src, n))]
    return copies, [n for n in others if n not in copies]


def fp8_to_dtype(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | torch.dtype = torch.bfloat16,
                 overwrite: bool = False, progress: bool | None = None) -> dict:
    """Dequantise an FP8 checkpoint exactly (fp8 * scale in float32, then `dtype`); the other float tensors are
    cast to `dtype` too, except the float32 router bias. The result has no quantization_config, so transformers
    and other tools load it as a plain checkpoint. Returns a summary of what was written."""
    dtype = parse_dtype(dtype)
    return _convert(src, dst, "dequantize", dtype, overwrite, progress)


def to_fp8(src: str | os.PathLike, dst: str | os.PathLike, other_dtype: str | torch.dtype | None = torch.bfloat16,
           overwrite: bool = False, progress: bool | None = None) -> dict:
    """Quantise a bf16/fp16/fp32 checkpoint to the official FP8 block format: every projection the official
    checkpoints store in FP8 becomes float8_e4m3fn + a float32 weight_scale_inv per 128x128 block; the other float
    tensors are cast to `other_dtype` (None: left as they are), the router bias stays float32."""
    other = None if other_dtype in (None, "keep") else parse_dtype(other_dtype)
    return _convert(src, dst, "quantize", other, overwrite, progress)


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str, dtype: str | torch.dtype =
                        torch.bfloat16, overwrite: bool = False, progress: bool | None = None) -> dict:
    """Write an int8/int4 copy of checkpoint `src` (bf16, fp32 or official FP8) to `dst`: the model is loaded with
    quantize=`to`, one matrix quantised at a time, so memory holds the quantised model and one matrix; the other
    tensors become `dtype` (the router and its bias stay float32). The result loads without re-quantising (its
    config.json's quantization_config says how it is stored, checkpoint/quantized.py). DST appears only when
    complete; the tokenizer and other plain files of SRC are copied. Returns a summary."""
    src = os.fspath(src)
    quant.scheme(to)  # an unknown name fails before anything is read
    copies, _ = _other_files(src)
    with output_directory(dst, overwrite, sources=[src]) as tmp:  # an occupied DST fails before the load
        model = load_model(src, dtype=dtype, quantize=to, progress=progress)
        info = save_model(model, tmp)
        for n in copies:
            shutil.copy2(os.path.join(src, n), os.path.join(tmp, n))
    return {**info, "path": os.fspath(dst), "quantization": model_quantization(model).config(), "copied": copies}
