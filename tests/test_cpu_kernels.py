"""The C++ CPU kernels (dsv3/kernels/csrc/cpu_kernels.cpp) against the PyTorch implementations they replace."""
import copy
import gc

import pytest
import torch

from dsv3 import ModelConfig
from dsv3.kernels import cpu_ext
from dsv3.kernels.cpu_pack import CpuBlocks, available, prepack_for_cpu
from dsv3.model import build_model
from dsv3.model.layers import RMSNorm
from dsv3.model.mla import MLA
from dsv3.model.moe import MoE, CpuMoE
from dsv3.model.rope import RotaryEmbedding
from hf_ref import YARN, v2, v3

OPS = cpu_ext.load()
pytestmark = pytest.mark.skipif(OPS is None, reason=f"C++ CPU kernels unavailable: {cpu_ext.unsupported_reason()}")
BF = torch.bfloat16


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("dtype", [BF, torch.float32])
def test_argmax_rows_is_torchs_first_maximum_with_nan_as_maximum(dtype):
    from dsv3.engine.sampling import argmax_rows

    t = torch.randn(6, 4099).to(dtype)  # a length that leaves a tail after the 16-lane blocks
    t[1, 17], t[1, 3000] = float("nan"), float("nan")  # the first NaN wins
    t[2, :] = -float("inf")  # all equal: the first index
    t[3, 5] = t[3, 4098] = t[3].max() + 1  # a tie: the first of the two
    t[4, 4097] = 100.0  # the maximum in the tail
    t[5, 4098] = float("nan")  # a NaN in the tail only
    want = [t[0].float().argmax().item(), 17, 0, 5, 4097, 4098]
    assert OPS.argmax_rows(t).tolist() == t.argmax(-1).tolist() == want
    assert OPS.argmax_rows(t[:, 2:]).tolist() == t[:, 2:].argmax(-1).tolist()  # strided rows
    assert argmax_rows(t).tolist() == want  # the sampler's entry point (the kernels are loaded here)
    short = torch.randn(3, 7).to(dtype)
    assert OPS.argmax_rows(short).tolist() == short.argmax(-1).tolist()
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        OPS.argmax_rows(torch.randn(2, 8).double())


def test_inverse_cdf_draw_kernel_matches_the_reference_bit_for_bit():
    from dsv3.engine.sampling import draw_inverse_cdf_reference

    gen = torch.Generator().manual_seed(0)
    for trial, (B, V) in enumerate([(1, 4096), (3, 4099), (2, 129280), (4, 7)] * 6):
        probs = torch.rand(B, V, generator=gen) ** 8  # peaked, unnormalised
        if trial % 3 == 0:
            probs[:, V // 2:] = 0  # a zero-mass tail (never drawn)
        if trial % 4 == 1:
            probs = (torch.randn(B, V, generator=gen) * 4).softmax(-1)
        u = torch.rand(B, generator=gen)
        if trial % 5 == 0:
            u[0] = 1 - 2.0 ** -24  # the largest float32 below 1
        assert torch.equal(OPS.draw_inverse_cdf(probs, u), draw_inverse_cdf_reference(probs, u)), trial
    with pytest.raises(RuntimeError, match="float32"):
        OPS.draw_inverse_cdf(torch.rand(2, 5).double(), torch.rand(2))
    with pytest.raises(RuntimeError, match=r"u must be a CPU float32 \[2\]"):
        OPS.draw_inverse_cdf(torch.rand(2, 5), torch.rand(3))


@pytest.mark.parametrize("dtype", [BF, torch.float32])
def test_tempered_softmax_matches_torch_to_a_few_ulp(dtype):
    from dsv3.engine.sampling import tempered_softmax

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 4099, generator=gen) * 6).to(dtype)  # a tail after the 16-lane blocks
    x[1, ::3] = -float("inf")  # masked tokens (top-k/top-p/min-p) get exactly 0
    x[2, 4098] = 80.0  # the maximum in the tail
    x[3, 1:] = -float("inf")  # one token left
    for t in (0.3, 0.7, 1.0, 1.7):
        got, want = OPS.tempered_softmax(x, t), (x.float() / t).softmax(-1)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-12)
        assert (got[1, ::3] == 0).all() and got[3, 0] == 1 and (got[3, 1:] == 0).all()
        assert torch.equal(tempered_softmax(x, t), got)  # the samplers' entry point (the kernels are loaded here)
    assert torch.equal(OPS.tempered_softmax(x[:3, 3:], 0.7), OPS.tempered_softmax(x[:3, 3:].contiguous(), 0.7))
    with pytest.raises(RuntimeError, match="temperature 0 must be finite and > 0"):
        OPS.tempered_softmax(x, 0.0)
    with pytest.raises(RuntimeError, match="no finite logit"):
        OPS.tempered_softmax(torch.full((1, 8), -float("inf")), 1.0)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        OPS.tempered_softmax(x.double(), 1.0)


