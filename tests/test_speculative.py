"""MTP speculative decoding: identical greedy output, exact sampling distribution, acceptance bookkeeping."""

import time

import pytest
import torch

import dsv3
from dsv3.engine.engine import EngineConfig, LLMEngine
from dsv3.engine.request import run_to_completion
from dsv3.engine.sampling import SamplingParams, SequenceSamplingState
from dsv3.engine.speculative import propose, propose_rows, target_probs, verify, verify_rows
from hf_ref import run_all

# Speculation at every batch size (the engine's default pauses drafting above a device-dependent batch size).
SPEC = dict(speculative="mtp", speculative_max_batch=0)


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    return dsv3.load_model(tiny_ckpt, dtype=torch.float32)


def prompts_for(vocab, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_identical_with_random_mtp(tiny_model, k):
    assert tiny_model.mtp_layers, "the tiny checkpoint has an MTP layer"
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompts = prompts_for(tiny_model.cfg.vocab_size)
    cfg = dict(num_blocks=256, block_size=8, max_num_batched_tokens=64)
    plain = run_all(LLMEngine(tiny_model, config=EngineConfig(speculative="off", **cfg)), prompts, params)
    spec_eng = LLMEngine(tiny_model, config=EngineConfig(**SPEC, num_draft_tokens=k, **cfg))
    spec = run_all(spec_eng, prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert spec_eng.stats["spec_drafted"] > 0
    assert spec_eng.cache.allocator.num_used == 0


def make_perfect_mtp(model):
    """Main model: next token depends only on the current token (attention and MLP outputs zeroed). MTP: the same
    function of the token it is given, so every draft is what the main model will say."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            mlp = layer.mlp
            if hasattr(mlp, "experts"):
                mlp.experts.down_proj.weight.zero_()
                if mlp.shared_experts is not None:
                    mlp.shared_experts.down_proj.weight.zero_()
            else:
                mlp.down_proj.weight.zero_()
        D = model.cfg.hidden_size
        for mtp in model.mtp_layers:  # every module: its output is the embedding of the token it is given
            mtp.eh_proj.weight.zero_()
            mtp.eh_proj.weight[:, :D] = torch.eye(D)
            mtp.enorm.weight.fill_(1.0)
            mtp.input_layernorm.weight.fill_(1.0)
            mtp.shared_head.norm.weight.copy_(model.model.norm.weight)
        model.model.layers[0].input_layernorm.weight.fill_(1.0)


def test_perfect_mtp_accepts_every_draft(tiny_ckpt):
    model = dsv3.load_model(tiny_ckpt, dtype=torch.float32)
    make_perfect_mtp(model)
    params = SamplingParams(max_tokens=13, temperature=0.0, ignore_eos=True)
    prompts = prompts_for(model.cfg.vocab_size, n=3)
    plain = run_all(LLMEngine(model, config=EngineConfig(speculative="off", num_blocks=64)), prompts, params)
    eng = LLMEngine(model, config=EngineConfig(**SPEC, num_draft_tokens=3, num_blocks=64))
    spec = run_all(eng, prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    s = eng.spec_stats()
    assert s["drafted"] > 0 and s["acceptance_rate"] == 1.0
    assert s["tokens_per_step"] == 4.0  # three accepted drafts + one token of the main model per step
    assert all(o.metrics["spec_acceptance"] == 1.0 for o in spec)
    assert all(o.metrics["spec_tokens_per_step"] == 4.0 for o in spec)  # per request too (13 = 1 + 3 x 4)


def test_max_tokens_and_stop_token_inside_an_accepted_run(tiny_ckpt):
    model = dsv3.load_model(tiny_ckpt, dtype=torch.float32)
    make_perfect_mtp(model)
    prompt = prompts_for(model.cfg.vocab_size, n=1)[0]
    eng_cfg = dict(num_blocks=64, num_draft_tokens=3)
    plain = run_all(LLMEngine(model, config=EngineConfig(speculative="off", **eng_cfg)), [prompt],
                    SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0].token_ids
    for max_tokens in (1, 2, 5, 6):
        out = run_all(LLMEngine(model, config=EngineConfig(**SPEC, **eng_cfg)), [prompt],
                      SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))[0]
        assert out.token_ids == plain[:max_tokens] and out.finish_reason == "length"
    stop_at = plain[4]
    first = plain.index(stop_at)
    eng = LLMEngine(model, config=EngineConfig(**SPEC, **eng_cfg))
    out = run_all(eng, [prompt], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                                stop_token_ids=[stop_at]))[0]
    assert out.token_ids == plain[:first + 1] and out.finish_reason == "stop"
    assert eng.cache.allocator.num_used == 0
    # EOS inside an accepted run: the same token as the model's end of sequence.
    eng = LLMEngine(model, config=EngineConfig(**SPEC, **eng_cfg))
    eng.eos_ids = {stop_at}
    out = run_all(eng, [prompt], SamplingParams(max_tokens=10, temperature=0.0))[0]
    assert out.token_ids == plain[:first + 1] and out.finish_reason == "stop"
    assert eng.spec_stats()["accepted"] > 0 and eng.cache.allocator.num_used == 0


def test_stop_string_inside_an_accepted_run(tiny_ckpt):
    from dsv3.tokenizer import Tokenizer

    model = dsv3.load_model(tiny_ckpt, dtype=torch.float32)
    make_perfect_mtp(model)
    tok = Tokenizer.from_pretrained(tiny_ckpt)
    prompt = prompts_for(model.cfg.vocab_size, n=1)[0]
    eng_cfg = dict(num_blocks=64, num_draft_tokens=3)
    plain = run_all(LLMEngine(model, tok, EngineConfig(speculative="off", **eng_cfg)), [prompt],
                    SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    stop = tok.decode(plain.token_ids[5:7])  # text of the 6th and 7th tokens: inside the second verified run
    assert stop and stop in plain.text
    eng = LLMEngine(model, tok, EngineConfig(**SPEC, **eng_cfg))
    out = run_all(eng, [prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == plain.text[:plain.text.index(stop)]
    assert out.token_ids == plain.token_ids[:len(out.token_ids)]
    assert eng.spec_stats()["accepted"] > 0 and eng.cache.allocator.num_used == 0


@pytest.mark.parametrize("path", ["kernels", "pytorch"])
def test_speculative_sampling_keeps_the_distribution(path, monkeypatch):
    """Chi-square: with a deliberately poor draft q, the first emitted token is distributed as p (through the C++
    kernels' acceptance and draws when they load here, and through the PyTorch reference)."""
    from dsv3.kernels import cpu_ext

    if path == "kernels" and cpu_ext.load() is None:
        pytest.skip("C++ CPU kernels unavailable")
    if path == "pytorch":
        monkeypatch.setattr(cpu_ext, "loaded", lambda: None)
    V = 6
    torch.manual_seed(0)
    target_logits = torch.tensor([1.5, 0.2, -0.3, 0.9, -1.0, 0.0])
    q = torch.tensor([0.02, 0.5, 0.3, 0.02, 0.1, 0.06])  # far from p
    params = SamplingParams(temperature=0.8, max_tokens=4, seed=123)
    state = SequenceSamplingState(params, [0], V)
    p = target_probs(target_logits[None], state)[0]
    n = 6000
    counts = torch.zeros(V)
    accepted = 0
    gen = torch.Generator().manual_seed(7)
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=gen))
        logits = torch.stack([target_logits, target_logits])  # [d+1, V]
        out = verify(logits, [x], [q], state)
        counts[out[0]] += 1
        accepted += len(out) == 2
    expected = p * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # 5 degrees of freedom: p = 0.001
    # Acceptance of a draft from q is sum_x min(p(x), q(x)).
    assert abs(accepted / n - float(torch.minimum(p, q).sum())) < 0.03


def test_seeded_sampling_reproduces_with_speculation(tiny_model):
    params = SamplingParams(max_tokens=15, temperature=0.9, top_p=0.9, seed=42, ignore_eos=True)
    prompts = prompts_for(tiny_model.cfg.vocab_size, n=3)
    cfg = EngineConfig(**SPEC, num_draft_tokens=2, num_blocks=128)
    a = run_all(LLMEngine(tiny_model, config=cfg), prompts, params)
    b = run_all(LLMEngine(tiny_model, config=cfg), list(reversed(prompts)), params)
    assert [o.token_ids for o in a] == [o.token_ids for o in reversed(b)]


def test_time_to_first_token_counts_the_mtp_pass_over_the_prompt(tiny_model, monkeypatch):
    """The MTP pass over a prompt runs after its first token is appended, and the caller gets that token only when
    the step ends: the reported time to first token (and the end of a request finishing in that step) count it."""
    eng = LLMEngine(tiny_model, config=EngineConfig(**SPEC, num_blocks=64))
    draft = eng._draft

    def slow_draft(*args):
        time.sleep(0.05)
        return draft(*args)

    monkeypatch.setattr(eng, "_draft", slow_draft)
    prompt = prompts_for(tiny_model.cfg.vocab_size, n=1)[0]
    first = []
    rid = eng.add_request(prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    one = eng.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while eng.has_unfinished():
        first += [o for o in eng.step() if len(o.token_ids) == 1]
    assert [o.request_id for o in first] == [rid, one]
    for o in first:
        assert o.metrics["time_to_first_token"] >= 0.05
    assert first[1].finished and first[1].metrics["elapsed"] >= 0.05
    assert eng.stats["spec_drafted"] > 0


def test_speculation_flags(tiny_ckpt, tmp_path):
    model = dsv3.load_model(tiny_ckpt, dtype=torch.float32, with_mtp=False)
    with pytest.raises(ValueError, match="needs MTP weights"):
        LLMEngine(model, config=EngineConfig(**SPEC, num_blocks=8))
    assert LLMEngine(model, config=EngineConfig(num_blocks=8)).num_draft == 0  # auto: off without MTP
    with pytest.raises(ValueError, match="speculative="):
        LLMEngine(model, config=EngineConfig(speculative="eagle", num_blocks=8))
    with pytest.raises(ValueError, match="num_draft_tokens"):
        LLMEngine(model, config=EngineConfig(num_draft_tokens=0, num_blocks=8))


def test_fused_greedy_drafting_on_the_cpu_kernels(tiny_ckpt, monkeypatch):
    # bf16 on the C++ kernels: steps draft in the verification step's own context (engine
    # _verify_and_draft_in_step). Output must equal plain decoding (the kernels are batch invariant), including
    # max_tokens and a stop token landing inside an accepted run.
    from dsv3.kernels import cpu_ext
    from dsv3.kernels.cpu_pack import prepack_for_cpu

    if cpu_ext.load() is None:
        pytest.skip("C++ CPU kernels unavailable")
    fused = []

    def counted(eng):
        f = eng._verify_and_draft_in_step

        def wrapper(*a):
            r = f(*a)
            fused.append(r is not None)
            return r
        monkeypatch.setattr(eng, "_verify_and_draft_in_step", wrapper)
        return eng

    for perfect, k in ((False, 1), (False, 3), (True, 1), (True, 2)):
        model = dsv3.load_model(tiny_ckpt, dtype=torch.bfloat16)
        if perfect:
            make_perfect_mtp(model)
        assert prepack_for_cpu(model) and model.cpu_kernels
        prompts = prompts_for(model.cfg.vocab_size, n=4)
        cfg = dict(num_blocks=128, block_size=8)
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        plain = run_all(LLMEngine(model, config=EngineConfig(speculative="off", **cfg)), prompts, params)
        fused.clear()
        eng = counted(LLMEngine(model, config=EngineConfig(**SPEC, num_draft_tokens=k, **cfg)))
        spec = run_all(eng, prompts, params)
        assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
        assert any(fused) and eng.cache.allocator.num_used == 0
        # The one-call C++ MTP passes (kept rows, recurrent drafts) propose exactly the drafts of the
        # module-by-module path (every row through the MTP block, logits in Python).
        assert model.cpu_mtp_draft is not None
        one_call, model.cpu_mtp_draft = model.cpu_mtp_draft, None
        eng2 = LLMEngine(model, config=EngineConfig(**SPEC, num_draft_tokens=k, **cfg))
        spec2 = run_all(eng2, prompts, params)
        model.cpu_mtp_draft = one_call
        assert [o.token_ids for o in spec2] == [o.token_ids for o in spec]
        assert eng2.spec_stats()["drafted"] == eng.spec_stats()["drafted"]
        assert eng2.spec_stats()["accepted"] == eng.spec_stats()["accepted"]
        if perfect:
            assert eng.spec_stats()["acceptance_rate"] > 0.9
            want = plain[0].token_ids
            for max_tokens in (1, 2, 5):
                out = run_all(LLMEngine(model, config=EngineConfig(**SPEC, num_draft_tokens=1, **cfg)),
                              [prompts[0]], SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                           ignore_eos=True))[0]
                assert out.token_ids == want[:max_tokens] and out.finish_reason == "length"
            stop_at = want[4]
            out = run_all(LLMEngine(model, config=EngineConfig(**SPEC, num_draft_tokens=1, **cfg)),
                          [prompts[0]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                       stop_token_ids=[stop_at]))[0]
            assert out.token_ids == want[:want.index(stop_at) + 1] and out.finish_reason == "stop"


@pytest.mark.parametrize("chunk", [64, 7])  # whole prompt in one step, or prefilled in chunks of 7
def test_prompt_drafting_stores_every_mtp_latent_and_drafts_from_the_last_row(tiny_model, chunk):
    # After a prompt, only its last row drafts: the other rows skip the MTP block's attention, FFN and head and only
    # store their latents. Both must equal a full MTP pass over the whole prompt (no cache), and the recurrent
    # second draft a pass that takes the first MTP output as the next position's hidden state.
    m = tiny_model
    prompt = prompts_for(m.cfg.vocab_size, n=1, seed=3)[0] + [7] * 20  # 23..62 tokens
    eng = LLMEngine(m, config=EngineConfig(**SPEC, num_draft_tokens=2, num_blocks=64, block_size=8,
                                           max_num_batched_tokens=chunk))
    eng.add_request(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    while not eng.scheduler.running or not eng.scheduler.running[0].output_ids:
        eng.step()
    seq = eng.scheduler.running[0]
    L = len(prompt)
    first = seq.output_ids[0]
    with torch.no_grad():
        ids = torch.tensor([prompt])
        h = m.hidden_states(ids)  # [1, L, D]
        assert int(m.logits(h[0, -1]).argmax()) == first
        next_ids = torch.tensor([prompt[1:] + [first]])
        logits, h_mtp = m.mtp(1, h, next_ids)  # [1, L, V], [1, L, D]
        d1 = int(logits[0, -1].argmax())
        # The second draft: MTP module 1 again, one position further, on its own output and the first draft.
        logits2, _ = m.mtp(1, torch.cat([h, h_mtp[:, -1:]], dim=1), torch.tensor([prompt[1:] + [first, d1]]))
        assert seq.draft == [d1, int(logits2[0, -1].argmax())]
        layer = m.mtp_layers[0]
        cos, sin = m.rotary.cos_sin(torch.arange(L)[None])
        _, _, c_kv, k_pe = layer.self_attn.latents(layer.input_layernorm(m._mtp_input(layer, h, next_ids)), cos, sin)
        want = torch.cat([c_kv, k_pe], dim=-1)[0]  # [L, C+R]
        got = eng.cache.kv[layer.layer_idx][eng.runner.slots(seq, 0, L)]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # The second draft's pass left its latents at position L (its own), from the first MTP output and d1.
        cos, sin = m.rotary.cos_sin(torch.tensor([[L]]))
        x2 = m._mtp_input(layer, h_mtp[:, -1:], torch.tensor([[d1]]))
        _, _, c_kv, k_pe = layer.self_attn.latents(layer.input_layernorm(x2), cos, sin)
        got = eng.cache.kv[layer.layer_idx][eng.runner.slots(seq, L, L + 1)]
        torch.testing.assert_close(got, torch.cat([c_kv, k_pe], dim=-1)[0], atol=1e-5, rtol=1e-5)


def test_batched_verification_and_drafting_draw_what_each_sequence_draws_alone():
    # Seeded sequences with different settings (one greedy), 0-2 drafts each: one batched call gives every
    # sequence exactly the tokens (and draft distributions) it gets alone, so seeded output does not depend on
    # which other sequences share the step.
    V = 40
    g = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=0.9, seed=1), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.3, top_k=8, seed=2), SamplingParams(temperature=0.7, top_p=0.8, seed=3)]
    n_drafts = [2, 1, 0, 2]

    def states():
        return [SequenceSamplingState(p, [0], V) for p in params]

    for trial in range(20):
        mtp_logits = torch.randn(len(params), V, generator=g) * 2
        alone = [propose(mtp_logits[i], st) for i, st in enumerate(states())]
        toks, qs = propose_rows(mtp_logits, states())
        assert toks == [t for t, _ in alone]
        assert all((q is None and a is None) or torch.equal(q, a) for q, (_, a) in zip(qs, alone))
        drafts = [torch.randint(0, V, (d,), generator=g).tolist() for d in n_drafts]
        qs = [[torch.softmax(torch.randn(V, generator=g), -1) for _ in d] for d in drafts]
        logits = [torch.randn(d + 1, V, generator=g) * 2 for d in n_drafts]
        want = [verify(lg, d, q, st) for lg, d, q, st in zip(logits, drafts, qs, states())]
        got = verify_rows(torch.cat(logits), drafts, qs, states())
        assert got == want, trial
        assert all(1 <= len(t) <= d + 1 for t, d in zip(got, n_drafts))


