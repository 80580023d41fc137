import math
import random
from collections import Counter

import pytest
import torch

from dsv3.engine import SamplingParams
from dsv3.engine.sampling import (MAX_STOP_STRINGS, Sampler, SamplingBatch, SequenceSamplingState, draw_inverse_cdf,
                                  process_logits, sample_seed)

# chi-square quantiles at p = 0.001 (the tests use fixed seeds, so this is a bound on the chance of a bad seed)
CHI2_999 = {2: 13.816, 5: 20.515}


def _batch(params, vocab, prompts=None):
    states = [SequenceSamplingState(p, prompts[i] if prompts else (), vocab) for i, p in enumerate(params)]
    return states, SamplingBatch(states)


def _chi2(counts, probs, total):
    return sum((counts.get(i, 0) - total * p) ** 2 / (total * p) for i, p in enumerate(probs) if p > 0)


# ---- slow references ------------------------------------------------------------------------------------------

def ref_keep(row, p):
    """Tokens a row may draw from: top-k, then top-p over the renormalised rest, then min-p; ties with the last
    kept token are kept."""
    x = [v / p.temperature for v in row]
    keep = set(range(len(x)))
    if p.top_k > 0:
        kth = sorted(x, reverse=True)[min(p.top_k, len(x)) - 1]
        keep = {i for i in keep if x[i] >= kth}
    if p.top_p < 1:
        m = max(x[i] for i in keep)
        z = sum(math.exp(x[i] - m) for i in keep)
        mass, cut = 0.0, None
        for i in sorted(keep, key=lambda i: -x[i]):
            if mass >= p.top_p:
                break
            cut, mass = x[i], mass + math.exp(x[i] - m) / z
        keep = {i for i in keep if x[i] >= cut}
    if p.min_p > 0:
        m = max(x[i] for i in keep)
        keep = {i for i in keep if math.exp(x[i] - m) >= p.min_p}
    return keep


def ref_penalise(row, prompt, output, p):
    counts = Counter(output)
    seen = set(prompt) | set(output)
    out = []
    for t, v in enumerate(row):
        if t in seen:
            v = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        out.append(v - p.frequency_penalty * counts[t] - p.presence_penalty * (counts[t] > 0))
    return out


def _unambiguous_top_p(row, p, rnd):
    # A top_p far (1e-4) from every cumulative mass, so float32 vs float64 rounding cannot move the cut.
    x = sorted((v / p.temperature for v in row), reverse=True)
    if p.top_k > 0:
        x = x[:min(p.top_k, len(x))]
    z = sum(math.exp(v - x[0]) for v in x)
    masses = [sum(math.exp(v - x[0]) for v in x[:j]) / z for j in range(len(x) + 1)]
    while True:
        top_p = rnd.uniform(0.05, 0.99)
        if all(abs(top_p - m) > 1e-4 for m in masses):
            return top_p


def _unambiguous_min_p(row, p, rnd):
    x = [v / p.temperature for v in row]
    while True:
        min_p = rnd.uniform(0.001, 0.9)
        if all(abs(math.log(min_p) - (v - max(x))) > 1e-4 for v in x):
            return min_p


# ---- tests ----------------------------------------------------------------------------------------------------

def test_greedy_is_argmax_and_input_untouched():
    logits = torch.randn(8, 100)
    before = logits.clone()
    states, batch = _batch([SamplingParams(temperature=0)] * 8, 100)
    out = Sampler()(logits, batch)
    assert torch.equal(out.token_ids, logits.argmax(-1)) and out.logprobs is None
    assert torch.equal(Sampler()(logits.bfloat16(), batch).token_ids, logits.bfloat16().argmax(-1))
    # Greedy rows mixed with sampled ones still take the argmax, also with filters on the others.
    params = [SamplingParams(temperature=0, top_k=3), SamplingParams(temperature=1.0, top_p=0.5)] * 4
    _, batch = _batch(params, 100)
    ids = Sampler()(logits, batch).token_ids
    assert torch.equal(ids[0::2], logits[0::2].argmax(-1))
    assert torch.equal(logits, before)