def test_speculative_accept_kernel_matches_the_reference_bit_for_bit():
    from dsv3.engine.speculative import accept_and_draw_reference

    gen = torch.Generator().manual_seed(1)
    outcomes = set()
    for trial in range(60):
        V = (7, 300, 4099)[trial % 3]
        counts = [int(c) for c in torch.randint(0, 4, (1 + trial % 4,), generator=gen)]
        n, D = sum(counts) + len(counts), sum(counts)
        sharp = 1 + trial % 5  # from flat to peaked distributions, so drafts are kept and rejected
        p = (torch.randn(n, V, generator=gen) * sharp).softmax(-1)
        qs = list((torch.randn(D, V, generator=gen) * sharp).softmax(-1))
        drafts = [int(torch.multinomial(q, 1, generator=gen)) for q in qs]
        if trial % 6 == 0 and D:  # a draft distribution equal to its row's p: an all-zero residual, drawn from p
            rows = [r for s, d in enumerate(counts) for r in range(sum(counts[:s]) + s, sum(counts[:s]) + s + d)]
            qs[0] = p[rows[0]].clone()
        u = torch.rand(n, generator=gen)
        if trial % 7 == 0:
            u[0] = 0.0
        got = OPS.speculative_accept(p, qs, drafts, counts, u)
        want = accept_and_draw_reference(p, qs, drafts, counts, u)
        assert tuple(got) == want, trial
        outcomes.update((a == d) for a, d in zip(want[0], counts) if d)
    assert outcomes == {True, False}  # both every draft kept and a rejection were exercised
    p, q = torch.rand(3, 5).softmax(-1), list(torch.rand(2, 5).softmax(-1))
    with pytest.raises(RuntimeError, match="2 drafts need 3 rows of p and 2 drafts, got 3 and 1"):
        OPS.speculative_accept(p, q[:1], [1], [2], torch.rand(3))
    with pytest.raises(RuntimeError, match="1 drafts but 2 draft distributions"):
        OPS.speculative_accept(p, q, [1], [2], torch.rand(3))
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        OPS.speculative_accept(p, q, [1, 9], [2], torch.rand(3))
    with pytest.raises(RuntimeError, match="one per row of p"):
        OPS.speculative_accept(p, q, [1, 2], [2], torch.rand(2))


def test_rms_norm_is_bit_identical_to_the_module():
    norm = RMSNorm(64, 1e-6)
    norm.weight.data = torch.randn(64)
    norm = norm.to(BF)
    x = torch.randn(9, 80).to(BF)[:, 3:67]  # strided rows, like a slice of a fused projection
    want = norm(x)
    norm.cpu_ops = OPS
    assert torch.equal(norm(x), want)
    assert torch.equal(norm(x[None]), want[None])  # leading dims are flattened and restored


