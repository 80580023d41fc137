"""Process groups and parallel state: ParallelState (rank, TP/EP groups, device, timeout, collectives with their
timing in CommStats), ParallelError, init_parallel / shutdown, the --tp/--ep size rules, and split(), the one
contiguous cut every sharded dimension uses.

Rank layout: rank = ep_rank * tp + tp_rank, so the ranks of one TP group are consecutive (one node's GPUs) and an
EP group holds the ranks with the same tp_rank. Size-1 groups are None and their collectives are skipped.
"""
from __future__ import annotations

import datetime
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
GROUPS = ("tp", "ep", "world")


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
# Cutting a dimension across ranks
def split(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when n items are cut into `parts` contiguous parts differing by at most one."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)
