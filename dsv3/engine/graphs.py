"""Decode steps through static buffers, replayed from one CUDA graph per batch-size bucket.

Dimension letters: b bucket (padded batch), B real decode rows (B <= b), M blocks per sequence in the static block
table (cover max_model_len), Z block size, D hidden, V vocabulary, Y cache layers.

A decode step (every sequence adds one known token, no drafts) is the same computation every time up to its batch
size and the context lengths. Everything that varies lives in device buffers that never move: token ids, positions,
the cache slot each new latent goes to, a [b, M] block table and the context lengths. Attention reads the context
through the block table and masks by length (dispatch.mla_decode_paged), MoE routes without host reads
(triton_moe, or torch's grouped path), so the forward holds no .item()/.tolist() and no shape that depends on data,
and a CUDA graph captured once per bucket replays it with no Python in the loop.

Rows past B in a bucket are padding: they decode token 0 at position 0 against a scratch block that the graph runner
takes from the allocator for good, so their cache writes never land in a live sequence's blocks.

Greedy speculative steps with one draft (MTP) get static steps of their own: two rows per sequence (its last token
and its draft, or a padding row when it has none), each row attending through its sequence's block table up to its
own position, so the draft row sees the latent its first row writes in the same step. The graph also runs the MTP
module over both rows with the main model's argmaxes as the next tokens and returns the argmaxes of both (the
verification targets and the next drafts): a speculative step is one replay and one host read.
On the CPU (or with capture=False) the same static steps run eagerly, which is how the tests check them.
"""
from __future__ import annotations

import logging

import torch

from ..kernels import dispatch
from ..model.mla import MLA
from ..model.transformer import Transformer
from .kv_cache import LatentKVCache
from .scheduler import Sequence

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class PagedDecodeContext:
    """The model's LatentCache protocol for a static decode step (one token per row)."""

    def __init__(self, cache: LatentKVCache, slots: torch.Tensor, block_table: torch.Tensor, lens: torch.Tensor,
                 num_splits: int | None):
        self.cache, self.slots, self.block_table, self.lens = cache, slots, block_table, lens
        self.num_splits = num_splits

    def attend(self, mla: MLA, q_nope, q_pe, c_kv, k_pe, impl: str) -> torch.Tensor:
        """q_nope [1, b, H, N], q_pe [1, b, H, R], c_kv [1, b, C], k_pe [1, b, R] -> [1, b, H, V]"""
        kv = self.cache.kv[mla.layer_idx]  # [slots, W]
        kv.index_copy_(0, self.slots, torch.cat([c_kv[0], k_pe[0]], dim=-1).to(kv.dtype))
        o = dispatch.mla_decode_paged(mla, q_nope[0], q_pe[0], kv, self.block_table, self.lens,
                                      self.cache.block_size, self.num_splits)
        return o[None]


