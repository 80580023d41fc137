"""MTP drafting after a step: the next drafts of every speculating sequence, and the MTP cache layers behind them.

Owns SpecDrafting, the part of LLMEngine that runs the checkpoint's MTP module(s) once a step's tokens are
appended: the MTP pass over the verified rows (latents stored for all, the block run on only the drafting rows),
further drafts with the last module run recurrently, DeepSeek's chain of D >= 2 modules, the draws of the draft
tokens, how many drafts a sequence may take, and the MTP latents that wait while drafting pauses for the batch size
(MTP_BACKLOG_LIMIT). The math of drafting and verification is speculative.py's; verification is spec_verify.py's.
"""
from __future__ import annotations

import torch

from .scheduler import Sequence
from .speculative import propose_rows

__all__ = ["MTP_BACKLOG_LIMIT", "SpecDrafting"]


# Most positions a paused sequence's MTP latents may wait for (LLMEngine._defer_mtp_latents); past it, it stops
# speculating. The wait holds one hidden state per position (14 KB for DeepSeek-V3 in bf16).
MTP_BACKLOG_LIMIT = 4096


class SpecDrafting:
    """LLMEngine's drafting (a mixin: the model, runner, scheduler and speculation settings it uses are set up by
    LLMEngine.__init__)."""

    def _draft_room(self, seq: Sequence, appending: int = 0) -> int:
        """How many drafts seq may take now (or once `appending` more tokens are appended): up to num_draft,
        leaving room for the main model's own token within max_tokens and the context; 0 while drafting pauses
        for the batch size (seeded sampled sequences excepted)."""
        if self._pauses(seq):
            return 0
        return min(self.num_draft, seq.params.max_tokens - len(seq.output_ids) - appending - 1,
                   self.max_model_len - seq.num_tokens - appending - 1)

    def _pauses(self, seq: Sequence) -> bool:
        """Whether seq's drafting pauses in this step (more sequences run than spec_max_batch; a seeded sampled
        sequence drafts on, so its output does not depend on the load)."""
        return self._spec_paused and (seq.params.greedy or seq.extra["sampling"].generator is None)

    def _defer_mtp_latents(self, seq: Sequence, start: int, kept: torch.Tensor, row: int, n: int) -> None:
        """While seq's drafting pauses, its MTP latents wait: the main model's final hidden states of positions
        start..start+n-1, rows row.. of `kept` (the step's paused rows, copied once for all its paused sequences),
        are kept and stored in one batched call when it drafts again (_flush_mtp_backlog), so a paused step runs no
        MTP pass and a sequence that never drafts again never pays for one. Past MTP_BACKLOG_LIMIT waiting
        positions the sequence stops speculating for good (the wait would hold too much memory)."""
        ex = seq.extra
        if "mtp_backlog" not in ex:
            ex["mtp_backlog"], ex["mtp_backlog_rows"] = [], 0
        ex["mtp_backlog"].append((start, kept, row, n))
        ex["mtp_backlog_rows"] += n
        if ex["mtp_backlog_rows"] > MTP_BACKLOG_LIMIT:
            ex["speculate"] = False
            del ex["mtp_backlog"], ex["mtp_backlog_rows"]

    @torch.inference_mode()
    def _flush_mtp_backlog(self, seqs: list[Sequence]) -> None:
        """Store the waiting MTP latents of seqs (see _defer_mtp_latents) in one call. Entries past a sequence's
        computed positions (it was preempted and recomputes, which stores them again) are dropped."""
        work = []  # (seq, first position, its hidden states)
        for s in seqs:
            del s.extra["mtp_backlog_rows"]
            work += [(s, p, kept[r:r + n]) for p, kept, r, n in s.extra.pop("mtp_backlog") if p + n <= s.num_computed]
        if not work:
            return
        positions, slots = self.runner.positions_and_slots([s for s, _, _ in work], [p for _, p, _ in work],
                                                           [h.shape[0] for _, _, h in work])
        ids = torch.tensor([t for s, p, h in work for t in s.tokens[p + 1:p + 1 + h.shape[0]]], device=self.device)
        self.runner.store_mtp_latents(1, torch.cat([h for _, _, h in work]), ids, positions, slots)

    @torch.inference_mode()
    def _draft(self, batch, starts: list[int], computed: list[int], hidden: torch.Tensor) -> None:
        """Run MTP over every verified position of the step (filling its cache layer) and propose drafts for the
        sequences that just got a token. Only a drafting row (each such sequence's last verified one) needs the MTP
        block's output; every other row only needs its latents stored, which skips attention, FFN and head there
        (for a prompt: one full MTP row instead of one per prompt token)."""
        if self.chain:
            return self._draft_chain(batch, starts, computed, hidden)
        seqs, counts, toks, rows, pos0, want = [], [], [], [], [], []
        paused = []  # (seq, first position, first row of hidden, rows) whose MTP latents wait
        t = 0
        for seq, start, n, done in zip(batch.seqs, starts, batch.num_new, computed):
            valid = done - start  # positions start..done-1 are verified; their next tokens are all known
            speculating = seq.extra["speculate"] and valid > 0 and not seq.is_finished
            if speculating and self._pauses(seq):
                paused.append((seq, start, t, valid))
            elif speculating:
                seqs.append(seq)
                counts.append(valid)
                toks.append(seq.tokens[start + 1:start + 1 + valid])
                rows.append(torch.arange(t, t + valid))
                pos0.append(start)
                want.append(done == seq.num_tokens - 1)  # the next token is the sampled one: draft from here
            t += n
        if paused:  # one copy of their rows for all of them (the step's hidden states are not kept)
            total = sum(v for _, _, _, v in paused)
            if total == hidden.shape[0]:  # every row (they are in order): no index list
                kept = hidden.clone()
            else:
                kept = hidden[[r for _, _, t0, v in paused for r in range(t0, t0 + v)]]
            r = 0
            for seq, start, _, v in paused:
                self._defer_mtp_latents(seq, start, kept, r, v)
                r += v
        if not seqs:
            return
        keep = torch.cat(rows)
        h = hidden[keep]  # [T', D]
        ids = torch.tensor([t for ts in toks for t in ts], device=h.device)  # [T']
        last = (torch.tensor(counts).cumsum(0) - 1).tolist()
        drafting = []  # (seq, how many drafts it may take, its row in keep)
        for j, seq in enumerate(seqs):
            room = self._draft_room(seq)
            if want[j] and room > 0:
                drafting.append((seq, room, last[j]))
        out_rows = torch.tensor([r for _, _, r in drafting], dtype=torch.long, device=h.device)
        reuse = self.runner.reuse_context(keep)  # same positions and slots as the verification step
        if reuse is not None:  # decode/verification rows on the C++ kernels: one call, latents-only rows inside
            positions, ctx = reuse
            h_last = self.model.mtp_hidden(1, h[None], ids[None], positions, cache=ctx, keep=out_rows)[0]  # [B', D]
        else:  # a step with prompt chunks: latents of the other rows, then the drafting rows as decode rows
            positions, slot_map = self.runner.positions_and_slots(seqs, pos0, counts)
            drafting_rows = {r for _, _, r in drafting}
            fill = [r for r in range(len(keep)) if r not in drafting_rows]  # (host indices: no device sync)
            if fill:
                fill = torch.tensor(fill, device=h.device)
                self.runner.store_mtp_latents(1, h[fill], ids[fill], positions[fill], slot_map[fill])
            if not drafting:
                return
            # a drafting row is its sequence's last verified position: done - 1, whose next token is the last known
            d_ids, d_pos, d_ctx = self.runner.build_context(
                [s for s, _, _ in drafting], [s.num_tokens - 2 for s, _, _ in drafting], [1] * len(drafting),
                [[s.tokens[-1]] for s, _, _ in drafting])
            h_last = self.model.mtp_hidden(1, h[out_rows][None], d_ids, d_pos, cache=d_ctx)[0]  # [B', D]
        if not drafting:
            return
        logits = self.model.mtp_logits(1, h_last)  # only the drafting rows go through the head
        seqs = [seq for seq, _, _ in drafting]
        for seq, tok, q in zip(seqs, *self._propose(logits, seqs)):
            seq.draft, seq.extra["draft_q"] = [tok], [q]
        self._draft_more([(seq, room) for seq, room, _ in drafting], h_last)

    def _draft_more(self, drafting: list[tuple[Sequence, int]], h: torch.Tensor, chained: int = 1) -> None:
        """Further drafts, all sequences together, each from the last MTP module on the previous pass's output h
        [B', D] and the previous draft, one position further (the recurrent option: an output at position i stands
        for the hidden state of position i+1). `chained`: how many drafts the chain made at the last verified
        position (1 when module 1 alone drafts)."""
        n_mtp = len(self.model.mtp_layers)
        rows = list(range(len(drafting)))
        while True:
            keep = []
            for i in rows:
                seq, room = drafting[i]
                pos = seq.num_tokens - 2 + len(seq.draft) - (chained - 1)  # its input token is the last draft
                if len(seq.draft) < room and self.scheduler.reserve_slots(seq, pos + 1):
                    keep.append(i)
            if not keep:
                return
            k = min(len(drafting[keep[0]][0].draft) + 1, n_mtp)
            # Sequences drafting their j-th token together share module k (all have the same draft count here).
            seqs = [drafting[i][0] for i in keep]
            pos = [s.num_tokens - 2 + len(s.draft) - (chained - 1) for s in seqs]
            ids, positions, ctx = self.runner.build_context(seqs, pos, [1] * len(seqs), [[s.draft[-1]] for s in seqs])
            every = len(keep) == h.shape[0]  # (the usual case: no row indexing)
            h_in = h if every else h[keep]
            fused_mtp = getattr(self.model, "cpu_mtp_draft", None)  # module 1 as one C++ call (greedy)
            if fused_mtp is not None and k == 1 and getattr(ctx, "kernel_only", False) and self.sync_tokens is None:
                greedy = all(s.params.greedy for s in seqs)
                toks, mtp_logits, h_out = fused_mtp(h_in, ids[0], positions, ctx, logits=not greedy)
                toks, qs = (toks.tolist(), [None] * len(seqs)) if greedy else self._propose(mtp_logits, seqs)
            else:
                h_out = self.model.mtp_hidden(k, h_in[None], ids, positions, cache=ctx)[0]  # [B'', D]
                toks, qs = self._propose(self.model.mtp_logits(k, h_out), seqs)
            for seq, tok, q in zip(seqs, toks, qs):
                seq.draft.append(tok)
                seq.extra["draft_q"].append(q)
            if every:
                h = h_out
            else:
                h = h.clone()
                h[keep] = h_out
            rows = keep

    @torch.inference_mode()
    def _draft_chain(self, batch, starts: list[int], computed: list[int], hidden: torch.Tensor) -> None:
        """Drafting with D >= 2 MTP modules as DeepSeek-V3 chains them (the training objective, train/mtp.py): module
        j at position i reads module j-1's output h^{j-1}_i (h^0: the main model's) and the embedding of token
        i+j, and predicts token i+j+1. Its cache entry at i is final once token i+j is known (i <= p + 1 - j, p
        the last verified position), so after each step module j (re)computes positions from start + 1 - j (the
        first it could not finalise last step; its input there is the output module j-1 saved then) to p + 1 - j:
        modules before the last one in full (their outputs feed the next), the last one storing latents only.
        Then draft 1 is module 1's prediction at p, and draft j module j's at p on module j-1's draft-time output
        and draft j-1 (its entry at p is provisional until the next step redoes it). Drafts beyond D continue with
        module D recurrently (_draft_more). After a prefix-cache hit or a preemption the entry just before the
        recomputed positions keeps what the earlier computation left there (proposals only: output unchanged)."""
        work = []  # (seq, first new position, last verified position p, main hidden states of start..p)
        t = 0
        for seq, start, n, done in zip(batch.seqs, starts, batch.num_new, computed):
            if seq.extra["speculate"] and not seq.is_finished and done > start:
                work.append((seq, start, done - 1, hidden[t:t + done - start]))
            t += n
        if work:
            self._chain_drafts(work, self._finalise_chain(work))

    def _finalise_chain(self, work: list[tuple[Sequence, int, int, torch.Tensor]]) -> list[torch.Tensor | None]:
        """The chain modules' cache entries that became final with this step (see _draft_chain), for every
        (seq, start, p, main hidden rows start..p) of `work`. Returns module 1's output at each p [D] (None where
        it was not computed), what draft 1 and module 2's draft start from."""
        Dk = self.chain
        hidden = work[0][3]
        inputs = [(start, rows) for _, start, _, rows in work]  # h^{j-1} from a first position on, per sequence
        saved_before = [dict(seq.extra.setdefault("mtp_chain", {})) for seq, _, _, _ in work]  # (this step updates)
        last_out: list[torch.Tensor | None] = [None] * len(work)  # module 1's output at p, for draft 1 and 2
        for j in range(1, Dk + 1):
            members, spans, h_rows, toks = [], [], [], []
            for w, (seq, start, p, _) in enumerate(work):
                first, h_in = inputs[w]
                lo, end = max(0, start + 1 - j), p + 1 - j
                saved = saved_before[w].get(j - 1)  # module j-1's last final output of the previous step
                if lo < first and saved is not None and saved[0] == first - 1 == lo:
                    h_in, first = torch.cat([saved[1][None], h_in]), lo
                lo = max(lo, first)
                if end >= lo:
                    members.append(w)
                    spans.append((lo, end))
                    h_rows.append(h_in[lo - first:end - first + 1])
                    toks.append(seq.tokens[lo + j:end + j + 1])  # token i+j for each position i
            next_inputs = [(p + 2 - j, hidden.new_zeros(0, hidden.shape[-1])) for _, _, p, _ in work]
            if members:
                seqs = [work[w][0] for w in members]
                h = torch.cat(h_rows)
                if j < Dk:  # in full: the outputs are module j+1's inputs
                    ids, positions, ctx = self.runner.build_context(seqs, [lo for lo, _ in spans],
                                                                    [len(ts) for ts in toks], toks)
                    out = self.model.mtp_hidden(j, h[None], ids, positions, cache=ctx)[0]  # [T, D]
                    o = 0
                    for w, seq, (lo, end) in zip(members, seqs, spans):
                        rows = out[o:o + end - lo + 1]
                        o += end - lo + 1
                        next_inputs[w] = (lo, rows)
                        seq.extra["mtp_chain"][j] = (end, rows[-1].clone())  # module j+1 starts here next step
                        if j == 1:
                            last_out[w] = rows[-1]
                else:  # the last module of the chain: latents only
                    ids = torch.tensor([x for ts in toks for x in ts], device=h.device)
                    positions, slot_map = self.runner.positions_and_slots(
                        seqs, [lo for lo, _ in spans], [end - lo + 1 for lo, end in spans])
                    self.runner.store_mtp_latents(j, h, ids, positions, slot_map)
            inputs = next_inputs
        return last_out

    def _chain_drafts(self, work: list[tuple[Sequence, int, int, torch.Tensor]],
                      last_out: list[torch.Tensor | None]) -> None:
        """Drafts of the sequences of `work` that just got their token: module 1's at p (from its final output
        last_out), then module j's at p on module j-1's draft-time output and draft j-1, then module D recurrently."""
        Dk = self.chain
        drafting = [(w, seq, room) for w, (seq, start, p, _) in enumerate(work)
                    if p == seq.num_tokens - 2 and (room := self._draft_room(seq)) > 0 and last_out[w] is not None]
        if not drafting:
            return
        seqs = [seq for _, seq, _ in drafting]
        h_prev = torch.stack([last_out[w] for w, _, _ in drafting])  # [B', D]
        for seq, tok, q in zip(seqs, *self._propose(self.model.mtp_logits(1, h_prev), seqs)):
            seq.draft, seq.extra["draft_q"] = [tok], [q]
        rows = list(range(len(drafting)))
        for j in range(2, Dk + 1):
            rows = [i for i in rows if drafting[i][2] >= j]
            if not rows:
                return
            group = [seqs[i] for i in rows]
            ids, positions, ctx = self.runner.build_context(group, [s.num_tokens - 2 for s in group], [1] * len(rows),
                                                            [[s.draft[-1]] for s in group])
            h_j = self.model.mtp_hidden(j, h_prev[rows][None], ids, positions, cache=ctx)[0]  # [B'', D]
            for seq, tok, q in zip(group, *self._propose(self.model.mtp_logits(j, h_j), group)):
                seq.draft.append(tok)
                seq.extra["draft_q"].append(q)
            h_prev = h_prev.clone()
            h_prev[rows] = h_j
        more = [i for i in rows if drafting[i][2] > Dk]
        if more:
            self._draft_more([(seqs[i], drafting[i][2]) for i in more], h_prev[more], chained=Dk)

    def _propose(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[torch.Tensor | None]]:
        """MTP logits [B, V] of the drafting sequences -> (their draft tokens, the draft distributions)."""
        toks, qs = propose_rows(logits, [s.extra["sampling"] for s in seqs])
        if self.sync_tokens is not None:  # every rank drafts what rank 0 drew
            toks = [t[0] for t in self.sync_tokens([[t] for t in toks])]
        return toks, qs
