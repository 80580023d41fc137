"""Sampling: what a request asks for (SamplingParams) and one batched call per step that picks every row's token.

Legend: B rows sampled in this step (one per running sequence), V vocabulary size (the logits' last dimension),
P rows of the step that use a penalty, F rows that use top-k/top-p, N top logprobs (the most any row asks for).

How the engine drives it:
    sampler = Sampler(vocab_size, device)                                      # once
    state = SequenceSamplingState.create(params, prompt_ids, vocab_size, device)  # once per sequence, at admission
    out = sampler.sample(logits_BV, states)     # per step; out.token_ids [B] stays on the device, no host sync
    ... the engine's one sync: tokens = out.token_ids.tolist() ...
    state.append(token)                         # per committed token (several at once after speculative verify)
sample() also takes a SamplingBatch (the states' parameters as tensors), which an engine can build once and keep
while the set and order of running sequences does not change; batch.append(out.token_ids) then updates every
row's counts without leaving the device.

Order of processing, per row: penalties (repetition over prompt + output, then OpenAI presence/frequency over
output) -> greedy rows take the argmax here -> temperature -> top-k -> top-p (over what top-k kept, renormalised)
-> min-p -> a draw. Top-k, top-p and min-p keep every token tied with the last one kept, so the result does not
depend on how a sort orders equal values. Reported logprobs are the model's own: log_softmax of the raw logits,
before penalties, temperature and filtering (what OpenAI and vLLM report by default), so they compare across
sampling settings.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..kernels import cpu_ext
from .guided import GuidedDecoding, validate_constraints

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
MAX_N = 128
# Beyond this every token is equally likely to float32 precision anyway; the bound keeps 1 / temperature normal.
MAX_TEMPERATURE = 100.0
# Dividing logits by a tinier penalty overflows them to inf (and the row's probabilities to nan).
MAX_REPETITION_PENALTY = 100.0
# Below this a temperature is treated as 0: dividing by it overflows float32 logits into inf and nan.
GREEDY_BELOW = 1e-5
_TOP_P_OFF = 2.0  # above any cumulative probability, so float rounding of the cumsum never cuts a row's tail


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL/HF: seen tokens' positive logits divided by it, negative multiplied
    presence_penalty: float = 0.0  # OpenAI: subtracted once from each token generated so far
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence among generated tokens
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; n = chosen token's logprob and the n most likely
    n: int = 1
    logit_bias: dict[int, float] | None = None  # OpenAI's: token id -> added to its logit, in [-100, 100]
    guided: GuidedDecoding | None = None  # structured output (engine/guided.py)
    skip_special_tokens: bool = True  # the output text leaves special tokens out (tool and reasoning parsers
    # that read marker tokens set it False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise ValueError naming the first bad field; `vocab_size` also checks stop_token_ids against it."""
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} {rule}, got {getattr(self, name)!r}")

        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise bad("max_tokens", "must be a positive integer (the most tokens to generate)")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise bad("temperature", f"must be a number in [0, {MAX_TEMPERATURE:g}] (0 means greedy)")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be an integer >= 1, or 0 / -1 to turn it off")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1] (1 turns it off)")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1] (0 turns it off)")
        if not _is_number(self.repetition_penalty) or not 1 / MAX_REPETITION_PENALTY <= self.repetition_penalty <= \
                MAX_REPETITION_PENALTY:
            raise bad("repetition_penalty", f"must be a number in [{1 / MAX_REPETITION_PENALTY:g}, "
                      f"{MAX_REPETITION_PENALTY:g}] (1 turns it off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise bad(name, "must be in [-2, 2] (0 turns it off)")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise bad("seed", "must be None or an integer in [0, 2**64)")
        if self.stop is not None:
            if not isinstance(self.stop, (str, list, tuple)):
                raise bad("stop", "must be None, a string or a list of strings")
            stops = self.stop_strings
            if any(not isinstance(s, str) for s in stops):
                raise bad("stop", "must hold only strings")
            if any(not s for s in stops):
                raise bad("stop", "must not contain an empty string (it would stop before the first token)")
            if len(stops) > MAX_STOP_STRINGS:
                raise ValueError(f"SamplingParams.stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} "
                                 "are allowed")
        if not isinstance(self.stop_token_ids, (list, tuple)) or any(
                not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of token ids (integers >= 0)")
        if vocab_size is not None and any(t >= vocab_size for t in self.stop_token_ids):
            raise bad("stop_token_ids", f"must be token ids below the vocabulary size {vocab_size}")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be True or False")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}] (how many top tokens)")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"must be an integer in [1, {MAX_N}] (completions per prompt)")
        validate_constraints(self, vocab_size)
        if not isinstance(self.skip_special_tokens, bool):
            raise bad("skip_special_tokens", "must be True or False")
        return self


