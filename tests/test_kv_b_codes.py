"""The absorbed attention (csrc/attention.h, mla_decode) reading a quantised model's kv_b_proj as codes: the same
bits as reading that weight dequantised to bf16, for every scheme it takes (dsv3's int4 / int8, float32 scales with
and without mins as GGUF's Q4_K / Q8_0 repacks give), at batch 1 and across several sequences, with verification
rows; packing keeps the codes (a quarter of the bytes for int4); the engine's output is unchanged; bad scales are
refused by name."""
import pytest
import torch

from dsv3 import LLM, SamplingParams
from dsv3.kernels import cpu_ext, cpu_pack, quant

OPS = cpu_ext.load()
pytestmark = pytest.mark.skipif(OPS is None, reason=f"C++ CPU kernels unavailable: {cpu_ext.unsupported_reason()}")
BF = torch.bfloat16
H, N, R, V, C = 3, 16, 8, 24, 64  # odd head count, two groups of 32 along C


def _schemes():
    """(name, codes, scales, scheme) for kv_b [H*(N+V), C] in each readable form."""
    w = torch.randn(H * (N + V), C) * 0.05
    w[1, :32] = 0  # an all-zero group
    out = []
    for name in ("int4", "int8"):
        s = quant.scheme(name)
        codes, scales = quant.quantize(w, s)
        out.append((name, codes, scales, s))
        # The same codes with float32 scales (a K-quant's repack keeps float32 scales; Q8_0 from GGUF is int8 codes)
        s32 = quant.Scheme(bits=s.bits, scale_dtype=torch.float32)
        out.append((name + "-f32", codes, scales.float() * 1.0009765625, s32))  # off the float16 grid
    # int4 with mins (Q4_K's form): unsigned codes, w = q s - m with float32 (s, m)
    s = quant.Scheme(bits=4, scale_dtype=torch.float32, with_min=True)
    codes = torch.randint(0, 256, (H * (N + V), C // 2), dtype=torch.uint8)
    sm = torch.stack([torch.rand(H * (N + V), C // 32) * 0.01, torch.randn(H * (N + V), C // 32) * 0.05], -1)
    out.append(("int4-min", codes, sm.float(), s))
    return out


def _tables(ctx_lens, new, S=256):
    """Slot tables for sequences with cached contexts ctx_lens computing `new` rows each."""
    perm = torch.randperm(S)
    tables, used = [], 0
    for L, n in zip(ctx_lens, new):
        tables.append(perm[used:used + L + n])
        used += L + n
    slots = torch.zeros(len(tables), max(len(t) for t in tables), dtype=torch.long)
    for i, t in enumerate(tables):
        slots[i, :len(t)] = t
    tok, seq, lens = [], [], []
    for i, (L, n) in enumerate(zip(ctx_lens, new)):
        for j in range(n):
            tok.append(len(tok))
            seq.append(i)
            lens.append(L + j + 1)
    return torch.tensor(tok), torch.tensor(seq), torch.tensor(lens), slots


@pytest.mark.parametrize("layout", [([9], [1]), ([30], [3]), ([5, 17, 40], [1, 3, 2])],
                         ids=["batch1", "verify-rows", "three-sequences"])
@pytest.mark.parametrize("form", _schemes(), ids=lambda f: f[0])
def test_attention_on_codes_equals_attention_on_the_bf16_dequantised_weight(form, layout):
    name, codes, scales, s = form
    tok, seq, lens, slots = _tables(*layout)
    T = len(tok)
    cache = (torch.randn(256, C + R) * 0.5).to(BF)
    q = torch.randn(T, H, N + R).to(BF)
    want = torch.empty(T, H, V, dtype=BF)
    got = torch.empty(T, H, V, dtype=BF)
    OPS.mla_decode(q, cache, tok, seq, lens, slots, quant.dequantize(codes, scales, s, BF), V, 0.2, want)
    OPS.mla_decode(q, cache, tok, seq, lens, slots, codes, V, 0.2, got, scales)
    assert torch.equal(got, want)
    if "avx512f" in cpu_ext.cpu_flags():  # the AVX2 build widens the codes with its own instructions: same bits
        avx2 = cpu_ext.build("dsv3_cpu_avx2", ("-mno-avx512f",))
        again = torch.empty_like(got)
        avx2.mla_decode(q, cache, tok, seq, lens, slots, codes, V, 0.2, again, scales)
        ref = torch.empty_like(got)
        avx2.mla_decode(q, cache, tok, seq, lens, slots, quant.dequantize(codes, scales, s, BF), V, 0.2, ref)
        assert torch.equal(again, ref)


def test_codes_that_do_not_fit_their_scales_are_refused_by_name():
    _, codes, scales, s = _schemes()[0]
    tok, seq, lens, slots = _tables([4], [1])
    cache = torch.zeros(256, C + R, dtype=BF)
    q = torch.zeros(1, H, N + R, dtype=BF)
    out = torch.empty(1, H, V, dtype=BF)
    with pytest.raises(RuntimeError, match="kv_b codes .* do not fit scales"):
        OPS.mla_decode(q, cache, tok, seq, lens, slots, codes[:, :8].contiguous(), V, 0.2, out, scales)
    with pytest.raises(RuntimeError, match="kv_b scales must be"):
        OPS.mla_decode(q, cache, tok, seq, lens, slots, codes, V, 0.2, out, scales[:-1].contiguous())
    with pytest.raises(RuntimeError, match="kv_b scales must be float16 or float32"):
        OPS.mla_decode(q, cache, tok, seq, lens, slots, codes, V, 0.2, out, scales.double())
    with pytest.raises(RuntimeError, match="no scales given"):
        OPS.mla_decode(q, cache, tok, seq, lens, slots, codes, V, 0.2, out)


def test_packed_int4_model_keeps_kv_b_codes_and_the_engine_gives_the_same_output(int4_ckpt, monkeypatch):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    prompts = [[3, 17, 40, 99, 5], [200, 7, 7, 31]]
    llm = LLM(int4_ckpt, dtype="bfloat16", speculative="mtp", num_blocks=64)
    attn = llm.model.model.layers[0].self_attn
    assert attn.kv_b_proj.quant is not None and attn.kv_b_proj.weight.dtype == torch.uint8
    new = llm.generate(prompts, params)
    bytes_codes = cpu_pack.resident_weight_bytes(llm.model)
    del llm
    monkeypatch.setattr(cpu_pack, "kv_b_codes_readable", lambda lin: False)  # the bf16 copy, as before
    old_llm = LLM(int4_ckpt, dtype="bfloat16", speculative="mtp", num_blocks=64)
    assert old_llm.model.model.layers[0].self_attn.kv_b_proj.weight.dtype == BF
    old = old_llm.generate(prompts, params)
    assert [o.token_ids for o in new] == [o.token_ids for o in old]
    assert [o.logprobs for o in new] == [o.logprobs for o in old]
    assert bytes_codes < cpu_pack.resident_weight_bytes(old_llm.model)


@pytest.fixture(scope="module")
def int4_ckpt(tiny_ckpt, tmp_path_factory):
    import dsv3.convert

    dst = tmp_path_factory.mktemp("int4kvb") / "ckpt"
    dsv3.convert.quantize_checkpoint(tiny_ckpt, dst, "int4")
    return dst
