"""The C++ CPU kernels' int8/int4 products (csrc/qpacked.h) against their oracle (kernels/quant_cpu.py's
linear_quant_acts), quantised MoE layers and whole packed models against the PyTorch reference, batch invariance,
the engine on packed quantised weights, and the errors for blobs that are not what they claim."""
import pytest
import torch

import dsv3.convert
from dsv3 import LLM, ModelConfig, SamplingParams
from dsv3.kernels import cpu_ext, quant, quant_cpu
from dsv3.kernels.cpu_pack import prepack_for_cpu
from dsv3.model import build_model
from dsv3.model.moe import MoE
from hf_ref import v3

OPS = cpu_ext.load()
pytestmark = pytest.mark.skipif(OPS is None, reason=f"C++ CPU kernels unavailable: {cpu_ext.unsupported_reason()}")
BF = torch.bfloat16
SCHEMES = [quant.scheme("int8"), quant.scheme("int4")]
IDS = ["int8", "int4"]


def _weights(o: int, i: int, s: quant.Scheme, lead: tuple[int, ...] = ()):
    w = torch.randn(*lead, o, i) * 0.05
    w[..., 0, :32] = 0  # an all-zero group: scale 0
    return quant.quantize(w, s)


@pytest.mark.parametrize("s", SCHEMES, ids=IDS)
@pytest.mark.parametrize("o,i", [(5, 32), (17, 96), (64, 512), (257, 160)])  # partial 16-row blocks
@pytest.mark.parametrize("t", [1, 3, 16, 33])  # tiles of 8, 4, 2 and 1 input rows
def test_linear_is_the_oracle_to_float32_rounding(s, o, i, t):
    codes, scales = _weights(o, i, s)
    x = (torch.randn(t, i) * 2).to(BF)
    x[0, 32:64] = 0  # an all-zero input group: d = 0
    blob = quant_cpu.pack(codes, scales, s)
    got = OPS.linear_f32(x, blob, o).double()
    want = quant_cpu.linear_quant_acts(x, codes, scales, s)
    assert ((got - want).abs() <= 1e-5 * want.abs().max() + 1e-30).all()
    # The bf16 product is that float32 result rounded once.
    assert torch.equal(OPS.linear(x, blob, o), got.float().to(BF))


def test_the_avx2_build_computes_the_same_bits_as_the_default_one():
    # The AVX-512 VNNI tiles (dpbusd / dpwssd on 16 rows) and the AVX2 ones (maddubs / madd on two halves of 8 rows)
    # form the same exact integer group sums and then the same float32 operations per row.
    if "avx512f" not in cpu_ext.cpu_flags():
        pytest.skip("the default build already is the AVX2 one")
    avx2 = cpu_ext.build("dsv3_cpu_avx2", ("-mno-avx512f",))
    assert avx2.capability() == "avx2"
    for s in SCHEMES:
        codes, scales = _weights(40, 160, s)
        blob = quant_cpu.pack(codes, scales, s)
        x = (torch.randn(13, 160) * 2).to(BF)
        got = avx2.linear_f32(x, blob, 40)
        want = quant_cpu.linear_quant_acts(x, codes, scales, s)
        assert ((got.double() - want).abs() <= 1e-5 * want.abs().max()).all()
        assert torch.equal(got, OPS.linear_f32(x, blob, 40))
        # The activation quantisation's edge cases (vectorised on AVX-512, a scalar loop on AVX2): halves that round
        # to even (a group whose scale is exactly 1 for int8 codes), a NaN (skipped by the group max, clamped to
        # qmax), an infinity (scale inf, the rest of its group 0), an all-zero group.
        x[1, :32] = torch.tensor([127.0, 2.5, 3.5, -0.5, 0.5, -2.5, 1.5, -1.5] * 4)
        x[2, 5], x[3, 40], x[4, 64:96] = float("nan"), float("inf"), 0.0
        got = avx2.linear_f32(x, blob, 40)
        assert not got[3].isfinite().all()  # (the infinite row: scale inf)
        assert torch.equal(got.view(torch.int32), OPS.linear_f32(x, blob, 40).view(torch.int32))  # NaNs too


@pytest.mark.parametrize("s", SCHEMES, ids=IDS)
def test_activation_quantisation_costs_little_against_the_weight_only_reference(s):
    codes, scales = _weights(256, 1024, s)
    x = torch.randn(8, 1024).to(BF)
    got = OPS.linear_f32(x, quant_cpu.pack(codes, scales, s), 256)
    want = quant.linear(x.float(), codes, scales, s)
    assert ((got - want).norm() / want.norm()).item() < 0.01  # measured ~0.5%: 8-bit inputs per group of 32


@pytest.mark.parametrize("s", SCHEMES, ids=IDS)
def test_a_row_gives_the_same_bits_alone_and_in_a_batch(s):
    codes, scales = _weights(96, 256, s)
    blob = quant_cpu.pack(codes, scales, s)
    x = torch.randn(37, 256).to(BF)
    together = OPS.linear(x, blob, 96)
    for r in (0, 5, 36):
        assert torch.equal(OPS.linear(x[r:r + 1], blob, 96), together[r:r + 1])
    strided = torch.randn(37, 512).to(BF)[:, 100:356]  # rows of a wider tensor (a fused projection's slice)
    assert torch.equal(OPS.linear(strided, blob, 96), OPS.linear(strided.contiguous(), blob, 96))


