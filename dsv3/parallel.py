"""Tensor and expert parallelism on torch.distributed: process groups, the sharded layers, and loading a rank's
slices straight from a Hugging Face checkpoint.

Dimension letters: T tokens, D hidden, H heads (h local), V vocabulary (v local), E routed experts (e local),
I intermediate width (i local), W world size = tp * ep.

Rank layout: rank = ep_rank * tp + tp_rank, so the ranks of one TP group are consecutive (one node's GPUs) and an
EP group holds the ranks with the same tp_rank. Every rank sees every token of a step:
  attention     heads split across the TP group: q_proj / q_b_proj and kv_b_proj rows by head, o_proj columns by
                head, one all-reduce (TP group) of o_proj's output. The latent cache is per token and shared by
                all heads, so each rank keeps the whole of it (replicated, no split).
  dense MLP     gate/up rows and down columns split across the TP group, one all-reduce (TP group).
  embedding     vocabulary rows split across the TP group: each rank looks up the ids it holds, zeros elsewhere,
                one all-reduce (TP group). The head computes local logits and all-gathers them (TP group).
  MoE           router replicated (every rank routes every token the same way). Routed experts are split across
                the EP ranks (contiguous by default, or a configured placement), and each expert's intermediate
                width across the TP ranks; the shared experts' intermediate width is split across all W ranks. Each
                rank adds up what its slices contribute for every token, and one all-reduce over all W ranks
                combines the routed and shared parts together.
Sharding happens on the meta-device model before loading, so a rank allocates and reads only its own slices
(weights.load_weights' select hook); FP8 scales are sliced with the weights (see load_sharded).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kernels import fp8
from .model.layers import MLP, Linear
from .model.moe import Experts, MoE, StackedLinear
from .model.transformer import Transformer, build_model

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
GROUPS = ("tp", "ep", "world")
# A placement: for each EP rank, the routed experts it holds (global ids), per MoE layer or one for all layers.
Placement = list[list[int]]


class ParallelError(RuntimeError):
    """A collective or the rendezvous failed: a peer died, hung, or never arrived."""


# ------------------------------------------------------------------------------------------------------------------
# Process groups
@dataclass
class CommStats:
    """Time and bytes spent in collectives, per kind. On GPUs the time covers only the launch unless `sync` is on
    (the benchmark turns it on; it costs a device sync per collective)."""

    sync: bool = False
    calls: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.calls.clear()
        self.seconds.clear()
        self.nbytes.clear()

    def add(self, kind: str, seconds: float, nbytes: int) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.nbytes[kind] = self.nbytes.get(kind, 0) + nbytes

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


@dataclass(frozen=True)
class ParallelState:
    """Who this process is and which groups it talks to. Passed explicitly to whatever needs it; size-1 groups are
    None and their collectives are skipped."""

    rank: int = 0
    world_size: int = 1
    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    device: torch.device = torch.device("cpu")
    tp_group: Any = None
    ep_group: Any = None
    world_group: Any = None
    control_group: Any = None  # gloo: the engine's host-side messages (also when the model runs on NCCL)
    timeout_s: float = DEFAULT_TIMEOUT_S
    comm: CommStats = field(default_factory=CommStats)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size} (tp {self.tp_rank}/{self.tp_size}, ep {self.ep_rank}/{self.ep_size})"

    def _group(self, name: str) -> tuple[Any, int]:
        return {"tp": (self.tp_group, self.tp_size), "ep": (self.ep_group, self.ep_size),
                "world": (self.world_group, self.world_size), "control": (self.control_group, self.world_size)}[name]

    @contextmanager
    def _collective(self, kind: str, group: str, nbytes: int, device: torch.device):
        sync = self.comm.sync and device.type == "cuda"
        if sync:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        try:
            yield
            if sync:
                torch.cuda.synchronize(device)
        except Exception as e:  # noqa: BLE001 - every backend has its own error types; all mean the same here
            raise ParallelError(f"{self.describe()}: {kind} over the {group} group failed: a peer rank died or did "
                                f"not answer within {self.timeout_s:g} s ({type(e).__name__}: {e})") from e
        finally:
            self.comm.add(kind, time.perf_counter() - t0, nbytes)

    def all_reduce(self, x: torch.Tensor, group: str) -> torch.Tensor:
        """Sum x over `group` in place (x must be contiguous); returns x."""
        g, n = self._group(group)
        if n == 1:
            return x
        with self._collective("all_reduce", group, x.numel() * x.element_size(), x.device):
            dist.all_reduce(x, group=g)
        return x

    def all_gather_last(self, x: torch.Tensor, group: str, sizes: Sequence[int]) -> torch.Tensor:
        """Concatenate every rank's x along the last dim; rank j's part is sizes[j] wide (x is padded to the
        widest part for the transfer)."""
        g, n = self._group(group)
        if n == 1:
            return x
        width = max(sizes)
        if x.shape[-1] < width:
            x = F.pad(x, (0, width - x.shape[-1]))
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(n)]
        with self._collective("all_gather", group, x.numel() * x.element_size() * n, x.device):
            dist.all_gather(parts, x, group=g)
        return torch.cat([p[..., :s] for p, s in zip(parts, sizes)], dim=-1)

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (over the control group)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        with self._collective("broadcast", "control", 0, torch.device("cpu")):
            dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    def broadcast_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's CPU tensor x into every rank's x (same shape and dtype everywhere)."""
        if self.world_size == 1:
            return x
        with self._collective("broadcast", "control", x.numel() * x.element_size(), x.device):
            dist.broadcast(x, src=0, group=self.control_group)
        return x

    def shutdown(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
        # A group's worker threads are joined only when the group object dies, and one may still hold the last
        # collective's tensors: released during interpreter teardown, that aborts the process. Drop them now.
        for name in ("tp_group", "ep_group", "world_group", "control_group"):
            object.__setattr__(self, name, None)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_sizes(world: int, tp: int | None, ep: int | None) -> tuple[int, int]:
    """(tp, ep) with tp * ep == world; unset sizes fill the world (all TP by default, like the official code)."""
    for name, v in (("--tp", tp), ("--ep", ep)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if tp is None and ep is None:
        tp, ep = world, 1
    elif tp is None:
        tp = world // ep if world % ep == 0 else 0
    elif ep is None:
        ep = world // tp if world % tp == 0 else 0
    if not tp or not ep or tp * ep != world:
        if world == 1:
            raise ValueError(f"--tp {tp or '?'} --ep {ep or '?'} needs {(tp or 1) * (ep or 1)} processes but this is a "
                             f"single process; launch with torchrun --nproc-per-node {(tp or 1) * (ep or 1)} -m dsv3 ...")
        raise ValueError(f"--tp {tp or '?'} x --ep {ep or '?'} must equal the number of processes ({world}, "
                         f"WORLD_SIZE from torchrun)")
    return tp, ep


def init_parallel(tp: int | None = None, ep: int | None = None, backend: str | None = None,
                  timeout_s: float | None = None) -> ParallelState:
    """Join the process group torchrun (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set
    up and build the TP/EP groups. backend None: nccl when CUDA is available, else gloo. timeout_s bounds the
    rendezvous and every collective (default 600 s, or DSV3_DIST_TIMEOUT): a rank that never arrives or dies ends
    the others with ParallelError instead of a silent hang. A single process gets a trivial state."""
    world = _env_int("WORLD_SIZE", 1)
    tp, ep = resolve_sizes(world, tp, ep)
    if timeout_s is None:
        timeout_s = float(os.environ.get("DSV3_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if world == 1:
        return ParallelState(timeout_s=timeout_s)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(seconds=timeout_s)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world)
        except Exception as e:  # noqa: BLE001 - store timeouts, refused connections, bad addresses
            raise ParallelError(f"rank {rank} of {world}: the rendezvous at {where} did not complete within "
                                f"{timeout_s:g} s ({type(e).__name__}: {e}). Are all {world} processes started "
                                f"(torchrun --nnodes/--node-rank/--rdzv-endpoint on every node) and can they reach "
                                f"{where}?") from e
    try:
        world_group = dist.group.WORLD
        tp_group = ep_group = None
        # new_group is collective: every rank creates every group, in the same order.
        for e in range(ep):
            ranks = [e * tp + t for t in range(tp)]
            g = world_group if tp == world else (dist.new_group(ranks, timeout=timeout) if tp > 1 else None)
            if rank in ranks:
                tp_group = g
        for t in range(tp):
            ranks = [e * tp + t for e in range(ep)]
            g = world_group if ep == world else (dist.new_group(ranks, timeout=timeout) if ep > 1 else None)
            if rank in ranks:
                ep_group = g
        # Its own group even on gloo: the driver's heartbeat thread must never interleave with model collectives.
        control = dist.new_group(backend="gloo", timeout=timeout)
    except Exception as e:  # noqa: BLE001
        raise ParallelError(f"rank {rank} of {world}: creating the TP/EP process groups failed within {timeout_s:g} s "
                            f"({type(e).__name__}: {e})") from e
    return ParallelState(rank=rank, world_size=world, tp_size=tp, tp_rank=rank % tp, ep_size=ep, ep_rank=rank // tp,
                         device=device, tp_group=tp_group, ep_group=ep_group, world_group=world_group,
                         control_group=control, timeout_s=timeout_s)


# ------------------------------------------------------------------------------------------------------------------
# Parallel layers (module names stay the checkpoint's, so the loader needs no renames)
def split(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when n items are cut into `parts` contiguous parts differing by at most one."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


class RowParallelLinear(Linear):
    """Holds some input columns of W; its partial output is summed over `group`."""

    def __init__(self, in_features: int, out_features: int, ps: ParallelState, group: str):
        super().__init__(in_features, out_features)
        self.ps, self.group = ps, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ps.all_reduce(super().forward(x), self.group)


class VocabParallelEmbedding(nn.Embedding):
    """Holds vocabulary rows [start, start + num_embeddings); other ids give zeros before the all-reduce, so every
    row comes from exactly one rank and the sum is exact."""

    def __init__(self, num_embeddings: int, dim: int, start: int, ps: ParallelState):
        super().__init__(num_embeddings, dim)
        self.start, self.ps = start, ps

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # [..., D]
        return self.ps.all_reduce(x.masked_fill(outside[..., None], 0), "tp")


class ParallelHead(Linear):
    """Local logits for this rank's vocabulary rows, all-gathered into [..., V] on every rank."""

    def __init__(self, dim: int, sizes: list[int], ps: ParallelState):
        super().__init__(dim, sizes[ps.tp_rank])
        self.sizes, self.ps = sizes, ps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.ps.all_gather_last(super().forward(h), "tp", self.sizes)


class TiedParallelHead(nn.Module):
    """The head of a model with tied embeddings: the embedding shard's rows, all-gathered. Holds the embedding
    outside the module tree so the loader sees one tensor."""

    def __init__(self, embed: VocabParallelEmbedding, sizes: list[int], ps: ParallelState):
        super().__init__()
        self.__dict__["embed"] = embed
        self.sizes, self.ps = sizes, ps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.ps.all_gather_last(F.linear(h, self.embed.weight.to(h.dtype)), "tp", self.sizes)


class ParallelExperts(Experts):
    """The routed experts this rank holds (`owned`, global ids, in local order), each cut to intermediate rows
    `inter` of its projections. forward() returns this rank's part of sum_k w_k expert_k(x): pairs routed to
    experts held elsewhere contribute zero here and are added by their owner."""

    def __init__(self, cfg: ModelConfig, owned: list[int], inter: tuple[int, int]):
        super().__init__(cfg)  # on the meta device (shard_model), so the full stacks it builds cost nothing
        D, i = cfg.hidden_size, inter[1] - inter[0]
        self.owned = list(owned)
        self.n_experts = n = len(owned)
        self.gate_proj = StackedLinear(n, D, i)
        self.up_proj = StackedLinear(n, D, i)
        self.down_proj = StackedLinear(n, i, D)
        cpu = torch.device("cpu")  # built inside shard_model's meta-device context: be explicit
        table = torch.full((cfg.n_routed_experts,), n, dtype=torch.long, device=cpu)  # n = "held elsewhere"
        table[torch.tensor(self.owned, device=cpu)] = torch.arange(n, device=cpu)
        self._table = {cpu: table}  # not a buffer: the checkpoint has no such tensor

    def local_index(self, device: torch.device) -> torch.Tensor:
        if device not in self._table:
            self._table[device] = self._table[torch.device("cpu")].to(device)
        return self._table[device]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights [T, K], indices [T, K] (global) -> this rank's partial sum [T, D]"""
        T, K = indices.shape
        n = self.n_experts
        local = self.local_index(indices.device)[indices]  # [T, K]
        flat = local.reshape(-1)  # [N]
        order = flat.argsort(stable=True)  # held pairs first (by expert), then the rest
        counts = torch.bincount(flat, minlength=n + 1)
        if self.use_grouped_mm(x):
            ys = self._grouped(x[order // K], counts[:n].cumsum(0).to(torch.int32))  # no host sync
            # Rows past the last group are not computed by the grouped GEMM: zero them explicitly.
            ys = torch.where((flat[order] < n)[:, None], ys, 0)
        else:
            c = counts.tolist()
            held = sum(c[:n])
            ys = self._per_expert(x[order[:held] // K], c[:n])  # [held, D]
            ys = torch.cat([ys, ys.new_zeros(c[n], ys.shape[1])])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y = ys[inverse].view(T, K, -1).float()
        w = weights.float().masked_fill(local == n, 0.0)
        return (y * w[..., None]).sum(1).to(x.dtype)


class ParallelMoE(MoE):
    """Replicated router; this rank's experts and shared-expert slice; one all-reduce over the world sums the
    routed and shared partial outputs together."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, owned: list[int]):
        super().__init__(cfg)
        self.ps = ps
        self.experts = ParallelExperts(cfg, owned, split(cfg.moe_intermediate_size, ps.tp_size, ps.tp_rank))
        if self.shared_experts is not None:
            a, b = split(cfg.shared_intermediate_size, ps.world_size, ps.rank)
            self.shared_experts = _split_mlp(cfg.hidden_size, b - a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ps.all_reduce(super().forward(x).contiguous(), "world")


def _split_mlp(dim: int, inter: int, ps: ParallelState | None = None, group: str = "tp") -> MLP:
    mlp = MLP(dim, inter)
    if ps is not None:
        mlp.down_proj = RowParallelLinear(inter, dim, ps, group)
    return mlp


# ------------------------------------------------------------------------------------------------------------------
# Expert placement
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


# ------------------------------------------------------------------------------------------------------------------
# Sharding a meta-device model, then loading the slices
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
                layer.mlp = _split_mlp(D, b - a, ps, "tp")
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
                 attn_impl: str = "naive", progress: bool | None = None, placement: Any = None) -> Transformer:
    """This rank's shard of a Hugging Face checkpoint: the model is built on the meta device, sharded, then only
    the rank's slices are read (FP8 weights with the scales of the blocks they touch). With fp8_mode='dequantize'
    any slice is dequantised exactly; with 'keep', slices on 128-block boundaries stay FP8 with their scales sliced
    alike, and a slice that cuts a block (a head split of 192-row heads, say) is read block-aligned, dequantised
    exactly and cut. placement: see resolve_placement. device: default the rank's device."""
    from .weights import load_weights, open_checkpoint, parse_dtype

    dtype = parse_dtype(dtype)
    path, cfg, layout, with_mtp = open_checkpoint(path, with_mtp)
    model = build_model(cfg, "meta", with_mtp=with_mtp, attn_impl=attn_impl)
    windows = shard_model(model, ps, resolve_placement(placement, cfg, ps.ep_size))
    crops = _align_fp8_windows(model, windows, layout) if fp8_mode == "keep" else {}
    load_weights(model, path, dtype, device if device is not None else ps.device, fp8_mode, progress,
                 select=lambda name, shape: windows.get(name), layout=layout)
    _crop(model, crops, dtype)
    return model
