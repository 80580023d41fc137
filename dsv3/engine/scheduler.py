"""Continuous batching: which sequences run in the next step, with how many tokens each.

Each step has a token budget. Running sequences go first (decode: one token; a prompt being prefilled: its next
chunk), then waiting requests are admitted in arrival order while the budget, the sequence limit and the cache
allow. A long prompt is prefilled in chunks across steps, mixed with other sequences' decode tokens. When a running
sequence needs a block and none is free, the most recently admitted sequence is preempted: its blocks are released
and it is recomputed later (prefix caching usually makes that cheap). Requests that could never fit are refused
when added, so the cache never runs out of memory.
"""
from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .kv_cache import LatentKVCache, block_hash


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: Any  # SamplingParams
    output_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # prompt + output, kept in step with append_token
    draft: list[int] = field(default_factory=list)  # speculative tokens to verify in the next step
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose latents are in the cache
    num_cached_prompt: int = 0  # prompt tokens served from the prefix cache at the last admission
    block_hashes: list[bytes] = field(default_factory=list)  # chain hashes of the full blocks registered so far
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    seq_no: int = field(default_factory=lambda: next(_ids))
    extra: dict = field(default_factory=dict)  # per-request state owned by the engine (sampler, detokenizer, ...)

    def __post_init__(self) -> None:
        self.token_ids = self.prompt_ids + self.output_ids

    def append_token(self, tok: int) -> None:
        self.output_ids.append(tok)
        self.token_ids.append(tok)

    @property
    def tokens(self) -> list[int]:
        return self.token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclass
class ScheduledBatch:
    """The sequences of one step and how many not-yet-computed tokens of each are computed now."""

    seqs: list[Sequence]
    num_new: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class QueueFullError(RuntimeError):
    """Too many requests waiting; the server answers 429/503 with Retry-After."""


class Scheduler:
    def __init__(self, cache: LatentKVCache, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 max_waiting: int = 1024):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.cache = cache
        self.alloc = cache.allocator
        self.block_size = cache.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        needed = seq.num_tokens + seq.params.max_tokens - len(seq.output_ids)
        if needed > self.cache.capacity_tokens:
            raise ValueError(f"request needs up to {needed} tokens of cache (prompt {len(seq.prompt_ids)} + "
                             f"max_tokens {seq.params.max_tokens}) but the whole cache holds "
                             f"{self.cache.capacity_tokens}; lower max_tokens or give the cache more memory")
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests already waiting (limit {self.max_waiting})")
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        seq.draft = []
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        seqs, counts = [], []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted by an earlier sequence of this loop
                continue
            n = min(seq.num_tokens - seq.num_computed + len(seq.draft), budget)
            if n <= 0:
                continue
            if not self._reserve(seq, n, preempt=True, scheduled=seqs):
                continue
            seqs.append(seq)
            counts.append(n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                self._match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._reserve(seq, n, preempt=False, scheduled=seqs):
                break  # wait for blocks to free up; keep arrival order
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return ScheduledBatch(seqs, counts)

    def after_step(self, batch: ScheduledBatch, computed: list[int] | None = None) -> None:
        """Advance computed counts (by the step's token counts, or to `computed` when speculative tokens were
        rejected: their blocks are released) and register newly filled blocks for prefix reuse."""
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            if computed is not None and computed[i] < seq.num_computed + n:
                self.rollback(seq, computed[i])
            else:
                seq.num_computed += n
            self.register_full_blocks(seq)

    def register_full_blocks(self, seq: Sequence) -> None:
        bs = self.block_size
        full = min(seq.num_computed, seq.num_tokens) // bs
        if len(seq.block_hashes) >= full:
            return
        tokens = seq.tokens
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), full):
            parent = block_hash(parent, tokens[i * bs:(i + 1) * bs])
            seq.block_hashes.append(parent)
            self.alloc.register(seq.block_table[i], parent)

    def rollback(self, seq: Sequence, num_computed: int) -> None:
        """Set the computed count to num_computed (dropping rejected speculative tokens) and free blocks past it."""
        seq.num_computed = num_computed
        keep = -(-num_computed // self.block_size)
        # Blocks hashed beyond the kept prefix would claim content that is about to be overwritten.
        del seq.block_hashes[num_computed // self.block_size:]
        extra = seq.block_table[keep:]
        del seq.block_table[keep:]
        self.alloc.release(extra)

    def reserve_slots(self, seq: Sequence, num_positions: int) -> bool:
        """Make sure blocks cover positions [0, num_positions) without preempting anyone (drafting uses this)."""
        need = -(-num_positions // self.block_size) - len(seq.block_table)
        if need > self.alloc.num_free:
            return False
        for _ in range(max(need, 0)):
            seq.block_table.append(self.alloc.allocate())
        return True

    # ------------------------------------------------------------------------------------------------------------
    def _match_prefix(self, seq: Sequence) -> None:
        bs = self.block_size
        tokens = seq.tokens
        # Leave at least the last token to compute: its logits give the next token.
        n_full = (len(tokens) - 1) // bs
        hashes, parent = [], None
        for i in range(n_full):
            parent = block_hash(parent, tokens[i * bs:(i + 1) * bs])
            hashes.append(parent)
        blocks = self.alloc.lookup(hashes)
        seq.block_table = blocks
        seq.block_hashes = hashes[:len(blocks)]
        seq.num_computed = len(blocks) * bs
        if not seq.output_ids:
            seq.num_cached_prompt = seq.num_computed

    def _reserve(self, seq: Sequence, n: int, preempt: bool, scheduled: list[Sequence]) -> bool:
        need = -(-(seq.num_computed + n) // self.block_size) - len(seq.block_table)
        while need > self.alloc.num_free:
            if not preempt:
                return False
            victim = self._pick_victim(seq, scheduled)
            if victim is None:
                self._preempt(seq)
                return False
            self._preempt(victim)
        for _ in range(max(need, 0)):
            seq.block_table.append(self.alloc.allocate())
        return True

    def _pick_victim(self, for_seq: Sequence, scheduled: list[Sequence]) -> Sequence | None:
        # The latest admitted sequence that is not already part of this step.
        for cand in reversed(self.running):
            if cand is not for_seq and cand not in scheduled:
                return cand
        return None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _free(self, seq: Sequence) -> None:
        self.alloc.release(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0
