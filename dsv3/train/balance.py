"""Expert load balancing for training: DeepSeek-V3's auxiliary-loss-free bias, its complementary sequence-wise
balance loss, the classic (batch-wise) auxiliary loss for comparison, and the MaxVio balance metric.

Dimension letters: B sequences, S tokens per sequence, T = B*S tokens, E routed experts (N_r), K experts per token
(K_r), L MoE layers.

Each MoE module records (indices [T, K], scores [T, E]) of its last forward when `record_routing` is set; the
scores carry gradients, so the balance losses train the gate, while the counts drive the bias update.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import MoE

BALANCE_MODES = ("none", "aux", "aux-free")


def moe_modules(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every MoE module, main layers first, then the MTP modules' (which have their own gate and bias)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def set_recording(model: nn.Module, on: bool) -> None:
    for _, m in moe_modules(model):
        m.record_routing = on
        m.last_routing = None


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """indices [T, K] -> [E] float32 number of tokens routed to each expert."""
    return torch.bincount(indices.reshape(-1), minlength=n_experts).float()


def normalized_scores(scores: torch.Tensor) -> torch.Tensor:
    """[..., E] -> per-token scores summing to 1 (the paper normalises sigmoid affinities; softmax ones already are)."""
    return scores / (scores.sum(-1, keepdim=True) + 1e-20)


def balance_loss(indices: torch.Tensor, scores: torch.Tensor, n_seq: int) -> torch.Tensor:
    """sum_i f_i * P_i averaged over `n_seq` equal-length sequences (without alpha).

    f_i = N_r / (K_r * S) * (tokens of the sequence routed to expert i), P_i = mean over the sequence's tokens of
    the normalised score of expert i. With n_seq = 1 this is the classic batch-wise auxiliary loss. A perfectly
    balanced router gives 1 for every sequence."""
    T, K = indices.shape
    E = scores.shape[-1]
    if T % n_seq:
        raise ValueError(f"{T} tokens do not split into {n_seq} equal sequences")
    S = T // n_seq
    one_hot = torch.zeros(T, E, device=indices.device, dtype=torch.float32).scatter_(1, indices, 1.0)
    counts = one_hot.view(n_seq, S, E).sum(1)  # [B, E]; from discrete choices, so no gradient
    f = counts * (E / (K * S))
    P = normalized_scores(scores.float()).view(n_seq, S, E).mean(1)  # [B, E]
    return (f * P).sum(-1).mean()


def update_bias(bias: torch.Tensor, counts: torch.Tensor, gamma: float) -> None:
    """b_i += gamma * sign(mean_load - load_i): under-loaded experts become more attractive, over-loaded less.
    An exactly average expert (sign 0) is left alone."""
    if gamma:
        bias.add_(torch.sign(counts.mean() - counts.to(bias.device, torch.float32)), alpha=gamma)


def max_violation(counts: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean load - 1 (0 when perfectly balanced)."""
    mean = counts.float().mean()
    return float(counts.float().max() / mean - 1.0) if mean > 0 else 0.0


@dataclass
class Schedule:
    """A value that is `early` until fraction `switch` of training and `late` after (the paper's two-phase gamma
    and lambda)."""

    early: float
    late: float
    switch: float = 1.0

    def at(self, step: int, total: int) -> float:
        return self.early if step < self.switch * total else self.late


class Balancer:
    """Collects per-layer expert counts over one optimizer step (all micro-batches), turns routing records into
    balance losses, and applies the bias update, summed across data-parallel ranks first so every rank applies the
    identical update and the biases never drift apart."""

    def __init__(self, model: nn.Module, mode: str, alpha: float):
        if mode not in BALANCE_MODES:
            raise ValueError(f"balance mode {mode!r}: choose one of {BALANCE_MODES}")
        self.mode, self.alpha = mode, alpha
        self.layers = moe_modules(model)
        self.counts = [torch.zeros(m.gate.weight.shape[0]) for _, m in self.layers]
        if mode == "aux-free":
            missing = [n for n, m in self.layers if m.gate.e_score_correction_bias is None]
            if missing:
                raise ValueError(f"balance 'aux-free' needs the routing bias (topk_method 'noaux_tc'), which "
                                 f"{missing[0]} lacks; use --balance aux or none")
        set_recording(model, bool(self.layers))

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.layers]

    def collect(self, n_seq: int) -> torch.Tensor:
        """After a micro-batch forward: accumulate counts and return the balance loss (alpha included; a zero
        tensor when the mode has none)."""
        loss = None
        for j, (name, m) in enumerate(self.layers):
            if m.last_routing is None:
                raise RuntimeError(f"{name} recorded no routing during the forward")
            indices, scores = m.last_routing
            m.last_routing = None
            self.counts[j] += expert_counts(indices.detach(), scores.shape[-1]).cpu()
            if self.alpha and self.mode != "none":
                # aux: the whole micro-batch is one "sequence" (classic batch-wise loss); aux-free: per sequence.
                term = balance_loss(indices, scores, 1 if self.mode == "aux" else n_seq)
                loss = term if loss is None else loss + term
        return torch.zeros(()) if loss is None else loss * self.alpha

    def finish_step(self, gamma: float) -> list[torch.Tensor]:
        """End of an optimizer step: sum counts over ranks, update biases (aux-free), reset; returns the counts."""
        counts = self.counts
        if counts and dist.is_available() and dist.is_initialized():
            flat = torch.stack(counts)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            counts = list(flat.unbind(0))
        if self.mode == "aux-free":
            for (_, m), c in zip(self.layers, counts):
                update_bias(m.gate.e_score_correction_bias, c, gamma)
        self.counts = [torch.zeros_like(c) for c in self.counts]
        return counts

    def bias_stats(self) -> list[dict]:
        out = []
        for _, m in self.layers:
            b = m.gate.e_score_correction_bias
            if b is None:
                out.append({})
            else:
                b = b.detach().float()
                out.append({"mean": float(b.mean()), "std": float(b.std()) if b.numel() > 1 else 0.0,
                            "min": float(b.min()), "max": float(b.max())})
        return out