def test_filters_keep_exactly_the_reference_tokens():
    rnd = random.Random(0)
    vocab, rows = 40, 64
    # Logits on a grid of eighths: plenty of exact ties, and distinct values far apart.
    logits = torch.tensor([[rnd.randint(-40, 40) / 8 for _ in range(vocab)] for _ in range(rows)])
    params = []
    for i in range(rows):
        p = SamplingParams(temperature=rnd.choice([0.5, 0.8, 1.0, 1.3]), top_k=rnd.choice([0, -1, 1, 2, 5, 17, 40, 99]))
        row = logits[i].tolist()
        if rnd.random() < 0.7:
            p.top_p = _unambiguous_top_p(row, p, rnd)
        if rnd.random() < 0.4:
            p.min_p = _unambiguous_min_p(row, p, rnd)
        params.append(p.validate())
    _, batch = _batch(params, vocab)
    _, x = process_logits(logits, batch)
    for i, p in enumerate(params):
        keep = ref_keep(logits[i].tolist(), p)
        got = set(torch.isfinite(x[i]).nonzero().flatten().tolist())
        assert got == keep, (i, p)
        assert torch.equal(x[i][list(keep)], (logits[i] / p.temperature)[list(keep)])
    # Every setting was exercised, ties included.
    assert any(p.top_k == 1 and len(ref_keep(logits[i].tolist(), p)) > 1 for i, p in enumerate(params))


def test_ties_are_kept_together():
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0, 2.0, 0.0]] * 3)
    params = [SamplingParams(top_k=1), SamplingParams(top_k=3), SamplingParams(top_p=0.01)]
    _, batch = _batch(params, 6)
    _, x = process_logits(logits, batch)
    kept = torch.isfinite(x)
    assert kept[0].tolist() == [True, False, True, False, False, False]
    assert kept[1].tolist() == [True, False, True, True, True, False]
    assert kept[2].tolist() == [True, False, True, False, False, False]


def test_penalties_match_reference():
    rnd = random.Random(1)
    vocab, rows = 30, 12
    logits = torch.randn(rows, vocab) * 3
    params, prompts, outputs = [], [], []
    for i in range(rows):
        params.append(SamplingParams(repetition_penalty=rnd.choice([1.0, 0.7, 1.3, 2.0]),
                                     presence_penalty=rnd.choice([0.0, -0.5, 1.5]),
                                     frequency_penalty=rnd.choice([0.0, 0.4, -2.0]), temperature=0.9))
        prompts.append([rnd.randrange(vocab) for _ in range(rnd.randrange(0, 8))])
        outputs.append([rnd.randrange(vocab) for _ in range(rnd.randrange(0, 12))])
    states, batch = _batch(params, vocab, prompts)
    for s, out in zip(states, outputs):
        if out:  # both ways the engine records: one tensor of accepted ids, or one token at a time
            s.append(torch.tensor(out[:3]))
            for t in out[3:]:
                s.append(t)
    penalised, x = process_logits(logits, batch)
    for i, p in enumerate(params):
        ref = torch.tensor(ref_penalise(logits[i].tolist(), prompts[i], outputs[i], p))
        torch.testing.assert_close(penalised[i], ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x[i], ref / p.temperature, rtol=1e-6, atol=1e-6)


def test_append_counts_generated_tokens():
    states, batch = _batch([SamplingParams(frequency_penalty=1.0), SamplingParams(), SamplingParams(
        repetition_penalty=1.1)], 10)
    for ids in ([1, 2, 3], [1, 5, 3], [4, 2, 3]):
        batch.append(torch.tensor(ids))
    assert states[0].output_counts.tolist() == torch.bincount(torch.tensor([1, 1, 4]), minlength=10).tolist()
    assert states[1].output_counts is None  # no penalty, no per-vocabulary state
    assert states[2].output_counts.tolist() == torch.bincount(torch.tensor([3, 3, 3]), minlength=10).tolist()


