"""Speculative decoding under load on the trained embedded model (the default CPU path: bf16, on the C++ kernels
where they build): requests arriving while others decode, the batch growing past the drafting pause and shrinking
below it, aborts, stop strings, stop tokens, EOS and max_tokens, greedy and seeded sampled, and for greedy also
preemption under a small cache. The trained MTP module is accepted ~85% of the time, so stops and limits often land
inside accepted runs.

What is exact and what is not: a decode or verification row computes the same numbers whatever else shares the
step (batch invariance), so a request whose prompt is computed in one piece and which is never preempted decodes
the same tokens under any schedule, greedy or seeded. A prompt cut into different chunks, or a sequence recomputed
after preemption, goes through the prefill attention, whose rounding differs from the decode kernel's at the bf16
level (docs/engine.md); that can change a seeded draw, and a greedy token where its two best logits are nearly
tied (bf16 logits tie exactly at a few positions of these prompts), so the preemption test runs in float32.
"""

import pytest

from dsv3.engine.engine import EngineConfig, LLMEngine
from dsv3.engine.request import run_to_completion
from dsv3.engine.llm import LLM
from dsv3.engine.sampling import SamplingParams

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n\ndef main(",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):",
    "    for i, line in enumerate(",
    "def read_config(path):\n    with open(path) as f:",
    "# Copyright (c) Python Software Foundation\n",
    "    def __repr__(self):\n        return",
    "try:\n    import _thread\nexcept ImportError:",
    "def _check_arg(name, value):\n    if not isinstance(value, str):\n        raise TypeError(",
    "if __name__ == '__main__':\n    ",
    "    @property\n    def name(self):",
    "def split(s, sep=None, maxsplit=-1):\n    \"\"\"",
]
# Steps after which each request arrives (the batch grows past 2 sequences and shrinks again), and requests aborted
# once they have that many tokens.
ARRIVALS = [0, 0, 3, 3, 5, 9, 14, 20, 20, 27, 40, 60]
ABORTS = {4: 3, 9: 6}  # request -> abort after this many tokens (moved on to a request that lives that long)


def aborts_for(plain) -> dict[int, int]:
    """ABORTS, each moved to the first request from there whose plain output outlives the abort point (which
    requests stop early depends on the model's greedy text)."""
    chosen: dict[int, int] = {}
    for i, n in ABORTS.items():
        j = next(j for j in range(i, len(plain)) if j not in chosen and len(plain[j].token_ids) > n)
        chosen[j] = n
    return chosen


@pytest.fixture(scope="module")
def embedded():
    """The embedded model and tokenizer as LLM loads them (every engine here shares them)."""
    llm = LLM(speculative="off", progress=False)
    assert llm.model.mtp_layers, "the embedded model ships a trained MTP module"
    return llm.model, llm.tokenizer


def engine(embedded, eos: int | None = None, **cfg) -> LLMEngine:
    """An engine on the shared model; eos: the token to treat as the end of sequence (default: the model's)."""
    model, tok = embedded
    eng = LLMEngine(model, tok, EngineConfig(enable_prefix_caching=False, **cfg))
    if eos is not None:
        eng.eos_ids = {eos}
    return eng


def drive(eng: LLMEngine, requests: list[tuple[str, SamplingParams]], arrivals: list[int], aborts: dict[int, int]):
    """Queue request i once `arrivals[i]` steps have run; abort request i once it has `aborts[i]` tokens. Returns
    the final output of every request (None for aborted ones), the tokens the aborted ones had, and the largest
    number of sequences that ran in one step."""
    ids: list[str | None] = [None] * len(requests)
    final, partial, steps, widest = {}, {}, 0, 0
    while len(final) + len(partial) < len(requests):
        for i, (prompt, params) in enumerate(requests):
            if ids[i] is None and arrivals[i] <= steps:
                ids[i] = eng.add_request(prompt, params)
        widest = max(widest, eng.num_running)
        for out in eng.step():  # (a step with accepted drafts hands back several outputs per request)
            i = ids.index(out.request_id)
            if i in partial:
                continue  # aborted at an earlier output of this step
            if out.finished:
                final[i] = out
            elif i in aborts and len(out.token_ids) >= aborts[i]:
                assert eng.abort(out.request_id)
                partial[i] = out.token_ids
        steps += 1
        assert steps < 5000, "the engine stopped making progress"
    return [final.get(i) for i in range(len(requests))], partial, widest


