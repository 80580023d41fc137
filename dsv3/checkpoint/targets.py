"""Planning a load: which model tensor comes from which checkpoint tensor(s) (the one name transformation: per-expert
tensors stacked into [E, ...]), which checkpoint tensors are deliberately skipped, and every check of the checkpoint
against the model (names, shapes, dtypes, FP8 and int8/int4 scales, parallel windows) before the first data byte is
read; all mismatches are listed at once."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable

from ..config import ModelConfig
from ..kernels import fp8
from ..model.transformer import Transformer
from ..kernels import quant as qk
from .fp8 import SCALE_SUFFIX, fp8_scale_problems
from .layout import FLOAT_DTYPES, ST_NAMES, CheckpointError, CheckpointLayout, names_list
from .quantized import SCALE_NAME, Quantization, scale_problems
from .quantized import SCALE_SUFFIX as QSCALE_SUFFIX

log = logging.getLogger(__name__)

Select = Callable[[str, tuple[int, ...]], "tuple[slice | list[int], ...] | None"]


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
    quant: qk.Scheme | None = None  # set by the plan: the int8/int4 scheme this weight is held in
    stored_quant: bool = False  # set by the plan: the checkpoint already holds its codes and scales


def model_targets(model: Transformer) -> dict[str, Target]:
    from ..model.layers import Linear
    from ..model.moe import Gate, StackedLinear

    cfg = model.cfg
    targets: dict[str, Target] = {}
    params = {n for n, _ in model.named_parameters()}
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(SCALE_SUFFIX) or name.rpartition(".")[2] == SCALE_NAME:
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


def skipped(cfg: ModelConfig, name: str, with_mtp: bool) -> bool:
    """Checkpoint tensors that are deliberately not loaded (and never read)."""
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        if not with_mtp:
            return True
        # The MTP layer's copies of the embedding and the output head: the main model's are used.
        return ".embed_tokens." in name or ".shared_head.head." in name
    return False


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


def plan_load(cfg: ModelConfig, layout: CheckpointLayout, model: Transformer, with_mtp: bool,
              fp8_mode: str, select: Select | None, quantize: Quantization | None = None) -> list[Target]:
    """The targets in file order, each checked against the checkpoint. quantize: quantise the weights it covers
    while loading (a checkpoint written quantised, declared in its config.json, is read as it is stored)."""
    stored = Quantization.from_config(cfg)
    if stored is not None and quantize is not None and quantize != stored:
        raise ValueError(f"{layout.path} is already quantised to {stored.name} (its config.json's quantization_config); "
                         f"it cannot be loaded as {quantize.name}: drop --quantize / quantize=, or quantise the "
                         f"original checkpoint")
    q = stored or quantize
    targets = list(model_targets(model).values())
    for t in targets:
        t.quant = q.scheme_for(t.sources[0]) if q is not None and t.kind == "weight" else None
        t.stored_quant = stored is not None and t.quant is not None
    expected = {s for t in targets for s in t.sources}
    present = set(layout.tensors)
    scales = {n for n in present if n.endswith(SCALE_SUFFIX)}
    if stored is not None:
        scales |= {n for n in present if n.endswith("." + SCALE_NAME)}
    where = layout.where
    problems = []

    def report(what: str, items: list[str]) -> None:
        if items:
            problems.append(f"{what} ({len(items)}): {names_list(items)}")

    report("missing tensors", [n for n in expected if n not in present])
    report("unexpected tensors", [where(n) for n in present - scales
                                  if n not in expected and not skipped(cfg, n, with_mtp)])
    report("scales without a weight", [where(n) for n in scales if n.removesuffix(SCALE_SUFFIX).removesuffix(
        QSCALE_SUFFIX) not in present])
    bad_shape, bad_dtype, mixed, fp8_names, quant_names, unaligned = [], [], [], [], [], []
    for t in targets:
        infos = [layout.tensors.get(s) for s in t.sources]
        if any(i is None for i in infos):
            continue
        stacked = t.stacked
        logical = tuple(t.shape[1:] if stacked else t.shape) if select is None else None
        if t.stored_quant:
            # Codes and scales are checked together below; the window is planned on the weight's logical shape.
            full_w = logical or _logical_shape(t, infos[0].shape)
            quant_names += [(i.name, full_w) for i in infos]
            full = (len(infos), *full_w) if stacked else full_w
            t.window = _normalise_window(t, full, select(t.model_name, full) if select else None)
            _check_group_window(t, full)
            continue
        if select is None:
            for info in infos:
                want = t.shape[1:] if stacked else t.shape
                if info.shape != tuple(want):
                    bad_shape.append(f"{info.name} {list(info.shape)} in {info.file} (model expects {list(want)})")
        elif len({i.shape for i in infos}) > 1:
            bad_shape.append(f"{t.model_name}: experts stored with different shapes "
                             f"{sorted({i.shape for i in infos})}")
        if len({i.dtype for i in infos}) > 1:
            mixed.append(f"{t.model_name}: {names_list({f'{where(i.name)} {ST_NAMES[i.dtype]}' for i in infos}, 4)}")
        for info in infos:
            ok = info.dtype in FLOAT_DTYPES or (info.dtype == fp8.FP8_DTYPE and t.kind == "weight")
            if not ok:
                why = "only projection weights may be FP8" if info.dtype == fp8.FP8_DTYPE else "not a float dtype"
                bad_dtype.append(f"{where(info.name)} is {ST_NAMES[info.dtype]} ({why})")
                continue
            if info.dtype == fp8.FP8_DTYPE:
                fp8_names.append(info.name)
        full = (len(infos), *infos[0].shape) if stacked else infos[0].shape
        t.window = _normalise_window(t, full, select(t.model_name, full) if select else None)
        if t.quant is not None:
            t.quant.check_divides(t.model_name, tuple(full))
            if not _group_aligned(t, full):
                unaligned.append(t.model_name)
                t.quant = None  # quantising this rank's slice alone would group other weights than the full tensor
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
    if stored is not None:
        problems += scale_problems(layout, stored, quant_names)
    if unaligned:
        log.warning("%d weight slice(s) cut their input dimension inside a group of %d and stay unquantised on this "
                    "rank: %s (choose TP/EP sizes that split these dimensions on group boundaries)",
                    len(unaligned), q.scheme.group_size, names_list(unaligned))
    if problems:
        raise CheckpointError(f"checkpoint {layout.path} does not match its config.json "
                              f"({cfg.model_type}, {cfg.num_hidden_layers} layers):\n  " + "\n  ".join(problems))
    # Visit targets in file order so each file is read front to back.
    return sorted(targets, key=lambda t: (layout.tensors[t.sources[0]].file, layout.tensors[t.sources[0]].offset))


def _logical_shape(t: Target, code_shape: tuple[int, ...]) -> tuple[int, ...]:
    """A quantised weight's [O, I] from its stored codes (sharded loads, where the model's shape is the window's)."""
    return (*code_shape[:-1], t.quant.in_features(code_shape))


def _group_aligned(t: Target, full: tuple[int, ...]) -> bool:
    a, b = t.window[-1]
    g = t.quant.group_size
    return not (a % g or (b % g and b != full[-1]))


def _check_group_window(t: Target, full: tuple[int, ...]) -> None:
    """A parallel window of a stored quantised weight must cut its input dimension on group boundaries."""
    g = t.quant.group_size
    if not _group_aligned(t, full):
        raise ValueError(f"select: window {t.window} of {t.quant.name} weight {t.model_name} cuts its input dimension "
                         f"inside a group of {g} weights (each group shares one scale); choose a split on "
                         f"{g}-weight boundaries")
