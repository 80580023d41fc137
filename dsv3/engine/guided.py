"""Structured outputs: a request's constraint (JSON schema, any JSON object, regex, choice list, EBNF grammar)
compiled with xgrammar into a token-level automaton, and the per-row logits masks of each step.

How the engine drives it:
    backend = GrammarBackend(tokenizer, vocab_size, eos_ids)   # once per engine, on the first guided request
    compiled = backend.compile(spec)                           # per request; LRU-cached by the spec's canonical text
    state = GuidedState(compiled)                              # per sequence (n > 1: one each)
    apply_row_constraints(logits, seqs, rows)                  # per step, after the model's logits
    state.accept(token)                                        # per committed token

A sequence with speculative drafts gets one logits row per draft plus one; row j is masked with the grammar's state
after drafts[:j] (the matcher advances over the drafts and rolls back), so verification compares drafts with the
constrained distribution and the output is what decoding without speculation gives. A draft the grammar refuses has
probability 0 under the masked row, so it is rejected there and the rows after it are never read.

Logit biases (OpenAI's logit_bias) are added in the same pass, before the mask, on every row of the sequence.
"""
from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..kernels import cpu_ext

__all__ = ["GuidedDecoding", "GrammarBackend", "GuidedState", "apply_row_constraints", "MAX_GRAMMAR_CHARS",
           "MAX_CHOICES", "validate_constraints"]

