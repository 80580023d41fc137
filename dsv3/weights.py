"""Hugging Face safetensors checkpoints <-> the model.

Loading builds the model on the meta device, checks every checkpoint tensor against what the model expects
(names, shapes, dtypes: all mismatches listed at once), then streams tensors shard by shard from memory-mapped
files straight into their final place and dtype. Per-expert tensors (experts.{e}.gate_proj.weight) are stacked into
[E, ...] tensors; that is the only name transformation. FP8 weights (float8_e4m3fn + float32 weight_scale_inv per
128x128 block) are either dequantised while loading or kept as FP8 with their scales.

Nothing here unpickles: safetensors only.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open

from .config import ModelConfig
from .kernels import fp8
from .model.transformer import Transformer, build_model

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn,
}
_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
FP8_MODES = ("dequantize", "keep")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the files and tensors involved."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(_DTYPE_NAMES)}") from None


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


@dataclass
class CheckpointLayout:
    """Every tensor of a checkpoint with its file, shape and dtype (read from the safetensors headers only)."""

    path: str
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str) -> "CheckpointLayout":
        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object): {e}")
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(path, SINGLE_FILE)):
            weight_map, files = None, [SINGLE_FILE]
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no {INDEX_FILE}, {SINGLE_FILE} or *.safetensors files; "
                                      f"is this a Hugging Face checkpoint directory?")
            weight_map = None
        missing_files = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing_files:
            raise CheckpointError(f"{path}: shard(s) named in {INDEX_FILE} are missing: {_names_list(missing_files)}"
                                  f" (an interrupted download? fetch them again)")
        layout = cls(path)
        for fname in files:
            fpath = os.path.join(path, fname)
            size = os.path.getsize(fpath)
            try:
                with safe_open(fpath, framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        dt_name = sl.get_dtype()
                        if dt_name not in _ST_DTYPES:
                            raise CheckpointError(f"{fpath}: tensor {name!r} has dtype {dt_name}, which a DeepSeek "
                                                  f"checkpoint never uses (expected one of {sorted(_ST_DTYPES)})")
                        shape = tuple(sl.get_shape())
                        dtype = _ST_DTYPES[dt_name]
                        n = dtype.itemsize
                        for d in shape:
                            n *= d
                        layout.tensors[name] = TensorInfo(name, fname, shape, dtype, n)
            except CheckpointError:
                raise
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{fpath} ({size} bytes) cannot be read as safetensors: {e} "
                                      f"(truncated or corrupted? download it again)") from None
            _check_file_extent(fpath, size, layout, fname)
        if weight_map is not None:
            wrong = [n for n, fn in weight_map.items() if n in layout.tensors and layout.tensors[n].file != fn]
            absent = [n for n in weight_map if n not in layout.tensors]
            if absent:
                raise CheckpointError(f"{index} names tensors that no shard holds: {_names_list(absent)}")
            if wrong:
                raise CheckpointError(f"{index} places tensors in the wrong shard: {_names_list(wrong)}")
        return layout

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _check_file_extent(fpath: str, size: int, layout: CheckpointLayout, fname: str) -> None:
    # The header's offsets must fit in the file: a truncated download otherwise fails late, deep inside a read.
    with open(fpath, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{fpath}: corrupted safetensors header: {e}") from None
    data_len = size - 8 - header_len
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        info = layout.tensors.get(name)
        if end > data_len:
            raise CheckpointError(f"{fpath}: tensor {name!r} ends at byte {end} of the data section but the file "
                                  f"holds only {data_len} data bytes (truncated download? fetch it again)")
        if info is not None and info.file == fname and end - start != info.nbytes:
            raise CheckpointError(f"{fpath}: tensor {name!r} occupies {end - start} bytes but its header says "
                                  f"shape {list(info.shape)} x {info.dtype} = {info.nbytes} bytes")


# ------------------------------------------------------------------------------------------------------------------
# Model <-> checkpoint names
@dataclass
class Target:
    """One model tensor to fill: from one checkpoint tensor, or stacked from one per expert."""

    model_name: str
    shape: tuple[int, ...]
    sources: list[str]  # checkpoint names; several when stacked (index = expert)
    kind: str  # "weight" (may be fp8 with scale), "float32" (router), "plain"


def _model_targets(model: Transformer) -> dict[str, Target]:
    cfg = model.cfg
    targets: dict[str, Target] = {}
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        shape = tuple(p.shape)
        if name.endswith("weight_scale_inv"):
            continue
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if m:
            E = cfg.n_routed_experts
            srcs = [f"{m.group(1)}.{e}.{m.group(2)}.weight" for e in range(E)]
            targets[name] = Target(name, shape, srcs, "weight")
        elif ".mlp.gate." in name:
            targets[name] = Target(name, shape, [name], "float32")
        elif name.endswith("_proj.weight") or name == "lm_head.weight":
            targets[name] = Target(name, shape, [name], "weight")
        else:
            targets[name] = Target(name, shape, [name], "plain")
    return targets


def _skipped(cfg: ModelConfig, name: str, with_mtp: bool) -> bool:
    """Checkpoint tensors that are deliberately not loaded."""
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        if not with_mtp:
            return True
        # The MTP layer's copies of the embedding and the output head: the main model's are used.
        return ".embed_tokens." in name or ".shared_head.head." in name
    return False


# ------------------------------------------------------------------------------------------------------------------
# Loading
class _Shards:
    """Lazily opened, memory-mapped shard files."""

    def __init__(self, path: str):
        self.path, self._open = path, {}

    def get(self, info: TensorInfo) -> torch.Tensor:
        f = self._open.get(info.file)
        if f is None:
            f = self._open[info.file] = safe_open(os.path.join(self.path, info.file), framework="pt")
        try:
            return f.get_tensor(info.name)
        except Exception as e:
            raise CheckpointError(f"{os.path.join(self.path, info.file)}: reading tensor {info.name!r} failed: {e}")

    def close(self) -> None:
        self._open.clear()


def _plan_load(cfg: ModelConfig, layout: CheckpointLayout, model: Transformer, with_mtp: bool
               ) -> dict[str, Target]:
    targets = _model_targets(model)
    expected: dict[str, tuple[Target, int]] = {}
    for t in targets.values():
        for i, s in enumerate(t.sources):
            expected[s] = (t, i)
    present = set(layout.tensors)
    scales = {n for n in present if n.endswith(SCALE_SUFFIX)}
    missing = [n for n in expected if n not in present]
    unexpected = [n for n in present - scales if n not in expected and not _skipped(cfg, n, with_mtp)]
    orphan_scales = [n for n in scales if n[: -len(SCALE_SUFFIX)] not in present]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_names_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_names_list(unexpected)}")
    if orphan_scales:
        problems.append(f"scales without a weight ({len(orphan_scales)}): {_names_list(orphan_scales)}")
    bad_shape, no_scale, bad_scale, bad_fp8 = [], [], [], []
    for name, (t, _) in expected.items():
        info = layout.tensors.get(name)
        if info is None:
            continue
        want = t.shape[1:] if len(t.sources) > 1 else t.shape
        if info.shape != tuple(want):
            bad_shape.append(f"{name} {list(info.shape)} (model expects {list(want)})")
        if info.dtype == fp8.FP8_DTYPE:
            if t.kind != "weight":
                bad_fp8.append(name)
                continue
            sname = name + SCALE_SUFFIX
            sinfo = layout.tensors.get(sname)
            if sinfo is None:
                no_scale.append(name)
            elif sinfo.shape != fp8.scale_shape(info.shape):
                bad_scale.append(f"{sname} {list(sinfo.shape)} (weight {list(info.shape)} needs "
                                 f"{list(fp8.scale_shape(info.shape))})")
    if bad_shape:
        problems.append(f"wrong shapes ({len(bad_shape)}): {_names_list(bad_shape)}")
    if no_scale:
        problems.append(f"FP8 weights without their {SCALE_SUFFIX} ({len(no_scale)}): {_names_list(no_scale)}")
    if bad_scale:
        problems.append(f"scales whose shape does not match their weight ({len(bad_scale)}): {_names_list(bad_scale)}")
    if bad_fp8:
        problems.append(f"FP8 tensors that must not be FP8 ({len(bad_fp8)}): {_names_list(bad_fp8)}")
    if problems:
        raise CheckpointError(f"checkpoint {layout.path} does not match its config.json "
                              f"({cfg.model_type}, {cfg.num_hidden_layers} layers):\n  " + "\n  ".join(problems))
    return targets


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor, is_param: bool) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if is_param:
        mod._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


def load_model(path: str | os.PathLike, dtype: str | torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               fp8_mode: str = "dequantize", with_mtp: bool | None = None, attn_impl: str = "naive",
               progress: bool | None = None, select: Callable[[str, int], bool] | None = None) -> Transformer:
    """Load a Hugging Face DeepSeek-V3-family checkpoint directory.

    dtype: compute dtype for everything not kept in FP8 (router weights and bias stay float32).
    fp8_mode: for FP8 checkpoints, "dequantize" (exact, to `dtype`, while loading) or "keep" (FP8 + block scales in
      memory, dequantised block-wise inside each matmul).
    with_mtp: load the MTP module(s) (num_nextn_predict_layers); False saves their memory and read time; None (the
      default) loads them when the checkpoint has them (transformers' save_pretrained drops them).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    if fp8_mode not in FP8_MODES:
        raise ValueError(f"fp8_mode {fp8_mode!r}: choose one of {FP8_MODES}")
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    cfg = ModelConfig.from_pretrained(path)
    layout = CheckpointLayout.read(path)
    if with_mtp is None:
        with_mtp = cfg.num_nextn_predict_layers > 0 and any(
            n.startswith(f"model.layers.{cfg.num_hidden_layers}.") for n in layout.tensors)
        if cfg.num_nextn_predict_layers and not with_mtp:
            log.warning("%s: config.json declares %d MTP layer(s) but the checkpoint holds none; loading without MTP",
                        path, cfg.num_nextn_predict_layers)
    model = build_model(cfg, "meta", with_mtp=with_mtp, attn_impl=attn_impl)
    targets = _plan_load(cfg, layout, model, with_mtp)
    param_names = {n for n, _ in model.named_parameters()}
    shards = _Shards(path)

    # Visit targets in shard order so each file is read front to back (a stacked target follows its first expert).
    def first_pos(t: Target) -> tuple[str, str]:
        info = layout.tensors[t.sources[0]]
        return info.file, t.sources[0]

    order = sorted(targets.values(), key=first_pos)
    to_read = sum(layout.tensors[s].nbytes for t in order for s in t.sources)
    bar = _progress(to_read, f"loading {os.path.basename(os.path.normpath(path))}", progress)
    try:
        with torch.no_grad():
            for t in order:
                infos = [layout.tensors[s] for s in t.sources]
                is_fp8 = infos[0].dtype == fp8.FP8_DTYPE
                keep = is_fp8 and fp8_mode == "keep"
                out_dtype = torch.float32 if t.kind == "float32" else (fp8.FP8_DTYPE if keep else dtype)
                dest = torch.empty(t.shape, dtype=out_dtype, device=device)
                scale_dest = None
                if keep:
                    scale_dest = torch.empty((len(infos), *fp8.scale_shape(infos[0].shape)) if len(infos) > 1
                                             else fp8.scale_shape(infos[0].shape), dtype=torch.float32, device=device)
                for i, info in enumerate(infos):
                    src = shards.get(info)
                    if src.dtype == fp8.FP8_DTYPE:
                        scale = shards.get(layout.tensors[info.name + SCALE_SUFFIX])
                        if keep:
                            (scale_dest[i] if len(infos) > 1 else scale_dest).copy_(scale)
                        else:
                            src = fp8.dequantize(src, scale, out_dtype)
                    (dest[i] if len(infos) > 1 else dest).copy_(src)
                    bar.update(info.nbytes)
                    del src
                _set_tensor(model, t.model_name, dest, t.model_name in param_names)
                if keep:
                    model.get_submodule(t.model_name.rpartition(".")[0]).set_fp8(scale_dest)
    finally:
        bar.close()
        shards.close()
    model.eval()
    log.info("loaded %s: %.2f GB in %s on %s", path, model_bytes(model) / 1e9, dtype, device)
    return model


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm.auto import tqdm

    disable = (not enabled) if enabled is not None else None  # None: tqdm decides (off when not a terminal)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=disable,
                leave=False)


