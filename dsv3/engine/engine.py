"""LLMEngine: requests in, incremental outputs out, one continuous-batching step at a time.

The engine owns the latent cache, the scheduler, the model runner and the sampler. `step()` schedules a batch,
runs one forward pass over it, samples the next token of every sequence whose known tokens are all computed,
applies stop rules, frees finished sequences' blocks at once and returns what changed. The server drives the same
object from a background thread; `LLM` drives it to completion for offline use.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from ..model.transformer import Transformer
from .kv_cache import LatentKVCache
from .runner import ModelRunner
from .sampling import LogprobEntry, SamplingParams, Sampler, SequenceSamplingState, shared_temperature, uniforms
from .speculative import SPECULATIVE_METHODS, accept_greedy, propose_rows, supports_speculation, verify_rows
from .scheduler import QueueFullError, Scheduler, Sequence, SeqStatus

log = logging.getLogger(__name__)

__all__ = ["EngineConfig", "LLMEngine", "RequestOutput", "QueueFullError"]


# Largest batch at which drafting goes on, per device type, when EngineConfig.speculative_max_batch is -1. CPU: on
# the embedded model speculation gains at batch 1 (1.08-1.12x), breaks even at 2 and loses at 4 and 8 (0.93-0.94x;
# docs/benchmarks.md). GPUs: no limit until measured.
DEFAULT_SPEC_MAX_BATCH = {"cpu": 2}
# Most positions a paused sequence's MTP latents may wait for (LLMEngine._defer_mtp_latents); past it, it stops
# speculating. The wait holds one hidden state per position (14 KB for DeepSeek-V3 in bf16).
MTP_BACKLOG_LIMIT = 4096


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


@dataclass
class StepDrafts:
    """What a step that verified its drafts and ran the MTP pass in one go hands back to LLMEngine.step."""
    accepted: list[list[int]]  # per sequence of the batch: the tokens it appends
    rows: list[int]  # the batch indices the MTP pass drafted for, in the order of its output rows
    ids: list[int]  # their draft tokens (argmaxes; drawn from q for the rows the call sampled)
    logits: torch.Tensor | None = None  # [K, V] when the drafts are drawn after the step instead (top-k/top-p rows)
    q: torch.Tensor | None = None  # [K, V] float32 draft distributions of the rows the call sampled (others unused)
    h: torch.Tensor | None = None  # [K, D] the MTP block's output, for further drafts (CPU kernels)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # all generated so far
    text: str  # all generated so far (stop string and eos excluded)
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    num_cached_tokens: int = 0
    logprobs: list[LogprobEntry] | None = None
    new_logprobs: list[LogprobEntry] | None = None
    metrics: dict = field(default_factory=dict)


def run_to_completion(engine, prompts: list, params: list[SamplingParams]) -> list[RequestOutput]:
    """Queue prompts[i] with params[i] on an engine (LLMEngine or its torchrun Driver), step until each has
    finished, and return their final outputs in prompt order. If queueing or a step fails, the prompts' requests
    are aborted (their cache freed) before the error propagates."""
    ids = []
    try:
        for prompt, p in zip(prompts, params):
            ids.append(engine.add_request(prompt, p))
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out
    except BaseException:
        for rid in ids:
            engine.abort(rid)
        raise
    return [final[r] for r in ids]


class LLMEngine:
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
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json, so prompts must be token-id lists")
            if not prompt:
                raise ValueError("prompt is empty")
            return self.tokenizer.encode(prompt, add_bos=True)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                              for t in prompt):
            raise ValueError("a prompt must be a string or a list of token ids (ints)")
        if not prompt:
            raise ValueError("prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.cfg.vocab_size})")
        return list(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validate and queue a request; raises ValueError (bad input) or QueueFullError before any work."""
        params = params or SamplingParams()
        params.validate()
        ids = self.encode_prompt(prompt)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = "
                             f"{len(ids) + params.max_tokens} exceeds the context length {self.max_model_len}")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise ValueError(f"request id {rid!r} is already in use")
        seq = Sequence(rid, ids, params)
        seq.extra["sampling"] = state = SequenceSamplingState.create(params, ids, self.cfg.vocab_size, self.device)
        seq.extra["speculate"] = self.num_draft > 0 and supports_speculation(state)
        seq.extra["draft_q"] = []
        seq.extra["spec"] = [0, 0, 0]  # drafted, accepted, verification steps
        seq.extra["text"] = ""
        seq.extra["logprobs"] = [] if params.logprobs is not None else None
        if self.tokenizer is not None:
            seq.extra["detok"] = self.tokenizer.detokenizer(ids)
            seq.extra["stop"] = self.tokenizer.stop_checker(params.stop) if params.stop else None
        self.scheduler.add(seq)
        self.seqs[rid] = seq
        return rid

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its cache blocks; False if it is unknown or already finished."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.abort(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, "abort"
        self.stats["aborted"] += 1
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

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
        drafted = [i for i, r in enumerate(rows) if len(r) > 1] if fused is None else []
        if drafted:  # every sequence with drafts verified in one batched call
            seqs = [batch.seqs[i] for i in drafted]
            picks = [r for i in drafted for r in range(offsets[i], offsets[i + 1])]
            verified = verify_rows(logits[picks], [s.draft for s in seqs], [s.extra["draft_q"] for s in seqs],
                                   [s.extra["sampling"] for s in seqs])
            for i, seq, toks in zip(drafted, seqs, verified):
                new_tokens[i] = toks
                self._count_verified(seq, len(toks) - 1)
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
        if fused is not None:
            # MTP at each drafting sequence's last verified row proposes its next draft: drawn in the MTP call, or
            # only now (top-k/top-p rows), for the sequences that go on drafting, so a seeded sequence's generator
            # advances exactly as on the module path.
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

    def _count_verified(self, seq: Sequence, accepted: int) -> None:
        """Acceptance bookkeeping of one verified sequence (its drafts before they are cleared)."""
        d = len(seq.draft)
        seq.extra["spec"][0] += d
        seq.extra["spec"][1] += accepted
        seq.extra["spec"][2] += 1
        self.stats["spec_drafted"] += d
        self.stats["spec_accepted"] += accepted
        self.stats["spec_verify_steps"] += 1

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

    def _static_verify_and_draft(self, batch, n_known: list[int]) -> StepDrafts | None:
        """Greedy speculative steps with one draft through the static runner (engine/graphs.py: one replay computes
        the main model's and the MTP module's argmaxes at every row, one host read). Same result as
        _verify_and_draft_in_step; None when the step does not qualify or no static runner is on."""
        g = self.runner.graphs
        if g is None or self.num_draft != 1 or self.sync_tokens is not None:
            return None
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
        fused_mtp = getattr(self.model, "cpu_mtp_draft", None)  # the whole MTP pass as one C++ call
        if (self.sync_tokens is not None or self.num_draft == 0 or self.chain
                or (self.num_draft > 1 and fused_mtp is None)):
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
            accepted = verify_rows(logits, [s.draft for s in seqs], [s.extra["draft_q"] for s in seqs],
                                   [s.extra["sampling"] for s in seqs])
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
            if p.greedy:
                temps.append(0.0)
            elif shared_temperature([seq.extra["sampling"]]) is None:
                filtered = True
            else:
                temps.append(p.temperature)
        return rows, (None if filtered else temps)

    # ------------------------------------------------------------------------------------------------------------
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

    def _append(self, seq: Sequence, tok: int, lp) -> RequestOutput:
        now = time.perf_counter()
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.stats["prompt_tokens"] += len(seq.prompt_ids)
        seq.append_token(tok)
        seq.extra["sampling"].append(tok)
        self.stats["generated_tokens"] += 1
        p = seq.params
        new_text = ""
        reason = None
        is_eos = tok in self.eos_ids and not p.ignore_eos
        if is_eos or tok in (p.stop_token_ids or ()):
            reason = "stop"
        if "detok" in seq.extra and reason is None:
            delta = seq.extra["detok"].add(tok)
            stop = seq.extra["stop"]
            if stop is not None:
                delta, hit = stop.feed(delta)
                if hit:
                    reason = "stop"
            new_text = delta
        if reason is None and (len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None and "detok" in seq.extra and not (reason == "stop" and seq.extra["stop"] is not None
                                                               and seq.extra["stop"].hit):
            tail = seq.extra["detok"].flush()
            if seq.extra["stop"] is not None:
                tail = seq.extra["stop"].flush(tail)
            new_text += tail
        seq.extra["text"] += new_text
        new_lp = None
        if lp is not None:
            seq.extra["logprobs"].append(lp)
            new_lp = [lp]
        if reason is not None:
            self._finish(seq, reason, now)
        return RequestOutput(
            seq.request_id, seq.prompt_ids, list(seq.output_ids), seq.extra["text"], [tok], new_text,
            seq.is_finished, seq.finish_reason, seq.num_cached_prompt, seq.extra["logprobs"], new_lp,
            self._metrics(seq, now))

    def _finish(self, seq: Sequence, reason: str, now: float) -> None:
        # The scheduler frees its blocks after the step registered them for prefix reuse.
        seq.status, seq.finish_reason, seq.finish_time = SeqStatus.FINISHED, reason, now
        self.seqs.pop(seq.request_id, None)
        self.stats["finished"] += 1

    @staticmethod
    def _metrics(seq: Sequence, now: float) -> dict:
        ttft = (seq.first_token_time - seq.arrival_time) if seq.first_token_time else None
        n = len(seq.output_ids)
        decode_time = now - seq.first_token_time if seq.first_token_time else 0.0
        drafted, accepted, steps = seq.extra["spec"]
        return {"arrival_time": seq.arrival_time, "time_to_first_token": ttft, "elapsed": now - seq.arrival_time,
                "decode_tokens_per_s": (n - 1) / decode_time if n > 1 and decode_time > 0 else None,
                "spec_drafted": drafted, "spec_accepted": accepted, "spec_verify_steps": steps,
                "spec_acceptance": accepted / drafted if drafted else None,
                # tokens each verification step appended: its accepted drafts plus the main model's own token
                "spec_tokens_per_step": (accepted + steps) / steps if steps else None}

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