def greedy_requests(base: list) -> tuple[list[tuple[str, SamplingParams]], int]:
    """From the prompts' free-running greedy outputs: the prompts again, each with a limit or a stop that cuts its
    output somewhere inside, and a token to use as the end of sequence (the model rarely ends these texts within
    48 tokens), taken from the middle of an output of a request that stops at EOS."""
    reqs = []
    for i, (prompt, text, ids) in enumerate(zip(PROMPTS, [o.text for o in base], [o.token_ids for o in base])):
        kind = i % 4
        if kind == 0:  # max_tokens wherever it falls
            p = SamplingParams(max_tokens=(1, 2, 5, 17, 33)[i % 5], temperature=0, ignore_eos=True)
        elif kind == 1:  # a stop string from the middle of the text
            stop = text[len(text) // 2:len(text) // 2 + 3]
            p = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, stop=[stop] if stop.strip() else None)
        elif kind == 2:  # a stop token from the middle of the ids
            p = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, stop_token_ids=[ids[len(ids) // 2]])
        else:  # the end of sequence
            p = SamplingParams(max_tokens=48, temperature=0)
        reqs.append((prompt, p))
    return reqs, base[3].token_ids[len(base[3].token_ids) // 2]


@pytest.fixture(scope="module")
def greedy_case(embedded):
    """The greedy requests and their plain decoding (all queued at once, a roomy cache)."""
    free = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    base = run_to_completion(engine(embedded, speculative="off"), PROMPTS, [free] * len(PROMPTS))
    requests, eos = greedy_requests(base)
    plain = run_to_completion(engine(embedded, eos, speculative="off"), [p for p, _ in requests],
                              [s for _, s in requests])
    assert {o.finish_reason for o in plain} >= {"length", "stop"}
    assert any(o.finish_reason == "stop" for o, (_, s) in zip(plain, requests) if not s.ignore_eos)  # an EOS
    return requests, plain, eos


def check_greedy(spec: LLMEngine, requests, plain, arrivals) -> None:
    aborts = aborts_for(plain)
    outs, partial, widest = drive(spec, requests, arrivals, aborts)
    assert widest > 2  # past the CPU's default drafting pause
    for i, (got, want) in enumerate(zip(outs, plain)):
        if i in aborts:
            assert got is None and partial[i] == want.token_ids[:len(partial[i])]
            continue
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason), i
    stats = spec.spec_stats()
    assert stats["drafted"] > 0 and stats["accepted"] / stats["drafted"] > 0.5
    assert spec.cache.allocator.num_used == 0 and not spec.seqs and not spec.has_unfinished()


@pytest.mark.parametrize("num_draft_tokens", [1, 2])
def test_greedy_under_load_equals_plain_decoding(embedded, greedy_case, num_draft_tokens):
    """Staggered arrivals, the default drafting pause (above 2 sequences on the CPU) switching on and off, aborts."""
    requests, plain, eos = greedy_case
    check_greedy(engine(embedded, eos, speculative="mtp", num_draft_tokens=num_draft_tokens), requests, plain,
                 ARRIVALS)


@pytest.mark.parametrize("max_batch,num_blocks", [(-1, 10), (0, 11)])
def test_greedy_under_preemption_equals_plain_decoding(max_batch, num_blocks):
    """The same with a cache so small that sequences are preempted and recomputed, and a token budget that cuts
    prompts into chunks, on the embedded model in float32 (the PyTorch path): recomputed positions round
    differently from decoded ones, which only a near-tie can turn into another token, and bf16 logits tie exactly
    at a few positions of these prompts while float32 margins stay wide (checked first)."""
    llm = LLM(speculative="off", dtype="float32", progress=False)
    f32 = (llm.model, llm.tokenizer)
    top2 = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, logprobs=2)
    base = run_to_completion(engine(f32, speculative="off"), PROMPTS, [top2] * len(PROMPTS))
    margin = min(e.top[0][1] - e.top[1][1] for o in base for e in o.logprobs)
    assert margin > 1e-4, f"a near-tie among the greedy tokens (margin {margin:.2e} nats)"
    requests, eos = greedy_requests(base)
    plain = run_to_completion(engine(f32, eos, speculative="off"), [p for p, _ in requests], [s for _, s in requests])
    spec = engine(f32, eos, speculative="mtp", speculative_max_batch=max_batch, num_blocks=num_blocks, block_size=8,
                  max_num_batched_tokens=64)
    check_greedy(spec, requests, plain, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])  # crowded: preemptions
    assert spec.scheduler.num_preemptions > 0


@pytest.mark.parametrize("num_draft_tokens", [1, 2])
def test_seeded_sampling_under_load_does_not_depend_on_the_schedule(embedded, num_draft_tokens):
    """Seeded sampled requests (temperature alone, and with top-p: drafts drawn after the step) draft whatever the
    batch size, so queued all at once or arriving staggered while others are aborted, they sample the same."""
    reqs = [(p, SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95 if i % 3 == 0 else 1.0, seed=100 + i,
                               ignore_eos=True, stop=["\n\n\n"] if i % 4 == 1 else None))
            for i, p in enumerate(PROMPTS)]
    want = run_to_completion(engine(embedded, speculative="mtp", num_draft_tokens=num_draft_tokens),
                             [p for p, _ in reqs], [s for _, s in reqs])
    others = [(p, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)) for p in PROMPTS[:4]]
    eng = engine(embedded, speculative="mtp", num_draft_tokens=num_draft_tokens)
    got, _, widest = drive(eng, reqs + others, ARRIVALS + [1, 2, 7, 11], {12: 2, 14: 9})
    assert widest > 2
    assert [(o.token_ids, o.text, o.finish_reason) for o in got[:len(reqs)]] == \
        [(o.token_ids, o.text, o.finish_reason) for o in want]
    assert eng.spec_stats()["drafted"] > 0 and eng.cache.allocator.num_used == 0