def sample_seed(seed: int, sample_index: int) -> int:
    # Completion 0 of a request uses the seed itself (so n=1 reproduces), the others a well-spread derivative.
    return seed if sample_index == 0 else (seed + sample_index * 0x9E3779B97F4A7C15) % 2**64


class SequenceSamplingState:
    """What sampling remembers about one sequence: its parameters, its own random generator when seeded, and
    (only when a penalty is on) which tokens the prompt holds and how often each was generated. `sample_index`
    is the completion's index among a request's n, so each of them gets its own random stream."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] | torch.Tensor, vocab_size: int,
                 device: torch.device | str = "cpu", sample_index: int = 0):
        self.params = params
        self.vocab_size = vocab_size
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(sample_seed(params.seed, sample_index))
        self.error: str | None = None  # set when this sequence's sampling failed: the engine ends it alone
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (token ids [K], biases [K] float32)
        if params.logit_bias:
            self.bias = (torch.tensor(list(params.logit_bias), dtype=torch.long, device=device),
                         torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=device))
        self.output_counts: torch.Tensor | None = None  # [V] int32
        self.prompt_mask: torch.Tensor | None = None  # [V] bool
        if params.uses_penalties:
            self.output_counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
            self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
            if prompt.numel():
                self.prompt_mask[prompt] = True

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: Sequence[int] | torch.Tensor, vocab_size: int,
               device: torch.device | str = "cpu", sample_index: int = 0) -> SequenceSamplingState:
        return cls(params, prompt_ids, vocab_size, device, sample_index)

    def fail(self, message: str) -> None:
        """Mark the sequence failed (the first reason wins); RequestBook._append then ends it with the error."""
        if self.error is None:
            self.error = message

    def append(self, token_ids: int | Sequence[int] | torch.Tensor) -> None:
        """Count tokens committed to the sequence (host ints or a device tensor; no sync either way)."""
        if self.output_counts is None:
            return
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.output_counts.device).reshape(-1)
        self.output_counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))


class SamplingBatch:
    """The per-row parameters of one step's rows as tensors, plus host-side flags that let the sampler skip
    whole stages without looking at device values."""

    def __init__(self, states: Sequence[SequenceSamplingState], device: torch.device | str = "cpu"):
        self.states = list(states)
        params = [s.params for s in self.states]
        greedy = [p.greedy for p in params]
        self.size = len(params)
        self.all_greedy = all(greedy)
        self.any_greedy = any(greedy)
        f32 = dict(dtype=torch.float32, device=device)
        # Tensors only for the stages some row uses (each costs a host-to-device copy per step); None otherwise.
        self.greedy = torch.tensor(greedy, dtype=torch.bool, device=device) if self.any_greedy else None  # [B]
        self.temperature = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], **f32)

        self.filter_rows = [i for i, (p, g) in enumerate(zip(params, greedy)) if not g and (p.top_k > 0 or p.top_p < 1)]
        self.filter_index = self.top_k = self.top_p = None
        if self.filter_rows:
            self.filter_index = torch.tensor(self.filter_rows, dtype=torch.long, device=device)  # [F]
            self.top_k = torch.tensor([params[i].top_k for i in self.filter_rows], dtype=torch.long, device=device)
            self.top_p = torch.tensor([params[i].top_p if params[i].top_p < 1 else _TOP_P_OFF
                                       for i in self.filter_rows], **f32)  # [F]
        self.use_min_p = any(p.min_p > 0 and not g for p, g in zip(params, greedy))
        self.log_min_p = None
        if self.use_min_p:
            self.log_min_p = torch.tensor([math.log(p.min_p) if p.min_p > 0 and not g else -math.inf
                                           for p, g in zip(params, greedy)], **f32)  # [B]

        self.penalty_rows = [i for i, p in enumerate(params) if p.uses_penalties]
        self.penalty_index = self.repetition = self.presence = self.frequency = None
        if self.penalty_rows:
            self.penalty_index = torch.tensor(self.penalty_rows, dtype=torch.long, device=device)  # [P]
            pen = [params[i] for i in self.penalty_rows]
            self.repetition = torch.tensor([p.repetition_penalty for p in pen], **f32)
            self.presence = torch.tensor([p.presence_penalty for p in pen], **f32)
            self.frequency = torch.tensor([p.frequency_penalty for p in pen], **f32)

        self.seeded_rows = [(i, s.generator) for i, (s, g) in enumerate(zip(self.states, greedy))
                            if s.generator is not None and not g]
        self.num_logprobs = [p.logprobs for p in params]
        asked = [n for n in self.num_logprobs if n is not None]
        self.want_logprobs = bool(asked)
        self.num_top_logprobs = max(asked, default=0)

    def append(self, token_ids: torch.Tensor) -> None:
        """Count each row's new token (token_ids [B]) for the penalties; rows without penalties cost nothing."""
        for i in self.penalty_rows:
            self.states[i].append(token_ids[i:i + 1])


