"""Speculative decoding with the checkpoint's MTP module(s): drafting and verification.

Dimension letters: d draft tokens of one sequence, V vocabulary, n rows of a sequence in a step, D hidden.

Drafting: MTP module 1 takes the main model's final hidden state at position i and the embedding of token i+1 and
predicts token i+2. Its own latent cache layer (after the main layers in the cache tensor) is filled for every
verified position, so a draft costs one MTP block over the step's verified rows. With D > 1 modules, module k
continues from module k-1's output at the same position (DeepSeek's chain, LLMEngine._draft_chain); beyond D, or
with one module, the last module runs recurrently on its own output, one position further each time.

Verification: the main model computes the last real token and the d drafts in one pass. Greedy accepts the
longest prefix of drafts equal to the main model's argmax, then appends the main model's token, so the output is
identical to plain greedy decoding. Sampling uses standard speculative sampling: draft x ~ q is kept with
probability min(1, p(x)/q(x)); on rejection the token is drawn from max(0, p - q) renormalised; if every draft is
kept a bonus token is drawn from p at the last row. The output distribution is exactly p.
"""
from __future__ import annotations

import torch

from ..kernels import cpu_ext
from .sampling import (SamplingBatch, SequenceSamplingState, argmax_rows, draw_inverse_cdf, draw_inverse_cdf_reference,
                       process_logits, shared_temperature, tempered_softmax, uniforms)

SPECULATIVE_METHODS = ("off", "mtp")


def supports_speculation(state: SequenceSamplingState) -> bool:
    """Penalties change p with every accepted token and logprobs are reported per sampled step; such requests
    decode one token at a time."""
    p = state.params
    return not p.uses_penalties and p.logprobs is None


def target_probs(logits: torch.Tensor, states: SequenceSamplingState | list[SequenceSamplingState]) -> torch.Tensor:
    """logits [n, V] -> the distribution p [n, V] float32 each row samples from (temperature, top-k/p, min-p): one
    state for all rows, or one per row."""
    if isinstance(states, SequenceSamplingState):
        states = [states] * logits.shape[0]
    t = shared_temperature(states)
    if t is not None:  # temperature only (the common case): no per-row parameter tensors, the same values
        return tempered_softmax(logits, t)
    _, x = process_logits(logits, SamplingBatch(states, logits.device))
    return tempered_softmax(x)


def draw_rows(probs: torch.Tensor, generators: list[torch.Generator | None]) -> list[int]:
    """One token from each distribution probs[i] ([B, V]; unnormalised is fine) with generators[i], in one call."""
    if not len(probs):
        return []
    return draw_inverse_cdf(probs, uniforms(generators, probs.device)).tolist()


def propose(logits: torch.Tensor, state: SequenceSamplingState) -> tuple[int, torch.Tensor | None]:
    """MTP logits [V] -> (draft token, its distribution q [V], None when greedy)."""
    toks, qs = propose_rows(logits[None], [state])
    return toks[0], qs[0]


def propose_rows(logits: torch.Tensor, states: list[SequenceSamplingState]
                 ) -> tuple[list[int], list[torch.Tensor | None]]:
    """MTP logits [B, V], one row per drafting sequence -> (draft tokens, their distributions q [V], None for
    greedy rows): the greedy rows' argmax and the sampled rows' draws from q in one batched pass."""
    toks: list[int] = [0] * len(states)
    qs: list[torch.Tensor | None] = [None] * len(states)
    greedy = [i for i, s in enumerate(states) if s.params.greedy]
    sampled = [i for i, s in enumerate(states) if not s.params.greedy]
    if greedy:
        rows = logits if not sampled else logits.index_select(0, torch.tensor(greedy, device=logits.device))
        for i, t in zip(greedy, argmax_rows(rows).tolist()):
            toks[i] = t
    if sampled:
        rows = logits if not greedy else logits.index_select(0, torch.tensor(sampled, device=logits.device))
        q = target_probs(rows, [states[i] for i in sampled])  # [S, V]
        for i, t, qi in zip(sampled, draw_rows(q, [states[i].generator for i in sampled]), q):
            toks[i], qs[i] = t, qi
    return toks, qs


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
    return verify_rows(logits, [draft], [draft_q], [state])[0]


