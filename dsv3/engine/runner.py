"""One forward pass over a step's packed tokens, with attention over the paged latent cache.

Dimension letters: T packed tokens of the step (all sequences back to back), B sequences, H heads, N/R/V head dims,
C kv_lora_rank, W = C + R, L context length of a sequence, Lm longest context among the decode rows, D hidden.

Every layer writes its new latents into their cache slots first, then attends:
- single-token rows (decode) are batched together: their contexts are gathered from the block tables into a padded
  [B, Lm, W] tensor and attended with the absorbed form (reads the 576-dim latent once for all heads);
- short multi-token rows (speculative verification: the last token and its drafts) are batched the same way,
  padded to the longest, with a causal mask offset by each sequence's cached prefix;
- longer rows (prefill chunks) attend one sequence at a time with a causal mask offset by the cached prefix; queries
  are split so that no score tensor exceeds a fixed size, so a long prompt never materialises an L x L matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import dispatch
from ..kernels.cpu_pack import kv_b_args
from ..model.mla import MLA
from ..model.transformer import Transformer
from .guided import apply_row_constraints
from .kv_cache import LatentKVCache
from .scheduler import ScheduledBatch, Sequence

MAX_SCORE_ELEMENTS = 1 << 25  # per attention call: 32M float32 scores = 128 MiB
SHORT_ROWS = 16  # sequences computing at most this many tokens in a step are batched like decode rows


@dataclass
class _ShortRows:
    """Sequences with 2..SHORT_ROWS new tokens, padded to S rows and Lm context slots."""

    rows: torch.Tensor  # [B, S] packed token index of each query (padding repeats a valid row)
    valid: torch.Tensor  # [B, S] bool: a real query
    slots: torch.Tensor  # [B, Lm] cache slots of the context
    mask: torch.Tensor  # [B, S, Lm] bool: query may attend to that context position


@dataclass
class _KernelRows:
    """Query rows attended by the CPU kernel: every token of a sequence computing at most SHORT_ROWS tokens."""

    tok: torch.Tensor  # [Q] packed token index of each query
    seq: torch.Tensor  # [Q] its row in slots
    len: torch.Tensor  # [Q] context positions it attends (0..len-1, itself included)
    slots: torch.Tensor  # [B, Lm] cache slots of each sequence's context


@dataclass
class _MultiRow:
    start: int  # first packed token of this sequence's chunk
    end: int
    ctx_slots: torch.Tensor  # [L] cache slots of positions 0..L-1
    q_pos: torch.Tensor  # [S] absolute positions of the chunk's queries


class StepContext:
    """Implements the model's LatentCache protocol for one step."""

    def __init__(self, cache: LatentKVCache, slot_mapping: torch.Tensor, decode_rows: torch.Tensor | None,
                 decode_slots: torch.Tensor | None, decode_valid: torch.Tensor | None, multi: list[_MultiRow],
                 layer_offset: int = 0, prefill_impl: str | None = None, decode_impl: str = "absorbed",
                 decode_paged: tuple[torch.Tensor, torch.Tensor] | None = None, short: _ShortRows | None = None,
                 kernel_rows: _KernelRows | None = None, cpu_kernels: bool = False):
        self.cache = cache
        self.short = short
        self.decode_paged = decode_paged  # (block tables [B, M] int32, lengths [B] int32) for the paged kernel
        self.slot_mapping = slot_mapping
        self.decode_rows, self.decode_slots, self.decode_valid = decode_rows, decode_slots, decode_valid
        self.multi = multi
        self.layer_offset = layer_offset  # MTP layers sit after the main layers in the cache tensor
        self.prefill_impl = prefill_impl
        self.decode_impl = decode_impl
        # CPU kernels (kernels/cpu_ext.py): MLA layers hand over raw projections (attend_projected) and the decode
        # and short rows are attended by one kernel call straight from the cache.
        self.cpu_kernels = cpu_kernels
        self.kernel_rows = kernel_rows
        # Every row goes through the kernel tables: packed blocks may run as single C++ calls (CpuLayer).
        self.kernel_only = cpu_kernels and kernel_rows is not None and not multi
        # (cos, sin) [T, P] of the step's positions once the model computed them (Transformer.hidden_states on a
        # kernel-only step): the MTP pass over the same rows reuses them.
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.max_position = -1  # the largest position of the step's rows (set on the kernels' steps)

    def subset(self, rows: torch.Tensor) -> StepContext:
        """This kernel-only step's context for packed rows `rows` [T'] (in order) only: the MTP drafting pass runs
        over the verified rows of the step it follows, at the same positions and cache slots."""
        assert self.kernel_only
        k = self.kernel_rows
        if rows.numel() == k.tok.numel():  # every row, in order
            return self
        kr = _KernelRows(torch.arange(rows.numel()), k.seq[rows], k.len[rows], k.slots)
        sub = StepContext(self.cache, self.slot_mapping[rows], None, None, None, [], layer_offset=self.layer_offset,
                          prefill_impl=self.prefill_impl, kernel_rows=kr, cpu_kernels=True)
        if self.rope is not None:
            sub.rope = (self.rope[0][rows], self.rope[1][rows])
        return sub

    def _attend(self, mla: MLA, q_nope, q_pe, ctx, mask) -> torch.Tensor:
        """Decode-style rows against gathered context ctx [B, Lm, W] (the cache layout, c_kv then k_pe)."""
        if self.decode_impl == "absorbed":
            return mla.attend_latent(q_nope, q_pe, ctx, mask)
        return mla.attend(self.decode_impl, q_nope, q_pe, ctx[..., :mla.rank], ctx[..., mla.rank:], mask)

    def attend(self, mla: MLA, q_nope, q_pe, c_kv, k_pe, impl: str) -> torch.Tensor:
        """q_nope [1, T, H, N], q_pe [1, T, H, R], c_kv [1, T, C], k_pe [1, T, R] -> [1, T, H, V]"""
        kv = self.cache.kv[mla.layer_idx - self.layer_offset]  # [slots, W]
        kv[self.slot_mapping] = torch.cat([c_kv[0], k_pe[0]], dim=-1).to(kv.dtype)
        dt = q_nope.dtype
        out = q_nope.new_empty(q_nope.shape[1], mla.n_heads, mla.v_dim)
        if self.decode_paged is not None:  # Triton on CUDA: reads the cache through the block tables
            tables, lens = self.decode_paged
            out[self.decode_rows] = dispatch.mla_decode_paged(mla, q_nope[0, self.decode_rows],
                                                              q_pe[0, self.decode_rows], kv, tables, lens,
                                                              self.cache.block_size)
        elif self.decode_rows is not None:
            ctx = kv[self.decode_slots].to(dt)  # [B, Lm, W]
            rows = self.decode_rows
            o = self._attend(mla, q_nope[0, rows, None], q_pe[0, rows, None], ctx,
                             self.decode_valid[:, None, :])  # [B, 1, H, V]
            out[rows] = o[:, 0]
        if self.short is not None:
            sr = self.short
            ctx = kv[sr.slots].to(dt)  # [B, Lm, W]
            o = self._attend(mla, q_nope[0, sr.rows], q_pe[0, sr.rows], ctx, sr.mask)  # [B, S, H, V]
            out[sr.rows[sr.valid]] = o[sr.valid]
        self._attend_multi(mla, q_nope, q_pe, kv, out)
        return out[None]

    def _attend_multi(self, mla: MLA, q_nope, q_pe, kv, out) -> None:
        """Prefill chunks, one sequence at a time: q_nope [1, T, H, N], q_pe [1, T, H, R] -> rows of out [T, H, V]."""
        dt = q_nope.dtype
        C = mla.rank
        for r in self.multi:
            ctx = kv[r.ctx_slots].to(dt)[None]  # [1, L, W]
            L, S = ctx.shape[1], r.end - r.start
            use = self.prefill_impl or ("naive" if L <= 2 * S else "absorbed")
            if use == "naive" and L == S:  # a fresh prompt: causal SDPA (its flash kernels: no mask, no L x L)
                out[r.start:r.end] = mla.attend(use, q_nope[:, r.start:r.end], q_pe[:, r.start:r.end],
                                                ctx[..., :C], ctx[..., C:], None)[0]
                continue
            step = max(1, MAX_SCORE_ELEMENTS // (L * mla.n_heads))
            ctx_pos = torch.arange(L, device=ctx.device)
            for a in range(0, S, step):
                b = min(S, a + step)
                mask = ctx_pos[None, :] <= r.q_pos[a:b, None]  # [s, L]
                o = mla.attend(use, q_nope[:, r.start + a:r.start + b], q_pe[:, r.start + a:r.start + b],
                               ctx[..., :C], ctx[..., C:], mask[None])
                out[r.start + a:r.start + b] = o[0]

    def attend_projected(self, mla: MLA, q: torch.Tensor, kv_a: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> torch.Tensor:
        """The CPU-kernel path. q [T, H, N+R] from q_b_proj (q_pe not yet rotated; rotated here in place), kv_a
        [T, C+R] the raw kv_a_proj output (normalised, rotated and stored here), cos/sin [T, P] -> [T, H, V]."""
        ops = mla.cpu_ops
        kv = self.cache.kv[mla.layer_idx - self.layer_offset]  # [slots, W]
        ops.mla_prepare(q, kv_a, mla.kv_a_layernorm.weight, mla.kv_a_layernorm.eps, cos, sin, kv,
                        self.slot_mapping, mla.nope)
        out = q.new_empty(q.shape[0], mla.n_heads, mla.v_dim)
        if self.kernel_rows is not None:
            k = self.kernel_rows
            kv_b, kv_b_scales = kv_b_args(mla.kv_b_proj)  # (codes and scales when it stays quantised)
            ops.mla_decode(q, kv, k.tok, k.seq, k.len, k.slots, kv_b, mla.v_dim, mla.softmax_scale, out, kv_b_scales)
        if self.multi:
            self._attend_multi(mla, q[None, ..., :mla.nope], q[None, ..., mla.nope:], kv, out)
        return out


class ModelRunner:
    def __init__(self, model: Transformer, cache: LatentKVCache, prefill_impl: str | None = None):
        self.model = model
        self.cache = cache
        self.device = cache.kv.device
        self.prefill_impl = prefill_impl
        self.graphs = None  # graphs.DecodeGraphs once enable_decode_graphs() is called
        self.last: tuple[StepContext, torch.Tensor] | None = None  # the last run's (context, positions [1, T])
        # The C++ CPU kernels attend decode and short rows when the model was packed with them (cpu_pack.py) and
        # the cache is a bf16 CPU tensor.
        self.cpu_kernels = (getattr(model, "cpu_kernels", False) and self.device.type == "cpu"
                            and cache.kv.dtype == torch.bfloat16)

    def enable_decode_graphs(self, max_batch: int, max_model_len: int, capture: bool | None = None) -> None:
        """Run pure decode steps through static buffers (CUDA graphs on a CUDA cache); see engine/graphs.py."""
        from .graphs import DecodeGraphs

        self.graphs = DecodeGraphs(self.model, self.cache, max_batch, max_model_len, capture=capture)

    def slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Cache slots [end - start] of positions start..end-1 (a view of a per-sequence table that is rebuilt only
        when the block table changes)."""
        bs = self.cache.block_size
        cached = seq.extra.get("slot_table")
        if cached is None or cached[0] != seq.block_table:
            bt = torch.tensor(seq.block_table, dtype=torch.long)
            cached = (list(seq.block_table), (bt[:, None] * bs + torch.arange(bs)).flatten())
            seq.extra["slot_table"] = cached
        return cached[1][start:end]

    def build_context(self, seqs: list[Sequence], starts: list[int], counts: list[int], tokens: list[list[int]]
                      ) -> tuple[torch.Tensor, torch.Tensor, StepContext]:
        """Packed inputs for computing tokens[i] at positions starts[i].. of seqs[i]."""
        ids, pos, slot_map = [], [], []
        dec_rows, dec_slots, multi, short = [], [], [], []
        t = 0
        for seq, start, n, toks in zip(seqs, starts, counts, tokens):
            ids.extend(toks)
            pos.extend(range(start, start + n))
            ctx_slots = self.slots(seq, 0, start + n)
            slot_map.append(ctx_slots[start:])
            if self.cpu_kernels and n <= SHORT_ROWS:
                short.append((t, n, start, ctx_slots))
            elif n == 1:
                dec_rows.append(t)
                dec_slots.append(ctx_slots)
            elif n <= SHORT_ROWS:
                short.append((t, n, start, ctx_slots))
            else:
                multi.append(_MultiRow(t, t + n, ctx_slots.to(self.device),
                                       torch.arange(start, start + n, device=self.device)))
            t += n
        if self.cpu_kernels:
            return self._kernel_context(ids, pos, slot_map, short, multi)
        dev = self.device
        short_rows = self._short_rows(short) if short else None
        rows = slots = valid = None
        if dec_rows:
            lm = max(len(s) for s in dec_slots)
            slots = torch.zeros(len(dec_rows), lm, dtype=torch.long)
            valid = torch.zeros(len(dec_rows), lm, dtype=torch.bool)
            for i, s in enumerate(dec_slots):
                slots[i, :len(s)] = s
                valid[i, :len(s)] = True
            rows, slots, valid = torch.tensor(dec_rows, device=dev), slots.to(dev), valid.to(dev)
        paged = None
        if dec_rows and dispatch.use_triton(self.cache.kv, "mla_decode"):
            dec = [s for s, n in zip(seqs, counts) if n == 1]
            tables = torch.zeros(len(dec), -(-lm // self.cache.block_size), dtype=torch.int32)
            for i, s in enumerate(dec):
                tables[i, :min(len(s.block_table), tables.shape[1])] = torch.tensor(s.block_table[:tables.shape[1]])
            paged = tables.to(dev), valid.sum(1, dtype=torch.int32)
        ctx = StepContext(self.cache, torch.cat(slot_map).to(dev), rows, slots, valid, multi,
                          prefill_impl=self.prefill_impl, decode_paged=paged, short=short_rows)
        input_ids = torch.tensor(ids, device=dev)[None]
        positions = torch.tensor(pos, device=dev)[None]
        return input_ids, positions, ctx

    def _kernel_context(self, ids: list[int], pos: list[int], slot_map: list[torch.Tensor],
                        short: list[tuple[int, int, int, torch.Tensor]], multi: list[_MultiRow]
                        ) -> tuple[torch.Tensor, torch.Tensor, StepContext]:
        """build_context's end on the C++ CPU kernels: the short sequences' rows (packed start, new tokens, first
        position, context slots) go into the kernel's attention tables. Ids, positions and the tables' rows come
        from one host-to-tensor copy and a single sequence's slot tables are views, so a decode step costs a few
        tensor operations."""
        tok, seq_rows, lens = [], [], []
        for i, (t, n, start, _) in enumerate(short):
            tok.extend(range(t, t + n))
            seq_rows.extend([i] * n)
            lens.extend(range(start + 1, start + n + 1))
        T, Q = len(ids), len(tok)
        packed = torch.tensor(ids + pos + tok + seq_rows + lens)
        kernel_rows = None
        if short:
            tables = [c for _, _, _, c in short]
            slots = tables[0][None] if len(tables) == 1 else torch.nn.utils.rnn.pad_sequence(tables, batch_first=True)
            kernel_rows = _KernelRows(packed[2 * T:2 * T + Q], packed[2 * T + Q:2 * T + 2 * Q], packed[2 * T + 2 * Q:],
                                      slots)  # [Q], [Q], [Q], [B, Lm]
        ctx = StepContext(self.cache, slot_map[0] if len(slot_map) == 1 else torch.cat(slot_map), None, None, None,
                          multi, prefill_impl=self.prefill_impl, kernel_rows=kernel_rows, cpu_kernels=True)
        ctx.max_position = max(pos)  # (the rotary tables of run_model must reach it)
        return packed[None, :T], packed[None, T:2 * T], ctx

    def _short_rows(self, short: list[tuple[int, int, int, torch.Tensor]]) -> _ShortRows:
        """(packed start, new tokens, first position, context slots) per sequence -> padded batch tensors."""
        B = len(short)
        S = max(n for _, n, _, _ in short)
        Lm = max(len(c) for _, _, _, c in short)
        rows = torch.zeros(B, S, dtype=torch.long)
        valid = torch.zeros(B, S, dtype=torch.bool)
        slots = torch.zeros(B, Lm, dtype=torch.long)
        q_pos = torch.zeros(B, S, dtype=torch.long)
        ctx_len = torch.zeros(B, 1, 1, dtype=torch.long)
        for i, (t, n, start, c) in enumerate(short):
            rows[i, :n] = torch.arange(t, t + n)
            rows[i, n:] = t  # padding queries repeat the first row; their outputs are dropped
            valid[i, :n] = True
            slots[i, :len(c)] = c
            q_pos[i, :n] = torch.arange(start, start + n)
            q_pos[i, n:] = start
            ctx_len[i] = len(c)
        ctx_pos = torch.arange(Lm)[None, None, :]
        mask = (ctx_pos <= q_pos[:, :, None]) & (ctx_pos < ctx_len)
        dev = self.device
        return _ShortRows(rows.to(dev), valid.to(dev), slots.to(dev), mask.to(dev))

    def positions_and_slots(self, seqs: list[Sequence], starts: list[int], counts: list[int]
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [T] and cache slots [T] of counts[i] consecutive positions from starts[i] of seqs[i], packed
        in order, on the cache's device."""
        positions = torch.cat([torch.arange(p, p + c) for p, c in zip(starts, counts)])
        slots = torch.cat([self.slots(s, p, p + c) for s, p, c in zip(seqs, starts, counts)])
        return positions.to(self.device), slots.to(self.device)

    @torch.inference_mode()
    def store_mtp_latents(self, k: int, h: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                          slots: torch.Tensor) -> None:
        """MTP module k's latents of rows whose drafts are not wanted (h [T, D], next_ids [T], positions [T]) into
        its cache layer at slots [T] (Transformer.mtp_store_latents)."""
        layer = self.model.mtp_layers[k - 1]
        self.model.mtp_store_latents(k, h, next_ids, positions, self.cache.kv[layer.layer_idx], slots)

    def reuse_context(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, StepContext] | None:
        """(positions [1, T'], context) of the last run restricted to packed rows `rows` (None: all of them), when
        that run was a kernel-only step (decode and verification rows on the CPU kernels); else None (build a fresh
        context)."""
        if self.last is None or not self.last[0].kernel_only:
            return None
        ctx, positions = self.last
        if rows is None or rows.numel() == positions.shape[1]:  # every row, in order (StepContext.subset's contract)
            return positions, ctx
        return positions[:, rows], ctx.subset(rows)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, logits_rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the batch's new tokens (a sequence's known tokens, then its draft tokens). logits_rows[i]:
        offsets within seq i's chunk whose logits are wanted. Returns (logits [sum(len(rows)), V] float32,
        hidden states of every packed token [T, D] after the final norm). The logits carry each sequence's logit
        bias and grammar mask (engine/guided.py), so sampling and draft verification see the constrained
        distribution."""
        logits, h = self._run(batch, logits_rows)
        apply_row_constraints(logits, batch.seqs, logits_rows)
        return logits, h

    def _run(self, batch: ScheduledBatch, logits_rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = batch.seqs
        if self.graphs is not None and self.graphs.can_run(seqs, batch.num_new, logits_rows):
            self.last = None  # no step context to reuse
            return self.graphs.run(seqs)
        starts = [s.num_computed for s in seqs]
        toks = [(s.tokens[a:] + s.draft)[:n] if s.draft else s.tokens[a:a + n]
                for s, a, n in zip(seqs, starts, batch.num_new)]
        input_ids, positions, ctx = self.build_context(seqs, starts, batch.num_new, toks)
        self.last = (ctx, positions)
        picks, t = [], 0
        for n, rows in zip(batch.num_new, logits_rows):
            picks.extend(t + r for r in rows)
            t += n
        every = picks == list(range(t))
        fused = self.model.cpu_model_step if ctx.kernel_only else None
        if fused is not None:  # embedding, blocks, norm and head in one C++ call
            h, logits = fused(input_ids, positions, ctx, None if every else picks)
            if logits is not None:
                return logits, h
        else:
            h = self.model.hidden_states(input_ids, positions, cache=ctx)[0]  # [T, D]
        hs = h if every else h[torch.tensor(picks, dtype=torch.long, device=h.device)]
        return self.model.logits(hs).float(), h
