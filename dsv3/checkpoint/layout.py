"""A safetensors checkpoint on disk: the shard index, every file's header validated against its size, and the
tensor inventory (name -> file, shape, dtype, byte position). Nothing here reads tensor data or unpickles.

The headers are parsed here rather than by the safetensors library so that every inconsistency (a truncated shard,
a header that lies about sizes, overlapping data, a missing or misplaced shard) is reported with its file and tensor
before a single data byte is read; safetensors' own errors name neither.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Iterable

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Every dtype the safetensors format defines; anything else in a header means a corrupted (or foreign) file.
ST_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the files and tensors involved."""



def names_list(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def problem_lines(kinds: Iterable[tuple[str, list[str]]]) -> list[str]:
    """One line "<what> (<count>): <names>" per kind of problem that has any."""
    return [f"{what} ({len(items)}): {names_list(items)}" for what, items in kinds if items]


@dataclass
class TensorInfo:
    name: str
    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    offset: int = 0  # absolute position of the first data byte in the file


def read_safetensors_header(fpath: str) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header against the file's size. Every inconsistency (a truncated
    file, a header that lies about sizes, overlapping or missing data, an unknown dtype) raises CheckpointError
    naming the file and the tensor."""
    fname = os.path.basename(fpath)
    size = os.path.getsize(fpath)
    fix = "the file is truncated or corrupted: download it again"
    with open(fpath, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{fpath}: {size} bytes is too short to be a safetensors file ({fix})")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CheckpointError(f"{fpath}: the header claims {n} bytes but the file holds only {size}; {fix}")
        if n > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{fpath}: a header of {n} bytes is beyond the format's limit; {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{fpath}: the safetensors header is not valid JSON ({e}); {fix}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{fpath}: the safetensors header is not a JSON object; {fix}")
    data_start, data_len = 8 + n, size - 8 - n
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        where = f"{fpath}: tensor {name!r}"
        if not isinstance(meta, dict):
            raise CheckpointError(f"{where}: its header entry is not an object; {fix}")
        dt, shape, offs = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if dt not in ST_DTYPES:
            raise CheckpointError(f"{where} has dtype {dt!r}, which safetensors does not define (known: "
                                  f"{', '.join(ST_DTYPES)}); the file is corrupted or not a safetensors file")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers; {fix}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise CheckpointError(f"{where}: data_offsets {offs!r} are not two increasing byte offsets; {fix}")
        nbytes = math.prod(shape) * ST_DTYPES[dt].itemsize
        begin, end = offs
        if end - begin != nbytes:
            raise CheckpointError(f"{where}: the header says shape {shape} x {dt} = {nbytes} bytes but gives it "
                                  f"{end - begin} bytes (data_offsets {begin}..{end}): the header lies about sizes; "
                                  f"{fix}")
        if end > data_len:
            raise CheckpointError(f"{where} ends at data byte {end} but the file holds only {data_len} data bytes; "
                                  f"{fix}")
        infos[name] = TensorInfo(name, fname, tuple(shape), ST_DTYPES[dt], nbytes, data_start + begin)
        spans.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes before it"
            raise CheckpointError(f"{fpath}: tensor {name!r} {what} (data_offsets {begin}..{end}); {fix}")
        pos = end
    if pos != data_len:
        raise CheckpointError(f"{fpath}: the header accounts for {pos} data bytes but the file holds {data_len}; {fix}")
    return infos


@dataclass
class CheckpointLayout:
    """Every tensor of a checkpoint with its file, shape, dtype and position (read from the headers only)."""

    path: str
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "CheckpointLayout":
        path = os.fspath(path)
        index = os.path.join(path, INDEX_FILE)
        weight_map = None
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map must map tensor names to file names")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object): "
                                      f"{e}") from None
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(path, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no {INDEX_FILE}, {SINGLE_FILE} or *.safetensors files; "
                                      f"is this a Hugging Face checkpoint directory?")
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            held = [n for n, f in (weight_map or {}).items() if f == missing[0]]
            raise CheckpointError(f"{path}: shard file(s) named in {INDEX_FILE} are missing: {names_list(missing)}; "
                                  f"{missing[0]} should hold {len(held)} tensors ({names_list(held, 3)}). "
                                  f"An interrupted download? Fetch the missing files again")
        layout = cls(path, files=files)
        for fname in files:
            for name, info in read_safetensors_header(os.path.join(path, fname)).items():
                if name in layout.tensors:
                    raise CheckpointError(f"{path}: tensor {name!r} is stored twice, in {layout.tensors[name].file} "
                                          f"and {fname}; remove the stale file")
                layout.tensors[name] = info
        if weight_map is not None:
            absent = [n for n in weight_map if n not in layout.tensors]
            wrong = [f"{n} (index: {f}, found in {layout.tensors[n].file})" for n, f in weight_map.items()
                     if n in layout.tensors and layout.tensors[n].file != f]
            if absent:
                raise CheckpointError(f"{index} names tensors that no shard holds: "
                                      + names_list(f"{n} (in {weight_map[n]})" for n in absent))
            if wrong:
                raise CheckpointError(f"{index} places tensors in the wrong shard: {names_list(wrong)}")
        return layout

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def where(self, name: str) -> str:
        info = self.tensors.get(name)
        return f"{name} ({info.file})" if info else name