class DecodeGraphs:
    def __init__(self, model: Transformer, cache: LatentKVCache, max_batch: int, max_model_len: int,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, capture: bool | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.cache = model, cache
        dev = cache.kv.device
        self.capture = dev.type == "cuda" if capture is None else capture
        if self.capture and dev.type != "cuda":
            raise ValueError("CUDA graphs need the cache on a CUDA device")
        self.buckets = tuple(sorted({b for b in buckets if b < max_batch} | {max_batch}))
        Z = cache.block_size
        self.max_blocks = -(-max_model_len // Z)
        # A block no sequence will ever own: padding rows write their latents there and attend only to it.
        self.scratch_block = cache.allocator.allocate()
        b = self.buckets[-1]
        self.rows = StaticRows(b, self.max_blocks, dev)  # one row per sequence
        self._graphs: dict[int, tuple] = {}  # bucket -> (graph, logits, hidden)
        self._spec_graphs: dict[int, tuple] = {}  # bucket -> (graph, targets, drafts): speculative steps
        self._spec = None  # their row buffers (StaticRows, two rows per sequence), made on first use
        self._pool = None
        self.prepare([], b)  # every row parked on the scratch block until a step fills it

    # ------------------------------------------------------------------------------------------------------------
    def can_run(self, seqs: list[Sequence], num_new: list[int], logits_rows: list[list[int]]) -> bool:
        return (0 < len(seqs) <= self.buckets[-1] and all(n == 1 for n in num_new)
                and all(r == [0] for r in logits_rows) and not any(s.draft for s in seqs)
                and all(s.num_computed < self.max_blocks * self.cache.block_size for s in seqs))

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def prepare(self, seqs: list[Sequence], b: int | None = None) -> int:
        """Fill the static buffers for these sequences (built on the host, one copy per buffer) and park the rest
        of the bucket on the scratch block; returns the bucket."""
        b = self.bucket(len(seqs)) if b is None else b
        self.rows.fill([(seq, seq.num_computed, seq.tokens[seq.num_computed]) for seq in seqs], b,
                       self.scratch_block, self.cache.block_size)
        return b

    def forward(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The static step for bucket b: reads only the buffers -> (logits [b, V] float32, hidden [b, D])."""
        r = self.rows
        ctx = PagedDecodeContext(self.cache, r.slots[:b], r.tables[:b], r.lens[:b], self._splits(b))
        h = self.model.hidden_states(r.ids[None, :b], r.pos[None, :b], cache=ctx)[0]  # [b, D]
        return self.model.logits(h).float(), h

    def _splits(self, b: int) -> int | None:
        if not self.cache.kv.is_cuda:
            return None
        from ..kernels.triton_mla import default_splits

        return default_splits(b, self.model.cfg.num_attention_heads, self.max_blocks * self.cache.block_size)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] float32 and hidden states [B, D] of the sequences' next positions (same contract as
        ModelRunner.run for a decode batch)."""
        b = self.prepare(seqs)
        logits, h = self._outputs(self._graphs, self.forward, b, "decode")
        n = len(seqs)
        # Copies: the next replay overwrites the graph's outputs while the caller may still hold these.
        return logits[:n].clone(), h[:n].clone()

    # ------------------------------------------------------------------------------------------------ speculative
    def can_run_spec(self, seqs: list[Sequence]) -> bool:
        """A greedy speculative step the static runner can take: every sequence computes its last token and at most
        one draft, within the block table, and the model has an MTP module (the engine checks the rest)."""
        Z = self.cache.block_size
        return (bool(self.model.mtp_layers) and 0 < len(seqs) <= self.buckets[-1]
                and all(len(s.draft) <= 1 and s.num_computed == s.num_tokens - 1
                        and s.num_computed + len(s.draft) < self.max_blocks * Z for s in seqs))

    def prepare_spec(self, seqs: list[Sequence], b: int | None = None) -> int:
        """Fill the speculative buffers: rows 2i and 2i+1 are sequence i's last token and its draft (a padding row
        on the scratch block when it has none); padding sequences of the bucket likewise. Returns the bucket."""
        b = self.bucket(len(seqs)) if b is None else b
        if self._spec is None:
            self._spec = StaticRows(2 * self.buckets[-1], self.max_blocks, self.cache.kv.device)
        rows = []
        for seq in seqs:
            p = seq.num_computed
            rows += [(seq, p, seq.tokens[p]), (seq, p + 1, seq.draft[0]) if seq.draft else None]
        self._spec.fill(rows, 2 * b, self.scratch_block, self.cache.block_size)
        return b

    def forward_spec(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The static speculative step for bucket b -> (the main model's argmax [2b], the MTP module's argmax [2b]
        at every row, fed the main model's argmax there as the next token)."""
        R, sp = 2 * b, self._spec
        ctx = PagedDecodeContext(self.cache, sp.slots[:R], sp.tables[:R], sp.lens[:R], self._splits(R))
        pos = sp.pos[None, :R]
        h = self.model.hidden_states(sp.ids[None, :R], pos, cache=ctx)  # [1, R, D]
        targets = self.model.logits(h[0]).argmax(dim=-1)  # [R]
        h_mtp = self.model.mtp_hidden(1, h, targets[None], pos, cache=ctx)[0]  # [R, D] (its cache layer via ctx)
        return targets, self.model.mtp_logits(1, h_mtp).argmax(dim=-1)

    @torch.inference_mode()
    def run_spec(self, seqs: list[Sequence]) -> tuple[list[list[int]], list[list[int]]]:
        """(verification targets, MTP argmaxes) per sequence, two rows each (the second is padding when the
        sequence has no draft), after the one host read of the step."""
        b = self.prepare_spec(seqs)
        targets, drafts = self._outputs(self._spec_graphs, self.forward_spec, b, "speculative")
        n = len(seqs)
        t, d = torch.stack([targets[:2 * n], drafts[:2 * n]]).view(2, n, 2).tolist()
        return t, d

    def _outputs(self, graphs: dict, forward, b: int, what: str) -> tuple:
        """forward(b)'s outputs: computed eagerly, or replayed from the graph captured for bucket b on first use
        (graphs: bucket -> (graph, *its static outputs))."""
        if not self.capture:
            return forward(b)
        if b not in graphs:
            graphs[b] = self._capture(forward, b, what)
        graph, *outs = graphs[b]
        graph.replay()
        return tuple(outs)

    def _capture(self, forward, b: int, what: str) -> tuple:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles the Triton kernels and settles lazy state (rotary tables) before capture
                forward(b)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outs = forward(b)
        self._pool = graph.pool()
        log.info("captured the %s step for batch bucket %d", what, b)
        return (graph, *outs)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every bucket up front (largest first, so smaller graphs reuse its memory pool)."""
        if self.capture:
            for b in sorted(self.buckets, reverse=True):
                if b not in self._graphs:
                    self.prepare([], b)
                    self._graphs[b] = self._capture(self.forward, b, "decode")


class StaticRows:
    """The static inputs of up to R query rows: token id, position, the cache slot its latent goes to, its sequence's
    block table [M] and the context length it attends to (its position + 1)."""

    def __init__(self, R: int, max_blocks: int, dev: torch.device):
        self.ids = torch.zeros(R, dtype=torch.long, device=dev)
        self.pos = torch.zeros(R, dtype=torch.long, device=dev)
        self.slots = torch.zeros(R, dtype=torch.long, device=dev)
        self.tables = torch.zeros(R, max_blocks, dtype=torch.int32, device=dev)
        self.lens = torch.ones(R, dtype=torch.int32, device=dev)

    def fill(self, rows: list[tuple[Sequence, int, int] | None], R: int, scratch_block: int, Z: int) -> None:
        """rows: (sequence, position, token) per row, None for a padding row; rows past them up to R are padding
        too. Built on the host, one copy per buffer. A padding row decodes token 0 at position 0 against the
        scratch block (its writes never land in a live sequence's blocks)."""
        M = self.tables.shape[1]
        ids, pos = torch.zeros(R, dtype=torch.long), torch.zeros(R, dtype=torch.long)
        slots = scratch_block * Z + torch.arange(R) % Z
        tables = torch.full((R, M), scratch_block, dtype=torch.int32)
        lens = torch.ones(R, dtype=torch.int32)
        for r, row in enumerate(rows):
            if row is None:
                continue
            seq, p, tok = row
            ids[r], pos[r] = tok, p
            slots[r] = seq.block_table[p // Z] * Z + p % Z
            blocks = seq.block_table[:M]  # blocks reserved past max_model_len are never read
            tables[r, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            lens[r] = p + 1
        for dst, src in ((self.ids, ids), (self.pos, pos), (self.slots, slots), (self.tables, tables),
                         (self.lens, lens)):
            dst[:R].copy_(src, non_blocking=True)
