"""`dsv3 convert`: FP8 -> bf16/fp32 (exact, loadable by transformers), bf16 -> FP8 round trips, atomic output."""
import argparse
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import dsv3
from dsv3 import convert
from dsv3.checkpoint.layout import CheckpointError, CheckpointLayout
from dsv3.commands import convert as convert_cmd
from dsv3.kernels import fp8
from test_fp8 import read_checkpoint, reference_weights


def snapshot(path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `path` with its size, mtime and bytes."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns, fh.read())
    return out


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    convert_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["convert", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def bf16_ckpt(tiny_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("conv") / "bf16"
    convert.fp8_to_dtype(tiny_ckpt, path)
    return path


def test_fp8_to_bf16_is_exact_and_complete(tiny_ckpt, bf16_ckpt):
    ref = reference_weights(tiny_ckpt)
    out = read_checkpoint(bf16_ckpt)
    assert set(out) == set(ref)  # scales dropped, nothing else
    for name, t in out.items():
        want = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert t.dtype == want and torch.equal(t, ref[name].to(want)), name
    conf = json.loads((bf16_ckpt / "config.json").read_text())
    src_conf = json.loads((tiny_ckpt / "config.json").read_text())
    assert "quantization_config" not in conf and conf["torch_dtype"] == "bfloat16"
    assert {k: v for k, v in conf.items() if k != "quantization_config"} == \
        {k: v for k, v in src_conf.items() if k != "quantization_config"}
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (bf16_ckpt / f).read_bytes() == (tiny_ckpt / f).read_bytes()
    index = json.loads((bf16_ckpt / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())


def test_fp8_to_fp32_chunked_equals_the_definition(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "_CHUNK_BYTES", 1000)  # many chunks per tensor
    info = convert.fp8_to_dtype(tiny_ckpt, tmp_path / "fp32", "float32")
    out = read_checkpoint(tmp_path / "fp32")
    ref = reference_weights(tiny_ckpt)
    assert info["tensors"] == len(out) == len(ref)
    for name, t in out.items():
        assert torch.equal(t, ref[name]), name


@torch.no_grad()
def test_fp8_to_bf16_loads_in_transformers_and_agrees_with_dsv3(bf16_ckpt):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    ref = transformers.AutoModelForCausalLM.from_pretrained(bf16_ckpt, dtype=torch.float32).eval()
    ours = dsv3.load_model(bf16_ckpt, dtype=torch.float32)
    ids = torch.randint(0, 320, (2, 24))
    expected = ref(ids).logits
    assert ((ours(ids) - expected).norm() / expected.norm()).item() <= 1e-4


def test_round_trip_bf16_to_fp8_to_load_reproduces_quantised_weights(bf16_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "_CHUNK_BYTES", 1000)  # quantising chunk by chunk must equal quantising at once
    info = convert.to_fp8(bf16_ckpt, tmp_path / "fp8")
    raw = read_checkpoint(tmp_path / "fp8")
    src = read_checkpoint(bf16_ckpt)
    layout = CheckpointLayout.read(tmp_path / "fp8")
    fp8_names = {n for n, i in layout.tensors.items() if i.dtype == fp8.FP8_DTYPE}
    # the official set: projections incl. kv_a_proj_with_mqa; not the head, the MTP eh_proj, the router, embeddings
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in fp8_names
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in fp8_names
    for name in ("lm_head.weight", "model.layers.3.eh_proj.weight", "model.layers.1.mlp.gate.weight",
                 "model.embed_tokens.weight"):
        assert raw[name].dtype == torch.bfloat16 and name + "_scale_inv" not in raw
    assert raw["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert info["tensors"] == len(src) + len(fp8_names)
    loaded = dsv3.load_model(tmp_path / "fp8", dtype=torch.float32)
    from test_fp8 import model_weight

    for name, w in src.items():
        if ".layers.3.embed_tokens." in name or ".shared_head.head." in name:
            continue
        if name in fp8_names:  # the file holds exactly the quantised bytes, and the model their dequantisation
            q, s = fp8.quantize(w)
            assert torch.equal(raw[name].view(torch.uint8), q.view(torch.uint8)), name
            assert torch.equal(raw[name + "_scale_inv"], s), name
            assert torch.equal(model_weight(loaded, name), fp8.dequantize(q, s)), name
        else:
            assert torch.equal(model_weight(loaded, name), w.float()), name


def test_failed_convert_leaves_dst_and_src_as_they_were(tiny_ckpt, bf16_ckpt, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    shutil.copytree(bf16_ckpt, dst)  # an existing checkpoint the user asked to replace
    before_dst, before_src = snapshot(dst), snapshot(tiny_ckpt)
    calls = []
    real = convert._write_safetensors

    def fail_on_second(path, entries):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, entries)
    monkeypatch.setattr(convert, "_write_safetensors", fail_on_second)
    with pytest.raises(OSError, match="No space left"):
        convert.fp8_to_dtype(tiny_ckpt, dst, "float32", overwrite=True)
    assert len(calls) == 2
    assert snapshot(dst) == before_dst and snapshot(tiny_ckpt) == before_src
    assert sorted(os.listdir(tmp_path)) == ["dst"]  # the staging directory is gone
    # through the command: a clear error instead of a traceback, and still nothing touched
    calls.clear()
    with pytest.raises(RuntimeError, match="left as it was"):
        cli("fp8-to-bf16", str(tiny_ckpt), str(dst), "--overwrite")
    assert snapshot(dst) == before_dst


def test_refuses_to_overwrite_without_being_asked(tiny_ckpt, bf16_ckpt, tmp_path):
    before = snapshot(tiny_ckpt)
    with pytest.raises(ValueError, match="overlaps the source"):
        convert.fp8_to_dtype(tiny_ckpt, tiny_ckpt, overwrite=True)
    with pytest.raises(ValueError, match="overlaps the source"):
        convert.fp8_to_dtype(tiny_ckpt, tiny_ckpt / "inside")
    with pytest.raises(ValueError, match="overlaps the source"):
        convert.fp8_to_dtype(tiny_ckpt, tiny_ckpt.parent, overwrite=True)  # replacing DST would delete SRC
    other = tmp_path / "other"
    shutil.copytree(bf16_ckpt, other)
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        convert.fp8_to_dtype(tiny_ckpt, other)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="does not look like a checkpoint"):
        convert.fp8_to_dtype(tiny_ckpt, notes, overwrite=True)
    assert (notes / "todo.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match="already quantised"):
        convert.to_fp8(tiny_ckpt, tmp_path / "again")
    with pytest.raises(CheckpointError, match="no FP8"):
        convert.fp8_to_dtype(bf16_ckpt, tmp_path / "again")
    assert snapshot(tiny_ckpt) == before and not (tmp_path / "again").exists()
    # an empty DST is fine without --overwrite, and --overwrite replaces a checkpoint
    (tmp_path / "empty").mkdir()
    convert.fp8_to_dtype(tiny_ckpt, tmp_path / "empty")
    convert.to_fp8(bf16_ckpt, other, overwrite=True)
    assert load_file(other / "model-00001-of-00003.safetensors")["model.layers.0.mlp.up_proj.weight"].dtype == \
        fp8.FP8_DTYPE


def test_cli_reports_what_it_wrote(tiny_ckpt, tmp_path, capsys):
    assert cli("fp8-to-bf16", str(tiny_ckpt), str(tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'out'} (FP8 -> bfloat16)" in out
    assert "model-00001-of-00003.safetensors" in out and "total: 3 files, 207 tensors" in out
    assert "copied: generation_config.json, tokenizer.json, tokenizer_config.json" in out
    assert cli("to-fp8", str(tmp_path / "out"), str(tmp_path / "back"), "--dtype", "keep") == 0
    assert "total: 3 files, 383 tensors" in capsys.readouterr().out
