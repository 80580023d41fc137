"""The parallel layers: this rank's slices of the model's linears, embedding, head and MoE, with the collective each
one ends in. Module names stay the checkpoint's, so the loader needs no renames.

Dimension letters: T tokens, D hidden, V vocabulary, E routed experts, I intermediate width, K routed experts per
token, W world size = tp * ep.
  attention     heads split across the TP group; o_proj (a RowParallelLinear) all-reduces over TP.
  dense MLP     gate/up rows and down columns split across the TP group, one all-reduce (TP group).
  embedding     vocabulary rows split across the TP group: each rank looks up the ids it holds, zeros elsewhere,
                one all-reduce (TP group). The head computes local logits and all-gathers them (TP group).
  MoE           router replicated (every rank routes every token the same way). A rank holds its routed experts
                (see experts.py for which), each cut to its TP slice of the intermediate width, and its slice of
                the shared experts' width (split across all W ranks); one all-reduce over all W ranks combines the
                routed and shared parts together.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..model.layers import MLP, Linear
from ..model.moe import Experts, MoE, StackedLinear
from .state import ParallelState, split


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
            self.shared_experts = split_mlp(cfg.hidden_size, b - a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ps.all_reduce(super().forward(x).contiguous(), "world")


def split_mlp(dim: int, inter: int, ps: ParallelState | None = None, group: str = "tp") -> MLP:
    """An MLP of intermediate width `inter` (a rank's slice); with `ps`, its down_proj all-reduces over `group`."""
    mlp = MLP(dim, inter)
    if ps is not None:
        mlp.down_proj = RowParallelLinear(inter, dim, ps, group)
    return mlp