@dataclass
class LogprobEntry:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob) of the row's n most likely tokens, most likely first


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] float32: raw log-softmax of the chosen token
    top_logprobs: torch.Tensor | None = None  # [B, N] float32, descending
    top_token_ids: torch.Tensor | None = None  # [B, N] int64
    num_logprobs: list[int | None] = field(default_factory=list)  # what each row asked for
    _host: tuple | None = field(default=None, repr=False)

    def logprob_entry(self, row: int) -> LogprobEntry | None:
        """Row `row`'s logprobs as host values (None if it asked for none). The first call copies all rows to the
        host at once, so call it after the step's sync, not in the hot path."""
        if self.logprobs is None or self.num_logprobs[row] is None:
            return None
        if self._host is None:
            self._host = (self.token_ids.tolist(), self.logprobs.tolist(), self.top_token_ids.tolist(),
                          self.top_logprobs.tolist())
        ids, lps, top_ids, top_lps = self._host
        n = self.num_logprobs[row]
        return LogprobEntry(ids[row], lps[row], list(zip(top_ids[row][:n], top_lps[row][:n])))


class _RowwiseOutput(SamplerOutput):
    """Rows sampled one by one after a batch failed (Sampler.sample): the same interface over per-row outputs."""

    def __init__(self, rows: list[SamplerOutput]):
        super().__init__(torch.cat([r.token_ids for r in rows]),
                         num_logprobs=[r.num_logprobs[0] for r in rows])
        self.rows = rows

    def logprob_entry(self, row: int) -> LogprobEntry | None:
        return self.rows[row].logprob_entry(0)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [B, V] float32, changed in place for the penalty rows."""
    if not batch.penalty_rows:
        return logits
    states = [batch.states[i] for i in batch.penalty_rows]
    counts = torch.stack([s.output_counts for s in states])  # [P, V]
    generated = counts > 0
    seen = generated | torch.stack([s.prompt_mask for s in states])  # [P, V]
    x = logits.index_select(0, batch.penalty_index)  # [P, V]
    rep = batch.repetition[:, None]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - batch.frequency[:, None] * counts - batch.presence[:, None] * generated
    return logits.index_copy_(0, batch.penalty_index, x)


def apply_top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [B, V] (temperature already applied), masked in place with -inf for the filter rows."""
    if not batch.filter_rows:
        return logits
    x = logits.index_select(0, batch.filter_index)  # [F, V]
    vocab = x.shape[-1]
    sorted_x, _ = x.sort(dim=-1, descending=True)  # [F, V]
    k = torch.where(batch.top_k > 0, batch.top_k.clamp(max=vocab), vocab)  # [F]
    kth = sorted_x.gather(1, (k - 1)[:, None])  # [F, 1]
    sorted_x = sorted_x.masked_fill(sorted_x < kth, -math.inf)
    probs = sorted_x.softmax(dim=-1)
    # A token is kept while the mass of the tokens before it is still short of top_p (so the first always is).
    kept = (probs.cumsum(dim=-1) - probs) < batch.top_p[:, None]  # [F, V]
    cut = sorted_x.masked_fill(~kept, math.inf).amin(dim=-1, keepdim=True)  # [F, 1]
    cut = torch.maximum(cut, kth)
    return logits.index_copy_(0, batch.filter_index, x.masked_fill(x < cut, -math.inf))


def apply_min_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    # p_i < min_p * p_max  <=>  l_i < l_max + log(min_p): no softmax needed, and filters before do not matter.
    if not batch.use_min_p:
        return logits
    threshold = logits.amax(dim=-1, keepdim=True) + batch.log_min_p[:, None]  # [B, 1]
    return logits.masked_fill_(logits < threshold, -math.inf)