@pytest.mark.parametrize("rows", ["filters", "temperatures"])
def test_sampled_drafting_in_the_step_draws_what_the_module_path_draws(tiny_ckpt, monkeypatch, rows):
    # Sampled (and mixed greedy/sampled) batches on the C++ kernels verify and draft in the step's own context:
    # with top-k/top-p rows the MTP logits come from the one-call C++ pass and drafts are drawn after the step;
    # with temperature-only rows the call draws them itself (uniforms taken beforehand only from sequences that
    # will draft: different max_tokens end the drafting of some). With seeds, every token and every acceptance
    # equals the module-by-module path's (same distributions, same draws from each sequence's generator).
    from dsv3.kernels import cpu_ext
    from dsv3.kernels.cpu_pack import prepack_for_cpu

    if cpu_ext.load() is None:
        pytest.skip("C++ CPU kernels unavailable")
    model = dsv3.load_model(tiny_ckpt, dtype=torch.bfloat16)
    assert prepack_for_cpu(model) and model.cpu_kernels
    prompts = prompts_for(model.cfg.vocab_size, n=4, seed=5)
    if rows == "filters":
        params = [SamplingParams(max_tokens=14, temperature=0.9, seed=1, ignore_eos=True),
                  SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True),
                  SamplingParams(max_tokens=14, temperature=1.2, top_k=20, seed=2, ignore_eos=True),
                  SamplingParams(max_tokens=14, temperature=0.7, top_p=0.9, seed=3, ignore_eos=True)]
    else:
        params = [SamplingParams(max_tokens=n, temperature=t, seed=s, ignore_eos=True)
                  for n, t, s in ((14, 0.9, 1), (9, 0.0, None), (6, 1.3, 2), (11, 0.6, 3))]
    for k in (1, 2):
        cfg = EngineConfig(**SPEC, num_draft_tokens=k, num_blocks=128,
                           block_size=8)
        eng = LLMEngine(model, config=cfg)
        in_step = []
        f = eng._verify_and_draft_in_step
        monkeypatch.setattr(eng, "_verify_and_draft_in_step", lambda *a: in_step.append(f(*a)) or in_step[-1])
        got = run_to_completion(eng, prompts, params)
        assert any(r is not None for r in in_step)
        drawn_in_call = any(r is not None and r.q is not None for r in in_step)  # (q from the call)
        assert drawn_in_call == (rows == "temperatures")
        one_call, model.cpu_mtp_draft = model.cpu_mtp_draft, None
        try:
            ref_eng = LLMEngine(model, config=cfg)
            want = run_to_completion(ref_eng, prompts, params)
        finally:
            model.cpu_mtp_draft = one_call
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert eng.spec_stats()["drafted"] == ref_eng.spec_stats()["drafted"] > 0
        assert eng.spec_stats()["accepted"] == ref_eng.spec_stats()["accepted"]