def test_seeded_rows_do_not_depend_on_the_batch():
    vocab, steps = 50, 30
    target = SamplingParams(temperature=0.9, top_p=0.95, min_p=0.01, repetition_penalty=1.2, seed=1234)
    gen = torch.Generator().manual_seed(0)
    step_logits = [torch.randn(vocab, generator=gen) * 2 for _ in range(steps)]

    def run(with_others: bool, sampler_seed: int) -> list[int]:
        rnd = random.Random(sampler_seed)
        sampler = Sampler(generator=torch.Generator().manual_seed(sampler_seed))
        me = SequenceSamplingState.create(target, [1, 2, 3], vocab)
        others = [SequenceSamplingState(p, [], vocab) for p in (
            SamplingParams(temperature=1.3, seed=5), SamplingParams(), SamplingParams(temperature=0),
            SamplingParams(top_k=5, presence_penalty=0.5), SamplingParams(temperature=0.9, seed=1234 + 1))]
        tokens = []
        for t in range(steps):
            rows = rnd.sample(others, rnd.randrange(len(others) + 1)) if with_others else []
            pos = rnd.randrange(len(rows) + 1)
            rows.insert(pos, me)
            logits = torch.randn(len(rows), vocab, generator=gen) * 2
            logits[pos] = step_logits[t]
            batch = SamplingBatch(rows)
            ids = sampler(logits, batch).token_ids
            batch.append(ids)
            tokens.append(int(ids[pos]))
        return tokens

    alone = run(False, 0)
    assert run(True, 1) == alone and run(True, 2) == alone
    assert len(set(alone)) > 3  # really sampled, not a constant
    other_seed = SequenceSamplingState(SamplingParams(temperature=0.9, seed=99), [], vocab)
    draws = [int(Sampler()(step_logits[t][None], SamplingBatch([other_seed])).token_ids[0]) for t in range(steps)]
    assert draws != alone


def test_n_completions_get_distinct_streams():
    assert sample_seed(7, 0) == 7 and len({sample_seed(7, i) for i in range(16)}) == 16
    p = SamplingParams(seed=7, n=2)
    a, b = (SequenceSamplingState(p, [], 100, sample_index=i) for i in range(2))
    logits = torch.zeros(2, 100)
    ids = [Sampler()(logits, SamplingBatch([a, b])).token_ids.tolist() for _ in range(5)]
    assert [x for x, _ in ids] != [y for _, y in ids]


def test_temperature_sampling_matches_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temp, total = 0.7, 20000
    probs = torch.softmax(logits.double() / temp, -1).tolist()
    # Unseeded rows share the sampler's generator ...
    _, batch = _batch([SamplingParams(temperature=temp)] * total, 6)
    ids = Sampler(generator=torch.Generator().manual_seed(0))(logits.expand(total, 6), batch).token_ids
    assert _chi2(Counter(ids.tolist()), probs, total) < CHI2_999[5]
    # ... seeded rows each draw from their own.
    n = 4000
    _, batch = _batch([SamplingParams(temperature=temp, seed=s) for s in range(n)], 6)
    ids = Sampler()(logits.expand(n, 6), batch).token_ids
    assert _chi2(Counter(ids.tolist()), probs, n) < CHI2_999[5]
    # Filtered rows draw from the renormalised rest and never from a masked token.
    _, batch = _batch([SamplingParams(temperature=1.0, top_k=3)] * total, 6)
    sampler = Sampler(generator=torch.Generator().manual_seed(1))
    counts = Counter(sampler(logits.expand(total, 6), batch).token_ids.tolist())
    assert set(counts) == {0, 1, 2}
    assert _chi2(counts, torch.softmax(logits[:3].double(), -1).tolist(), total) < CHI2_999[2]


def test_temperature_only_rows_take_the_short_path_with_the_same_draws():
    # Rows with a temperature and nothing else skip the per-row parameter tensors (Sampler.sample given states,
    # speculative.target_probs); tokens and distributions must equal the general path's, seeded or not.
    from dsv3.engine.sampling import shared_temperature, tempered_softmax
    from dsv3.engine.speculative import target_probs

    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(3)) * 3
    seeds = [11, None, 12, None, 13]
    states = [SequenceSamplingState(SamplingParams(temperature=0.7, seed=s), [], 300) for s in seeds]
    assert shared_temperature(states) == 0.7

    def rewind():  # both paths start from the same state of every stream
        for st, seed in zip(states, seeds):
            if seed is not None:
                st.generator.manual_seed(sample_seed(seed, step))

    for step in range(20):
        rewind()
        short = Sampler(generator=torch.Generator().manual_seed(step))(logits, states).token_ids
        rewind()
        general = Sampler(generator=torch.Generator().manual_seed(step))(logits, SamplingBatch(states)).token_ids
        assert torch.equal(short, general)
        logits = logits.roll(1, dims=1)
    _, x = process_logits(logits, SamplingBatch(states))
    assert torch.equal(target_probs(logits, states), tempered_softmax(x))  # (C++ or torch: the same function)
    # anything besides the temperature, or rows that disagree, go the general way
    for other in (SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=0.7, min_p=0.1),
                  SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=0.7, presence_penalty=0.5),
                  SamplingParams(temperature=0.8), SamplingParams(temperature=0)):
        assert shared_temperature(states[:2] + [SequenceSamplingState(other, [], 300)]) is None


