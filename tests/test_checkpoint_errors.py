"""Bad checkpoints: each case gives one CheckpointError naming the file and the tensor, and nothing on disk changes."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3 import CheckpointError, convert
from test_convert import snapshot

SHARD2 = "model-00002-of-00003.safetensors"


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, path)
    return path


def fails_cleanly(path, match: str, tmp_path) -> CheckpointError:
    """Loading (and converting) `path` raises CheckpointError matching `match`, and leaves every file as it was."""
    before = snapshot(path)
    with pytest.raises(CheckpointError, match=match) as e:
        dsv3.load_model(path)
    assert "\n" not in str(e.value).strip() or str(e.value).startswith("checkpoint ")  # one message, not a dump
    with pytest.raises(CheckpointError, match=match):
        convert.fp8_to_dtype(path, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()
    assert snapshot(path) == before
    return e.value


def read_raw(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw(path, header, body):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


def edit_shard(path, edit):
    """Rewrite the shard that holds some tensors with edit(dict), keeping the index consistent."""
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    tensors = load_file(path / SHARD2)
    edit(tensors)
    save_file(tensors, path / SHARD2)
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != SHARD2}
    index["weight_map"].update({n: SHARD2 for n in tensors})
    index_path.write_text(json.dumps(index))
    return tensors


def test_truncated_shard(ckpt, tmp_path):
    header, body = read_raw(ckpt / SHARD2)
    shard = ckpt / SHARD2
    shard.write_bytes(shard.read_bytes()[:-5000])
    err = fails_cleanly(ckpt, rf"{SHARD2}: tensor '([^']+)' ends at data byte \d+ but the file holds only", tmp_path)
    name = re.search(r"tensor '([^']+)'", str(err)).group(1)
    assert header[name]["data_offsets"][1] > len(body) - 5000  # the named tensor really is cut off
    assert "download it again" in str(err)
    shard.write_bytes(b"\x10\x00")  # cut inside the 8-byte length
    fails_cleanly(ckpt, rf"{SHARD2}: 2 bytes is too short", tmp_path)


def test_header_that_lies_about_sizes(ckpt, tmp_path):
    header, body = read_raw(ckpt / SHARD2)
    name = next(n for n in header if n.endswith("kv_a_layernorm.weight"))
    header[name]["shape"] = [header[name]["shape"][0] + 3]
    write_raw(ckpt / SHARD2, header, body)
    fails_cleanly(ckpt, rf"{SHARD2}: tensor '{re.escape(name)}': the header says shape \[67\] x BF16 = 134 bytes "
                        rf"but gives it 128 bytes", tmp_path)
    header[name]["shape"] = [header[name]["shape"][0] - 3]
    header[name]["data_offsets"][1] += 2  # overlaps the next tensor
    header[name]["shape"] = [65]
    write_raw(ckpt / SHARD2, header, body)
    fails_cleanly(ckpt, rf"{SHARD2}: tensor '[^']+' overlaps the previous tensor", tmp_path)
    (ckpt / SHARD2).write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    fails_cleanly(ckpt, rf"{SHARD2}: the header claims 1099511627776 bytes but the file holds only 10", tmp_path)
    (ckpt / SHARD2).write_bytes((4).to_bytes(8, "little") + b"{]x!")
    fails_cleanly(ckpt, rf"{SHARD2}: the safetensors header is not valid JSON", tmp_path)


def test_missing_shard(ckpt, tmp_path):
    (ckpt / "model-00003-of-00003.safetensors").unlink()
    err = fails_cleanly(ckpt, r"shard file\(s\) named in model.safetensors.index.json are missing: "
                              r"model-00003-of-00003.safetensors; .* should hold \d+ tensors \(", tmp_path)
    assert "model.layers." in str(err)


def test_scale_shape_does_not_match_weight(ckpt, tmp_path):
    def shrink(t):
        name = next(n for n in t if n.endswith("q_b_proj.weight_scale_inv"))
        t[name] = t[name][:1].contiguous()  # [2, 1] -> [1, 1] for a [192, 96] weight
    edit_shard(ckpt, shrink)
    fails_cleanly(ckpt, rf"scales whose shape does not match their weight \(1\): model.layers.\d.self_attn.q_b_proj"
                        rf".weight_scale_inv \({SHARD2}\) \[1, 1\] F32 \(weight \[192, 96\] needs float \[2, 1\]\)",
                  tmp_path)


def test_weight_missing_its_scale(ckpt, tmp_path):
    def drop(t):
        del t[next(n for n in t if n.endswith("experts.5.up_proj.weight_scale_inv"))]
    edit_shard(ckpt, drop)
    fails_cleanly(ckpt, rf"FP8 weights without their _scale_inv \(1\): model.layers.\d.mlp.experts.5.up_proj.weight "
                        rf"\({SHARD2}\)", tmp_path)


def test_unknown_dtype(ckpt, tmp_path):
    header, body = read_raw(ckpt / SHARD2)
    name = next(n for n in header if n.endswith("o_proj.weight"))
    header[name]["dtype"] = "F6_E3M2"
    write_raw(ckpt / SHARD2, header, body)
    fails_cleanly(ckpt, rf"{SHARD2}: tensor '{re.escape(name)}' has dtype 'F6_E3M2', which safetensors does not "
                        rf"define", tmp_path)


def test_known_dtype_that_no_deepseek_tensor_uses(ckpt, tmp_path):
    header, body = read_raw(ckpt / SHARD2)
    name = next(n for n in header if n.endswith("input_layernorm.weight"))
    header[name]["dtype"] = "I16"  # same size as BF16, so only the dtype is wrong
    write_raw(ckpt / SHARD2, header, body)
    before = snapshot(ckpt)
    with pytest.raises(CheckpointError, match=rf"unsupported dtypes \(1\): {re.escape(name)} \({SHARD2}\) is I16"):
        dsv3.load_model(ckpt)
    assert snapshot(ckpt) == before


def test_non_finite_scale(ckpt, tmp_path):
    def poison(t):
        name = next(n for n in t if n.endswith("kv_b_proj.weight_scale_inv"))
        t[name] = torch.full_like(t[name], float("nan"))
    edit_shard(ckpt, poison)
    before = snapshot(ckpt)
    with pytest.raises(CheckpointError, match=rf"{SHARD2}: tensor 'model.layers.\d.self_attn.kv_b_proj"
                                              rf".weight_scale_inv' holds non-finite scales"):
        dsv3.load_model(ckpt)
    assert snapshot(ckpt) == before


def test_device_that_is_not_here(tiny_ckpt, tmp_path, capsys):
    """A device this machine cannot load onto is refused before any weight is read, with what to use instead (torch
    itself fails with an assertion deep in torch.cuda), by the Python API and the commands alike."""
    from dsv3.cli import main

    with pytest.raises(ValueError, match="not a device name: use cpu, cuda or cuda:N"):
        dsv3.load_model(tiny_ckpt, device="gpu0")
    with pytest.raises(ValueError, match="dsv3 runs on cpu or cuda devices"):
        dsv3.load_model(tiny_ckpt, device="mps")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = "cuda" if n == 0 else f"cuda:{n}"
    with pytest.raises(ValueError, match="CPU-only build; use cpu|no CUDA device is visible|CUDA device\\(s\\)"):
        dsv3.load_model(tiny_ckpt, device=missing)
    assert main(["generate", "--model", str(tiny_ckpt), "--device", missing, "x"]) == 1
    assert f"dsv3 generate: error: device '{missing}'" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["train", "--device", "mps", "--out", str(out), "--steps", "1"]) == 1
    assert "dsv3 train: error: device 'mps'" in capsys.readouterr().err and not out.exists()
