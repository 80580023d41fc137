"""Hugging Face safetensors checkpoints <-> the model.

Loading builds the model on the meta device, checks every checkpoint tensor against what the model expects
(names, shapes, dtypes, FP8 scales: all mismatches listed at once), then streams tensors file by file, in file
order, straight into their final place and dtype: bytes are read with plain positioned reads into the destination
tensor (or, when the dtype changes, through a small reused staging buffer, chunk by chunk), so peak memory is the
loaded model plus a few MB, and only the bytes of tensors that are loaded are ever read. Per-expert tensors
(experts.{e}.gate_proj.weight) are stacked into [E, ...] tensors; that is the only name transformation. FP8 weights
(float8_e4m3fn + float32 weight_scale_inv per 128x128 block) are either dequantised exactly while loading or kept
as FP8 with their scales.

The safetensors headers are parsed and validated here (not by the safetensors library) so that every problem is
reported with its file and tensor. Nothing here unpickles.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from .config import ModelConfig
from .kernels import fp8
from .model.transformer import Transformer, build_model

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
SCALE_ATTR = "weight" + SCALE_SUFFIX
FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                           "weight_block_size": [fp8.BLOCK, fp8.BLOCK]}
# Every dtype the safetensors format defines; anything else in a header means a corrupted (or foreign) file.
ST_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
FP8_MODES = ("dequantize", "keep")
# Projections the official checkpoints store in FP8. The output head, the MTP layer's eh_proj, embeddings, norms,
# the router weight and its bias stay bf16/fp32 there.
_OFFICIAL_FP8_RE = re.compile(r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                              r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$")
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
_CHUNK_BYTES = 8 * 2**20  # staging buffer for reads that change dtype: bounds the load's extra memory

Select = Callable[[str, tuple[int, ...]], "tuple[slice | list[int], ...] | None"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the files and tensors involved."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(_DTYPE_NAMES)}") from None


def parse_device(device: str | torch.device) -> torch.device:
    """A device to load a model on: the CPU, or a CUDA device that this machine has. Anything else raises a
    ValueError that says what is available (torch's own errors here are an assertion deep in torch.cuda)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device {device!r}: dsv3 runs on cpu or cuda devices")
    if not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}) is a CPU-only build" if torch.version.cuda is None
               else "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)")
        raise ValueError(f"device {device!r}: {why}; use cpu")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise ValueError(f"device {device!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return dev


def official_fp8(name: str) -> bool:
    """Whether the official FP8 checkpoints store checkpoint tensor `name` as FP8 with a weight_scale_inv."""
    return bool(_OFFICIAL_FP8_RE.search(name))


def _names_list(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ------------------------------------------------------------------------------------------------------------------
# Reading a checkpoint directory's layout
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
            raise CheckpointError(f"{path}: shard file(s) named in {INDEX_FILE} are missing: {_names_list(missing)}; "
                                  f"{missing[0]} should hold {len(held)} tensors ({_names_list(held, 3)}). "
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
                                      + _names_list(f"{n} (in {weight_map[n]})" for n in absent))
            if wrong:
                raise CheckpointError(f"{index} places tensors in the wrong shard: {_names_list(wrong)}")
        return layout

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def where(self, name: str) -> str:
        info = self.tensors.get(name)
        return f"{name} ({info.file})" if info else name


# ------------------------------------------------------------------------------------------------------------------
# Model <-> checkpoint names
@dataclass
class Target:
    """One model tensor to fill: from one checkpoint tensor, or stacked from one per expert."""

    model_name: str
    shape: tuple[int, ...]  # the model's (possibly selected) shape
    sources: list[str]  # checkpoint names; several when stacked (index = expert)
    kind: str  # "weight" (a projection: may be FP8 with a scale), "float32" (router), "plain"
    is_param: bool = True
    stacked: bool = False  # sources are experts 0..E-1 of an [E, ...] tensor
    window: list[tuple[int, int]] | None = None  # per dim of the full tensor [start, stop), set by the plan
    experts: list[int] | None = None  # stacked, when select listed the experts: window[0] is then (0, len)


def _model_targets(model: Transformer) -> dict[str, Target]:
    from .model.layers import Linear
    from .model.moe import Gate, StackedLinear

    cfg = model.cfg
    targets: dict[str, Target] = {}
    params = {n for n, _ in model.named_parameters()}
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(SCALE_SUFFIX):
            continue
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        shape, is_param = tuple(p.shape), name in params
        if isinstance(mod, StackedLinear):
            prefix, proj = mod_name.rsplit(".", 1)
            srcs = [f"{prefix}.{e}.{proj}.weight" for e in range(cfg.n_routed_experts)]
            targets[name] = Target(name, shape, srcs, "weight", is_param, stacked=True)
        elif isinstance(mod, Gate):
            targets[name] = Target(name, shape, [name], "float32", is_param)
        elif isinstance(mod, Linear) and attr == "weight":
            targets[name] = Target(name, shape, [name], "weight", is_param)
        else:
            targets[name] = Target(name, shape, [name], "plain", is_param)
    return targets


def _skipped(cfg: ModelConfig, name: str, with_mtp: bool) -> bool:
    """Checkpoint tensors that are deliberately not loaded (and never read)."""
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        if not with_mtp:
            return True
        # The MTP layer's copies of the embedding and the output head: the main model's are used.
        return ".embed_tokens." in name or ".shared_head.head." in name
    return False


def fp8_scale_problems(layout: CheckpointLayout, names: Iterable[str]) -> list[str]:
    """What is wrong with the scales of FP8 weights `names`, one line per kind of problem (empty: all fine)."""
    no_scale, bad_scale = [], []
    for name in names:
        info, sinfo = layout.tensors[name], layout.tensors.get(name + SCALE_SUFFIX)
        if sinfo is None:
            no_scale.append(layout.where(name))
        elif sinfo.shape != fp8.scale_shape(info.shape) or sinfo.dtype not in _FLOAT_DTYPES:
            bad_scale.append(f"{layout.where(sinfo.name)} {list(sinfo.shape)} {ST_NAMES[sinfo.dtype]} (weight "
                             f"{list(info.shape)} needs float {list(fp8.scale_shape(info.shape))})")
    out = []
    if no_scale:
        out.append(f"FP8 weights without their {SCALE_SUFFIX} ({len(no_scale)}): {_names_list(no_scale)}")
    if bad_scale:
        out.append(f"scales whose shape does not match their weight ({len(bad_scale)}): {_names_list(bad_scale)}")
    return out


# ------------------------------------------------------------------------------------------------------------------
# Planning a load: every check before the first byte of data is read
def _normalise_window(t: Target, full: tuple[int, ...], sel) -> list[tuple[int, int]]:
    if sel is None:
        return [(0, d) for d in full]
    if isinstance(sel, slice):
        sel = (sel,)
    if t.stacked and isinstance(sel, tuple) and sel and isinstance(sel[0], list):
        # Expert parallelism with a placement that is not one contiguous range: read exactly these experts.
        ids = sel[0]
        if not ids or len(set(ids)) != len(ids) or not all(type(e) is int and 0 <= e < full[0] for e in ids):
            raise ValueError(f"select({t.model_name!r}, {full}) listed experts {ids!r}; expected distinct expert "
                             f"ids in [0, {full[0]})")
        t.experts = ids
        return [(0, len(ids))] + _normalise_window(t, full[1:], sel[1:])
    if not isinstance(sel, tuple) or len(sel) > len(full) or not all(isinstance(s, slice) for s in sel):
        raise ValueError(f"select({t.model_name!r}, {full}) returned {sel!r}; expected None or a tuple of at most "
                         f"{len(full)} slices")
    window = []
    for d, s in zip(full, sel + (slice(None),) * (len(full) - len(sel))):
        start, stop, step = s.indices(d)
        if step != 1 or stop <= start:
            raise ValueError(f"select({t.model_name!r}, {full}) returned {s!r}; slices must be non-empty with step 1")
        window.append((start, stop))
    return window


def _plan_load(cfg: ModelConfig, layout: CheckpointLayout, model: Transformer, with_mtp: bool,
               fp8_mode: str, select: Select | None) -> list[Target]:
    targets = list(_model_targets(model).values())
    expected = {s for t in targets for s in t.sources}
    present = set(layout.tensors)
    scales = {n for n in present if n.endswith(SCALE_SUFFIX)}
    where = layout.where
    problems = []

    def report(what: str, items: list[str]) -> None:
        if items:
            problems.append(f"{what} ({len(items)}): {_names_list(items)}")

    report("missing tensors", [n for n in expected if n not in present])
    report("unexpected tensors", [where(n) for n in present - scales
                                  if n not in expected and not _skipped(cfg, n, with_mtp)])
    report("scales without a weight", [where(n) for n in scales if n[: -len(SCALE_SUFFIX)] not in present])
    bad_shape, bad_dtype, mixed, fp8_names = [], [], [], []
    for t in targets:
        infos = [layout.tensors.get(s) for s in t.sources]
        if any(i is None for i in infos):
            continue
        stacked = t.stacked
        if select is None:
            for info in infos:
                want = t.shape[1:] if stacked else t.shape
                if info.shape != tuple(want):
                    bad_shape.append(f"{info.name} {list(info.shape)} in {info.file} (model expects {list(want)})")
        elif len({i.shape for i in infos}) > 1:
            bad_shape.append(f"{t.model_name}: experts stored with different shapes "
                             f"{sorted({i.shape for i in infos})}")
        if len({i.dtype for i in infos}) > 1:
            mixed.append(f"{t.model_name}: {_names_list({f'{where(i.name)} {ST_NAMES[i.dtype]}' for i in infos}, 4)}")
        for info in infos:
            ok = info.dtype in _FLOAT_DTYPES or (info.dtype == fp8.FP8_DTYPE and t.kind == "weight")
            if not ok:
                why = "only projection weights may be FP8" if info.dtype == fp8.FP8_DTYPE else "not a float dtype"
                bad_dtype.append(f"{where(info.name)} is {ST_NAMES[info.dtype]} ({why})")
                continue
            if info.dtype == fp8.FP8_DTYPE:
                fp8_names.append(info.name)
        full = (len(infos), *infos[0].shape) if stacked else infos[0].shape
        t.window = _normalise_window(t, full, select(t.model_name, full) if select else None)
        got = tuple(b - a for a, b in t.window)
        if select is not None and got != t.shape:
            bad_shape.append(f"{t.model_name}: the selected window {got} of {list(full)} does not match the "
                             f"model's {list(t.shape)}")
        if select is not None and fp8_mode == "keep" and infos[0].dtype == fp8.FP8_DTYPE:
            for (a, b), d in list(zip(t.window, full))[-2:]:
                if a % fp8.BLOCK or (b % fp8.BLOCK and b != d):
                    raise ValueError(f"select: window {t.window} of FP8 weight {t.model_name} does not lie on "
                                     f"{fp8.BLOCK}-element block boundaries, which fp8_mode='keep' needs (its scales "
                                     f"cover whole blocks); align the split or use fp8_mode='dequantize'")
    report("wrong shapes", bad_shape)
    report("unsupported dtypes", bad_dtype)
    report("experts stored in different dtypes", mixed)
    problems += fp8_scale_problems(layout, fp8_names)
    if problems:
        raise CheckpointError(f"checkpoint {layout.path} does not match its config.json "
                              f"({cfg.model_type}, {cfg.num_hidden_layers} layers):\n  " + "\n  ".join(problems))
    # Visit targets in file order so each file is read front to back.
    return sorted(targets, key=lambda t: (layout.tensors[t.sources[0]].file, layout.tensors[t.sources[0]].offset))


# ------------------------------------------------------------------------------------------------------------------
# Reading tensor bytes
def _read_at(f, offset: int, view: memoryview) -> int:
    """Fill `view` from byte `offset` of the open file; every byte a load reads goes through here."""
    f.seek(offset)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class TensorReader:
    """Reads windows of a checkpoint's tensors into CPU or device tensors, converting dtypes and dequantising FP8
    on the way, through one reused staging buffer. `on_bytes(n)` is told of every n bytes read."""

    def __init__(self, layout: CheckpointLayout, on_bytes: Callable[[int], None] | None = None):
        self.layout, self.on_bytes = layout, on_bytes or (lambda n: None)
        self._files: dict[str, object] = {}
        self._stage = torch.empty(0, dtype=torch.uint8)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _staging(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        if self._stage.numel() < n:
            self._stage = torch.empty(n, dtype=torch.uint8)
        return self._stage[:n].view(dtype).view(shape)

    def _read_rows(self, info: TensorInfo, r0: int, cols: tuple[int, int], out: torch.Tensor) -> None:
        """out [n, c1 - c0] (CPU, contiguous, info.dtype) <- info[r0:r0 + n, c0:c1] (1-D tensors: one row)."""
        if out.numel() == 0:
            return
        ncols = info.shape[-1] if info.shape else 1
        item = info.dtype.itemsize
        c0, c1 = cols
        fpath = os.path.join(self.layout.path, info.file)
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open(fpath, "rb", buffering=0)
        flat = memoryview(out.view(-1).view(torch.uint8).numpy())
        if c0 == 0 and c1 == ncols:  # whole rows: one contiguous range
            spans = [(info.offset + r0 * ncols * item, flat)]
        else:
            row = (c1 - c0) * item
            spans = [(info.offset + ((r0 + k) * ncols + c0) * item, flat[k * row:(k + 1) * row])
                     for k in range(out.shape[0])]
        for offset, view in spans:
            if _read_at(f, offset, view) != len(view):
                raise CheckpointError(f"{fpath}: the file ended while reading tensor {info.name!r}; it was "
                                      f"truncated or replaced during the read (download it again)")
            self.on_bytes(len(view))

    def fill(self, dest: torch.Tensor, name: str, rows: tuple[int, int], cols: tuple[int, int],
             scale: torch.Tensor | None = None) -> None:
        """dest [R, C] <- tensor[rows, cols] converted to dest's dtype (1-D tensors: rows (0, 1)). An FP8 source
        with `scale` (the float32 scales of the blocks the window touches, from read_scale) is dequantised exactly.
        Bytes go straight into dest when nothing changes, otherwise through the staging buffer in chunks of whole
        128-row blocks."""
        info = self.layout.tensors[name]
        r0, r1 = rows
        width = cols[1] - cols[0]
        direct = scale is None and dest.dtype == info.dtype and dest.device.type == "cpu"
        b = fp8.BLOCK
        per = max(1, _CHUNK_BYTES // max(1, width * info.dtype.itemsize))
        aligned = scale is not None and per >= b
        if aligned:
            per -= per % b
        r = r0
        while r < r1:
            n = min(r1 - r, per - (r % b if aligned else 0))
            out = dest[r - r0:r - r0 + n]
            buf = out if direct else self._staging((n, width), info.dtype)
            self._read_rows(info, r, cols, buf)
            if not direct:
                buf = buf.to(dest.device)
                if scale is None:
                    out.copy_(buf)
                else:
                    s = scale[r // b - r0 // b: -(-(r + n) // b) - r0 // b]
                    fp8.dequantize(buf, s, offset=(r % b, cols[0] % b), out=out)
            r += n

    def read_scale(self, name: str, rows: tuple[int, int], cols: tuple[int, int],
                   device: str | torch.device = "cpu") -> torch.Tensor:
        """The float32 scales of the blocks that the window [rows, cols] of FP8 weight `name` touches."""
        info = self.layout.tensors[name + SCALE_SUFFIX]
        b = fp8.BLOCK
        srows, scols = (rows[0] // b, -(-rows[1] // b)), (cols[0] // b, -(-cols[1] // b))
        s = torch.empty(srows[1] - srows[0], scols[1] - scols[0], dtype=torch.float32, device=device)
        self.fill(s, info.name, srows, scols)
        if not torch.isfinite(s).all():
            raise CheckpointError(f"{os.path.join(self.layout.path, info.file)}: tensor {info.name!r} holds "
                                  f"non-finite scales (NaN or inf): the file is corrupted; download it again")
        return s


# ------------------------------------------------------------------------------------------------------------------
# Loading
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
    for info in chosen:
        total += math.prod(b - a for a, b in win) * info.dtype.itemsize
        if info.dtype == fp8.FP8_DTYPE:
            scale = layout.tensors[info.name + SCALE_SUFFIX]
            total += math.prod(-(-b // fp8.BLOCK) - a // fp8.BLOCK for a, b in win[-2:]) * scale.dtype.itemsize
    return total


def load_weights(model: Transformer, path: str | os.PathLike, dtype: str | torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", fp8_mode: str = "dequantize", progress: bool | None = None,
                 select: Select | None = None, layout: CheckpointLayout | None = None) -> Transformer:
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
    order = _plan_load(cfg, layout, model, bool(model.mtp_layers), fp8_mode, select)
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


def load_model(path: str | os.PathLike, dtype: str | torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               fp8_mode: str = "dequantize", with_mtp: bool | None = None, attn_impl: str = "naive",
               progress: bool | None = None) -> Transformer:
    """Load a Hugging Face DeepSeek-V3-family checkpoint directory.

    dtype: compute dtype for everything not kept in FP8 (router weights and bias stay float32).
    fp8_mode: for FP8 checkpoints, "dequantize" (exact, to `dtype`, while loading) or "keep" (FP8 + block scales in
      memory, dequantised block-wise inside each matmul).
    with_mtp: load the MTP module(s) (num_nextn_predict_layers); False reads none of their bytes; None (the
      default) loads them when the checkpoint has them (transformers' save_pretrained drops them).
    progress: a bar of bytes read (None: only on a terminal).
    """
    if fp8_mode not in FP8_MODES:
        raise ValueError(f"fp8_mode {fp8_mode!r}: choose one of {FP8_MODES}")
    dtype = parse_dtype(dtype)
    device = parse_device(device)
    path, cfg, layout, with_mtp = open_checkpoint(path, with_mtp)
    model = build_model(cfg, "meta", with_mtp=with_mtp, attn_impl=attn_impl)
    load_weights(model, path, dtype, device, fp8_mode, progress, layout=layout)
    log.info("loaded %s: %.2f GB in %s on %s", path, model_bytes(model) / 1e9, dtype, device)
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


# ------------------------------------------------------------------------------------------------------------------
# Writing
def checkpoint_tensors(model: Transformer, fp8_weights: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under their checkpoint names, experts unstacked, in checkpoint order. With
    fp8_weights, the projections the official checkpoints store in FP8 are block-quantised and followed by their
    weight_scale_inv. MTP layers get copies of the shared embedding and head, as the official checkpoints store
    them."""
    cfg = model.cfg
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))

    def emit(name: str, t: torch.Tensor):
        if t.dtype == fp8.FP8_DTYPE:
            raise ValueError("writing a model loaded with fp8_mode='keep' is not supported; load with "
                             "fp8_mode='dequantize'")
        if fp8_weights and official_fp8(name):
            q, s = fp8.quantize(t)
            yield name, q
            yield name + SCALE_SUFFIX, s
        else:
            yield name, t.contiguous()

    for name, t in _model_targets(model).items():
        value = params[name].detach()
        if t.stacked:
            for e, src in enumerate(t.sources):
                yield from emit(src, value[e])
        else:
            yield from emit(name, value)
    for k, layer in enumerate(model.mtp_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}"
        yield f"{prefix}.embed_tokens.weight", model.model.embed_tokens.weight.detach()
        head = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        yield f"{prefix}.shared_head.head.weight", head.detach()


def write_checkpoint(path: str | os.PathLike, cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                     max_shard_bytes: int = 2 * 2**30, extra_config: dict | None = None,
                     drop_quantization: bool = False, dtype_name: str | None = None) -> dict:
    """Write tensors as sharded safetensors with an index, plus config.json. Files are written under temporary
    names and renamed at the end, so a failure leaves nothing half-written. Holds at most one shard in memory.
    Returns a summary."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tmp_names: list[str] = []
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    total = 0
    n_tensors = 0
    weight_map: dict[str, int] = {}

    def flush() -> None:
        i = len(tmp_names)
        tmp = os.path.join(path, f".tmp-shard-{i:05d}.safetensors")
        save_file(shards[-1], tmp, metadata={"format": "pt"})
        tmp_names.append(tmp)
        shards[-1] = {}
        sizes.append(0)

    try:
        for name, t in tensors:
            nb = t.numel() * t.element_size()
            if sizes[-1] and sizes[-1] + nb > max_shard_bytes:
                flush()
            t = t.contiguous()
            if any(o.data_ptr() == t.data_ptr() and o.shape == t.shape for o in shards[-1].values()):
                t = t.clone()  # safetensors refuses two names for one memory (the MTP layer's embedding/head copies)
            shards[-1][name] = t
            weight_map[name] = len(tmp_names)
            sizes[-1] += nb
            total += nb
            n_tensors += 1
        if shards[-1] or not tmp_names:
            flush()
        n = len(tmp_names)
        finals = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: finals[v] for k, v in sorted(weight_map.items())}}
        conf = cfg.to_dict()
        if drop_quantization:
            conf.pop("quantization_config", None)
        if dtype_name:
            conf["torch_dtype"] = dtype_name
            conf.pop("dtype", None)
        conf.update(extra_config or {})
        write_json(os.path.join(path, "config.json"), conf)
        mode = 0o666 & ~_umask()  # safetensors creates files readable by their owner only
        for tmp, final in zip(tmp_names, finals):
            os.chmod(tmp, mode)
            os.replace(tmp, os.path.join(path, final))
        write_json(os.path.join(path, INDEX_FILE), index)
        for stale in os.listdir(path):  # shards of an earlier, larger write would confuse readers
            if re.match(r"^model-\d{5}-of-\d{5}\.safetensors$", stale) and stale not in finals:
                os.remove(os.path.join(path, stale))
    except BaseException:
        for tmp in tmp_names:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    return {"path": path, "files": n, "tensors": n_tensors, "bytes": total}


def write_json(path: str, obj: dict) -> None:
    """Write JSON under a temporary name and rename it into place."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def save_model(model: Transformer, path: str | os.PathLike, fp8_weights: bool = False,
               max_shard_bytes: int = 2 * 2**30) -> dict:
    """Write `model` as a Hugging Face checkpoint (optionally in the official FP8 block format)."""
    cfg = model.cfg
    if fp8_weights:
        cfg = cfg.with_overrides(quantization_config=dict(FP8_QUANTIZATION_CONFIG))
    elif cfg.quantization_config is not None:
        cfg = cfg.with_overrides(quantization_config=None)
    dt = next(p.dtype for n, p in model.named_parameters() if n.endswith("embed_tokens.weight"))
    return write_checkpoint(path, cfg, checkpoint_tensors(model, fp8_weights), max_shard_bytes,
                            dtype_name=str(dt).removeprefix("torch."))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _looks_like_checkpoint(path: str) -> bool:
    names = os.listdir(path)
    return "config.json" in names or any(n.endswith(".safetensors") for n in names)


@contextmanager
def output_directory(dst: str | os.PathLike, overwrite: bool = False, sources: Iterable[str | os.PathLike] = ()
                     ) -> Iterator[str]:
    """Yield an empty staging directory next to `dst`; on success it replaces `dst` in one rename, on failure it is
    removed and `dst` is left exactly as it was. Refuses a `dst` that is (or contains, or lies inside) one of
    `sources`, and a non-empty `dst` unless `overwrite` (and even then only one that looks like a checkpoint)."""
    dst = os.path.abspath(os.fspath(dst))
    real = os.path.realpath(dst)
    for src in sources:
        s = os.path.realpath(os.fspath(src))
        if real == s or real.startswith(s + os.sep) or s.startswith(real + os.sep):
            raise ValueError(f"destination {dst} overlaps the source {os.fspath(src)}; write to a separate directory")
    if os.path.exists(dst):
        if not os.path.isdir(dst):
            raise ValueError(f"destination {dst} exists and is not a directory")
        if os.listdir(dst):
            if not overwrite:
                raise ValueError(f"destination {dst} is not empty; pass --overwrite (overwrite=True) to replace it")
            if not _looks_like_checkpoint(dst):
                raise ValueError(f"destination {dst} is not empty and does not look like a checkpoint (no config.json "
                                 f"or *.safetensors); refusing to replace it even with --overwrite")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should look like any other directory
        yield tmp
        if os.path.exists(dst):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
