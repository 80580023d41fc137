"""Writing checkpoints: the model's tensors under their checkpoint names (experts unstacked, optionally in the official
FP8 format, int8/int4 weights as their codes and scales), sharded safetensors with an index and config.json written under temporary names and renamed into place,
and the staging directory that replaces a destination in one rename or leaves it untouched."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

from ..config import ModelConfig
from ..kernels import fp8
from ..model.transformer import Transformer
from .fp8 import FP8_QUANTIZATION_CONFIG, SCALE_SUFFIX, official_fp8
from .layout import INDEX_FILE
from .quantized import SCALE_SUFFIX as QSCALE_SUFFIX
from .quantized import Quantization
from .targets import model_targets


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

    for name, t in model_targets(model).items():
        value = params[name].detach()
        owner = model.get_submodule(name.rpartition(".")[0])
        if getattr(owner, "quant", None) is not None:
            if fp8_weights:
                raise ValueError("a model with int8/int4 weights cannot be written in the FP8 format; write it as it "
                                 "is (save_model without fp8_weights) or load the original checkpoint")
            scales = owner.weight_scale.detach()
            for e, src in enumerate(t.sources) if t.stacked else [(None, name)]:
                yield src, (value if e is None else value[e]).contiguous()
                yield src + QSCALE_SUFFIX, (scales if e is None else scales[e]).contiguous()
            continue
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
        if model.lm_head is not None and model.lm_head.quant is not None:  # the copy in the head's own format
            yield f"{prefix}.shared_head.head.weight" + QSCALE_SUFFIX, model.lm_head.weight_scale.detach()


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
    q = model_quantization(model)
    if q is not None and not fp8_weights:
        cfg = cfg.with_overrides(quantization_config=q.config())
    elif fp8_weights:
        cfg = cfg.with_overrides(quantization_config=dict(FP8_QUANTIZATION_CONFIG))
    elif cfg.quantization_config is not None:
        cfg = cfg.with_overrides(quantization_config=None)
    dt = next(p.dtype for n, p in model.named_parameters() if n.endswith("embed_tokens.weight"))
    return write_checkpoint(path, cfg, checkpoint_tensors(model, fp8_weights), max_shard_bytes,
                            dtype_name=str(dt).removeprefix("torch."))


def model_quantization(model: Transformer) -> Quantization | None:
    """The int8/int4 quantisation a model holds (its projections' scheme and its head's), or None."""
    head = None if model.lm_head is None else model.lm_head.quant
    body = next((m.quant for n, m in model.named_modules() if getattr(m, "quant", None) is not None
                 and m is not model.lm_head), None)
    return None if body is None else Quantization(body, head)


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
