"""The training objective: next-token cross-entropy plus DeepSeek-V3's multi-token prediction (MTP) loss.

Dimension letters: B sequences, S positions, D hidden, V vocabulary.

tokens [B, S+1] are one window: the main model reads t_0..t_{S-1} and predicts t_1..t_S. MTP module k (1-based)
at position i combines depth k-1's hidden state h_i with the embedding of t_{i+k} and predicts t_{i+k+1}; the
positions that still have such a target are i = 0..S-k-1, so depth k works on S-k positions.
loss_MTP = lambda / D * sum_k CE_k, with the embedding and the output head shared with the main model.

distill=True is a draft-model stage after training (not in the paper): the main model runs without gradients, and
module k learns the main model's own next-token distribution at position i + k (which predicts the same t_{i+k+1}
from the true prefix) instead of the one-hot data: CE_k = -sum_v p_main(v) log q_k(v). What speculative decoding
accepts is agreement with the main model, not with the data.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.transformer import Transformer


@dataclass
class Losses:
    main: torch.Tensor  # scalar CE of the next-token prediction
    mtp: list[torch.Tensor]  # CE_k for k = 1..D
    mtp_correct: list[torch.Tensor]  # top-1 hits of module k (counts, no grad)
    mtp_count: list[int]
    main_correct: torch.Tensor
    main_count: int


def mtp_targets(tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, S+1] -> (inputs t_{i+k} [B, S-k], targets t_{i+k+1} [B, S-k]) for MTP depth k."""
    S = tokens.shape[1] - 1
    return tokens[:, k:S], tokens[:, k + 1:S + 1]


def compute_losses(model: Transformer, tokens: torch.Tensor, depth: int | None = None, distill: bool = False
                   ) -> Losses:
    """Forward the main model and `depth` MTP modules (default: all the model has) on one window batch; distill:
    see the module docstring (the main CE is then reported without a gradient)."""
    S = tokens.shape[1] - 1
    depth = len(model.mtp_layers) if depth is None else depth
    if depth > len(model.mtp_layers):
        raise ValueError(f"MTP depth {depth} requested but the model has {len(model.mtp_layers)} MTP module(s)")
    if depth >= S:
        raise ValueError(f"seq_len {S} is too short for {depth} MTP module(s)")
    with torch.no_grad() if distill else contextlib.nullcontext():
        h = model.hidden_states(tokens[:, :S])  # [B, S, D]
        logits = model.logits(h).float()  # [B, S, V]
        target = tokens[:, 1:]
        main = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        teacher = logits.softmax(-1) if distill else None
    main_correct = (logits.detach().argmax(-1) == target).sum()
    mtp, correct, count = [], [], []
    for k in range(1, depth + 1):
        nxt, tgt = mtp_targets(tokens, k)
        lg, h = model.mtp(k, h[:, : S - k], nxt)  # h becomes depth k's hidden state for module k+1
        lg = lg.float()
        if teacher is not None:
            mtp.append(-(teacher[:, k:S] * lg.log_softmax(-1)).sum(-1).mean())
        else:
            mtp.append(F.cross_entropy(lg.flatten(0, 1), tgt.flatten()))
        correct.append((lg.detach().argmax(-1) == tgt).sum())
        count.append(tgt.numel())
    return Losses(main, mtp, correct, count, main_correct, target.numel())


def mtp_loss(losses: list[torch.Tensor], lam: float) -> torch.Tensor:
    """lambda / D * sum_k CE_k (zero without MTP modules)."""
    if not losses:
        return torch.zeros(())
    return lam / len(losses) * torch.stack(losses).sum()
