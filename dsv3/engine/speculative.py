"""Speculative decoding with the checkpoint's MTP module(s): drafting and verification.

Dimension letters: d draft tokens of one sequence, V vocabulary, n rows of a sequence in a step, D hidden.

Drafting: MTP module 1 takes the main model's final hidden state at position i and the embedding of token i+1 and
predicts token i+2. Its own latent cache layer (after the main layers in the cache tensor) is filled for every
verified position, so a draft costs one MTP block over the step's verified rows. With D > 1 modules, module k
continues from module k-1's output; with one module it can run recurrently on its own output (an option).

Verification: the main model computes the last real token and the d drafts in one pass. Greedy accepts the
longest prefix of drafts equal to the main model's argmax, then appends the main model's token, so the output is
identical to plain greedy decoding. Sampling uses standard speculative sampling: draft x ~ q is kept with
probability min(1, p(x)/q(x)); on rejection the token is drawn from max(0, p - q) renormalised; if every draft is
kept a bonus token is drawn from p at the last row. The output distribution is exactly p.
"""
from __future__ import annotations

import torch

from .sampling import SamplingBatch, SequenceSamplingState, draw_inverse_cdf, process_logits

SPECULATIVE_METHODS = ("off", "mtp")


def supports_speculation(state: SequenceSamplingState) -> bool:
    """Penalties change p with every accepted token and logprobs are reported per sampled step; such requests
    decode one token at a time."""
    p = state.params
    return not p.uses_penalties and p.logprobs is None


def target_probs(logits: torch.Tensor, state: SequenceSamplingState) -> torch.Tensor:
    """logits [n, V] -> the distribution p [n, V] this request samples from (temperature, top-k/p, min-p)."""
    batch = SamplingBatch([state] * logits.shape[0], logits.device)
    _, x = process_logits(logits, batch)
    return x.softmax(dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """probs [V] (unnormalised is fine) -> one token drawn from it with the sequence's generator."""
    u = torch.rand(1, generator=generator, device=probs.device)
    return int(draw_inverse_cdf(probs[None], u)[0])


def propose(logits: torch.Tensor, state: SequenceSamplingState) -> tuple[int, torch.Tensor | None]:
    """MTP logits [V] -> (draft token, its distribution q [V], None when greedy)."""
    if state.params.greedy:
        return int(logits.argmax()), None
    q = target_probs(logits[None].float(), state)[0]
    return draw(q, state.generator), q


def accept_greedy(draft: list[int], target: list[int]) -> list[int]:
    """target [d+1]: the main model's argmax at the last real token and at each draft -> the longest prefix of
    drafts equal to it, then the main model's own token."""
    a = 0
    while a < len(draft) and draft[a] == target[a]:
        a += 1
    return draft[:a] + [target[a]]


def verify(logits: torch.Tensor, draft: list[int], draft_q: list[torch.Tensor | None],
           state: SequenceSamplingState) -> list[int]:
    """logits [d+1, V] of the main model at the last real token and each draft -> the tokens to append: the
    accepted drafts followed by one token from the main model (so between 1 and d+1 tokens)."""
    d = len(draft)
    if state.params.greedy:
        return accept_greedy(draft, logits.argmax(dim=-1).tolist())
    p = target_probs(logits.float(), state)  # [d+1, V]
    gen = state.generator
    for j in range(d):
        x, q = draft[j], draft_q[j]
        px, qx = float(p[j, x]), float(q[x])
        if float(torch.rand((), generator=gen)) * qx < px:  # u < p/q without dividing by a tiny q
            continue
        residual = (p[j] - q).clamp_(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p is right
            residual = p[j]
        return draft[:j] + [draw(residual, gen)]
    return draft + [draw(p[d], gen)]
