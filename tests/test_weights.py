"""Loading and writing checkpoints: round trips, sharding, strict checks that name what is wrong."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3 import CheckpointError, ModelConfig
from dsv3.model import build_model
from hf_ref import v3


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(v3()), "cpu", torch.float32).eval()
    info = dsv3.save_model(model, tmp_path / "ckpt", max_shard_bytes=200_000)
    return model, tmp_path / "ckpt", info


def test_round_trip_sharded_with_mtp(saved):
    model, path, info = saved
    assert info["files"] > 1
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    assert "model.layers.3.shared_head.head.weight" in index["weight_map"]  # MTP copies, as published
    loaded = dsv3.load_model(path, dtype=torch.float32)
    assert len(loaded.mtp_layers) == 1
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
        h = model.hidden_states(ids)
        assert torch.equal(loaded.mtp(1, h, ids)[0], model.mtp(1, h, ids)[0])


def test_skip_mtp(saved):
    _, path, _ = saved
    assert dsv3.load_model(path, dtype=torch.float32, with_mtp=False).mtp_layers == []


def _rewrite(path, edit):
    """Apply edit(dict of tensors) to whichever shard holds each tensor, keeping the index consistent."""
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = sorted(set(index["weight_map"].values()))
    for f in files:
        tensors = load_file(path / f)
        edit(tensors)
        save_file(tensors, path / f)
    index["weight_map"] = {n: f for f in files for n in load_file(path / f)}
    index_path.write_text(json.dumps(index))


def test_missing_tensor_named(saved):
    _, path, _ = saved
    _rewrite(path, lambda t: t.pop("model.layers.0.self_attn.kv_b_proj.weight", None))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model.layers.0.self_attn.kv_b_proj.weight"):
        dsv3.load_model(path)


def test_unexpected_tensor_named(saved):
    _, path, _ = saved

    def add(t):
        if "model.norm.weight" in t:
            t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    _rewrite(path, add)
    with pytest.raises(CheckpointError, match="unexpected tensors.*rotary_emb.inv_freq"):
        dsv3.load_model(path)


def test_wrong_shape_named(saved):
    _, path, _ = saved

    def shrink(t):
        name = "model.layers.2.mlp.experts.3.up_proj.weight"
        if name in t:
            t[name] = t[name][:-1].contiguous()
    _rewrite(path, shrink)
    with pytest.raises(CheckpointError, match=r"wrong shapes.*experts.3.up_proj.weight \[31, 64\].*\[32, 64\]"):
        dsv3.load_model(path)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(v3()))
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        dsv3.load_model(tmp_path)
    with pytest.raises(FileNotFoundError):
        dsv3.load_model(tmp_path / "nope")
