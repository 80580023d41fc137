"""FP8 block-scaled checkpoints: exact dequantisation (kernel and loader), scales in other shards, keep mode,
parity with transformers on the exactly dequantised weights, reading only what is loaded (MTP skip, the
tensor/expert-parallel `select` hook) and the progress bar."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3.checkpoint import load as weights
from dsv3.checkpoint import reader
from dsv3.checkpoint.layout import CheckpointError, CheckpointLayout
from dsv3.config import ModelConfig
from dsv3.kernels import fp8
from dsv3.model import build_model
from hf_ref import YARN, hf_model, v3


def reference_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The definition: w[i, j] = q[i, j] * scale_inv[i // 128, j // 128], in float32."""
    rows = torch.arange(q.shape[-2]) // 128
    cols = torch.arange(q.shape[-1]) // 128
    return q.float() * scale.float()[..., rows, :][..., cols]


def random_fp8(*shape: int) -> torch.Tensor:
    """Every finite e4m3 code is equally likely (0x7f / 0xff are NaN)."""
    bits = torch.randint(0, 256, shape, dtype=torch.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0
    return bits.view(fp8.FP8_DTYPE)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("shape", [(300, 160), (256, 384), (1, 129), (3, 200, 130), (130, 1)])
def test_dequantize_is_bit_exact(shape):
    q = random_fp8(*shape)
    s = torch.rand(fp8.scale_shape(shape)) * 1e-2 + 1e-4
    ref = reference_dequantize(q, s)
    assert same_bits(fp8.dequantize(q, s).view(torch.int32), ref.view(torch.int32))
    assert torch.equal(fp8.dequantize(q, s, torch.bfloat16), ref.to(torch.bfloat16))
    out = torch.empty(shape, dtype=torch.bfloat16)
    fp8.dequantize(q, s, out=out)
    assert torch.equal(out, ref.to(torch.bfloat16))


def test_dequantize_window_with_offsets_is_bit_exact():
    q = random_fp8(300, 260)
    s = torch.rand(fp8.scale_shape(q.shape)) + 0.5
    ref = reference_dequantize(q, s)
    for r0, r1, c0, c1 in [(0, 300, 0, 260), (5, 133, 7, 255), (128, 257, 130, 131), (299, 300, 0, 1)]:
        sub = s[r0 // 128: -(-r1 // 128), c0 // 128: -(-c1 // 128)]
        got = fp8.dequantize(q[r0:r1, c0:c1], sub, offset=(r0 % 128, c0 % 128))
        assert torch.equal(got, ref[r0:r1, c0:c1])
    with pytest.raises(ValueError, match="scale shape"):
        fp8.dequantize(q, s[:, :1])


def test_quantize_matches_the_official_recipe():
    w = torch.randn(200, 300)
    w[:128, :128] = 0  # an all-zero block
    q, s = fp8.quantize(w)
    assert q.dtype == fp8.FP8_DTYPE and s.shape == (2, 3)
    assert s[0, 0] == 1.0
    assert torch.equal(s[1, 2], w[128:, 256:].abs().max() / 448)
    err = (fp8.dequantize(q, s) - w).abs()
    # Rounding to 3 mantissa bits: half an ulp is 1/16 relative, or half the subnormal step 2^-9 (times the scale).
    assert (err <= w.abs() / 16 + reference_dequantize(torch.ones_like(q), s) * 2**-10).all()


# ------------------------------------------------------------------------------------------------------------------
# Loading FP8 checkpoints
def read_checkpoint(path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(path / f))
    return out


def reference_weights(path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint in float32, FP8 ones dequantised by the definition (safetensors' own reader)."""
    raw = read_checkpoint(path)
    return {n: (reference_dequantize(t, raw[n + "_scale_inv"]) if t.dtype == fp8.FP8_DTYPE else t.float())
            for n, t in raw.items() if not n.endswith("_scale_inv")}


def model_weight(model, name: str) -> torch.Tensor:
    """Checkpoint tensor `name` as the model holds it (float32, expert un-stacked)."""
    import re

    m = re.match(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$", name)
    if m:
        mod = model.get_submodule(f"{m.group(1)}.{m.group(3)}")
        return mod.dense(int(m.group(2)), torch.float32)
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if hasattr(mod, "effective_weight") and attr == "weight":
        return mod.effective_weight(torch.float32)
    return getattr(mod, attr).float()


def assert_loaded_exactly(model, ref: dict[str, torch.Tensor], skip=()):
    checked = 0
    for name, want in ref.items():
        if any(s in name for s in skip):
            continue
        assert torch.equal(model_weight(model, name), want), name
        checked += 1
    assert checked > 100


def test_loader_dequantizes_bit_exact(tiny_ckpt, monkeypatch):
    ref = reference_weights(tiny_ckpt)
    skip = (".layers.3.embed_tokens.", ".shared_head.head.")  # the MTP layer's copies are not loaded
    assert_loaded_exactly(dsv3.load_model(tiny_ckpt, dtype=torch.float32), ref, skip)
    assert_loaded_exactly(dsv3.load_model(tiny_ckpt, dtype=torch.float32, fp8_mode="keep"), ref, skip)
    # Chunks smaller than one block row force the chunked and the unaligned paths.
    monkeypatch.setattr(reader, "_CHUNK_BYTES", 700)
    assert_loaded_exactly(dsv3.load_model(tiny_ckpt, dtype=torch.float32), ref, skip)


def test_scales_in_another_shard(tiny_ckpt, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, path)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    moved = {}
    for f in sorted(set(index["weight_map"].values())):
        tensors = load_file(path / f)
        moved.update({n: tensors.pop(n) for n in list(tensors) if n.endswith("_scale_inv")})
        save_file(tensors, path / f)
    save_file(moved, path / "scales.safetensors")
    index["weight_map"].update({n: "scales.safetensors" for n in moved})
    index_path.write_text(json.dumps(index))
    model = dsv3.load_model(path, dtype=torch.float32)
    assert_loaded_exactly(model, reference_weights(path), (".layers.3.embed_tokens.", ".shared_head.head."))


@torch.no_grad()
def test_keep_mode_gives_the_same_logits(tiny_ckpt):
    deq = dsv3.load_model(tiny_ckpt, dtype=torch.float32)
    keep = dsv3.load_model(tiny_ckpt, dtype=torch.float32, fp8_mode="keep")
    attn = keep.model.layers[1].self_attn.q_b_proj
    experts = keep.model.layers[1].mlp.experts.gate_proj
    assert attn.weight.dtype == experts.weight.dtype == fp8.FP8_DTYPE
    assert attn.weight_scale_inv.shape == (2, 1) and experts.weight_scale_inv.shape == (16, 1, 2)
    assert keep.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(0, 320, (2, 17))
    a, b = deq(ids), keep(ids)
    assert ((a - b).norm() / a.norm()).item() <= 1e-5
    h = deq.hidden_states(ids)
    assert ((deq.mtp(1, h, ids)[0] - keep.mtp(1, h, ids)[0]).norm() / a.norm()).item() <= 1e-5
    # bf16 keep mode runs (the CPU path dequantises each hit expert on the fly)
    assert torch.isfinite(dsv3.load_model(tiny_ckpt, fp8_mode="keep")(ids)).all()


# Dims that are not multiples of 128 and some above 128, so partial blocks are real in both directions.
PARITY = v3(hidden_size=160, vocab_size=300, intermediate_size=320, moe_intermediate_size=144, q_lora_rank=136,
            kv_lora_rank=72, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=40, n_group=4, topk_group=2,
            num_experts_per_tok=2, rope_scaling=dict(YARN), max_position_embeddings=256)


@torch.no_grad()
def test_fp8_logits_match_transformers_on_exactly_dequantised_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from dsv3.convert import to_fp8

    src, q8, exact = tmp_path / "fp32", tmp_path / "fp8", tmp_path / "exact"
    hf_model(PARITY).save_pretrained(src)
    to_fp8(src, q8, other_dtype="keep")
    # The reference model gets the FP8 weights dequantised by the definition, written with safetensors itself.
    exact.mkdir()
    save_file({n: t.contiguous() for n, t in reference_weights(q8).items()}, exact / "model.safetensors")
    conf = json.loads((q8 / "config.json").read_text())
    conf.pop("quantization_config")
    (exact / "config.json").write_text(json.dumps(conf))
    transformers.logging.set_verbosity_error()
    ref = AutoModelForCausalLM.from_pretrained(exact, dtype=torch.float32).eval()

    ids = torch.randint(0, 300, (2, 40))
    expected = ref(ids).logits
    for mode in ("dequantize", "keep"):
        got = dsv3.load_model(q8, dtype=torch.float32, fp8_mode=mode)(ids)
        assert ((got - expected).norm() / expected.norm()).item() <= 1e-4, mode


# ------------------------------------------------------------------------------------------------------------------
# Reading only what is loaded
def record_reads(monkeypatch) -> list[tuple[str, int, int]]:
    reads = []
    real = reader._read_at

    def spy(f, offset, view):
        reads.append((f.name, offset, len(view)))
        return real(f, offset, view)
    monkeypatch.setattr(reader, "_read_at", spy)
    return reads


def bytes_read_per_tensor(layout, reads) -> dict[str, int]:
    import os

    out: dict[str, int] = {}
    for fname, offset, n in reads:
        for info in layout.tensors.values():
            if info.file == os.path.basename(fname) and offset < info.offset + info.nbytes and info.offset < offset + n:
                overlap = min(offset + n, info.offset + info.nbytes) - max(offset, info.offset)
                out[info.name] = out.get(info.name, 0) + overlap
    return out


def test_mtp_skip_reads_no_mtp_bytes(tiny_ckpt, monkeypatch):
    layout = CheckpointLayout.read(tiny_ckpt)
    mtp = {n for n in layout.tensors if n.startswith("model.layers.3.")}
    assert len(mtp) > 50
    reads = record_reads(monkeypatch)
    model = dsv3.load_model(tiny_ckpt, with_mtp=False)
    assert model.mtp_layers == []
    got = bytes_read_per_tensor(layout, reads)
    assert not mtp & set(got)
    # everything else is read exactly once
    assert got == {n: i.nbytes for n, i in layout.tensors.items() if n not in mtp}

    reads.clear()
    dsv3.load_model(tiny_ckpt, with_mtp=True)
    got = bytes_read_per_tensor(layout, reads)
    copies = {"model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight"}
    assert got == {n: i.nbytes for n, i in layout.tensors.items() if n not in copies}


def test_select_hook_reads_only_the_window(tiny_ckpt, monkeypatch):
    """What a tensor-/expert-parallel rank does: build its local model on meta, then read only its slices."""
    full = dsv3.load_model(tiny_ckpt, dtype=torch.float32, with_mtp=False)
    cfg = ModelConfig.from_pretrained(tiny_ckpt)
    windows = {
        "model.layers.1.mlp.experts.gate_proj.weight": (slice(4, 8),),  # expert parallel: experts 4..7
        "model.layers.0.self_attn.q_b_proj.weight": (slice(50, 170), slice(10, 90)),  # unaligned rows and cols
        "model.layers.2.self_attn.o_proj.weight": (slice(None), slice(64, 128)),  # a row-parallel split
    }

    def local_model():
        model = build_model(cfg, "meta", with_mtp=False)
        for name, sl in windows.items():
            mod_name, _, attr = name.rpartition(".")
            shape = torch.empty(model.get_parameter(name).shape, device="meta")[sl].shape
            setattr(model.get_submodule(mod_name), attr, torch.nn.Parameter(torch.empty(shape, device="meta")))
        return model

    reads = record_reads(monkeypatch)
    model = weights.load_weights(local_model(), tiny_ckpt, torch.float32, select=lambda n, shape: windows.get(n))
    for name, sl in windows.items():
        assert torch.equal(model.get_parameter(name), full.get_parameter(name)[sl]), name
    assert torch.equal(model.model.layers[1].mlp.experts.up_proj.weight, full.model.layers[1].mlp.experts.up_proj.weight)
    layout = CheckpointLayout.read(tiny_ckpt)
    got = bytes_read_per_tensor(layout, reads)
    read_experts = {n for n in got if n.startswith("model.layers.1.mlp.experts.") and ".gate_proj." in n}
    assert read_experts == {f"model.layers.1.mlp.experts.{e}.gate_proj.weight{s}" for e in range(4, 8)
                            for s in ("", "_scale_inv")}
    assert got["model.layers.0.self_attn.q_b_proj.weight"] == 120 * 80  # fp8: one byte per element
    assert got["model.layers.2.self_attn.o_proj.weight"] == 160 * 64

    # keep mode: FP8 windows must cover whole blocks; then weights and scales are both sliced
    windows = {"model.layers.0.self_attn.q_b_proj.weight": (slice(128, 192),)}
    model = weights.load_weights(local_model(), tiny_ckpt, torch.float32, fp8_mode="keep",
                                 select=lambda n, shape: windows.get(n))
    lin = model.model.layers[0].self_attn.q_b_proj
    assert lin.weight.dtype == fp8.FP8_DTYPE and lin.weight_scale_inv.shape == (1, 1)
    assert torch.equal(lin.effective_weight(torch.float32), full.get_parameter(next(iter(windows)))[128:192])
    windows = {"model.layers.0.self_attn.q_b_proj.weight": (slice(100, 192),)}
    with pytest.raises(ValueError, match="block boundaries"):
        weights.load_weights(local_model(), tiny_ckpt, fp8_mode="keep", select=lambda n, shape: windows.get(n))
    with pytest.raises(CheckpointError, match="selected window"):
        weights.load_weights(build_model(cfg, "meta", with_mtp=False), tiny_ckpt,
                             select=lambda n, shape: windows.get(n))


def test_progress_bar_counts_every_byte(tiny_ckpt, monkeypatch, capsys):
    bars = []
    real = weights.progress_bar

    def spy(total, desc, enabled):
        bar = real(total, desc, enabled)
        bars.append(bar)
        return bar
    monkeypatch.setattr(weights, "progress_bar", spy)
    reads = record_reads(monkeypatch)
    dsv3.load_model(tiny_ckpt, progress=True)
    (bar,) = bars
    assert bar.n == bar.total == sum(n for _, _, n in reads) > 2_000_000
    err = capsys.readouterr().err
    assert "loading ckpt" in err and "B/s" in err  # the bar is drawn (and erased at the end: leave=False)