def verify_rows(logits: torch.Tensor, drafts: list[list[int]], draft_qs: list[list[torch.Tensor | None]],
                states: list[SequenceSamplingState]) -> list[list[int]]:
    """Several sequences at once: logits [sum(d_i + 1), V], sequence i's d_i + 1 rows back to back -> the tokens
    each appends (verify). The target distributions of all sampled rows are built in one pass and every sampled
    sequence is decided in one accept_and_draw call; each draws its d_i + 1 uniforms (acceptance tests, then its
    final token) from its own generator whatever the outcome, so seeded output does not depend on the batch."""
    offs = [0]
    for d in drafts:
        offs.append(offs[-1] + len(d) + 1)
    if logits.shape[0] != offs[-1]:
        raise ValueError(f"verify_rows: {logits.shape[0]} logits rows for {len(drafts)} sequences whose drafts need "
                         f"{offs[-1]} (one per draft plus one each)")
    out: list[list[int]] = [[] for _ in drafts]
    greedy = [i for i, s in enumerate(states) if s.params.greedy]
    sampled = [i for i, s in enumerate(states) if not s.params.greedy]
    if greedy:
        if not sampled:  # every row (the common case: no row indexing)
            am = argmax_rows(logits).tolist()
        else:
            am = logits[[r for i in greedy for r in range(offs[i], offs[i + 1])]].argmax(dim=-1).tolist()
        k = 0
        for i in greedy:
            n = len(drafts[i]) + 1
            out[i] = accept_greedy(drafts[i], am[k:k + n])
            k += n
    if not sampled:
        return out
    if greedy:
        logits = logits.index_select(0, torch.tensor([r for i in sampled for r in range(offs[i], offs[i + 1])],
                                                     device=logits.device))
    p = target_probs(logits, [states[i] for i in sampled for _ in range(len(drafts[i]) + 1)])  # [n, V]
    counts = [len(drafts[i]) for i in sampled]
    u = uniforms([states[i].generator for i in sampled], p.device, [d + 1 for d in counts])  # [n]
    accepted, finals = accept_and_draw(p, [q for i in sampled for q in draft_qs[i]],
                                       [x for i in sampled for x in drafts[i]], counts, u)
    for i, a, t in zip(sampled, accepted, finals):
        out[i] = drafts[i][:a] + [t]
    return out


def accept_and_draw(p: torch.Tensor, qs: list[torch.Tensor], drafts: list[int], counts: list[int],
                    u: torch.Tensor) -> tuple[list[int], list[int]]:
    """Speculative sampling's acceptance tests and final draws for S sequences in one call. p [n, V] float32: the
    target distributions, sequence s's counts[s] + 1 rows back to back; qs: the draft distributions [V], one per
    draft in the order of drafts [sum(counts)]; u [n]: per sequence one uniform per draft, then one for its final
    token. Returns (accepted drafts per sequence, final token per sequence). On the CPU with the C++ kernels loaded
    one kernel call; the same results as accept_and_draw_reference (tested)."""
    ops = cpu_ext.loaded()
    if ops is not None and p.device.type == "cpu" and p.dtype == torch.float32 and u.dtype == torch.float32:
        return ops.speculative_accept(p.contiguous(), qs, drafts, counts, u)
    return accept_and_draw_reference(p, qs, drafts, counts, u)


def accept_and_draw_reference(p: torch.Tensor, qs: list[torch.Tensor], drafts: list[int], counts: list[int],
                              u: torch.Tensor) -> tuple[list[int], list[int]]:
    """accept_and_draw in PyTorch operations (any device, two host reads whatever the batch; the kernel's test
    oracle). Draft j is kept while u_j * q_j(x_j) < p_j(x_j) (u < p/q without dividing by a tiny q); at the first
    rejection the final token comes from max(0, p_j - q_j) renormalised (from p_j when that is all zero: p == q up
    to rounding); when every draft is kept, from the last row's p."""
    rows, r = [], 0  # the row of p of each draft
    for d in counts:
        rows += range(r, r + d)
        r += d + 1
    V = p.shape[1]
    at_p = torch.tensor([i * V + x for i, x in zip(rows, drafts)], dtype=torch.long, device=p.device)
    at_q = torch.tensor([j * V + x for j, x in enumerate(drafts)], dtype=torch.long, device=p.device)
    qx = torch.stack(qs).take(at_q) if qs else p.new_empty(0)
    host = torch.cat([p.take(at_p), qx, u.to(p.dtype)]).tolist()  # p and q at each draft token, and u
    D = len(drafts)
    px, qx, uh = host[:D], host[D:2 * D], host[2 * D:]
    accepted, dist_rows, resid, last = [], [], [], []  # per sequence: kept drafts, p row of its final draw, its
    # rejected draft (or -1), its last row (whose uniform draws the final token)
    r = k = 0  # this sequence's first row of p and first draft
    for d in counts:
        a = 0
        while a < d and uh[r + a] * qx[k + a] < px[k + a]:
            a += 1
        accepted.append(a)
        dist_rows.append(r + a)
        resid.append(k + a if a < d else -1)
        last.append(r + d)
        r += d + 1
        k += d
    dist = p[dist_rows]  # [S, V]
    rej = [s for s, j in enumerate(resid) if j >= 0]
    if rej:
        residual = (dist[rej] - torch.stack([qs[resid[s]] for s in rej])).clamp(min=0)
        keep_p = residual.sum(dim=-1, keepdim=True) > 0  # all zero: p == q up to rounding, draw from p
        dist[rej] = torch.where(keep_p, residual, dist[rej])
    return accepted, draw_inverse_cdf_reference(dist, u[last]).tolist()