def test_inverse_cdf_draw_never_picks_a_zero_mass_token():
    # Masked tokens sit at both ends and in the middle; u at its extremes (0 and the largest double below 1) must
    # still land on a token with mass, and unnormalised rows behave as their normalised selves.
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.5, 0.2, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 1e-30, 0.0],
                          [0.0, 3.0, 0.0, 5.0, 2.0, 0.0, 0.0]])
    for u in (0.0, 0.5, 1 - 2.0 ** -53):
        ids = draw_inverse_cdf(probs, torch.full((3,), u, dtype=torch.float64)).tolist()
        assert all(probs[i, t] > 0 for i, t in enumerate(ids)), (u, ids)
    assert draw_inverse_cdf(probs, torch.tensor([0.0, 0.0, 0.0])).tolist() == [1, 5, 1]
    u = torch.rand(30000, generator=torch.Generator().manual_seed(5))
    counts = Counter(draw_inverse_cdf(probs[2].expand(30000, 7), u).tolist())
    assert set(counts) == {1, 3, 4}
    assert _chi2(Counter({0: counts[1], 1: counts[3], 2: counts[4]}), [0.3, 0.5, 0.2], 30000) < CHI2_999[2]


def test_logprobs_are_the_raw_distribution():
    logits = torch.randn(4, 60)
    params = [SamplingParams(logprobs=3, temperature=0.5, repetition_penalty=1.5), SamplingParams(logprobs=0),
              SamplingParams(temperature=0, logprobs=5), SamplingParams()]
    _, batch = _batch(params, 60, prompts=[[1, 2]] * 4)
    out = Sampler()(logits, batch)
    raw = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_logprobs.shape == (4, 5)  # the most any row asked for; rows slice their own n
    values, ids = raw.topk(5, -1)
    assert torch.equal(out.top_token_ids, ids)
    torch.testing.assert_close(out.top_logprobs, values)
    entry = out.logprob_entry(0)  # host-side, trimmed to the row's own n
    assert entry.token_id == int(out.token_ids[0]) and len(entry.top) == 3
    assert entry.top[0] == (int(ids[0, 0]), pytest.approx(float(values[0, 0])))
    assert entry.logprob == pytest.approx(float(out.logprobs[0]))
    assert out.logprob_entry(1).top == [] and out.logprob_entry(3) is None


def test_engine_flow_with_states():
    # What the engine does: states in, tokens out, one host sync, then append what was committed.
    vocab = 20
    sampler = Sampler(vocab, "cpu")
    states = [SequenceSamplingState.create(SamplingParams(temperature=0, frequency_penalty=2.0), [0], vocab),
              SequenceSamplingState.create(SamplingParams(temperature=0.5, seed=1), [0], vocab)]
    logits = torch.linspace(0, 1, vocab).expand(2, vocab).contiguous()
    produced = []
    for _ in range(4):
        tokens = sampler.sample(logits, states).token_ids.tolist()
        for state, tok in zip(states, tokens):
            state.append(tok)
        produced.append(tokens[0])
    assert produced == [19, 18, 17, 16]  # each greedy pick is pushed down by the frequency penalty
    with pytest.raises(ValueError, match="logits have 21 columns but the vocabulary has 20"):
        sampler.sample(torch.zeros(2, 21), states)


