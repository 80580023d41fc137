"""LLMEngine: requests in, incremental outputs out, one continuous-batching step at a time.

This module owns EngineConfig (the runtime limits), the engine's construction (the latent cache, the scheduler, the
model runner and the sampler; cache sizing and the speculation settings), the engine step and the cache and
speculation statistics. `step()` schedules a batch, runs one forward pass over it, samples the next token of every
sequence whose known tokens are all computed, applies stop rules, frees finished sequences' blocks at once and
returns what changed. The server drives the same object from a background thread; `LLM` drives it to completion
for offline use. LLMEngine's other jobs are mixins beside it: request admission, appends and outputs in request.py
(RequestBook; RequestOutput, run_to_completion), the verification of drafts and the hand-off of a step's MTP pass in
spec_verify.py (SpecVerification, StepDrafts), drafting after the step in spec_draft.py (SpecDrafting).
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from ..model.transformer import Transformer
from .kv_cache import LatentKVCache
from .request import RequestBook, RequestOutput
from .runner import ModelRunner
from .sampling import Sampler
from .scheduler import Scheduler, Sequence
from .spec_draft import SpecDrafting
from .spec_verify import SpecVerification
from .speculative import SPECULATIVE_METHODS

log = logging.getLogger(__name__)

__all__ = ["EngineConfig", "LLMEngine"]


# Largest batch at which drafting goes on, per device type, when EngineConfig.speculative_max_batch is -1. CPU: on
# the embedded model speculation gains at batch 1 (1.08-1.12x), breaks even at 2 and loses at 4 and 8 (0.93-0.94x;
# docs/benchmarks.md). GPUs: no limit until measured.
DEFAULT_SPEC_MAX_BATCH = {"cpu": 2}


@dataclass
class EngineConfig:
    """Runtime limits (the model config holds architecture only)."""

    max_model_len: int | None = None  # default: the model's max_position_embeddings
    cache_memory_bytes: int | None = None  # latent cache budget; default 1 GiB or enough for max_num_seqs full contexts
    num_blocks: int | None = None  # overrides cache_memory_bytes
    block_size: int = 16
    cache_dtype: torch.dtype | None = None  # default: the model's compute dtype
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per step: prefill chunk size and decode rows together
    max_waiting: int = 1024
    enable_prefix_caching: bool = True
    prefill_impl: str | None = None  # None: naive for fresh prompts, absorbed over long cached prefixes
    speculative: str = "auto"  # "auto" (MTP drafting when the model has MTP layers), "mtp", "off"
    num_draft_tokens: int = 1  # drafts per step; beyond the number of MTP modules the last one runs recurrently
    # Drafting pauses while more sequences than this run (their MTP latents wait and are stored when drafting
    # resumes, at full acceptance); seeded sampled requests draft on, so their output does not depend on the load.
    # -1: the device's default (DEFAULT_SPEC_MAX_BATCH: 2 on the CPU, elsewhere no limit), 0: no limit.
    speculative_max_batch: int = -1


class LLMEngine(RequestBook, SpecVerification, SpecDrafting):
    def __init__(self, model: Transformer, tokenizer=None, config: EngineConfig | None = None):
        self.model = model
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        param = next(model.parameters())
        self.device = param.device
        self.dtype = next(p.dtype for n, p in model.named_parameters() if n.endswith("embed_tokens.weight"))
        self.max_model_len = config.max_model_len or self.cfg.max_position_embeddings
        if self.max_model_len > self.cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")
        cache_dtype = config.cache_dtype or self.dtype
        if config.speculative not in ("auto",) + SPECULATIVE_METHODS:
            raise ValueError(f"speculative={config.speculative!r}: choose one of auto, {', '.join(SPECULATIVE_METHODS)}")
        if config.speculative == "mtp" and not model.mtp_layers:
            raise ValueError("speculative='mtp' needs MTP weights, but this model has none loaded "
                             f"(num_nextn_predict_layers={self.cfg.num_nextn_predict_layers}); use speculative='off'")
        if config.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {config.num_draft_tokens}")
        if not isinstance(config.speculative_max_batch, int) or config.speculative_max_batch < -1:
            raise ValueError(f"speculative_max_batch must be -1 (the device's default), 0 (no limit) or a number of "
                             f"sequences >= 1, got {config.speculative_max_batch!r}")
        self.spec_max_batch = (config.speculative_max_batch if config.speculative_max_batch >= 0
                               else DEFAULT_SPEC_MAX_BATCH.get(self.device.type, 0))
        self._spec_paused = False  # this step runs more sequences than spec_max_batch
        self.num_draft = config.num_draft_tokens if (config.speculative != "off" and model.mtp_layers) else 0
        # With D >= 2 MTP modules and several drafts, drafts 1..min(k, D) follow DeepSeek's chain: module j at the
        # last verified position, on module j-1's output there (_draft_chain); 0 when module 1 alone drafts.
        n_mtp = len(model.mtp_layers)
        self.chain = min(self.num_draft, n_mtp) if n_mtp >= 2 and self.num_draft >= 2 else 0
        num_layers = self.cfg.num_hidden_layers + len(model.mtp_layers)
        if config.num_blocks is not None:
            num_blocks = config.num_blocks
        else:
            budget = config.cache_memory_bytes
            if budget is None:
                want = config.max_num_seqs * self.max_model_len * LatentKVCache.bytes_per_token_for(
                    self.cfg, cache_dtype, num_layers)
                budget = min(want, 1 << 30)
            num_blocks = LatentKVCache.blocks_for_budget(self.cfg, budget, config.block_size, cache_dtype, num_layers)
            if num_blocks < 1:
                raise ValueError(f"cache budget of {budget} bytes holds no block of {config.block_size} tokens; "
                                 f"raise cache_memory_bytes")
        self.cache = LatentKVCache(self.cfg, num_blocks, config.block_size, cache_dtype, self.device, num_layers,
                                   config.enable_prefix_caching)
        self.scheduler = Scheduler(self.cache, config.max_num_seqs, config.max_num_batched_tokens, config.max_waiting)
        self.runner = ModelRunner(model, self.cache, config.prefill_impl)
        self.sampler = Sampler(self.cfg.vocab_size, self.device)
        # Set when ranks run replicas of this engine in lockstep (engine/distributed.py): every sampling decision
        # (each sequence's new tokens, each draft) passes through it, so all replicas append rank 0's choices.
        self.sync_tokens = None  # Callable[[list[list[int]]], list[list[int]]] | None
        self.eos_ids = set(tokenizer.eos_ids if tokenizer is not None else self.cfg.eos_token_ids)
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.stats = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0, "aborted": 0, "finished": 0,
                      "spec_drafted": 0, "spec_accepted": 0, "spec_verify_steps": 0}
        log.info("latent cache: %d blocks x %d tokens (%.1f MiB, %d bytes/token, %s)", num_blocks, config.block_size,
                 self.cache.total_bytes / 2**20, self.cache.bytes_per_token, cache_dtype)

    # ------------------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self._spec_paused = 0 < self.spec_max_batch < len(self.scheduler.running)
        if self.num_draft and not self.chain:  # sequences drafting again store the MTP latents they owe
            owing = [s for s in batch.seqs if "mtp_backlog" in s.extra and not self._pauses(s)]
            if owing:
                self._flush_mtp_backlog(owing)
        # A sequence samples when all its known tokens are computed in this step; a draft adds one verified row.
        rows, n_known = [], []
        for seq, n in zip(batch.seqs, batch.num_new):
            known = seq.num_tokens - seq.num_computed
            n_known.append(min(n, known))
            if n >= known:
                del seq.draft[n - known:]  # the token budget may have cut drafts
                rows.append(list(range(known - 1, n)))
            else:
                rows.append([])
        logits = hidden = None
        fused = self._static_verify_and_draft(batch, n_known)  # a replayed greedy speculative step (CUDA graphs)
        if fused is None:
            logits, hidden = self.runner.run(batch, rows)
        self.stats["steps"] += 1
        new_tokens: list[list[int]] = [[] for _ in batch.seqs]
        plain = [i for i, r in enumerate(rows) if len(r) == 1]
        offsets = [0]
        for r in rows:
            offsets.append(offsets[-1] + len(r))
        results = {}
        if fused is None:
            fused = self._verify_and_draft_in_step(batch, n_known, logits, hidden, offsets)
        if fused is not None:  # accepted tokens and the MTP pass for the next drafts already computed
            new_tokens = fused.accepted
            for i, seq in enumerate(batch.seqs):
                if seq.draft:
                    self._count_verified(seq, len(new_tokens[i]) - 1)
            plain = []
        if plain:
            # (a plain decode step samples every row: no row indexing then)
            res = self.sampler.sample(logits if len(plain) == logits.shape[0] else logits[[offsets[i] for i in plain]],
                                      [batch.seqs[i].extra["sampling"] for i in plain])
            for j, (i, tok) in enumerate(zip(plain, res.token_ids.tolist())):  # the one host sync per step
                new_tokens[i] = [tok]
                results[i] = (res, j)
        if fused is None:  # every sequence with drafts verified in one batched call
            self._verify_drafts(batch, rows, offsets, logits, new_tokens)
        if self.sync_tokens is not None:
            new_tokens = self.sync_tokens(new_tokens)
        outputs, computed = [], []
        ends = []  # (seq, output, first?) when drafting follows the appends: stamped again when handed back
        for i, seq in enumerate(batch.seqs):
            start = seq.num_computed
            computed.append(start + (n_known[i] + len(new_tokens[i]) - 1 if new_tokens[i] else batch.num_new[i]))
            seq.draft = []
            seq.extra["draft_q"] = []
            for tok in new_tokens[i]:
                lp = None
                if i in results and seq.extra["logprobs"] is not None:
                    res, j = results[i]
                    lp = res.logprob_entry(j)
                first = seq.first_token_time is None
                outputs.append(self._append(seq, tok, lp))
                if self.num_draft and (first or seq.is_finished):
                    ends.append((seq, outputs[-1], first))
                if seq.is_finished:
                    break
        starts = [s.num_computed for s in batch.seqs]
        self.scheduler.after_step(batch, computed)
        for seq in batch.seqs:
            if seq.is_finished:
                self.scheduler.finish(seq)
        if fused is not None:  # the next drafts from the step's own MTP pass
            self._draft_from_step(batch, fused)
        elif self.num_draft:
            self._draft(batch, starts, computed, hidden)
        if ends:
            # Drafting after the appends (the MTP pass over a prompt, further drafts) delays the outputs: a caller
            # gets the first token and the end only now, so time to first token and elapsed count it.
            now = time.perf_counter()
            for seq, out, first in ends:
                if first:
                    seq.first_token_time = now
                if seq.is_finished:
                    seq.finish_time = now
                out.metrics = self._metrics(seq, now)
        return outputs

    def cache_stats(self) -> dict:
        a = self.cache.allocator
        return {"blocks_total": a.num_blocks, "blocks_used": a.num_used, "usage": self.cache.usage(),
                "bytes_per_token": self.cache.bytes_per_token, "total_bytes": self.cache.total_bytes,
                "prefix_hit_rate": a.hits / a.queries if a.queries else 0.0,
                "preemptions": self.scheduler.num_preemptions}

    def spec_stats(self) -> dict:
        """Speculative decoding so far: draft acceptance rate and tokens gained per verification step."""
        d, a, v = self.stats["spec_drafted"], self.stats["spec_accepted"], self.stats["spec_verify_steps"]
        return {"enabled": self.num_draft > 0, "num_draft_tokens": self.num_draft,
                "max_batch": self.spec_max_batch or None, "drafted": d, "accepted": a,
                "acceptance_rate": a / d if d else None, "tokens_per_step": (a + v) / v if v else None}