def test_generate_command_reports_acceptance_and_tokens_per_step(tiny_ckpt, capsys):
    import json

    from dsv3.cli import main

    assert main(["generate", "--model", str(tiny_ckpt), "--max-tokens", "12", "--temperature", "0", "hello"]) == 0
    err = capsys.readouterr().err  # the summary line goes to stderr, the text to stdout
    assert "MTP drafts accepted" in err and "tokens per step" in err
    assert main(["generate", "--model", str(tiny_ckpt), "--max-tokens", "12", "--temperature", "0", "--json",
                 "hello"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert 0 <= row["spec_acceptance"] <= 1 and 1 <= row["spec_tokens_per_step"] <= 2  # one draft per step


# ---- several MTP modules: DeepSeek's chain -------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_module_ckpt(tmp_path_factory):
    from dsv3.tiny import write_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny2") / "ckpt"
    write_tiny_checkpoint(path, num_nextn_predict_layers=2)
    return path


def chain_reference(m, tokens, k):
    """What a D = 2 model drafts after `tokens` (the last one just chosen, p = len - 2 the last verified position),
    from cache-free passes as in training: module 1 over positions 0..p on the main hidden states and tokens
    1..p+1; module 2 over 0..p on module 1's outputs and tokens 2..p+1, then draft 1 at p; with k = 3 module 2 once
    more at p+1 on its own output at p and draft 2. Returns (drafts, module 2's latents at 0..p [p+1, C+R])."""
    p = len(tokens) - 2
    h0 = m.hidden_states(torch.tensor([tokens[:p + 1]]))
    lg1, h1 = m.mtp(1, h0, torch.tensor([tokens[1:p + 2]]))
    d1 = int(lg1[0, -1].argmax())
    nxt2 = torch.tensor([tokens[2:p + 2] + [d1]])
    lg2, h2 = m.mtp(2, h1, nxt2)
    drafts = [d1, int(lg2[0, -1].argmax())]
    if k >= 3:
        lg3, _ = m.mtp(2, torch.cat([h1, h2[:, -1:]], 1), torch.tensor([tokens[2:p + 2] + drafts]))
        drafts.append(int(lg3[0, -1].argmax()))
    layer = m.mtp_layers[1]
    cos, sin = m.rotary.cos_sin(torch.arange(p + 1)[None])
    _, _, c_kv, k_pe = layer.self_attn.latents(layer.input_layernorm(m._mtp_input(layer, h1, nxt2)), cos, sin)
    return drafts, torch.cat([c_kv, k_pe], dim=-1)[0]


@pytest.mark.parametrize("k, chunk, first_perfect", [(2, 64, False), (3, 64, False), (2, 8, False), (2, 64, True),
                                                     (3, 64, True)])
def test_two_modules_draft_as_the_training_chain(two_module_ckpt, k, chunk, first_perfect):
    # Module 2 works at the last verified position on module 1's output there and the next token (draft 1 at the
    # newest position), attending its own cache layer, whose entries at verified positions must hold what a
    # cache-free chain pass computes (not left-overs from draft time); a third draft runs module 2 recurrently.
    # Checked after the prompt (chunked or whole) and after every decode step: with random modules (drafts
    # rejected), and with a perfect model whose module 2 is random again (draft 1 accepted, the others not: steps
    # verify two positions).
    m = dsv3.load_model(two_module_ckpt, dtype=torch.float32)
    if first_perfect:
        make_perfect_mtp(m)
        with torch.no_grad():
            m.mtp_layers[1].eh_proj.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    eng = LLMEngine(m, config=EngineConfig(**SPEC, num_draft_tokens=k, num_blocks=64, block_size=8,
                                           max_num_batched_tokens=chunk))
    assert eng.chain == 2
    prompt = prompts_for(m.cfg.vocab_size, n=1, seed=5)[0] + [9] * 12
    eng.add_request(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    checked = 0
    while eng.has_unfinished():
        eng.step()
        seq = eng.scheduler.running[0] if eng.scheduler.running else None
        if seq is None or len(seq.draft) < k:
            continue
        with torch.no_grad():
            drafts, latents = chain_reference(m, seq.tokens, k)
        assert seq.draft == drafts, (len(seq.tokens), seq.draft, drafts)
        p = seq.num_tokens - 2
        got = eng.cache.kv[m.mtp_layers[1].layer_idx][eng.runner.slots(seq, 0, p + 1)]
        torch.testing.assert_close(got, latents, atol=1e-4, rtol=1e-4)
        checked += 1
    assert checked >= 5
    s = eng.spec_stats()
    assert (s["accepted"] > 0) == first_perfect


@pytest.mark.parametrize("k", [2, 3])
def test_two_modules_keep_greedy_output_and_perfect_ones_accept_everything(two_module_ckpt, k):
    m = dsv3.load_model(two_module_ckpt, dtype=torch.float32)
    params = SamplingParams(max_tokens=17, temperature=0.0, ignore_eos=True)
    prompts = prompts_for(m.cfg.vocab_size, n=4, seed=2)
    cfg = dict(num_blocks=128, block_size=8, max_num_batched_tokens=64)
    plain = run_all(LLMEngine(m, config=EngineConfig(speculative="off", **cfg)), prompts, params)
    eng = LLMEngine(m, config=EngineConfig(**SPEC, num_draft_tokens=k, **cfg))
    assert [o.token_ids for o in run_all(eng, prompts, params)] == [o.token_ids for o in plain]
    assert eng.stats["spec_drafted"] > 0 and eng.cache.allocator.num_used == 0
    # a cache so small that sequences are preempted and recomputed (the chain's saved outputs go stale then)
    small = dict(cfg, num_blocks=14)
    eng = LLMEngine(m, config=EngineConfig(**SPEC, num_draft_tokens=k, **small))
    assert [o.token_ids for o in run_all(eng, prompts, params)] == [o.token_ids for o in plain]
    assert eng.scheduler.num_preemptions > 0 and eng.cache.allocator.num_used == 0
    # drafting paused while more than 2 sequences run (the chain's modules still finalise their entries meanwhile)
    plist = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (17, 6, 17, 4)]
    want = run_to_completion(LLMEngine(m, config=EngineConfig(speculative="off", **cfg)), prompts, plist)
    eng = LLMEngine(m, config=EngineConfig(speculative="mtp", speculative_max_batch=2, num_draft_tokens=k, **cfg))
    assert [o.token_ids for o in run_to_completion(eng, prompts, plist)] == [o.token_ids for o in want]
    assert eng.stats["spec_drafted"] > 0 and eng.cache.allocator.num_used == 0
    make_perfect_mtp(m)
    plain = run_all(LLMEngine(m, config=EngineConfig(speculative="off", **cfg)), prompts, params)
    eng = LLMEngine(m, config=EngineConfig(**SPEC, num_draft_tokens=k, **cfg))
    assert [o.token_ids for o in run_all(eng, prompts, params)] == [o.token_ids for o in plain]
    s = eng.spec_stats()
    assert s["acceptance_rate"] == 1.0 and s["drafted"] > 0


@pytest.mark.parametrize("path", ["pytorch", "kernels"])
def test_drafting_pauses_above_max_batch_and_keeps_every_mtp_latent(tiny_model, tiny_ckpt, path):
    # speculative_max_batch=2: while three sequences run, the greedy ones verify no drafts (plain decode rows) but
    # still store their MTP latents, so once the others finish, sequence A drafts again over a complete MTP cache
    # layer (every entry equal to a cache-free MTP pass); the seeded sampled one drafts throughout, so its output
    # does not depend on the load. Greedy output equals plain decoding's. "kernels": the bf16 model on the C++
    # kernels, whose MTP pass then runs for the drafting rows only (latents only when none drafts).
    m, tol = tiny_model, 1e-5
    if path == "kernels":  # (bf16 rounding through 4 layers: ~1% per position, 10% at one; a missing entry ~1)
        from dsv3.kernels import cpu_ext
        from dsv3.kernels.cpu_pack import prepack_for_cpu

        if cpu_ext.load() is None:
            pytest.skip("C++ CPU kernels unavailable")
        m, tol = dsv3.load_model(tiny_ckpt, dtype=torch.bfloat16), 0.25
        assert prepack_for_cpu(m) and m.cpu_kernels
    pa, pb, pc = prompts_for(m.cfg.vocab_size, n=3, seed=4)
    greedy_a = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    greedy_b = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=5, temperature=0.9, seed=3, ignore_eos=True)
    eng = LLMEngine(m, config=EngineConfig(speculative="mtp", speculative_max_batch=2, num_blocks=64, block_size=8))
    assert eng.spec_stats()["max_batch"] == 2
    ids = [eng.add_request(p, sp) for p, sp in ((pa, greedy_a), (pb, greedy_b), (pc, seeded))]
    a, c = eng.seqs[ids[0]], eng.seqs[ids[2]]
    paused = drafted_alone = 0
    while not a.is_finished:
        eng.step()
        if eng._spec_paused:
            paused += 1
            assert not a.draft
            assert c.is_finished or c.draft or eng._draft_room(c) <= 0 or not c.output_ids
        elif a.draft:
            drafted_alone += 1
        if len(a.output_ids) == 12:  # A alone by now; its MTP cache layer against a cache-free pass
            assert len(eng.scheduler.running) == 1
            n = a.num_computed
            toks = torch.tensor([a.tokens[:n + 1]])
            layer = m.mtp_layers[0]
            with torch.no_grad():
                h = m.hidden_states(toks[:, :n])
                cos, sin = m.rotary.cos_sin(torch.arange(n)[None])
                x = layer.input_layernorm(m._mtp_input(layer, h, toks[:, 1:]))
                _, _, c_kv, k_pe = layer.self_attn.latents(x, cos, sin)
            got = eng.cache.kv[layer.layer_idx][eng.runner.slots(a, 0, n)]
            want = torch.cat([c_kv, k_pe], dim=-1)[0].float()
            err = (got.float() - want).norm(dim=-1) / want.norm(dim=-1)  # per position: a missing entry is ~1
            assert err.max() < tol, err
    assert paused >= 3 and drafted_alone >= 2
    plain = LLMEngine(m, config=EngineConfig(speculative="off", num_blocks=64, block_size=8))
    want = run_to_completion(plain, [pa, pb], [greedy_a, greedy_b])
    assert a.output_ids == want[0].token_ids
    # speculative_max_batch=1 with two greedy sequences: steps where nobody drafts (latents only, no MTP row)
    eng = LLMEngine(m, config=EngineConfig(speculative="mtp", speculative_max_batch=1, num_blocks=64, block_size=8))
    assert [o.token_ids for o in run_to_completion(eng, [pa, pb], [greedy_a, greedy_b])] == \
        [o.token_ids for o in want]
    assert eng.spec_stats()["drafted"] > 0  # (A alone at the end)
    with pytest.raises(ValueError, match="speculative_max_batch must be -1"):
        LLMEngine(m, config=EngineConfig(speculative="mtp", speculative_max_batch=-2, num_blocks=8))
    assert LLMEngine(m, config=EngineConfig(num_blocks=8)).spec_max_batch == 2  # the CPU's default


def test_a_long_pause_stops_speculation_instead_of_holding_its_backlog(tiny_model, monkeypatch):
    # A paused sequence keeps one hidden state per position for its deferred MTP latents; past MTP_BACKLOG_LIMIT
    # of them it stops speculating (and frees them): no drafts afterwards, output unchanged.
    import dsv3.engine.spec_draft as engine_module

    monkeypatch.setattr(engine_module, "MTP_BACKLOG_LIMIT", 6)
    m = tiny_model
    pa, pb = prompts_for(m.cfg.vocab_size, n=2, seed=6)
    pa = pa[:4]  # a short prompt, so the limit is crossed while decoding
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (16, 12)]
    eng = LLMEngine(m, config=EngineConfig(speculative="mtp", speculative_max_batch=1, num_blocks=64, block_size=8))
    ids = [eng.add_request(p, sp) for p, sp in zip((pa, pb), params)]
    a = eng.seqs[ids[0]]
    while not a.is_finished and a.extra["speculate"]:
        eng.step()
        assert a.extra.get("mtp_backlog_rows", 0) <= 6
    assert not a.extra["speculate"] and "mtp_backlog" not in a.extra and not a.is_finished
    drafted = a.extra["spec"][0]
    while eng.has_unfinished():  # B finishes first; A, alone then, still does not draft
        eng.step()
        assert not a.draft
    assert a.extra["spec"][0] == drafted
    plain = run_to_completion(LLMEngine(m, config=EngineConfig(speculative="off", num_blocks=64, block_size=8)),
                              [pa, pb], params)
    assert a.output_ids == plain[0].token_ids