def test_no_host_sync_on_the_hot_path(monkeypatch):
    params = [SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                             frequency_penalty=0.3, seed=3, logprobs=2), SamplingParams(temperature=0),
              SamplingParams(presence_penalty=1.0)]
    states, batch = _batch(params, 50, prompts=[[1, 2]] * 3)
    logits = torch.randn(3, 50)

    def sync(*args, **kwargs):
        raise AssertionError("host sync on the sampling hot path")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, sync)
        out = Sampler()(logits, batch)
        batch.append(out.token_ids)
    assert sum(s.output_counts.sum().item() for s in states if s.output_counts is not None) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_has_no_sync_and_seeded_rows_stay_independent():
    vocab, dev = 1000, "cuda"
    target = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.2, seed=11,
                            logprobs=3)
    others = [SamplingParams(temperature=0), SamplingParams(presence_penalty=0.5, frequency_penalty=0.5),
              SamplingParams(temperature=1.2, seed=5, top_k=7)]
    gen = torch.Generator(dev).manual_seed(0)
    step_logits = [torch.randn(vocab, device=dev, generator=gen) for _ in range(8)]
    runs = []
    for with_others in (False, True):
        states = [SequenceSamplingState(p, [1, 2, 3], vocab, dev) for p in ([target] + others * with_others)]
        batch = SamplingBatch(states, dev)  # host-to-device copies: outside the checked region
        sampler = Sampler(vocab, dev)
        tokens = []
        for logits_v in step_logits:
            logits = torch.randn(len(states), vocab, device=dev, generator=gen)
            logits[0] = logits_v
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = sampler.sample(logits, batch)
                batch.append(out.token_ids)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            tokens.append(out.token_ids[0])
        runs.append(torch.stack(tokens).tolist())
    assert runs[0] == runs[1]


def test_bad_logits_shape():
    _, batch = _batch([SamplingParams()] * 2, 10)
    with pytest.raises(ValueError, match=r"logits must be \[B, V\] with B = 2"):
        Sampler()(torch.zeros(3, 10), batch)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=0), "max_tokens must be a positive integer"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(temperature=-0.1), r"temperature must be a number in \[0, 100\] \(0 means greedy\), got -0.1"),
    (dict(temperature=1e308), r"temperature must be a number in \[0, 100\]"),
    (dict(logit_bias={5: 101}), r"logit_bias\[5\] is 101; biases must be numbers in \[-100, 100\]"),
    (dict(logit_bias={-1: 1}), r"logit_bias has key -1"),
    (dict(logit_bias={"5": 1}), r"logit_bias has key '5'"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="1"), "temperature"),
    (dict(top_k=-2), "top_k must be an integer >= 1, or 0 / -1"),
    (dict(top_k=2.0), "top_k"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=float("inf")), "top_p"),
    (dict(min_p=-0.01), r"min_p must be in \[0, 1\]"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), r"repetition_penalty must be a number in \[0.01, 100\]"),
    (dict(repetition_penalty=1e-300), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(seed=-1), r"seed must be None or an integer in \[0, 2\*\*64\)"),
    (dict(seed=2**64), "seed"),
    (dict(seed=1.0), "seed"),
    (dict(stop=5), "stop must be None, a string or a list of strings"),
    (dict(stop=["a", 3]), "stop must hold only strings"),
    (dict(stop=""), "stop must not contain an empty string"),
    (dict(stop=["ok", ""]), "empty string"),
    (dict(stop=["x"] * (MAX_STOP_STRINGS + 1)), f"stop has 17 strings; at most {MAX_STOP_STRINGS}"),
    (dict(stop_token_ids=[-1]), "stop_token_ids must be a list of token ids"),
    (dict(stop_token_ids=3), "stop_token_ids"),
    (dict(stop_token_ids=["a"]), "stop_token_ids"),
    (dict(ignore_eos="yes"), "ignore_eos must be True or False"),
    (dict(logprobs=-1), r"logprobs must be None or an integer in \[0, 20\]"),
    (dict(logprobs=21), "logprobs"),
    (dict(n=0), r"n must be an integer in \[1, 128\]"),
    (dict(n=1000), "n must"),
])
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
    p = SamplingParams()  # validate() also catches fields changed after construction
    for k, v in kwargs.items():
        setattr(p, k, v)
    with pytest.raises(ValueError, match=match):
        p.validate()


def test_validation_accepts_edges_and_checks_vocab():
    SamplingParams(temperature=0, top_k=-1, top_p=1.0, min_p=1.0, presence_penalty=-2, frequency_penalty=2,
                   seed=2**64 - 1, stop=("a", "b"), logprobs=0, n=MAX_STOP_STRINGS)
    assert SamplingParams(stop="x").stop_strings == ["x"] and SamplingParams().stop_strings == []
    p = SamplingParams(stop_token_ids=[5, 99])
    with pytest.raises(ValueError, match="below the vocabulary size 50"):
        p.validate(vocab_size=50)
    assert p.validate(vocab_size=100) is p
