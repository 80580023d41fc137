"""Expert placement: which routed experts each EP rank holds. The contiguous split (the default), a balanced
placement from recorded expert loads, reading and checking a placement spec (resolve_placement), recording the
loads on a single-process model, and the before/after report the benchmark prints.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import torch

from ..config import ModelConfig
from ..model.moe import MoE
from ..model.transformer import Transformer
from .state import split

# A placement: for each EP rank, the routed experts it holds (global ids), per MoE layer or one for all layers.
Placement = list[list[int]]


def contiguous_placement(n_experts: int, ep: int) -> Placement:
    return [list(range(*split(n_experts, ep, r))) for r in range(ep)]


def balanced_placement(loads: Sequence[float], ep: int) -> Placement:
    """Greedy bin-packing (longest processing time first): experts in decreasing load order each go to the
    least-loaded rank that still has room; every rank keeps the same number of experts (so the same memory) as
    the contiguous split."""
    n = len(loads)
    room = [b - a for a, b in (split(n, ep, r) for r in range(ep))]
    bins: Placement = [[] for _ in range(ep)]
    totals = [0.0] * ep
    for e in sorted(range(n), key=lambda e: (-loads[e], e)):
        r = min((r for r in range(ep) if len(bins[r]) < room[r]), key=lambda r: (totals[r], r))
        bins[r].append(e)
        totals[r] += loads[e]
    return [sorted(b) for b in bins]


def rank_loads(loads: Sequence[float], placement: Placement) -> list[float]:
    return [float(sum(loads[e] for e in experts)) for experts in placement]


def check_placement(placement: Any, n_experts: int, ep: int, where: str = "placement") -> Placement:
    if (not isinstance(placement, (list, tuple)) or len(placement) != ep
            or not all(isinstance(p, (list, tuple)) and p for p in placement)):
        raise ValueError(f"{where}: expected {ep} non-empty lists of expert ids (one per EP rank), got "
                         f"{str(placement)[:200]}")
    flat = [e for p in placement for e in p]
    if sorted(flat) != list(range(n_experts)) or not all(type(e) is int for e in flat):
        missing = sorted(set(range(n_experts)) - set(flat))
        raise ValueError(f"{where}: every expert 0..{n_experts - 1} must be placed exactly once "
                         f"(missing {missing[:10]}, {len(flat)} placed)")
    return [list(p) for p in placement]


def resolve_placement(spec: Any, cfg: ModelConfig, ep: int) -> dict[int, Placement] | None:
    """Per-layer placements from `spec`: None (contiguous everywhere), a JSON file path, or its content:
    {"placement": [[ids of rank 0], [ids of rank 1], ...]} for every layer, {"placement": {"<layer>": [[...], ...]}}
    per layer, or {"loads": {"<layer>": [count of expert 0, count of expert 1, ...]}} (recorded expert loads, see
    record_expert_loads): a balanced placement is computed per layer; layers without loads stay contiguous."""
    if spec is None:
        return None
    where = "expert placement"
    if isinstance(spec, (str, os.PathLike)):
        where = os.fspath(spec)
        try:
            with open(spec, encoding="utf-8") as f:
                spec = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"expert placement file {where}: {e}") from None
    if not isinstance(spec, dict) or not ({"placement", "loads"} & set(spec)):
        raise ValueError(f"{where}: expected a JSON object with 'placement' or 'loads'")
    E = cfg.n_routed_experts
    moe_layers = [i for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers) if cfg.is_moe_layer(i)]
    out: dict[int, Placement] = {}
    if "placement" in spec:
        p = spec["placement"]
        if isinstance(p, dict):
            for k, v in p.items():
                out[_layer_key(k, moe_layers, where)] = check_placement(v, E, ep, f"{where} layer {k}")
        else:
            p = check_placement(p, E, ep, where)
            out = {i: p for i in moe_layers}
    else:
        loads = spec["loads"]
        if not isinstance(loads, dict):
            raise ValueError(f"{where}: 'loads' must map layer numbers to lists of {E} expert counts")
        for k, v in loads.items():
            if not isinstance(v, list) or len(v) != E or not all(isinstance(c, (int, float)) and c >= 0 for c in v):
                raise ValueError(f"{where}: loads of layer {k} must be {E} non-negative numbers")
            out[_layer_key(k, moe_layers, where)] = balanced_placement(v, ep)
    return out


def _layer_key(k: Any, moe_layers: list[int], where: str) -> int:
    try:
        i = int(k)
    except (TypeError, ValueError):
        i = -1
    if i not in moe_layers:
        raise ValueError(f"{where}: {k!r} is not a MoE layer of this model (MoE layers: {moe_layers})")
    return i


@torch.no_grad()
def record_expert_loads(model: Transformer, batches: Iterable[torch.Tensor]) -> dict[int, list[int]]:
    """Calibration on a single-process model: how many tokens each routed expert of each main MoE layer got over
    `batches` (input ids [B, S] or [S]). json.dump({"loads": result}) gives a file resolve_placement reads."""
    moes = {i: layer.mlp for i, layer in enumerate(model.main_layers) if isinstance(layer.mlp, MoE)}
    E = model.cfg.n_routed_experts
    counts = {i: torch.zeros(E, dtype=torch.long) for i in moes}
    for m in moes.values():
        m.record_routing = True
    try:
        for ids in batches:
            ids = ids if ids.dim() == 2 else ids[None]
            model(ids.to(next(model.parameters()).device))
            for i, m in moes.items():
                counts[i] += torch.bincount(m.last_routing[0].reshape(-1).cpu(), minlength=E)
    finally:
        for m in moes.values():
            m.record_routing, m.last_routing = False, None
    return {i: c.tolist() for i, c in counts.items()}


def placement_report(loads: dict[int, list[int]], placements: dict[int, Placement], ep: int) -> list[dict]:
    """Per layer: each EP rank's load (tokens routed to its experts) with the contiguous split and with
    `placements`, and the busiest rank's load over the mean."""
    rows = []
    for i, l in sorted(loads.items()):
        before = rank_loads(l, contiguous_placement(len(l), ep))
        after = rank_loads(l, placements.get(i, contiguous_placement(len(l), ep)))
        mean = sum(l) / ep or 1.0
        rows.append({"layer": i, "before": before, "after": after, "max_over_mean_before": max(before) / mean,
                     "max_over_mean_after": max(after) / mean})
    return rows