@pytest.mark.parametrize("shape", [(352, 512), (40, 63), (17, 130)])  # fused projection, odd width, odd rows
def test_linear_matches_torch(shape):
    from dsv3.kernels.cpu_pack import KernelWeight

    R, D = shape
    w = (torch.randn(R, D) * 0.1).to(BF)
    lin = KernelWeight(OPS, OPS.pack(w), R)
    for T in (1, 5, 6, 13, 50):  # tails of the 6-row tiles and of the 48-row token chunks
        x = torch.randn(T, D + 3).to(BF)[:, 2:D + 2]  # strided rows
        want = torch.nn.functional.linear(x.float(), w.float())
        got = lin(x)
        assert got.dtype == BF and got.shape == (T, R)
        assert rel_err(got, want) < 4e-3  # float32 sums, one bf16 rounding
        assert torch.equal(lin(x[None])[0], got)  # leading dims


MOE_CASES = {
    "v3 groups+bias": v3(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2),
    "v3 odd sizes": v3(hidden_size=63, moe_intermediate_size=33, n_routed_experts=8),
    "v2 softmax greedy": v2(n_routed_experts=16, num_experts_per_tok=3, n_shared_experts=2),
    "v2 group-limited": v2(topk_method="group_limited_greedy", n_group=4, topk_group=2, n_routed_experts=16,
                           num_experts_per_tok=3, norm_topk_prob=True, routed_scaling_factor=16.0),
    "no shared experts": v3(n_shared_experts=None),
    "40 experts, router split in 16s": v3(hidden_size=2048, moe_intermediate_size=32, n_routed_experts=40,
                                          num_experts_per_tok=6, n_group=8, topk_group=4),
}


@pytest.mark.parametrize("case", list(MOE_CASES))
@pytest.mark.parametrize("gate_dtype", [torch.float32, BF])
def test_moe_matches_the_pytorch_layer(case, gate_dtype):
    cfg = ModelConfig.from_dict(MOE_CASES[case])
    moe = MoE(cfg)
    for p in moe.parameters():
        p.data.normal_(0, 0.05)
    if moe.gate.e_score_correction_bias is not None:
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
    moe = moe.to(BF)
    moe.gate.weight.data = moe.gate.weight.data.to(gate_dtype)
    moe.gate.e_score_correction_bias = (None if moe.gate.e_score_correction_bias is None
                                        else moe.gate.e_score_correction_bias.float())
    kernel = CpuMoE(OPS, moe, cfg)
    with torch.no_grad():
        for T in (1, 4, 7, 33):  # one token, a full tile, a tile plus a remainder, several tiles
            x = torch.randn(T, cfg.hidden_size).to(BF)
            want = moe(x)
            got = kernel(x)
            assert got.dtype == BF and got.shape == want.shape
            # Same routing and the same bf16 roundings; only the order of the float32 sums differs.
            assert rel_err(got, want) < 4e-3, (case, T)


def _mla_setup(q_lora):
    cfg = ModelConfig.from_dict(v3(q_lora_rank=q_lora, rope_scaling=YARN))
    mla = MLA(cfg, 0)
    for p in mla.parameters():
        p.data.normal_(0, 0.2)
    for n in (getattr(mla, "q_a_layernorm", None), mla.kv_a_layernorm):
        if n is not None:
            n.weight.data = 1 + 0.1 * torch.randn_like(n.weight)
    return cfg, mla.to(BF)


