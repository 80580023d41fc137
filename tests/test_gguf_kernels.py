"""GGUF's schemes on the C++ CPU kernels (kind int8x of csrc/qpacked.h, and Q8_0 / Q4_0 / Q5_0 on the native int8 /
int4 kinds): the kernels against their float64 oracle quant_cpu.linear_quant_acts to float32 rounding, against the
weight-only reference quant.linear, batch invariance, mixed schemes fused into one matrix, and a whole GGUF model
packed for the kernels against the unpacked reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dsv3
from dsv3.gguf import blocks
from dsv3.kernels import cpu_ext, quant, quant_cpu
from test_gguf_files import MIXED, encode, gguf_tiny_cfg, write_gguf

OPS = cpu_ext.load()
pytestmark = pytest.mark.skipif(OPS is None, reason=f"C++ CPU kernels unavailable: {cpu_ext.unsupported_reason()}")
BF = torch.bfloat16
TYPES = ["Q4_K", "Q5_K", "Q6_K", "Q4_1", "Q5_1", "Q5_0", "Q8_0", "Q4_0"]
# The kernel kind each lands on: native int8 (1) / int4 (2), int4m (4: Q4_K and Q4_1 as stored), int6x (5: int8x's
# product with the codes in 6 bits), int4k / int6k / int5k (7 / 8 / 9: Q4_K / Q6_K / Q5_K with GGUF's own float16 x
# integer scales; int5k with int8 activations).
# Without the compact forms: int4m (4), int8x (3), int6 (6: int6x with no mins).
KINDS = {"Q4_K": 7, "Q4_1": 4, "Q5_K": 9, "Q6_K": 8, "Q5_1": 5, "Q5_0": 1, "Q8_0": 1, "Q4_0": 2}


def _gguf_weights(qtype: str, o: int, i: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((o, i)).astype(np.float32) * 0.05
    codes, scales = blocks.decode(qtype, encode(w, qtype, rng))
    return codes, scales, blocks.SCHEMES[qtype]


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("o,t", [(5, 1), (17, 3), (64, 16), (257, 33)])  # partial panels / blocks, token tails
def test_kernels_are_their_oracle_to_float32_rounding(qtype, o, t):
    codes, scales, s = _gguf_weights(qtype, o, 512)
    assert quant_cpu.supported(s)
    x = (torch.randn(t, 512) * 2).to(BF)
    x[0, 32:64] = 0  # an all-zero input group
    blob = quant_cpu.pack(codes, scales, s)
    kind = int(blob[8:16].view(torch.int64))
    assert kind == KINDS[qtype]
    got = OPS.linear_f32(x, blob, o).double()
    want = quant_cpu.linear_quant_acts(x, codes, scales, s)
    assert ((got - want).abs() <= 1e-5 * want.abs().max() + 1e-30).all()
    ref = quant.linear(x.float(), codes, scales, s)  # weight-only: the GGUF values with float inputs
    assert ((got.float() - ref).norm() / ref.norm()).item() < 0.01
    assert torch.equal(OPS.linear(x, blob, o), got.float().to(BF))


@pytest.mark.parametrize("qtype", ["Q6_K", "Q5_K", "Q5_1"])
def test_int6x_computes_int8xs_bits_in_fewer_bytes(qtype):
    """The 6-bit codes are a layout, not a rounding: the same integer sums, so the same bits as int8x, at every
    token count (tile widths 1, 2, 4, 8 and tails), in 9 bits per weight instead of 11 (8 without Q6_K's zero
    mins)."""
    codes, scales, s = _gguf_weights(qtype, 48, 1024, seed=3)
    parts = quant_cpu.to_int8x(codes, scales, s)
    if qtype == "Q6_K":  # scales off GGUF's float16 x int8 grid: kind int6, not int6k (int8 activations, below)
        parts = (parts[0], parts[1] * (1 + 2 ** -20), parts[2])
    wide, six = quant_cpu.pack_int8x(*parts, compact=False), quant_cpu.pack_int8x(*parts)
    bits = 8 if qtype == "Q6_K" else 9
    # (pack itself puts Q5_K on int5k: int8 activations, so other bits; pack_int8x is the int16-activation form)
    assert int(wide[8:16].view(torch.int64)) == 3 and int(six[8:16].view(torch.int64)) == {"Q6_K": 6}.get(qtype, 5)
    assert six.numel() <= bits / 11 * wide.numel() + 64
    for t in (1, 2, 3, 5, 8, 13):
        x = (torch.randn(t, 1024) * 3).to(BF)
        assert torch.equal(OPS.linear_f32(x, six, 48), OPS.linear_f32(x, wide, 48))
    # Codes outside [-32, 31] (Q8_0-like, fused into an int8x matrix) keep the wide kind.
    c = parts[0].clone()
    c[0, 0] = 100
    assert int(quant_cpu.pack_int8x(c, *parts[1:])[8:16].view(torch.int64)) == 3


def test_q6k_in_its_own_form_reads_int8_activations_at_every_tile_width():
    """Kind int6k (Q6_K's float16 x int8 scales, 6.5625 bits per weight) multiplies u = c + 32 with int8 inputs
    (dpbusd / maddubs) and takes 32 x each half's input sum off: its oracle linear_int6k_acts at every tile width
    and tail, each row the same alone as in a batch, and within 1% of the weights' float product."""
    codes, scales, s = _gguf_weights("Q6_K", 48, 1024, seed=3)
    parts = quant_cpu.to_int8x(codes, scales, s)
    blob = quant_cpu.pack_int8x(*parts)
    assert int(blob[8:16].view(torch.int64)) == quant_cpu.KIND_INT6K
    assert blob.numel() <= 48 * 1024 * 6.5625 / 8 + 2 * 64
    for t in (1, 2, 3, 5, 8, 13):
        x = (torch.randn(t, 1024) * 3).to(BF)
        x[0, 16:32] = 0  # a zero half
        got = OPS.linear_f32(x, blob, 48)
        want = quant_cpu.linear_int6k_acts(x, parts[0], parts[1])
        assert ((got.double() - want).abs() <= 1e-5 * want.abs().max()).all(), t
        for r in range(t):
            assert torch.equal(OPS.linear_f32(x[r:r + 1], blob, 48), got[r:r + 1])
        ref = quant.linear(x.float(), codes, scales, s)
        assert ((got - ref).norm() / ref.norm()).item() < 0.01


def test_ggufs_own_scales_compute_the_float32_kinds_bits():
    """int4k (Q4_K) and int6k (Q6_K) hold GGUF's float16 x integer scales, whose float32 products are exactly
    int4m's / int8x's float32 scales, in 4.625 / 6.5625 bits per weight: int4k computes int4m's bits at every tile
    width (int6k reads int8 activations where int8x reads int16 ones: its own oracle, above). Scales that do not
    factor (no sub-block at the range's end) fall back to the float32 kinds."""
    for qtype, full, short in (("Q4_K", 4, 7), ("Q6_K", 3, 8)):
        codes, scales, s = _gguf_weights(qtype, 40, 1024, seed=5)
        wide, small = quant_cpu.pack(codes, scales, s, compact=False), quant_cpu.pack(codes, scales, s)
        assert (int(wide[8:16].view(torch.int64)), int(small[8:16].view(torch.int64))) == (full, short)
        assert small.numel() <= {"Q4_K": 4.625, "Q6_K": 6.5625}[qtype] * 40 * 1024 / 8 * 48 / 40 + 256
        for t in (1, 2, 3, 4, 8, 11) if qtype == "Q4_K" else ():
            x = (torch.randn(t, 1024) * 3).to(BF)
            assert torch.equal(OPS.linear_f32(x, small, 40), OPS.linear_f32(x, wide, 40)), (qtype, t)
        odd = scales.clone()
        odd[0, 0] = odd[0, 0] * 0.7  # no longer d * an integer: that matrix keeps float32 scales
        assert int(quant_cpu.pack(codes, odd, s)[8:16].view(torch.int64)) == {"Q4_K": 4, "Q6_K": 6}[qtype]
    # Q5_K: int5k (its product, with int8 activations, is checked against the oracle above) in 5.625 bits.
    codes, scales, s = _gguf_weights("Q5_K", 40, 1024, seed=5)
    blob = quant_cpu.pack(codes, scales, s)
    assert int(blob[8:16].view(torch.int64)) == 9 and blob.numel() <= 5.625 * 48 * 1024 / 8 + 128
    d, c = quant_cpu.factor_scales(torch.tensor([[63 * 0.5, 7 * 0.5, 0.0, 0.5] * 2]), 8, (63,), 0, 255)
    assert d.tolist() == [[0.5]] and c.tolist() == [[63, 7, 0, 1] * 2]


def test_int8x_holds_the_schemes_weights_exactly():
    for qtype in TYPES:
        codes, scales, s = _gguf_weights(qtype, 24, 256)
        c, sc, mn = quant_cpu.to_int8x(codes, scales, s)
        w = (c.float().view(24, 16, 16) * sc[..., None]).view(24, 8, 32) - mn[..., None]
        assert torch.equal(w.view(24, 256), quant.dequantize(codes, scales, s)), qtype


def test_a_row_gives_the_same_bits_alone_and_in_a_batch():
    codes, scales, s = _gguf_weights("Q4_K", 96, 256)
    blob = quant_cpu.pack(codes, scales, s)
    x = torch.randn(37, 256).to(BF)
    together = OPS.linear(x, blob, 96)
    for r in (0, 5, 36):
        assert torch.equal(OPS.linear(x[r:r + 1], blob, 96), together[r:r + 1])


def test_mixed_schemes_fuse_into_one_int8x_matrix():
    from dsv3.model.layers import Linear

    mods = []
    for k, qtype in enumerate(("Q4_K", "Q6_K", "Q8_0")):
        lin = Linear(256, 40)
        codes, scales, s = _gguf_weights(qtype, 40, 256, seed=k)
        lin.set_quantized(codes, scales, s)
        mods.append(lin)
    blob = quant_cpu.kernel_matrix(OPS, mods)
    x = torch.randn(3, 256).to(BF)
    got = OPS.linear_f32(x, blob, 120).double()
    # (int8x reads int16 activations whatever the parts' own kinds would)
    want = torch.cat([quant_cpu.linear_int8x_acts(x, *quant_cpu.to_int8x(m.weight, m.weight_scale, m.quant))
                      for m in mods], dim=-1)
    assert ((got - want).abs() <= 1e-5 * want.abs().max()).all()
    assert int(blob[8:16].view(torch.int64)) == quant_cpu.KIND_INT8X
    same = quant_cpu.kernel_matrix(OPS, [mods[0], mods[0]])  # one scheme: its own compact kind
    assert int(same[8:16].view(torch.int64)) == quant_cpu.KIND_INT4K


def test_a_gguf_model_packs_for_the_kernels_and_runs_close_to_the_reference(tmp_path):
    from dsv3.kernels.cpu_pack import prepack_for_cpu

    write_gguf(tmp_path / "m.gguf", gguf_tiny_cfg(), MIXED)
    ref = dsv3.load_model(tmp_path / "m.gguf")
    packed = dsv3.load_model(tmp_path / "m.gguf")
    assert prepack_for_cpu(packed) and packed.cpu_kernels
    ids = torch.tensor([[5, 17, 99, 250, 7, 42, 300, 1, 64]])
    with torch.no_grad():
        a, b = packed(ids).float(), ref(ids).float()
    # int16 activations and bf16 between kernels against float32 throughout, on a random model (0.037 measured)
    assert ((a - b).norm() / b.norm()).item() < 0.05
    llm = dsv3.LLM(str(tmp_path / "m.gguf"), max_model_len=64)
    out = llm.generate([[5, 17, 99, 250]], dsv3.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 6


def test_packed_k_files_are_resident_near_their_own_bits(tmp_path):
    """What a K-quant model holds once packed for the kernels (cpu_pack.resident_weight_bytes): the compact kinds
    keep Q4_K / Q5_K / Q6_K at 4.625 / 5.625 / 6.5625 bits per weight, against 6 / 11 / 11 unpacked (codes
    widened, float32 scales)."""
    from dsv3.checkpoint import model_bytes
    from dsv3.kernels.cpu_pack import prepack_for_cpu, resident_weight_bytes

    names = ["attn_q_a", "attn_q_b", "attn_kv_a_mqa", "ffn_gate", "ffn_up", "ffn_down", "ffn_gate_exps",
             "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp", "output"]
    cfg = gguf_tiny_cfg()
    got = {}
    for qtype in ("Q4_K", "Q5_K", "Q6_K"):
        write_gguf(tmp_path / f"{qtype}.gguf", cfg, {n: qtype for n in names})
        model = dsv3.load_model(tmp_path / f"{qtype}.gguf")
        before = model_bytes(model)
        assert prepack_for_cpu(model) and resident_weight_bytes(model) < before
        got[qtype] = resident_weight_bytes(model)
    # Same model, same float tensors: the differences are the projections' bits per weight (1 and ~0.94 bits).
    quantised = sum(math.prod(m.weight.shape[:-1]) * m.quant.in_features(tuple(m.weight.shape))
                    for m in dsv3.load_model(tmp_path / "Q4_K.gguf").modules() if getattr(m, "quant", None))
    assert abs((got["Q5_K"] - got["Q4_K"]) * 8 / quantised - 1.0) < 0.05
    assert abs((got["Q6_K"] - got["Q4_K"]) * 8 / quantised - (6.5625 - 4.625)) < 0.1


def test_the_avx2_build_computes_the_same_bits_for_every_gguf_scheme():
    if "avx512f" not in cpu_ext.cpu_flags():
        pytest.skip("the default build already is the AVX2 one")
    avx2 = cpu_ext.build("dsv3_cpu_avx2", ("-mno-avx512f",))
    for qtype in TYPES:
        codes, scales, s = _gguf_weights(qtype, 40, 256)
        blob = quant_cpu.pack(codes, scales, s)
        x = (torch.randn(13, 256) * 2).to(BF)
        got = avx2.linear_f32(x, blob, 40)
        want = quant_cpu.linear_quant_acts(x, codes, scales, s)
        assert ((got.double() - want).abs() <= 1e-5 * want.abs().max()).all(), qtype
        assert torch.equal(got, OPS.linear_f32(x, blob, 40)), qtype
