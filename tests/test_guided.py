"""Structured outputs and logit_bias in the engine (engine/guided.py), and per-request failure isolation: a
failure in one row of a step ends that request only."""
from __future__ import annotations

import itertools
import json
import re

import pytest
import torch

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from dsv3.engine import sampling as sampling_mod
from dsv3.engine.guided import GuidedDecoding, GuidedState
from dsv3.engine.llm import LLM
from dsv3.engine.sampling import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                    "required": ["city"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llms(tiny_ckpt):
    # The tiny checkpoint has an MTP module: "auto" speculates, "off" decodes one token at a time.
    return {"auto": LLM(tiny_ckpt, dtype="float32"), "off": LLM(tiny_ckpt, dtype="float32", speculative="off")}


def params(guided: GuidedDecoding | None = None, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 160)
    kw.setdefault("temperature", 0.0)
    return SamplingParams(guided=guided, **kw)


def test_json_schema_sampled_outputs_validate(llms):
    llm = llms["auto"]
    g = GuidedDecoding(json=SCHEMA)
    outs = llm.generate(["Describe a user:"] * 16, [params(g, temperature=1.0, seed=s) for s in range(16)])
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert len({o.text for o in outs}) > 8  # sampled, not one answer repeated
    assert llm.engine.stats["spec_verify_steps"] > 0  # drafts were verified against the grammar


@pytest.mark.parametrize("guided,check", [
    (GuidedDecoding(json=SCHEMA), lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
    (GuidedDecoding(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    (GuidedDecoding(regex=r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
    (GuidedDecoding(choice=["red", "green", "blue"]), lambda t: t in ("red", "green", "blue")),
    (GuidedDecoding(grammar='root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'),
     lambda t: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", t)),
])
def test_speculation_gives_the_same_constrained_output(llms, guided, check):
    """Greedy: drafts checked against the grammar give exactly the output of decoding without speculation."""
    prompts = ["The answer:", "def f(x):", "Colour of the sky"]
    n = 32  # (greedy JSON from a random model may run on to the limit: the comparison is the point here)
    auto = llms["auto"].generate(prompts, [params(guided, max_tokens=n)] * 3)
    off = llms["off"].generate(prompts, [params(guided, max_tokens=n)] * 3)
    assert [o.token_ids for o in auto] == [o.token_ids for o in off]
    for o in auto:
        if o.finish_reason == "stop":
            assert check(o.text) is not False
    assert guided.kind in ("json", "json_object") or all(o.finish_reason == "stop" for o in auto)


def test_constrained_and_free_rows_share_a_step(llms):
    """Continuous batching: free rows are untouched by constrained neighbours; n > 1 gives each copy its own
    grammar state."""
    llm = llms["auto"]
    free = llm.generate(["Once upon a time"], [params(max_tokens=24, ignore_eos=True)])[0]
    g = GuidedDecoding(json=SCHEMA)
    outs = llm.generate(["Once upon a time", "Describe a user:", "Describe a user:"],
                        [params(max_tokens=24, ignore_eos=True), params(g, temperature=1.0, seed=1),
                         params(g, temperature=1.0, seed=2)])
    assert outs[0].token_ids == free.token_ids
    for o in outs[1:]:
        jsonschema.validate(json.loads(o.text), SCHEMA)


def test_draft_masks_equal_the_sequential_oracle(llms):
    """fill_rows over drafts (advance, mask, roll back) = fresh matchers that accepted each prefix."""
    backend = llms["auto"].engine.guided_backend()
    tok = llms["auto"].tokenizer
    g = GuidedDecoding(json=SCHEMA)
    state = backend.new_state(g)
    prefix = tok.encode('{"name": "ab', add_bos=False)
    for t in prefix:
        state.accept(t)
    draft = tok.encode('c", "age": 1', add_bos=False)[:5]
    bad = [draft[0], tok.encode("}", add_bos=False)[0], draft[1]]  # a refused draft in the middle
    for d in (draft, bad):
        import xgrammar as xgr

        rows = len(d) + 1
        got = xgr.allocate_token_bitmask(rows, backend.vocab_size)
        state.fill_rows(got, 0, d, rows)
        want = xgr.allocate_token_bitmask(rows, backend.vocab_size)
        ok = True
        for j in range(rows):
            oracle = backend.new_state(g)
            for t in prefix + d[:j]:
                ok = ok and oracle.matcher.accept_token(t)
            if not ok:  # rows past a refused draft are never read by verification: only the earlier ones count
                break
            oracle.matcher.fill_next_token_bitmask(want, j)
            assert torch.equal(got[j], want[j]), j
    # fill_rows rolled back: the state is where the prefix left it
    again = xgr.allocate_token_bitmask(1, backend.vocab_size)
    state.fill_rows(again, 0, [], 1)
    assert torch.equal(again[0], got[0])


def test_grammars_are_compiled_once_and_refused_with_reasons(llms):
    backend = llms["auto"].engine.guided_backend()
    a = backend.compile(GuidedDecoding(json=SCHEMA))
    b = backend.compile(GuidedDecoding(json=json.dumps(SCHEMA, indent=2)))  # same schema, other text
    assert a is b
    for bad, msg in [(GuidedDecoding(json={"type": "object", "properties": 5}), "properties must be an object"),
                     (GuidedDecoding(regex="(ab"), "regex constraint cannot be compiled"),
                     (GuidedDecoding(grammar="root ::= "), "grammar constraint cannot be compiled")]:
        with pytest.raises(ValueError, match=msg):
            backend.compile(bad)
    with pytest.raises(ValueError, match="cannot be compiled"):
        llms["auto"].engine.add_request("x", params(GuidedDecoding(regex="[")))


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one of"),
    ({"json": SCHEMA, "regex": "a"}, "exactly one of"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": [1]}, "must be a JSON schema"),
    ({"choice": []}, "non-empty list"),
    ({"choice": ["a", ""]}, "non-empty strings"),
    ({"regex": "a" * 300_000}, "at most 200000"),
    ({"json_object": "yes"}, "exactly one of|must be True or False"),
    ({"json": {"type": object}}, "not JSON-serialisable"),
])
def test_guided_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GuidedDecoding(**kwargs)


def test_logit_bias(llms):
    llm = llms["auto"]
    forced = llm.generate("Hello", params(max_tokens=6, ignore_eos=True, logit_bias={42: 100}))[0]
    assert forced.token_ids == [42] * 6
    plain = llm.generate("Hello", params(max_tokens=6, ignore_eos=True))[0]
    banned = llm.generate("Hello", params(max_tokens=6, ignore_eos=True,
                                          logit_bias={plain.token_ids[0]: -100}))[0]
    assert banned.token_ids[0] != plain.token_ids[0]
    # speculation verifies against the biased distribution: the same greedy output
    off = llms["off"].generate("Hello", params(max_tokens=6, ignore_eos=True,
                                               logit_bias={plain.token_ids[0]: -100}))[0]
    assert off.token_ids == banned.token_ids
    with pytest.raises(ValueError, match="below the vocabulary size"):
        llm.engine.add_request("x", params(logit_bias={10**6: 1.0}))


def test_a_failing_row_ends_only_its_request(llms, monkeypatch):
    """A sampling failure that concerns one row (here: forced for the request seeded 13) ends that request with
    an error; the other requests of the same steps finish with the tokens they get alone."""
    llm = llms["off"]
    prompts = ["Once upon a time", "def main():", "Describe a user:"]
    ps = [params(max_tokens=12, ignore_eos=True), params(max_tokens=12, ignore_eos=True),
          params(max_tokens=12, ignore_eos=True, temperature=1.0, seed=13)]
    alone = [llm.generate(p, q)[0] for p, q in zip(prompts[:2], ps[:2])]
    real = sampling_mod.Sampler._sample

    def poisoned(self, logits, batch):
        states = batch.states if isinstance(batch, sampling_mod.SamplingBatch) else list(batch)
        if any(s.params.seed == 13 for s in states):
            raise RuntimeError("forced failure")
        return real(self, logits, batch)

    monkeypatch.setattr(sampling_mod.Sampler, "_sample", poisoned)
    outs = llm.generate(prompts, ps)
    assert [o.token_ids for o in outs[:2]] == [o.token_ids for o in alone]
    assert outs[2].finish_reason == "error" and "forced failure" in outs[2].error
    assert outs[2].token_ids == []
    assert llm.engine.cache.allocator.num_used == 0 or not llm.engine.has_unfinished()


def test_a_failing_append_ends_only_its_request(llms, monkeypatch):
    llm = llms["auto"]
    g = GuidedDecoding(choice=["alpha", "beta"])
    real = GuidedState.accept
    calls = {"n": 0}

    def flaky(self, token):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("matcher broke")
        return real(self, token)

    monkeypatch.setattr(GuidedState, "accept", flaky)
    outs = llm.generate(["a", "b"], [params(g, max_tokens=8), params(max_tokens=8, ignore_eos=True)])
    assert outs[0].finish_reason == "error" and "matcher broke" in outs[0].error
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 8


def test_a_failing_draft_verification_ends_only_its_request(llms, monkeypatch):
    """With speculation: the batched verification fails because of one sequence, each is verified alone, that one
    ends with the error and the others (greedy and seeded sampled, all speculating) get their own tokens."""
    from dsv3.engine import spec_verify

    llm = llms["auto"]
    prompts = ["Once upon a time", "def main():", "Describe a user:", "A list:"]
    ps = [params(max_tokens=16, ignore_eos=True), params(max_tokens=16, ignore_eos=True),
          params(max_tokens=16, ignore_eos=True, temperature=1.0, seed=13),
          params(max_tokens=16, ignore_eos=True, temperature=1.0, seed=5)]
    alone = {i: llm.generate(prompts[i], ps[i])[0] for i in (0, 1, 3)}
    real = spec_verify.verify_rows

    def poisoned(logits, drafts, qs, states):
        if any(s.params.seed == 13 for s in states):
            raise RuntimeError("verification broke")
        return real(logits, drafts, qs, states)

    monkeypatch.setattr(spec_verify, "verify_rows", poisoned)
    before = llm.engine.stats["spec_verify_steps"]
    outs = llm.generate(prompts, ps)
    assert llm.engine.stats["spec_verify_steps"] > before
    assert outs[2].finish_reason == "error" and "verification broke" in outs[2].error
    for i in (0, 1, 3):
        assert outs[i].token_ids == alone[i].token_ids


def test_logits_wider_than_the_tokenizer_never_pick_padding(llms):
    """Real checkpoints pad the head beyond the tokenizer (DeepSeek-V3: 129,280 rows, ~128,815 tokens): the
    padding ids are never allowed, and special tokens other than eos never appear inside a constrained output."""
    from dsv3.engine.guided import GrammarBackend, apply_row_constraints

    tok = llms["auto"].tokenizer
    wide = tok.vocab_size + 77
    backend = GrammarBackend(tok, wide, [1])
    state = backend.new_state(GuidedDecoding(json_object=True))

    class Seq:
        draft: list = []
        extra = {"guided": state}

    logits = torch.zeros(1, wide)
    logits[0, tok.vocab_size:] = 1000.0  # the padding would win without the mask
    apply_row_constraints(logits, [Seq()], [[0]])
    allowed = (logits[0] > -1e30).nonzero().flatten().tolist()
    assert allowed and max(allowed) < tok.vocab_size
    assert not set(allowed) & set(tok.special_ids)
    assert all(tok.decode([i]).lstrip().startswith("{") for i in allowed)


@pytest.mark.slow
def test_sampled_speculation_under_a_grammar_keeps_the_distribution(llms):
    """Two-sample chi-square: seeded sampled outputs under a regex, speculating (drafts drawn from the masked MTP
    head, verified against the masked target) and not, come from the same distribution."""
    from scipy.stats import chi2_contingency

    g = GuidedDecoding(regex="[abc][abc]")
    n = 180
    counts = {}
    for name in ("auto", "off"):
        eng = llms[name].engine
        before = eng.stats["spec_drafted"]
        outs = llms[name].generate(["Letters:"] * n, [params(g, temperature=1.5, seed=s, max_tokens=8)
                                                      for s in range(n)])
        assert all(re.fullmatch("[abc]{2}", o.text) for o in outs)
        counts[name] = {o.text: 0 for o in outs}
        for o in outs:
            counts[name][o.text] += 1
        if name == "auto":
            assert eng.stats["spec_drafted"] > before
    keys = sorted(set(counts["auto"]) | set(counts["off"]))
    table = [[counts[name].get(k, 0) + 0.5 for k in keys] for name in ("auto", "off")]
    assert len(keys) > 4
    assert chi2_contingency(table).pvalue > 0.001


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "torch"])
def test_apply_bitmask_equals_xgrammars_kernel(kernels, monkeypatch):
    import xgrammar as xgr

    from dsv3.engine import guided
    from dsv3.kernels import cpu_ext

    if kernels and cpu_ext.load() is None:
        pytest.skip("C++ CPU kernels unavailable here")
    if not kernels:
        monkeypatch.setattr(guided.cpu_ext, "loaded", lambda: None)
    g = torch.Generator().manual_seed(0)
    for (rows, vocab), dtype in itertools.product(((1, 32), (5, 4096), (3, 4099), (16, 129), (2, 7)),
                                                  (torch.float32, torch.bfloat16)):
        logits = torch.randn(rows, vocab, generator=g).to(dtype)
        bitmask = torch.randint(-2**31, 2**31 - 1, (rows, (vocab + 31) // 32), dtype=torch.int32, generator=g)
        bitmask[0] = -1  # a row with every token allowed
        want = logits.clone()
        xgr.apply_token_bitmask_inplace(want, bitmask)
        guided.apply_bitmask(logits, bitmask)
        assert torch.equal(logits, want)