@pytest.mark.parametrize("q_lora", [32, None])
def test_mla_prepare_and_decode_match_the_reference_attention(q_lora):
    cfg, mla = _mla_setup(q_lora)
    rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim)
    W, S = cfg.kv_lora_rank + cfg.qk_rope_head_dim, 256
    cache = (torch.randn(S, W) * 0.5).to(BF)
    # Three sequences with cached contexts of 5, 17 and 40 tokens; they compute 1, 3 and 2 new tokens.
    ctx_lens, new = [5, 17, 40], [1, 3, 2]
    perm = torch.randperm(S)
    tables, used = [], 0
    for L, n in zip(ctx_lens, new):
        tables.append(perm[used:used + L + n])
        used += L + n
    Lm = max(len(t) for t in tables)
    slots = torch.zeros(len(tables), Lm, dtype=torch.long)
    for i, t in enumerate(tables):
        slots[i, :len(t)] = t
    tok, seq, lens, pos, slot_map = [], [], [], [], []
    for i, (L, n) in enumerate(zip(ctx_lens, new)):
        for j in range(n):
            tok.append(len(tok))
            seq.append(i)
            lens.append(L + j + 1)
            pos.append(L + j)
            slot_map.append(tables[i][L + j].item())
    T = len(tok)
    x = torch.randn(1, T, cfg.hidden_size).to(BF)
    cos, sin = rotary.cos_sin(torch.tensor(pos)[None])
    with torch.no_grad():
        # Reference: the module's own latents, written to a copy of the cache, attended in float32 per query.
        q_nope, q_pe, c_kv, k_pe = mla.latents(x, cos, sin)
        ref_cache = cache.clone()
        ref_cache[torch.tensor(slot_map)] = torch.cat([c_kv[0], k_pe[0]], dim=-1)
        f32 = copy.deepcopy(mla).float()
        want = []
        for i in range(T):
            ctx = ref_cache[slots[seq[i], :lens[i]]].float()[None]
            want.append(f32.attend("naive", q_nope[:, i:i + 1].float(), q_pe[:, i:i + 1].float(),
                                   ctx[..., :cfg.kv_lora_rank], ctx[..., cfg.kv_lora_rank:], None)[0, 0])
        want = torch.stack(want)  # [T, H, V]
        # Kernels: the same projections, then prepare (rotary, norm, cache write) and decode.
        x2 = x[0]
        q = mla.q_b_proj(mla.q_a_layernorm(mla.q_a_proj(x2))) if q_lora else mla.q_proj(x2)
        q = q.view(T, cfg.num_attention_heads, -1).contiguous()
        kv_a = mla.kv_a_proj_with_mqa(x2)
        got_cache = cache.clone()
        OPS.mla_prepare(q, kv_a, mla.kv_a_layernorm.weight, mla.kv_a_layernorm.eps, cos[0].contiguous(),
                        sin[0].contiguous(), got_cache, torch.tensor(slot_map), mla.nope)
        assert torch.equal(got_cache, ref_cache)  # same rounding as the module's norm and rotary
        assert torch.equal(q[..., mla.nope:], q_pe[0])  # queries rotated in place
        out = torch.empty(T, cfg.num_attention_heads, cfg.v_head_dim, dtype=BF)
        OPS.mla_decode(q, got_cache, torch.tensor(tok), torch.tensor(seq), torch.tensor(lens), slots,
                       mla.kv_b_proj.weight, cfg.v_head_dim, mla.softmax_scale, out)
    assert rel_err(out, want) < 1e-2  # float32 inside, one bf16 rounding at the end


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(RuntimeError, match="pack: expects a bfloat16"):
        OPS.pack(torch.randn(4, 4))
    with pytest.raises(RuntimeError, match="rms_norm: x must be bfloat16"):
        OPS.rms_norm(torch.randn(2, 8), torch.ones(8, dtype=BF), 1e-6)
    cfg, mla = _mla_setup(32)
    H, W = cfg.num_attention_heads, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    q = torch.zeros(1, H, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, dtype=BF)
    out = torch.empty(1, H, cfg.v_head_dim, dtype=BF)
    one = torch.tensor([0])
    with pytest.raises(RuntimeError, match="slot outside the cache"):
        OPS.mla_decode(q, torch.zeros(8, W, dtype=BF), one, one, torch.tensor([1]), torch.tensor([[99]]),
                       mla.kv_b_proj.weight, cfg.v_head_dim, 1.0, out)
    with pytest.raises(RuntimeError, match="moe: w13 .* is not a packed"):
        OPS.moe(torch.zeros(1, 64, dtype=BF), torch.zeros(8, 64), None, 2, 1, 1, 0, False, True, 1.0,
                torch.zeros(8, 3, 32, 16, 2, dtype=BF), torch.zeros(8, 4, 16, 16, 2, dtype=BF), 32, None, None, 0)