MAX_GRAMMAR_CHARS = 200_000  # a schema, regex or grammar longer than this is refused before compiling
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 4096
GRAMMAR_CACHE_SIZE = 256
KINDS = ("json", "json_object", "regex", "choice", "grammar")
_BOUNDED_CHAR = r'[^\"\\\r\n]'  # (EBNF text)
_JSON_CHAR = r'[^\0-\x1f\"\\]'
MAX_LOGIT_BIAS = 100.0  # OpenAI's range is [-100, 100]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_constraints(params: Any, vocab_size: int | None = None) -> None:
    """SamplingParams.validate's checks of logit_bias and guided (ValueError naming the field)."""
    def bad(name: str, rule: str) -> ValueError:
        return ValueError(f"SamplingParams.{name} {rule}, got {getattr(params, name)!r}")

    def _is_number(x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if params.logit_bias is not None:
        if not isinstance(params.logit_bias, dict):
            raise bad("logit_bias", "must be None or a dict of token id -> bias")
        for tok, value in params.logit_bias.items():
            if not _is_int(tok) or tok < 0 or (vocab_size is not None and tok >= vocab_size):
                limit = f" below the vocabulary size {vocab_size}" if vocab_size is not None else ""
                raise ValueError(f"SamplingParams.logit_bias has key {tok!r}; keys must be token ids (integers "
                                 f">= 0{limit})")
            if not _is_number(value) or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ValueError(f"SamplingParams.logit_bias[{tok}] is {value!r}; biases must be numbers in "
                                 f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
    if params.guided is not None:
        if not isinstance(params.guided, GuidedDecoding):
            raise bad("guided", "must be None or a dsv3.engine.guided.GuidedDecoding")
        params.guided.validate()


@dataclass
class GuidedDecoding:
    """What the output must match; exactly one of the fields is set. `json` is a JSON schema (a dict or its text);
    `json_object` any JSON object; `regex` a regular expression over the whole output; `choice` one of the
    strings; `grammar` an EBNF grammar in xgrammar's (GBNF-like) notation with a `root` rule. `strict` (JSON
    schemas only): properties and items the schema does not name are not allowed, as OpenAI's strict mode."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    strict: bool = True

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if (getattr(self, k) not in (None, False)))

    def validate(self) -> GuidedDecoding:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"GuidedDecoding.{name} {rule}")

        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"GuidedDecoding needs exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) or 'none'}")
        if not isinstance(self.strict, bool):
            raise bad("strict", f"must be True or False, got {self.strict!r}")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = json.loads(self.json)
                except ValueError as e:
                    raise bad("json", f"is not valid JSON text ({e})") from None
            else:
                schema = self.json
            if not isinstance(schema, (dict, bool)):
                raise bad("json", f"must be a JSON schema (an object), got {type(schema).__name__}")
            try:
                text = self.canonical_text()
            except (TypeError, ValueError) as e:  # (a Python caller's dict holding non-JSON values)
                raise bad("json", f"is not JSON-serialisable ({e})") from None
            if len(text) > MAX_GRAMMAR_CHARS:
                raise bad("json", f"is over the {MAX_GRAMMAR_CHARS}-character limit for a schema")
        if not isinstance(self.json_object, bool):
            raise bad("json_object", f"must be True or False, got {self.json_object!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str) or not value:
                    raise bad(name, "must be a non-empty string")
                if len(value) > MAX_GRAMMAR_CHARS:
                    raise bad(name, f"has {len(value)} characters; at most {MAX_GRAMMAR_CHARS} are allowed")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice:
                raise bad("choice", "must be a non-empty list of strings")
            if len(self.choice) > MAX_CHOICES:
                raise bad("choice", f"has {len(self.choice)} entries; at most {MAX_CHOICES} are allowed")
            if any(not isinstance(c, str) or not c or len(c) > MAX_CHOICE_CHARS for c in self.choice):
                raise bad("choice", f"must hold non-empty strings of at most {MAX_CHOICE_CHARS} characters")
        return self

    def canonical_text(self) -> str:
        """The constraint as one string: equal for equal constraints (JSON schemas with sorted keys)."""
        kind = self.kind
        if kind == "json":
            schema = json.loads(self.json) if isinstance(self.json, str) else self.json
            body = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            return f"json:{int(self.strict)}:{body}"
        if kind == "json_object":
            return "json_object"
        if kind == "choice":
            return "choice:" + json.dumps(list(self.choice), ensure_ascii=False)
        return f"{kind}:{getattr(self, kind)}"


def _choice_grammar(choices: Sequence[str]) -> str:
    # json.dumps writes each choice as a double-quoted literal with the escapes xgrammar's EBNF reads.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in dict.fromkeys(choices))


class GrammarBackend:
    """xgrammar's view of one tokenizer and a cache of compiled constraints. Thread-safe: the server compiles on
    worker threads (so the engine thread keeps stepping) and the engine thread finds the result in the cache."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int], cache_size: int = GRAMMAR_CACHE_SIZE):
        import xgrammar as xgr

        if tokenizer is None:
            raise ValueError("structured outputs need the model's tokenizer (tokenizer.json), which this "
                             "checkpoint lacks")
        self._xgr = xgr
        n = tokenizer.vocab_size
        if n > vocab_size:
            raise ValueError(f"the tokenizer has {n} tokens but the model's logits only {vocab_size}")
        special = tokenizer.special_ids
        if tokenizer.byte_level:
            # An empty entry marks a token as special for xgrammar, which then never lets a grammar emit it (the
            # stop tokens are allowed at the end through stop_token_ids).
            vocab = ["" if i in special else (tokenizer.id_to_token(i) or "") for i in range(n)]
            vtype = xgr.VocabType.BYTE_LEVEL
        else:
            vocab = ["" if i in special else tokenizer.decode([i]) for i in range(n)]
            vtype = xgr.VocabType.RAW
        self.vocab_size = vocab_size
        self.special = frozenset(special) - set(eos_ids)
        self.info = xgr.TokenizerInfo(vocab, vtype, vocab_size=vocab_size, stop_token_ids=list(eos_ids))
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._cache_size = cache_size
        self.compile_seconds: dict[str, float] = {}  # last compile time per canonical text (benchmarks)

    def compile(self, spec: GuidedDecoding) -> Any:
        """The compiled grammar of `spec` (cached). Raises ValueError saying why xgrammar refused it."""
        key = spec.canonical_text()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        t0 = time.perf_counter()
        try:
            compiled = self._compile(spec)
        except Exception as e:  # noqa: BLE001 - xgrammar reports bad input as RuntimeError, or worse
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            first = re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", first)  # xgrammar's "[time] file.cc:line: "
            raise ValueError(f"the {spec.kind} constraint cannot be compiled: {first}") from None
        with self._lock:
            self.compile_seconds[key] = time.perf_counter() - t0
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                old, _ = self._cache.popitem(last=False)
                self.compile_seconds.pop(old, None)
        return compiled

    def _compile(self, spec: GuidedDecoding) -> Any:
        c = self.compiler
        kind = spec.kind
        if kind in ("json", "json_object"):
            if kind == "json":
                schema, strict = (spec.json if isinstance(spec.json, str) else json.dumps(spec.json)), spec.strict
            else:
                schema, strict = '{"type": "object"}', False
            # Compact JSON: any_whitespace would let a weak model pad with spaces until max_tokens runs out.
            grammar = self._xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict)
            # xgrammar's length-bounded strings allow raw control characters, which JSON forbids (its unbounded
            # strings exclude them): give both the same character class.
            return c.compile_grammar(str(grammar).replace(_BOUNDED_CHAR, _JSON_CHAR))
        if kind == "regex":
            return c.compile_regex(spec.regex)
        if kind == "choice":
            return c.compile_grammar(_choice_grammar(spec.choice))
        return c.compile_grammar(spec.grammar)

    def new_state(self, spec: GuidedDecoding) -> GuidedState:
        return GuidedState(self, self.compile(spec))


class GuidedState:
    """One sequence's position in its grammar."""

    def __init__(self, backend: GrammarBackend, compiled: Any):
        xgr = backend._xgr
        self._xgr = xgr
        self.vocab_size = backend.vocab_size
        self.special = backend.special
        self.matcher = xgr.GrammarMatcher(compiled, max_rollback_tokens=-1)

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing more may follow."""
        return self.matcher.is_terminated()

    def accept(self, token: int) -> None:
        if self.matcher.is_terminated():
            return  # (ignore_eos past the end: the stop rule ends the request; see RequestBook._append)
        if not self.matcher.accept_token(int(token)):
            raise RuntimeError(f"token {token} does not continue the output's grammar (it was sampled from a "
                               "masked row; this is a bug)")

    def fill_rows(self, bitmask: torch.Tensor, first: int, draft: Sequence[int], rows: int) -> None:
        """Masks for `rows` consecutive rows from bitmask row `first`: the current state, then after each draft."""
        m = self.matcher
        advanced = 0
        for j in range(rows):
            if m.is_terminated():
                bitmask[first + j] = -1  # (all allowed; the stop rule ends the request first)
                continue
            m.fill_next_token_bitmask(bitmask, first + j)
            if j + 1 < rows:
                if j < len(draft) and draft[j] not in self.special and m.accept_token(int(draft[j])):
                    advanced += 1
                else:  # a refused draft: verification stops at row j, later rows only need some mask
                    for k in range(j + 1, rows):
                        bitmask[first + k] = bitmask[first + j]
                    break
        if advanced:
            m.rollback(advanced)


@dataclass
class _RowWork:
    seq_index: int
    first_row: int
    rows: int
    guided: GuidedState | None
    bias: tuple[torch.Tensor, torch.Tensor] | None
    draft: list[int] = field(default_factory=list)


def apply_row_constraints(logits: torch.Tensor, seqs: Sequence[Any], rows: Sequence[Sequence[int]]) -> None:
    """Add each sequence's logit bias and mask its rows with its grammar, in place. logits [sum(len(rows)), V];
    rows[i]: sequence i's logits rows (its last known token, then its drafts). A sequence whose grammar fails here
    gets the error on its sampling state (sampling.SequenceSamplingState.error), which ends that request alone."""
    work, r = [], 0
    for i, (seq, rr) in enumerate(zip(seqs, rows)):
        n = len(rr)
        if n:
            guided = seq.extra.get("guided")
            state = seq.extra.get("sampling")
            bias = state.bias if state is not None else None
            if guided is not None or bias is not None:
                work.append(_RowWork(i, r, n, guided, bias, list(seq.draft)))
        r += n
    if not work:
        return
    for w in work:
        if w.bias is not None:
            ids, values = w.bias
            logits[w.first_row:w.first_row + w.rows, ids] += values
    guided = [w for w in work if w.guided is not None]
    if not guided:
        return
    xgr = guided[0].guided._xgr
    total = sum(w.rows for w in guided)
    bitmask = xgr.allocate_token_bitmask(total, logits.shape[1])
    indices, b = [], 0
    for w in guided:
        try:
            w.guided.fill_rows(bitmask, b, w.draft, w.rows)
        except Exception as e:  # noqa: BLE001 - one request's grammar failing must not end the others
            seqs[w.seq_index].extra["sampling"].fail(f"the output grammar failed ({type(e).__name__}: {e})")
            bitmask[b:b + w.rows] = -1  # all allowed: the row is sampled and then dropped with the request
        indices.extend(range(w.first_row, w.first_row + w.rows))
        b += w.rows
    if indices == list(range(logits.shape[0])):
        apply_bitmask(logits, bitmask)
    else:
        sub = logits[indices]
        apply_bitmask(sub, bitmask)
        logits[indices] = sub


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits [n, V] in place: -inf where bit v of row i's bitmask (int32 [n, ceil(V / 32)], xgrammar's layout:
    token v is bit v % 32 of word v // 32, 1 = allowed) is 0. What xgrammar's apply_token_bitmask_inplace does, in
    the C++ kernels' mask_logits (16 tokens per masked move) or whole-tensor operations: xgrammar's CPU kernel visits
    tokens one by one (~0.25 ms for 16 rows of 4,096 tokens, an eighth of a constrained step on the embedded
    model)."""
    n, v = logits.shape
    ops = cpu_ext.loaded()
    if (ops is not None and logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16)
            and logits.stride(-1) == 1 and bitmask.device.type == "cpu"):
        with torch.inference_mode():
            ops.mask_logits(logits, bitmask.contiguous())
        return
    dev = logits.device
    shifts = _BIT_SHIFTS.get(dev)
    if shifts is None:
        shifts = _BIT_SHIFTS[dev] = torch.arange(32, dtype=torch.int32, device=dev)
    with torch.inference_mode():  # the step's logits may be inference tensors (written in place, as xgrammar does)
        words = bitmask.to(dev)[:, :(v + 31) // 32]
        allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(n, -1)[:, :v]
        logits.masked_fill_(allowed == 0, float("-inf"))