# ------------------------------------------------------------------------------------------------------------------
# Writing
def checkpoint_tensors(model: Transformer, fp8_weights: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under their checkpoint names, experts unstacked, in checkpoint order. With
    fp8_weights, every projection weight is block-quantised and followed by its weight_scale_inv. MTP layers get
    copies of the shared embedding and head, as the official checkpoints store them."""
    cfg = model.cfg
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    targets = _model_targets(model)

    def emit(name: str, t: torch.Tensor, kind: str):
        if t.dtype == fp8.FP8_DTYPE:
            raise ValueError("writing a model loaded with fp8_mode='keep' is not supported; load with "
                             "fp8_mode='dequantize'")
        if kind == "weight" and fp8_weights and name != "lm_head.weight":
            q, s = fp8.quantize(t)
            yield name, q
            yield name + SCALE_SUFFIX, s
        else:
            yield name, t.contiguous()

    for name, t in targets.items():
        value = params[name].detach()
        if len(t.sources) > 1:
            for e, src in enumerate(t.sources):
                yield from emit(src, value[e], t.kind)
        else:
            yield from emit(name, value, t.kind)
    for k, layer in enumerate(model.mtp_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}"
        yield f"{prefix}.embed_tokens.weight", model.model.embed_tokens.weight.detach()
        head = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        yield f"{prefix}.shared_head.head.weight", head.detach()


def write_checkpoint(path: str | os.PathLike, cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                     max_shard_bytes: int = 2 * 2**30, extra_config: dict | None = None,
                     drop_quantization: bool = False, dtype_name: str | None = None) -> dict:
    """Write tensors as sharded safetensors with an index, plus config.json. Files are written under temporary
    names and renamed at the end, so a failure leaves nothing half-written. Returns a summary."""
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
            shards[-1][name] = t.contiguous()
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
        _atomic_write_json(os.path.join(path, "config.json"), conf)
        for tmp, final in zip(tmp_names, finals):
            os.replace(tmp, os.path.join(path, final))
        _atomic_write_json(os.path.join(path, INDEX_FILE), index)
        for stale in os.listdir(path):  # shards of an earlier, larger write would confuse readers
            if re.match(r"^model-\d{5}-of-\d{5}\.safetensors$", stale) and stale not in finals:
                os.remove(os.path.join(path, stale))
    except BaseException:
        for tmp in tmp_names:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    return {"path": path, "files": n, "tensors": n_tensors, "bytes": total}


def _atomic_write_json(path: str, obj: dict) -> None:
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
        cfg = cfg.with_overrides(quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                                      "activation_scheme": "dynamic", "weight_block_size": [128, 128]})
    elif cfg.quantization_config is not None:
        cfg = cfg.with_overrides(quantization_config=None)
    dt = next(p.dtype for n, p in model.named_parameters() if n.endswith("embed_tokens.weight"))
    return write_checkpoint(path, cfg, checkpoint_tensors(model, fp8_weights), max_shard_bytes,
                            dtype_name=str(dt).removeprefix("torch."))
