"""Request bookkeeping and outputs: what goes in and what comes back for each request.

Owns RequestOutput (one request's incremental result), run_to_completion (drive an engine until given prompts are
done) and RequestBook, the part of LLMEngine that admits, tracks and ends requests: prompt validation and
encoding, add_request / abort, each new token's append with its stop rules (eos, stop ids and strings, max_tokens,
the context length) and detokenised delta, and a request's metrics. The step itself is engine.py's.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from .guided import GrammarBackend
from .sampling import LogprobEntry, SamplingParams, SequenceSamplingState
from .scheduler import Sequence, SeqStatus
from .speculative import supports_speculation

__all__ = ["RequestBook", "RequestOutput", "run_to_completion"]

log = logging.getLogger(__name__)
_BACKEND_LOCK = threading.Lock()


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # all generated so far
    text: str  # all generated so far (stop string and eos excluded)
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" (then `error` says what failed)
    num_cached_tokens: int = 0
    logprobs: list[LogprobEntry] | None = None
    new_logprobs: list[LogprobEntry] | None = None
    metrics: dict = field(default_factory=dict)
    error: str | None = None


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


class RequestBook:
    """LLMEngine's requests (a mixin: the state it uses, seqs, scheduler, tokenizer, stats and the limits, is set
    up by LLMEngine.__init__)."""

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
        if params.logit_bias:
            params.validate(self.cfg.vocab_size)  # the bias's token ids against the logits' width
        guided = self.guided_backend().new_state(params.guided) if params.guided is not None else None
        seq = Sequence(rid, ids, params)
        if guided is not None:
            seq.extra["guided"] = guided
        seq.extra["sampling"] = state = SequenceSamplingState.create(params, ids, self.cfg.vocab_size, self.device)
        seq.extra["speculate"] = self.num_draft > 0 and supports_speculation(state)
        seq.extra["draft_q"] = []
        seq.extra["spec"] = [0, 0, 0]  # drafted, accepted, verification steps
        seq.extra["text"] = ""
        seq.extra["logprobs"] = [] if params.logprobs is not None else None
        if self.tokenizer is not None:
            seq.extra["detok"] = self.tokenizer.detokenizer(ids, params.skip_special_tokens)
            seq.extra["stop"] = self.tokenizer.stop_checker(params.stop) if params.stop else None
        self.scheduler.add(seq)
        self.seqs[rid] = seq
        return rid

    def guided_backend(self) -> GrammarBackend:
        """The engine's xgrammar backend (built on first use; thread-safe, so a server compiles off the engine
        thread and the engine finds the grammar cached)."""
        backend = getattr(self, "_guided_backend", None)
        if backend is None:
            with _BACKEND_LOCK:
                backend = getattr(self, "_guided_backend", None)
                if backend is None:
                    backend = self._guided_backend = GrammarBackend(self.tokenizer, self.cfg.vocab_size,
                                                                    sorted(self.eos_ids))
        return backend

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

    def _append(self, seq: Sequence, tok: int, lp) -> RequestOutput:
        now = time.perf_counter()
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.stats["prompt_tokens"] += len(seq.prompt_ids)
        error = seq.extra["sampling"].error
        if error is None:
            try:
                return self._append_token(seq, tok, lp, now)
            except Exception as e:  # noqa: BLE001 - a failure of one request's output ends that request only
                error = f"{type(e).__name__}: {e}"
        # The step's work for this sequence failed: it ends alone, with the error, and the token is dropped.
        log.warning("request %s failed: %s", seq.request_id, error)
        seq.extra["sampling"].fail(error)
        self._finish(seq, "error", now)
        out = RequestOutput(seq.request_id, seq.prompt_ids, list(seq.output_ids), seq.extra["text"], [], "", True,
                            "error", seq.num_cached_prompt, seq.extra["logprobs"], None, self._metrics(seq, now))
        out.error = f"the engine failed on this request ({error})"
        return out

    def _append_token(self, seq: Sequence, tok: int, lp, now: float) -> RequestOutput:
        guided = seq.extra.get("guided")
        if guided is not None:
            guided.accept(tok)  # first: a token the grammar refuses must not reach the output
        seq.append_token(tok)
        seq.extra["sampling"].append(tok)
        self.stats["generated_tokens"] += 1
        p = seq.params
        new_text = ""
        reason = None
        is_eos = tok in self.eos_ids and not p.ignore_eos
        if is_eos or tok in (p.stop_token_ids or ()) or (guided is not None and guided.terminated):
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