def test_prepack_hands_moe_norms_and_attention_to_the_kernels_and_drops_plain_weights():
    model = build_model(ModelConfig.from_dict(v3()), "cpu", BF).eval()
    assert prepack_for_cpu(model)
    assert model.cpu_kernels
    moe = model.model.layers[1].mlp
    assert isinstance(moe.cpu_moe, CpuMoE)
    for lin in (moe.gate, moe.experts.gate_proj, moe.experts.down_proj, moe.shared_experts.up_proj):
        assert lin.weight.numel() == 0  # the kernel's packed copy is the only one
    assert model.model.layers[0].self_attn.cpu_ops is OPS and model.model.norm.cpu_ops is OPS


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("DSV3_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_ext, "_state", {})
    assert cpu_ext.load() is None
    assert "DSV3_CPU_KERNELS=0" in cpu_ext.status()
    model = build_model(ModelConfig.from_dict(v3()), "cpu", BF).eval()
    if not available(BF):  # oneDNN's bf16 layout needs AVX-512: without the kernels nothing is packed
        assert not prepack_for_cpu(model) and model.model.layers[1].mlp.cpu_moe is None
        return
    assert prepack_for_cpu(model)  # oneDNN packing still applies
    assert not model.cpu_kernels and model.model.layers[1].mlp.cpu_moe is None


PROMPTS = ["def fibonacci(n):", "import os\n\nclass Config:", "for i in range(10):"]
LONG_PROMPTS = ['def parse(path):\n    """Read the file at path and return its lines without comments."""\n    with open(path) as f:',
                "import json\nimport os\n\n\ndef load_settings(name, default=None):\n    path = os.path.join(",
                "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):"]


def test_a_failed_build_falls_back_to_pytorch_with_the_reason(monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("Error building extension 'dsv3_cpu_kernels'\ncpu_kernels.cpp:1: error: something")

    monkeypatch.setattr(cpu_ext, "_state", {})
    monkeypatch.setattr(cpu_ext, "unsupported_reason", lambda: None)
    monkeypatch.setattr(cpu_ext, "build", broken)
    with caplog.at_level("WARNING"):
        assert cpu_ext.load() is None
    assert "the build failed: cpu_kernels.cpp:1: error: something" in cpu_ext.status()
    assert "running the PyTorch path" in caplog.text
    model = build_model(ModelConfig.from_dict(v3()), "cpu", BF).eval()
    assert prepack_for_cpu(model) == available(BF) and not getattr(model, "cpu_kernels", False)


def _generate(monkeypatch, kernels: bool, model=None, prompts=PROMPTS, **kw):
    from dsv3 import LLM, SamplingParams

    if not kernels:
        monkeypatch.setenv("DSV3_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_ext, "_state", {})
    llm = LLM(model, progress=False, **kw)
    assert getattr(llm.model, "cpu_kernels", False) is kernels
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, logprobs=2))
    monkeypatch.delenv("DSV3_CPU_KERNELS", raising=False)
    monkeypatch.setattr(cpu_ext, "_state", {})
    return outs


def assert_same_greedy_run(want, got, margin: float = 0.25) -> int:
    """Greedy outputs agree token for token; they may part only at a near-tie, a step where the reference's two best
    tokens are closer than `margin` nats, and the comparison of that sequence ends there. Logprobs agree within bf16
    noise: the logits themselves are bf16 (a step of 0.0625 at |logit| ~ 10), so the PyTorch bf16 path differs from
    float32 by up to ~0.17 nats (mean ~0.015) on these prompts, and a gap below that may flip (`margin` is the bound
    on a single logprob's error asserted below). Returns how many steps were compared."""
    errs = []
    for w, g in zip(want, got):
        for step, (tw, tg, lw, lg) in enumerate(zip(w.token_ids, g.token_ids, w.logprobs, g.logprobs)):
            if tg != tw:
                gap = lw.top[0][1] - lw.top[1][1]
                assert gap < margin, f"step {step}: {tg} != {tw} with a reference margin of {gap:.3f} nats"
                break
            errs.append(abs(lw.logprob - lg.logprob))
    assert max(errs) < margin and sum(errs) / len(errs) < 0.03, (max(errs), sum(errs) / len(errs))
    return len(errs)


@pytest.mark.parametrize("speculative", ["off", "mtp"])
def test_engine_on_the_kernels_generates_what_the_pytorch_path_does(monkeypatch, speculative):
    # The embedded trained model, batched prompts of different lengths, decode and (with MTP) verification rows,
    # against the float32 PyTorch path (the bf16 PyTorch path is itself ~0.05 nats off: it rounds attention scores
    # to bf16 where the kernel keeps float32).
    want = _generate(monkeypatch, False, speculative=speculative, dtype="float32")
    got = _generate(monkeypatch, True, speculative=speculative)
    assert assert_same_greedy_run(want, got) >= 36  # of 72 steps: up to a flipped near-tie (embedded model: 49)


def test_engine_on_the_kernels_with_chunked_prefill_and_mixed_steps(monkeypatch):
    # A step budget of 24 tokens and prompts of 30-40: prompts are prefilled in chunks while other sequences
    # decode, so steps mix prefill rows (> 16 tokens: PyTorch attention over the cache) and kernel rows.
    kw = dict(max_num_batched_tokens=24, speculative="off", prompts=LONG_PROMPTS)
    want = _generate(monkeypatch, False, dtype="float32", **kw)
    got = _generate(monkeypatch, True, **kw)
    assert assert_same_greedy_run(want, got) >= 24


def test_avx512_build_without_bf16_instructions_agrees():
    if "avx512_bf16" not in cpu_ext.cpu_flags():
        pytest.skip("the default build already is the plain AVX-512 one")
    ops = cpu_ext.build("dsv3_cpu_avx512", ("-mno-avx512bf16",))
    assert ops.capability() == "avx512"
    cfg = ModelConfig.from_dict(MOE_CASES["v3 odd sizes"])
    moe = MoE(cfg)
    for p in moe.parameters():
        p.data.normal_(0, 0.05)
    moe = moe.to(BF)
    moe.gate.e_score_correction_bias = moe.gate.e_score_correction_bias.float()
    x = torch.randn(7, cfg.hidden_size).to(BF)
    with torch.no_grad():
        assert rel_err(CpuMoE(ops, moe, cfg)(x), moe(x)) < 4e-3


def test_decode_attention_agrees_across_builds():
    # The AVX512_BF16 absorbed products (bf16 pairs) and the float32 ones of the other builds.
    if "avx512_bf16" not in cpu_ext.cpu_flags():
        pytest.skip("this CPU runs only the float32 absorbed products")
    avx2 = cpu_ext.build("dsv3_cpu_avx2", ("-mno-avx512f",))
    H, N, R, V, C, S, L = 4, 64, 32, 64, 128, 64, 37
    q = torch.randn(2, H, N + R).to(BF)
    kv = (torch.randn(S, C + R) * 0.5).to(BF)
    kv_b = (torch.randn(H * (N + V), C) * 0.1).to(BF)
    slots = torch.stack([torch.randperm(S)[:L], torch.randperm(S)[:L]])
    args = (q, kv, torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([L, 20]), slots, kv_b, V, 0.125)
    outs = []
    for ops in (OPS, avx2):
        out = torch.empty(2, H, V, dtype=BF)
        ops.mla_decode(*args, out)
        outs.append(out)
    assert rel_err(outs[0], outs[1]) < 1e-2


def test_a_rows_result_does_not_depend_on_the_other_rows_of_the_call():
    # Batch invariance, which keeps greedy output identical alone, batched and under speculative verification:
    # a whole block (projections, attention, MoE) run for one query row or for that row among others gives the
    # same bits for it.

    cfg = ModelConfig.from_dict(v3(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2))
    model = build_model(cfg, "cpu", BF).eval()
    assert prepack_for_cpu(model)
    layer = model.model.layers[1]
    W, D = cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.hidden_size
    rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim)
    cache = (torch.randn(512, W) * 0.5).to(BF)
    slots = torch.randperm(512)[:300].reshape(3, 100)
    x = torch.randn(7, D).to(BF)
    # Rows: sequence 0 at positions 40..42 (verification of two drafts), sequence 1 at 70, sequence 2 at 90..92.
    seq = torch.tensor([0, 0, 0, 1, 2, 2, 2])
    pos = torch.tensor([40, 41, 42, 70, 90, 91, 92])
    w, dims, scal = CpuBlocks._describe(layer, cfg)

    def run(rows):
        kv = cache.clone()
        cos, sin = rotary.cos_sin(pos[rows])
        return OPS.decode_layer(x[rows].contiguous(), w, dims, scal, kv, slots[seq[rows], pos[rows]],
                                torch.arange(len(rows)), seq[rows], pos[rows] + 1, slots, cos, sin)

    with torch.no_grad():
        everything = run(torch.arange(7))
        for rows in ([3], [0, 1, 2], [4, 5, 6], [3, 4, 5, 6], [0, 1, 2, 4, 5, 6]):
            # (Each subset keeps a sequence's rows together: a query reads the cache entries its earlier rows write.)
            assert torch.equal(run(torch.tensor(rows)), everything[rows]), rows


