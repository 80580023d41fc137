"""int8/int4 weight-only quantisation: the format's math against slow references, quantise-while-loading, the
quantised checkpoint round trip, `dsv3 quantize`, the engine on quantised weights, and the bad-input errors."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3 import cli
from dsv3.checkpoint import CheckpointError, model_bytes
from dsv3.checkpoint.quantized import Quantization
from dsv3 import LLM, SamplingParams
from dsv3.kernels import quant
from dsv3.model.layers import Linear
from dsv3.model.moe import StackedLinear

INT8, INT4 = quant.scheme("int8"), quant.scheme("int4")


def _slow_dequantize(codes, scales, s):
    """Element by element, from the format's definition (module docstring of kernels/quant.py)."""
    *lead, o, nb = codes.shape
    i = s.in_features(tuple(codes.shape))
    c, sc = codes.reshape(-1, o, nb), scales.reshape(-1, o, i // s.group_size)
    out = torch.empty(c.shape[0], o, i, dtype=torch.float64)
    for m in range(c.shape[0]):
        for r in range(o):
            for j in range(i):
                if s.bits == 8:
                    q = int(c[m, r, j])
                else:
                    byte = int(c[m, r, j // 2])
                    q = (byte & 0xF if j % 2 == 0 else byte >> 4) - 8
                out[m, r, j] = q * float(sc[m, r, j // s.group_size])
    return out.reshape(*lead, o, i)


@pytest.mark.parametrize("s", [INT8, INT4], ids=["int8", "int4"])
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 96), (1, 32)])
def test_dequantize_is_the_format_exactly(s, shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 3  # rows of different magnitudes
    codes, scales = quant.quantize(w, s)
    assert codes.dtype == s.code_dtype and tuple(codes.shape) == s.code_shape(shape)
    assert scales.dtype == torch.float16 and tuple(scales.shape) == s.scale_shape(shape)
    deq = quant.dequantize(codes, scales, s)
    assert torch.equal(deq.double(), _slow_dequantize(codes, scales, s))  # exact in float32
    g = s.group_size
    step = scales.float().repeat_interleave(g, -1)
    err = (deq - w).abs()
    if s.bits == 8:
        assert codes.abs().max() <= 127
        assert (err <= step * 0.5 + 1e-6 * w.abs()).all()
    else:
        # The scale search never does worse than Q4_0's rule (largest magnitude on code -8) in squared error.
        m = torch.gather(w.view(*shape[:-1], -1, g), -1, w.view(*shape[:-1], -1, g).abs().argmax(-1, keepdim=True))
        d0 = (m / -8).half().float()
        q0 = (torch.round(w.view(*shape[:-1], -1, g) / d0).clamp(-8, 7) * d0).view(shape)
        ours = (deq - w).pow(2).view(*shape[:-1], -1, g).sum(-1)
        q4_0 = (q0 - w).pow(2).view(*shape[:-1], -1, g).sum(-1)
        assert (ours <= q4_0 * (1 + 1e-6) + 1e-12).all()


def test_int4_packing_round_trips_and_zero_groups():
    q = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    assert torch.equal(quant.unpack_int4(quant.pack_int4(q)), q)
    w = torch.zeros(2, 64)
    w[1, 40] = 1.0
    for s in (INT8, INT4):
        codes, scales = quant.quantize(w, s)
        assert torch.isfinite(scales.float()).all()
        assert torch.equal(quant.dequantize(codes, scales, s)[0], w[0])  # an all-zero group stays exactly zero


@pytest.mark.parametrize("s", [INT8, INT4], ids=["int8", "int4"])
def test_reference_product_is_float32_against_the_dequantised_weight(s):
    torch.manual_seed(1)
    w, x = torch.randn(48, 96), torch.randn(5, 96).bfloat16()
    codes, scales = quant.quantize(w, s)
    y = quant.linear(x, codes, scales, s)
    want = (x.double() @ _slow_dequantize(codes, scales, s).T).float()
    assert y.dtype == torch.bfloat16
    assert torch.allclose(quant.linear(x.float(), codes, scales, s), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(y, quant.linear(x.float(), codes, scales, s).bfloat16())


def test_group_size_must_divide_the_input_dimension():
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.*multiple of 32.*\[8, 80\]"):
        INT4.check_divides("model.layers.0.mlp.up_proj", (8, 80))
    with pytest.raises(ValueError, match="unknown quantisation 'int3': choose one of int8, int4"):
        quant.scheme("int3")


# ------------------------------------------------------------------------------------------------------------------
def _quantised_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (Linear, StackedLinear)) and m.quant is not None}


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_load_quantises_each_projection_as_a_whole_tensor_would(tiny_ckpt, name):
    ref = dsv3.load_model(tiny_ckpt, dtype=torch.float32)
    model = dsv3.load_model(tiny_ckpt, dtype=torch.float32, quantize=name)
    mods = _quantised_modules(model)
    q = Quantization.named(name)
    head = model.lm_head
    assert head.quant == q.head and "model.layers.1.mlp.experts.gate_proj" in mods
    # Embedding, norms, router, MTP eh_proj: as they were.
    assert "model.layers.3.eh_proj" not in mods and model.model.layers[3].eh_proj.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    refs = dict(ref.named_parameters())
    for n, m in mods.items():
        codes, scales = quant.quantize(refs[n + ".weight"], m.quant)
        assert torch.equal(m.weight, codes) and torch.equal(m.weight_scale, scales), n
    ids = torch.tensor([[3, 17, 40, 99, 5, 200, 7]])
    with torch.no_grad():
        a, b = ref(ids), model(ids)
    rel = float((a - b).norm() / a.norm())
    assert 1e-4 < rel < (0.05 if name == "int8" else 0.6)  # a random model: loose; quality: benchmarks/
    assert model_bytes(model) < 0.6 * model_bytes(ref) * (0.5 if name == "int4" else 1)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantize_save_load_gives_identical_logits(tiny_ckpt, tmp_path, name, capsys):
    dst = tmp_path / name
    assert cli.main(["quantize", str(tiny_ckpt), str(dst), "--to", name]) == 0
    assert f"wrote {dst} ({name}" in capsys.readouterr().out
    conf = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert conf["quant_method"] == "dsv3_int" and conf["bits"] == int(name[3:]) and conf["group_size"] == 32
    assert (dst / "tokenizer.json").exists()
    loaded = dsv3.load_model(dst, dtype=torch.float32)  # no flag: read as stored
    direct = dsv3.load_model(tiny_ckpt, dtype=torch.float32, quantize=name)
    ids = torch.tensor([[3, 17, 40, 99, 5, 200, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), direct(ids))
    assert dsv3.load_model(dst, dtype=torch.float32, quantize=name) is not None  # the same scheme: allowed
    with pytest.raises(ValueError, match=f"already quantised to {name}"):
        dsv3.load_model(dst, quantize="int8" if name == "int4" else "int4")
    assert cli.main(["info", "--model", str(dst)]) == 0
    assert f"dsv3_int: {name} weights, groups of 32" in capsys.readouterr().out


def test_quantize_refuses_to_overwrite_and_leaves_nothing_on_failure(tiny_ckpt, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert cli.main(["quantize", str(tiny_ckpt), str(dst), "--to", "int8"]) != 0
    assert "not empty" in capsys.readouterr().err and (dst / "keep.txt").read_text() == "mine"

    import dsv3.convert as convert

    def boom(*a, **k):
        raise OSError("No space left on device")
    monkeypatch.setattr(convert, "save_model", boom)
    new = tmp_path / "new"
    assert cli.main(["quantize", str(tiny_ckpt), str(new), "--to", "int4"]) != 0
    assert "left as it was" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no DST, no staging directory


def test_unknown_quantize_value_is_refused(tiny_ckpt, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "hi", "--quantize", "int2"])
    assert "invalid choice: 'int2'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="choose one of int8, int4"):
        dsv3.load_model(tiny_ckpt, quantize="nf4")


@pytest.fixture(scope="module")
def int4_ckpt(tiny_ckpt, tmp_path_factory):
    dst = tmp_path_factory.mktemp("int4") / "ckpt"
    dsv3.convert.quantize_checkpoint(tiny_ckpt, dst, "int4")
    return dst


def _edit(src, dst, fn):
    shutil.copytree(src, dst)
    f = next(p for p in dst.iterdir() if p.suffix == ".safetensors" and "o_proj" in str(load_file(p).keys()))
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != f.name}
    index["weight_map"].update({k: f.name for k in tensors})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


NAME = "model.layers.0.self_attn.o_proj.weight"


def test_missing_scale_is_named(int4_ckpt, tmp_path):
    bad = _edit(int4_ckpt, tmp_path / "bad", lambda t: t.pop(NAME + "_scale"))
    with pytest.raises(CheckpointError, match=rf"without their _scale \(1\): {NAME}"):
        dsv3.load_model(bad)


def test_misshaped_scale_and_codes_are_named(int4_ckpt, tmp_path):
    def damage(t):
        t[NAME + "_scale"] = t[NAME + "_scale"][:, :-1].contiguous()
        t["model.layers.0.self_attn.q_b_proj.weight"] = t["model.layers.0.self_attn.q_b_proj.weight"].to(torch.int8)
    bad = _edit(int4_ckpt, tmp_path / "bad", damage)
    with pytest.raises(CheckpointError) as e:
        dsv3.load_model(bad)
    msg = str(e.value)
    assert f"{NAME}_scale" in msg and "expected F16 [160, 4]" in msg
    assert "q_b_proj.weight" in msg and "int4 codes of a [192, 96] weight are U8 [192, 48]" in msg


def test_non_finite_scales_are_a_clear_error(int4_ckpt, tmp_path):
    def damage(t):
        t[NAME + "_scale"][0, 0] = float("nan")
    bad = _edit(int4_ckpt, tmp_path / "bad", damage)
    with pytest.raises(CheckpointError, match="o_proj.weight hold non-finite values"):
        dsv3.load_model(bad)


def test_unsupported_quantization_config_is_named(int4_ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(int4_ckpt, bad)
    conf = json.loads((bad / "config.json").read_text())
    conf["quantization_config"]["bits"] = 3
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="quantization_config.bits = 3; dsv3's int format supports 4 or 8"):
        dsv3.load_model(bad)


def test_a_dimension_the_group_does_not_divide_is_named(tmp_path):
    from dsv3.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path / "odd", hidden_size=144, num_hidden_layers=2)  # 144 = 4.5 groups of 32
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_a_proj.weight: int8 .* multiple of 32"):
        dsv3.load_model(tmp_path / "odd", quantize="int8")


# ------------------------------------------------------------------------------------------------------------------
def test_engine_on_int4_weights_speculation_and_batching_agree(int4_ckpt):
    prompts = [[3, 17, 40, 99, 5], [200, 7, 7, 31], [3, 17, 40, 99, 5, 12, 9]]  # shared prefix: prefix caching
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    plain = LLM(int4_ckpt, dtype="float32", speculative="off", num_blocks=64)
    spec = LLM(int4_ckpt, dtype="float32", speculative="mtp", num_blocks=64)
    assert spec.engine.num_draft == 1 and plain.engine.num_draft == 0
    alone = [plain.generate(p, greedy)[0].token_ids for p in prompts]
    together = [o.token_ids for o in plain.generate(prompts, greedy)]
    speculated = [o.token_ids for o in spec.generate(prompts, greedy)]
    assert together == alone
    assert speculated == alone  # greedy speculation is lossless on int4 weights too
    assert all(len(t) == 12 for t in alone)


def test_a_parallel_slice_that_cuts_a_group_stays_unquantised_with_a_warning(tiny_ckpt, caplog):
    from dsv3.checkpoint import load_weights, open_checkpoint
    from dsv3.model import build_model

    path, cfg, layout, _ = open_checkpoint(tiny_ckpt, False)
    model = build_model(cfg, "meta", with_mtp=False)
    o = model.model.layers[0].self_attn.o_proj
    o.weight = torch.nn.Parameter(torch.empty(160, 48, device="meta"))  # columns 0..48 of 128: 1.5 groups
    name = "model.layers.0.self_attn.o_proj.weight"
    with caplog.at_level("WARNING"):
        load_weights(model, path, torch.float32, select=lambda n, shape: (slice(None), slice(0, 48)) if n == name
                     else None, layout=layout, quantize="int4")
    assert o.quant is None and o.weight.dtype == torch.float32
    full = dsv3.load_model(tiny_ckpt, dtype=torch.float32, with_mtp=False)
    assert torch.equal(o.weight, full.model.layers[0].self_attn.o_proj.weight[:, :48])
    assert model.model.layers[0].self_attn.q_b_proj.quant is not None
    assert "stay unquantised on this rank: model.layers.0.self_attn.o_proj.weight" in caplog.text
