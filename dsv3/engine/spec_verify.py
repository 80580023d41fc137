"""The speculative-verification hand-off: how a step verifies its sequences' drafts and passes on the next ones.

Owns StepDrafts (what a step that verified its drafts and ran the MTP pass in one go hands back to LLMEngine.step)
and SpecVerification, the part of LLMEngine that produces and consumes it: the batched verification of a plain
step's drafts, the static runner's greedy speculative step (CUDA graphs), verification with the MTP pass in the
step's own context (C++ CPU kernels, or greedy with one draft), the drafts taken from that pass after the appends,
and the acceptance bookkeeping. The verification rules are speculative.py's; drafting after a step is
spec_draft.py's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .guided import apply_row_constraints
from .sampling import shared_temperature, uniforms
from .scheduler import Sequence
from .speculative import accept_greedy, verify_rows

__all__ = ["SpecVerification", "StepDrafts"]


@dataclass
class StepDrafts:
    """What a step that verified its drafts and ran the MTP pass in one go hands back to LLMEngine.step."""
    accepted: list[list[int]]  # per sequence of the batch: the tokens it appends
    rows: list[int]  # the batch indices the MTP pass drafted for, in the order of its output rows
    ids: list[int]  # their draft tokens (argmaxes; drawn from q for the rows the call sampled)
    logits: torch.Tensor | None = None  # [K, V] when the drafts are drawn after the step instead (top-k/top-p rows)
    q: torch.Tensor | None = None  # [K, V] float32 draft distributions of the rows the call sampled (others unused)
    h: torch.Tensor | None = None  # [K, D] the MTP block's output, for further drafts (CPU kernels)


class SpecVerification:
    """LLMEngine's verification of drafts (a mixin: the model, runner, scheduler, stats and speculation settings
    it uses are set up by LLMEngine.__init__; the drafting methods are SpecDrafting's)."""

    def _verify_drafts(self, batch, rows: list[list[int]], offsets: list[int], logits: torch.Tensor,
                       new_tokens: list[list[int]]) -> None:
        """Every sequence of a step with drafts (more than one sampled row), verified in one batched call: its
        accepted tokens go into new_tokens."""
        drafted = [i for i, r in enumerate(rows) if len(r) > 1]
        if not drafted:
            return
        seqs = [batch.seqs[i] for i in drafted]
        picks = [r for i in drafted for r in range(offsets[i], offsets[i + 1])]
        try:
            verified = verify_rows(logits[picks], [s.draft for s in seqs], [s.extra["draft_q"] for s in seqs],
                                   [s.extra["sampling"] for s in seqs])
        except Exception:  # noqa: BLE001 - one sequence's failure ends that sequence only: retry one by one
            verified = [self._verify_one(logits[offsets[i]:offsets[i + 1]], s) for i, s in zip(drafted, seqs)]
        for i, seq, toks in zip(drafted, seqs, verified):
            new_tokens[i] = toks
            self._count_verified(seq, len(toks) - 1)

    def _propose(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[torch.Tensor | None]]:
        """Drafts of constrained sequences come from the MTP logits under their logit bias and grammar mask (the
        grammar's state after the tokens just appended): a draft the grammar refuses would only be rejected, so more
        are accepted, and the draft's q is the masked distribution it was drawn from, which keeps verification exact.
        (LLMEngine lists this mixin before SpecDrafting, so every drafting path comes through here.)"""
        if any("guided" in s.extra or s.params.logit_bias for s in seqs):
            apply_row_constraints(logits, seqs, [[0]] * len(seqs))
        return super()._propose(logits, seqs)

    @staticmethod
    def _verify_one(logits: torch.Tensor, seq: Sequence) -> list[int]:
        try:
            return verify_rows(logits, [seq.draft], [seq.extra["draft_q"]], [seq.extra["sampling"]])[0]
        except Exception as e:  # noqa: BLE001 - the engine ends this request with the error (RequestBook._append)
            seq.extra["sampling"].fail(f"draft verification failed ({type(e).__name__}: {e})")
            return [0]

    def _draft_from_step(self, batch, fused: StepDrafts) -> None:
        """After a step's appends, MTP at each drafting sequence's last verified row proposes its next draft: drawn
        in the step's MTP call, or only now (top-k/top-p rows), for the sequences that go on drafting, so a seeded
        sequence's generator advances exactly as on the module path."""
        at = {i: r for r, i in enumerate(fused.rows)}  # batch index -> output row of the MTP pass
        drafting = [(at[i], seq, room) for i, seq in enumerate(batch.seqs)
                    if i in at and not seq.is_finished and (room := self._draft_room(seq)) > 0]
        if drafting:
            seqs = [seq for _, seq, _ in drafting]
            rows = [r for r, _, _ in drafting]
            if fused.logits is None:  # drafts drawn in the MTP call (argmaxes; q for the sampled rows)
                toks = [fused.ids[r] for r in rows]
                qs = [None if fused.q is None or seq.params.greedy else fused.q[r] for r, seq, _ in drafting]
            else:
                every = rows == list(range(fused.logits.shape[0]))  # (the usual case: no row indexing)
                toks, qs = self._propose(fused.logits if every else fused.logits[rows], seqs)
            for seq, tok, q in zip(seqs, toks, qs):
                seq.draft, seq.extra["draft_q"] = [tok], [q]
            more = [(r, seq, room) for r, seq, room in drafting if room > 1]
            if more:
                self._draft_more([(seq, room) for _, seq, room in more], fused.h[[r for r, _, _ in more]])

    def _count_verified(self, seq: Sequence, accepted: int) -> None:
        """Acceptance bookkeeping of one verified sequence (its drafts before they are cleared)."""
        d = len(seq.draft)
        seq.extra["spec"][0] += d
        seq.extra["spec"][1] += accepted
        seq.extra["spec"][2] += 1
        self.stats["spec_drafted"] += d
        self.stats["spec_accepted"] += accepted
        self.stats["spec_verify_steps"] += 1

    def _static_verify_and_draft(self, batch, n_known: list[int]) -> StepDrafts | None:
        """Greedy speculative steps with one draft through the static runner (engine/graphs.py: one replay computes
        the main model's and the MTP module's argmaxes at every row, one host read). Same result as
        _verify_and_draft_in_step; None when the step does not qualify or no static runner is on."""
        g = self.runner.graphs
        if g is None or self.num_draft != 1 or self.sync_tokens is not None:
            return None
        if any("guided" in seq.extra or seq.params.logit_bias for seq in batch.seqs):
            return None  # the graphs' fused argmaxes cannot see a grammar mask or a bias
        for seq, k, n in zip(batch.seqs, n_known, batch.num_new):
            if k != 1 or n != 1 + len(seq.draft) or not seq.extra["speculate"] or not seq.params.greedy:
                return None
        if not any(seq.draft for seq in batch.seqs) or not g.can_run_spec(batch.seqs):
            return None  # (a step without drafts is a plain decode step: the decode graphs take it)
        self.runner.last = None  # no eager step context to reuse
        targets, drafts = g.run_spec(batch.seqs)
        accepted = [accept_greedy(seq.draft, t[:1 + len(seq.draft)]) for seq, t in zip(batch.seqs, targets)]
        return StepDrafts(accepted, list(range(len(accepted))), [d[len(a) - 1] for a, d in zip(accepted, drafts)])

    @torch.inference_mode()
    def _verify_and_draft_in_step(self, batch, n_known: list[int], logits: torch.Tensor, hidden: torch.Tensor,
                                  offsets: list[int]) -> StepDrafts | None:
        """Decode/verification steps of speculating sequences, with the MTP pass in the step's own context right
        after the main pass (StepDrafts), or None when the step does not qualify (prompt rows, requests that do not
        speculate).
        - C++ CPU kernels (greedy and sampled rows, any number of drafts): the acceptance is known first (no device
          to wait for), so the MTP block stores the latents of every row but goes on (attention, FFN, head) only
          from the last verified row of each sequence that will draft after this step, as one C++ call; further
          drafts follow after the step (_draft_more). Rows that sample with a temperature alone draw their draft in
          that call too, from a uniform taken from their generator beforehand (the same draws as after the step);
        - elsewhere (greedy, one draft): the MTP module runs over all rows before the single host sync (rows past a
          rejected draft compute throwaway values whose cache slots are rewritten before anyone reads them)."""
        if self.num_draft == 0 or self.sync_tokens is not None or self.chain:  # (plain decoding: return at once)
            return None
        fused_mtp = getattr(self.model, "cpu_mtp_draft", None)  # the whole MTP pass as one C++ call
        if self.num_draft > 1 and fused_mtp is None:
            return None
        seqs = batch.seqs
        for seq, k in zip(seqs, n_known):
            if k != 1 or not seq.extra["speculate"] or (fused_mtp is None and not seq.params.greedy):
                return None
        if self._spec_paused and all(not s.draft and self._pauses(s) for s in seqs):
            return None  # a plain decode step: sampled as such, the MTP latents deferred (_draft)
        reuse = self.runner.reuse_context()
        if reuse is None or logits.shape[0] != hidden.shape[0]:
            return None
        positions, ctx = reuse
        if fused_mtp is not None:
            try:
                accepted = verify_rows(logits, [s.draft for s in seqs], [s.extra["draft_q"] for s in seqs],
                                       [s.extra["sampling"] for s in seqs])
            except Exception:  # noqa: BLE001 - one sequence's failure ends that sequence only (see _verify_drafts)
                accepted = [self._verify_one(logits[offsets[i]:offsets[i + 1]], s) for i, s in enumerate(seqs)]
            # Each verified row's next token is the one accepted after it; rows past the last verified one are
            # throwaway (their latents are rewritten before anyone reads them).
            next_ids = []
            for i, a in enumerate(accepted):
                next_ids += a + [a[-1]] * (offsets[i + 1] - offsets[i] - len(a))
            T = len(next_ids)
            rows, temps = self._next_drafters(seqs, accepted)
            both = torch.tensor(next_ids + [offsets[i] + len(accepted[i]) - 1 for i in rows])  # (one copy)
            ids, keep = both[:T], both[T:]
            if temps is None:  # some row filters (top-k/top-p/min-p): its logits, drafts drawn after the step
                out, mtp_logits, h_out = fused_mtp(hidden, ids, positions, ctx, keep=keep, logits=True)
                return StepDrafts(accepted, rows, out.tolist(), logits=mtp_logits, h=h_out)
            if not any(temps):  # greedy (or nobody drafts: latents only)
                out, _, h_out = fused_mtp(hidden, ids, positions, ctx, keep=keep)
                return StepDrafts(accepted, rows, out.tolist(), h=h_out)
            u = uniforms([seqs[i].extra["sampling"].generator if t else None for i, t in zip(rows, temps)])
            out, q, h_out = fused_mtp(hidden, ids, positions, ctx, keep=keep, temperatures=temps, u=u)
            return StepDrafts(accepted, rows, out.tolist(), q=q, h=h_out)
        targets = logits.argmax(dim=-1)  # [T]
        h_out = self.model.mtp_hidden(1, hidden[None], targets[None], positions, cache=ctx)[0]  # [T, D]
        drafts = self.model.mtp_logits(1, h_out).argmax(dim=-1)  # [T]
        t, d = torch.stack([targets, drafts]).tolist()  # the one host sync of the step
        accepted = [accept_greedy(seq.draft, t[offsets[i]:offsets[i + 1]]) for i, seq in enumerate(seqs)]
        return StepDrafts(accepted, list(range(len(seqs))),
                          [d[offsets[i] + len(a) - 1] for i, a in enumerate(accepted)])

    def _next_drafters(self, seqs: list[Sequence], accepted: list[list[int]]) -> tuple[list[int], list[float] | None]:
        """For a step about to append `accepted`: the indices of the sequences that will draft after it (room left;
        one that finishes on a stop string instead just wastes its draft) and the temperature each one's draft is
        drawn at inside the MTP call (0: greedy), or None for the temperatures when one of them samples with more
        than a temperature (top-k/top-p/min-p: drafts drawn after the step)."""
        rows, temps, filtered = [], [], False
        for i, (seq, a) in enumerate(zip(seqs, accepted)):
            if self._draft_room(seq, len(a)) <= 0:
                continue
            rows.append(i)
            p = seq.params
            if "guided" in seq.extra or p.logit_bias:
                filtered = True  # its draft is drawn after the step, under its mask (_propose)
            elif p.greedy:
                temps.append(0.0)
            elif shared_temperature([seq.extra["sampling"]]) is None:
                filtered = True
            else:
                temps.append(p.temperature)
        return rows, (None if filtered else temps)