def _moe_model(scheme: quant.Scheme):
    cfg = ModelConfig.from_dict(v3(n_routed_experts=7, num_experts_per_tok=3, n_group=1, topk_group=1, kv_lora_rank=32,
                                   v_head_dim=16))  # every projection's input a multiple of 32
    model = build_model(cfg, "cpu", BF)
    for mod in model.modules():
        if hasattr(mod, "set_quantized") and mod.weight.dim() >= 2 and mod.weight.shape[-1] % 32 == 0:
            mod.set_quantized(*quant.quantize(mod.weight.detach().float(), scheme), scheme)
    assert all(m.quant is not None for m in model.modules() if hasattr(m, "set_quantized"))
    return model


@pytest.mark.parametrize("s", SCHEMES, ids=IDS)
def test_quantised_moe_layer_matches_the_reference(s):
    plain = _moe_model(s)
    packed = _moe_model(s)
    packed.load_state_dict(plain.state_dict())
    assert prepack_for_cpu(packed) and packed.cpu_kernels
    moe_ref = next(m for m in plain.modules() if isinstance(m, MoE))
    moe = next(m for m in packed.modules() if isinstance(m, MoE))
    assert moe.cpu_moe.w13.dtype == torch.uint8 and moe.cpu_moe.w13.shape[0] == 7  # one blob per expert
    x = torch.randn(12, plain.cfg.hidden_size).to(BF)
    with torch.no_grad():
        want, got = moe_ref(x).float(), moe(x).float()
    assert ((got - want).norm() / want.norm()).item() < 0.03  # int8 inputs + bf16 roundings, vs float32 weight-only
    with torch.no_grad():
        assert torch.equal(moe(x[4:5]), moe(x)[4:5])  # batch invariant


@pytest.mark.parametrize("s", SCHEMES, ids=IDS)
def test_packed_quantised_model_matches_the_reference_and_drops_the_codes(s):
    plain = _moe_model(s)
    packed = _moe_model(s)
    packed.load_state_dict(plain.state_dict())
    assert prepack_for_cpu(packed)
    ids = torch.randint(0, plain.cfg.vocab_size, (1, 24))
    with torch.no_grad():
        want, got = plain(ids).float(), packed(ids).float()
    assert ((got - want).norm() / want.norm()).item() < 0.03
    attn = packed.model.layers[0].self_attn
    assert attn.o_proj.weight.numel() == 0 and attn.o_proj.weight_scale is None  # the blob holds them now
    ref = plain.model.layers[0].self_attn.kv_b_proj  # the absorbed attention reads kv_b's codes as they are
    assert attn.kv_b_proj.quant == s and torch.equal(attn.kv_b_proj.weight, ref.weight)
    assert torch.equal(attn.kv_b_proj.weight_scale, ref.weight_scale)


@pytest.fixture(scope="module")
def int4_bf16_ckpt(tiny_ckpt, tmp_path_factory):
    dst = tmp_path_factory.mktemp("int4k") / "ckpt"
    dsv3.convert.quantize_checkpoint(tiny_ckpt, dst, "int4")
    return dst


def test_engine_on_packed_int4_weights_speculation_batching_and_prefixes_agree(int4_bf16_ckpt):
    prompts = [[3, 17, 40, 99, 5], [200, 7, 7, 31], [3, 17, 40, 99, 5, 12, 9]]  # shared prefix: prefix caching
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    plain = LLM(int4_bf16_ckpt, dtype="bfloat16", speculative="off", num_blocks=64)
    spec = LLM(int4_bf16_ckpt, dtype="bfloat16", speculative="mtp", num_blocks=64)
    assert plain.model.cpu_kernels and spec.model.cpu_kernels
    assert plain.model.lm_head.packed.t.dtype == torch.uint8  # the head runs from its int8 blob
    alone = [plain.generate(p, greedy)[0].token_ids for p in prompts]
    together = [o.token_ids for o in plain.generate(prompts, greedy)]
    speculated = [o.token_ids for o in spec.generate(prompts, greedy)]
    assert together == alone
    assert speculated == alone
    assert all(len(t) == 12 for t in alone)


def test_a_blob_that_is_not_one_is_refused_by_name():
    s = SCHEMES[1]
    codes, scales = _weights(16, 64, s)
    blob = quant_cpu.pack(codes, scales, s)
    x = torch.randn(2, 64).to(BF)
    with pytest.raises(RuntimeError, match="linear: weight"):
        OPS.linear(x, blob, 32)  # the header says 16 rows
    bad = blob.clone()
    bad[:8] = 0  # magic gone
    with pytest.raises(RuntimeError, match="quant_cpu.pack"):
        OPS.linear(x, bad, 16)
    with pytest.raises(RuntimeError, match="linear: weight"):
        OPS.linear(torch.randn(2, 96).to(BF), blob, 16)  # wrong input width
    with pytest.raises(ValueError, match="groups of 32"):
        quant_cpu.pack(codes, scales, quant.Scheme(4, 16))
