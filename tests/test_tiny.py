"""`dsv3 init-tiny` / dsv3.tiny: a small random checkpoint in the exact official format, and the shipped default."""
import argparse
import json

import pytest
import torch
from safetensors import safe_open

import dsv3
from dsv3 import tokenizer_build as tb
from dsv3.assets import default_model_path
from dsv3.commands import init_tiny as init_tiny_cmd
from dsv3.kernels import fp8
from dsv3.tiny import write_tiny_checkpoint
from dsv3.checkpoint.fp8 import official_fp8
from dsv3.checkpoint.layout import CheckpointLayout


def test_official_format(tiny_ckpt):
    conf = json.loads((tiny_ckpt / "config.json").read_text())
    assert conf["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                           "weight_block_size": [128, 128]}
    assert conf["architectures"] == ["DeepseekV3ForCausalLM"] and conf["torch_dtype"] == "bfloat16"
    assert conf["num_nextn_predict_layers"] == 1 and conf["n_group"] > 1 and conf["topk_group"] < conf["n_group"]
    assert conf["rope_scaling"]["type"] == "yarn" and conf["first_k_dense_replace"] == 1
    assert conf["num_hidden_layers"] > conf["first_k_dense_replace"]
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    layout = CheckpointLayout.read(tiny_ckpt)
    assert set(index["weight_map"]) == set(layout.tensors)
    assert index["metadata"]["total_size"] == layout.total_bytes < 3_000_000
    partial = []
    for name, info in layout.tensors.items():
        if name.endswith("_scale_inv"):
            w = layout.tensors[name[: -len("_scale_inv")]]
            assert info.dtype == torch.float32 and info.shape == fp8.scale_shape(w.shape), name
        elif official_fp8(name):
            assert info.dtype == fp8.FP8_DTYPE and name + "_scale_inv" in layout.tensors, name
            if any(d > 128 and d % 128 for d in info.shape):
                partial.append(name)
        elif name.endswith("e_score_correction_bias"):
            assert info.dtype == torch.float32
        else:
            assert info.dtype == torch.bfloat16, name
    assert partial, "some FP8 weight must have a partial block in a dim above 128"
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv" in layout.tensors
    # the MTP layer (index num_hidden_layers) with its copies of the embedding and the head, as published
    mtp = f"model.layers.{conf['num_hidden_layers']}"
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "mlp.experts.0.up_proj.weight_scale_inv"):
        assert f"{mtp}.{name}" in layout.tensors
    for copy, main in ((f"{mtp}.embed_tokens.weight", "model.embed_tokens.weight"),
                       (f"{mtp}.shared_head.head.weight", "lm_head.weight")):
        assert torch.equal(_tensor(tiny_ckpt, index, copy), _tensor(tiny_ckpt, index, main))


def _tensor(path, index, name):
    with safe_open(path / index["weight_map"][name], framework="pt") as f:
        return f.get_tensor(name)


def test_tokenizer_files(tiny_ckpt):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in (tb.BOS, tb.EOS, tb.USER, tb.ASSISTANT)] == [0, 1, 2, 3]
    assert tok.get_vocab_size() <= json.loads((tiny_ckpt / "config.json").read_text())["vocab_size"]
    text = "def heapify(x):\n    return x"
    assert tok.decode(tok.encode(text).ids) == text
    assert len(tok.encode(text).ids) < len(text)  # merges were learned
    conf = json.loads((tiny_ckpt / "tokenizer_config.json").read_text())
    assert conf["bos_token"] == tb.BOS and conf["eos_token"] == tb.EOS and conf["chat_template"] == tb.CHAT_TEMPLATE
    gen = json.loads((tiny_ckpt / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 0 and gen["eos_token_id"] == 1


def test_seeded_and_deterministic(tiny_ckpt, tmp_path):
    write_tiny_checkpoint(tmp_path / "again", seed=0)
    write_tiny_checkpoint(tmp_path / "other", seed=1)
    names = sorted(p.name for p in tiny_ckpt.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for n in names:
        assert (tmp_path / "again" / n).read_bytes() == (tiny_ckpt / n).read_bytes(), n
    shard = "model-00001-of-00003.safetensors"
    assert (tmp_path / "other" / shard).read_bytes() != (tiny_ckpt / shard).read_bytes()


def test_overrides(tmp_path):
    info = write_tiny_checkpoint(tmp_path / "bf16", num_hidden_layers=2, quantization_config=None, vocab_size=300)
    conf = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in conf and conf["num_hidden_layers"] == 2 and info["tokenizer_vocab"] <= 300
    layout = CheckpointLayout.read(tmp_path / "bf16")
    assert not any(i.dtype == fp8.FP8_DTYPE for i in layout.tensors.values())
    assert "model.layers.2.eh_proj.weight" in layout.tensors
    model = dsv3.load_model(tmp_path / "bf16")
    assert len(model.main_layers) == 2 and len(model.mtp_layers) == 1


@torch.no_grad()
def test_loads_and_runs(tiny_ckpt):
    model = dsv3.load_model(tiny_ckpt, dtype=torch.float32)
    ids = torch.randint(0, 320, (2, 12))
    logits = model(ids)
    assert logits.shape == (2, 12, 320) and torch.isfinite(logits).all()
    assert logits.std() > 0.1  # random but not degenerate
    mtp_logits, _ = model.mtp(1, model.hidden_states(ids), ids)
    assert torch.isfinite(mtp_logits).all()


@torch.no_grad()
def test_shipped_default_model_loads():
    path = default_model_path()
    model = dsv3.load_model(path)
    conf = model.cfg
    ids = torch.randint(0, conf.vocab_size, (1, 8))
    assert torch.isfinite(model(ids).float()).all()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(f"{path}/tokenizer.json")
    assert tok.token_to_id(tb.BOS) == conf.bos_token_id and tok.get_vocab_size() <= conf.vocab_size


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    init_tiny_cmd.add_parser(parser.add_subparsers())

    def run(*argv):
        args = parser.parse_args(["init-tiny", *argv])
        return args.func(args)
    assert run(str(tmp_path / "t"), "--seed", "3") == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 't'}: tiny DeepSeek-V3 (seed 3), 3 shard files, 383 tensors, 2.59 MB" in out
    before = (tmp_path / "t" / "model-00001-of-00003.safetensors").read_bytes()
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        run(str(tmp_path / "t"))
    assert run(str(tmp_path / "t"), "--overwrite") == 0  # seed 0 now
    assert (tmp_path / "t" / "model-00001-of-00003.safetensors").read_bytes() != before