def shared_temperature(states: Sequence[SequenceSamplingState]) -> float | None:
    """The temperature of rows that sample with nothing else (no top-k/top-p/min-p, no penalties) when every row
    has the same one, else None. Such rows need no per-row parameter tensors: dividing by the number gives the
    same float32 values as process_logits."""
    t = None
    for s in states:
        p = s.params
        if p.greedy or p.uses_penalties or p.top_k > 0 or p.top_p < 1 or p.min_p > 0 or (t is not None
                                                                                          and p.temperature != t):
            return None
        t = p.temperature
    return t


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(penalised logits [B, V], the distribution to draw from [B, V]: tempered, filtered with -inf), both new."""
    penalised = apply_penalties(logits.to(torch.float32, copy=True), batch)
    x = penalised / batch.temperature[:, None]
    return penalised, apply_min_p(apply_top_k_top_p(x, batch), batch)


class Sampler:
    """Picks the next token of every row in one batched call. Seeded rows draw their noise from their own
    generator, exactly V values per step, so their tokens do not depend on which other rows share the batch;
    unseeded rows share `generator` (torch's default one when None). `vocab_size`, when given, is checked
    against the logits' width; `device` is where per-row parameters go when sample() is given states (the
    logits' device when None)."""

    def __init__(self, vocab_size: int | None = None, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None):
        self.vocab_size = vocab_size
        self.device = device
        self.generator = generator

    def sample(self, logits: torch.Tensor,
               batch: SamplingBatch | Sequence[SequenceSamplingState]) -> SamplerOutput:
        """Given states, a failure that concerns some rows (a bad parameter, a kernel refusing a row) ends those
        rows only: the batch is sampled again row by row, and each row that still fails gets the error on its state
        (state.error; its token is a placeholder the engine drops) while the others get their tokens."""
        if isinstance(batch, SamplingBatch):
            return self._sample(logits, batch)
        states = list(batch)
        try:
            return self._sample(logits, states)
        except Exception:  # noqa: BLE001 - narrowed down per row below
            if len(states) == 1:
                return self._failed_row(logits, states[0])
        self._check(logits, len(states))
        return _RowwiseOutput([self._sample_row(logits[i:i + 1], s) for i, s in enumerate(states)])

    def _sample_row(self, logits: torch.Tensor, state: SequenceSamplingState) -> SamplerOutput:
        try:
            return self._sample(logits, [state])
        except Exception:  # noqa: BLE001
            return self._failed_row(logits, state)

    def _failed_row(self, logits: torch.Tensor, state: SequenceSamplingState) -> SamplerOutput:
        import traceback

        err = traceback.format_exc(limit=1).strip().splitlines()[-1]
        state.fail(f"sampling failed ({err})")
        return SamplerOutput(torch.zeros(1, dtype=torch.long, device=logits.device), num_logprobs=[None])

    def _sample(self, logits: torch.Tensor,
                batch: SamplingBatch | Sequence[SequenceSamplingState]) -> SamplerOutput:
        if not isinstance(batch, SamplingBatch):
            states = list(batch)
            no_logprobs = all(s.params.logprobs is None for s in states)
            if no_logprobs and all(s.params.greedy and not s.params.uses_penalties for s in states):
                # Plain greedy rows need none of the per-row parameter tensors: skip building them.
                self._check(logits, len(states))
                return SamplerOutput(argmax_rows(logits), num_logprobs=[None] * len(states))
            t = shared_temperature(states) if no_logprobs else None
            if t is not None:  # temperature-only rows: the same draw without the parameter tensors
                self._check(logits, len(states))
                u = self._uniforms(len(states), [(i, s.generator) for i, s in enumerate(states)
                                                 if s.generator is not None], logits.device)
                return SamplerOutput(draw_inverse_cdf(tempered_softmax(logits, t), u),
                                     num_logprobs=[None] * len(states))
            batch = SamplingBatch(states, self.device if self.device is not None else logits.device)
        self._check(logits, batch.size)
        if batch.all_greedy and not batch.penalty_rows:
            token_ids = argmax_rows(logits)
        else:
            penalised, x = process_logits(logits, batch)
            token_ids = self._draw(x, batch)
            if batch.any_greedy:
                token_ids = torch.where(batch.greedy, penalised.argmax(dim=-1), token_ids)
        out = SamplerOutput(token_ids, num_logprobs=batch.num_logprobs)
        if batch.want_logprobs:
            logprobs = logits.float().log_softmax(dim=-1)  # [B, V]
            out.logprobs = logprobs.gather(1, token_ids[:, None]).squeeze(1)
            out.top_logprobs, out.top_token_ids = logprobs.topk(batch.num_top_logprobs, dim=-1)
        return out

    def _check(self, logits: torch.Tensor, rows: int) -> None:
        if logits.dim() != 2 or logits.shape[0] != rows:
            raise ValueError(f"logits must be [B, V] with B = {rows} rows of the batch, got {tuple(logits.shape)}")
        if self.vocab_size is not None and logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns but the vocabulary has {self.vocab_size} "
                             "tokens")

    __call__ = sample

    def _draw(self, x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        if batch.all_greedy:
            return x.argmax(dim=-1)
        return draw_inverse_cdf(tempered_softmax(x), self._uniforms(x.shape[0], batch.seeded_rows, x.device))

    def _uniforms(self, n: int, seeded_rows: list[tuple[int, torch.Generator]], device) -> torch.Tensor:
        """One uniform per row [n]: seeded rows from their own generator (so a row's token does not depend on which
        other rows share the batch), the others from the shared one."""
        if len(seeded_rows) == n:  # every row seeded (one row: the common case): no shared draws
            return uniforms([g for _, g in seeded_rows], device)
        u = torch.rand(n, generator=self.generator, device=device)
        for row, generator in seeded_rows:
            u[row] = torch.rand((), generator=generator, device=device)
        return u


def uniforms(generators: Sequence[torch.Generator | None], device: torch.device | str = "cpu",
             counts: Sequence[int] | None = None) -> torch.Tensor:
    """counts[i] (default 1) float32 uniforms in [0, 1) for each row i from its own generator (None: torch's default
    one), back to back in one tensor [sum(counts)]. A seeded row's values do not depend on the other rows."""
    counts = [1] * len(generators) if counts is None else counts
    if all(g is None for g in generators):
        return torch.rand(sum(counts), device=device)
    parts = [torch.rand(c, generator=g, device=device) for g, c in zip(generators, counts)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def tempered_softmax(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """x [B, V] logits (masked tokens -inf, every row with a finite one) -> softmax(x / temperature) [B, V] float32.
    CPU float32/bf16 rows go through the C++ kernels when they are loaded: the same float32 x / t, probabilities
    within a few ulp of torch.softmax (tested); every sampling path uses this one function, so they agree."""
    ops = cpu_ext.loaded()
    if (ops is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 2
            and x.shape[1] > 0 and x.stride(-1) == 1):
        return ops.tempered_softmax(x, float(temperature))
    x = x.float()
    return (x if temperature == 1.0 else x / temperature).softmax(dim=-1)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> [B] int64: each row's first maximum, a NaN counting as the maximum (torch.argmax's rule).
    CPU float32/bf16 rows go through the C++ kernels when they are loaded (the same indices, tested)."""
    ops = cpu_ext.loaded()
    if (ops is not None and logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16)
            and logits.dim() == 2 and logits.shape[1] > 0 and logits.stride(-1) == 1):
        return ops.argmax_rows(logits)
    return logits.argmax(dim=-1)


def draw_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [B, V] >= 0 (unnormalised is fine; masked tokens 0, each row with some mass), u [B] uniform in [0, 1)
    -> [B] int64: token i with probability probs[i] / sum. Inverse CDF in float64: the first i whose cumulative
    mass exceeds u * total, with u * total kept below the total, so a zero-mass token (whose cumulative mass equals
    its predecessor's) is never picked. ~7x cheaper than an exponential race or torch.multinomial over a 4K-token
    vocabulary on the CPU, with no host sync. With the C++ CPU kernels loaded, CPU float32 rows are drawn there
    with the same arithmetic (the same tokens, tested), ~4x faster."""
    ops = cpu_ext.loaded()
    if ops is not None and probs.device.type == "cpu" and probs.dtype == torch.float32 and u.dtype == torch.float32:
        return ops.draw_inverse_cdf(probs.contiguous(), u)
    return draw_inverse_cdf_reference(probs, u)


def draw_inverse_cdf_reference(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """draw_inverse_cdf in PyTorch operations (any device; the C++ kernel's test oracle)."""
    c = probs.double().cumsum(dim=-1)  # [B, V]
    total = c[:, -1:]
    target = torch.minimum(u.double()[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(c, target, right=True)[:, 0]