def test_kept_rows_store_every_latent_and_carry_on_only_the_kept_rows():
    # An MTP block needs the output of the row it drafts from only; the other rows must still leave the latents a
    # full pass writes, since later positions attend to them.
    cfg = ModelConfig.from_dict(v3(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2))
    model = build_model(cfg, "cpu", BF).eval()
    assert prepack_for_cpu(model)
    blocks = CpuBlocks(OPS, [model.model.layers[1]], cfg)
    W, D = cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.hidden_size
    rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim)
    cache = (torch.randn(2, 512, W) * 0.5).to(BF)
    slots = torch.randperm(512)[:200].reshape(2, 100)
    x = torch.randn(5, D).to(BF)
    seq = torch.tensor([0, 0, 0, 1, 1])
    pos = torch.tensor([40, 41, 42, 70, 71])
    cos, sin = rotary.cos_sin(pos)

    number = blocks.id

    def run(keep):
        kv = cache.clone()
        y = OPS.run_blocks(number, x, kv, 0, slots[seq, pos], torch.arange(5), seq, pos + 1, slots, cos, sin, keep)
        return y, kv

    with torch.no_grad():
        everything, kv_all = run(None)
        assert not torch.equal(kv_all, cache)
        for keep in ([2, 4], [0], [1, 3], []):
            y, kv = run(torch.tensor(keep, dtype=torch.long))
            assert torch.equal(y, everything[keep]), keep
            assert torch.equal(kv, kv_all), keep
        for bad in ([3, 1], [5]):
            with pytest.raises(RuntimeError, match="keep: rows must be increasing"):
                run(torch.tensor(bad))
    # The ops take the blocks by number (registered weakly): a number never handed out, or one whose blocks the
    # Python side has dropped, is refused with a clear error instead of touching freed weights.
    blocks = None
    gc.collect()
    with pytest.raises(RuntimeError, match="were released"):
        run(None)
    with pytest.raises(RuntimeError, match="never registered"):
        OPS.run_blocks(number + 10**6, x, cache.clone(), 0, slots[seq, pos], torch.arange(5), seq, pos + 1, slots,
                       cos, sin)


def test_section_timers_are_off_in_the_normal_build():
    # block_forward times its sections only in the profiling build (benchmarks/cpu_sections.py); asking the normal
    # build for them says how to get them.
    with pytest.raises(RuntimeError, match="no section timers.*DSV3_TIMING"):
        OPS.section_times()


def test_override_swaps_the_build_load_returns_and_restores_it():
    """cpu_ext.override (benchmarks/ab_kernels.py packs one model per build with it) is scoped to its block."""
    other = object()
    with cpu_ext.override(other):
        assert cpu_ext.load() is other and cpu_ext.loaded() is other
    assert cpu_ext.load() is OPS
    with pytest.raises(RuntimeError):
        with cpu_ext.override(other):
            raise RuntimeError("inside")
    assert cpu_ext.load() is OPS
