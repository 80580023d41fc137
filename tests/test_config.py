import json

import pytest

from dsv3 import ModelConfig
from dsv3.presets import PRESETS, preset


def test_deepseek_v3_published_counts():
    cfg = preset("deepseek-v3")
    c = cfg.param_counts()
    assert round(c["main"] / 1e9, 2) == 671.03  # published: 671B in the main model
    assert 36.5e9 < c["active_per_token"] < 38e9  # published: 37B activated
    assert 11.4e9 < c["mtp_unique"] < 11.7e9  # published: 11.5B unique MTP parameters
    assert cfg.kv_cache_bytes_per_token(2) == 70272  # 576 values x 61 layers x 2 bytes
    assert abs(cfg.softmax_scale - 0.135234) < 1e-6
    assert cfg.layer_kinds == ["dense"] * 3 + ["moe"] * 58


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_family_member_reads(name, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS[name]))
    cfg = ModelConfig.from_pretrained(tmp_path)
    assert cfg == preset(name)


def test_published_sizes_of_other_members():
    assert 1.0e12 < preset("kimi-k2").param_counts()["main"] < 1.05e12  # "1T total"
    assert 15.5e9 < preset("moonlight-16b-a3b").param_counts()["main"] < 16.5e9
    assert 235e9 < preset("deepseek-v2").param_counts()["main"] < 237e9  # "236B"
    assert 15.5e9 < preset("deepseek-v2-lite").param_counts()["main"] < 16e9  # "15.7B"


def test_rope_parameters_spelling_of_transformers_5():
    raw = dict(PRESETS["deepseek-v3"])
    scaling = raw.pop("rope_scaling")
    raw.pop("rope_theta")
    raw["rope_parameters"] = dict(scaling, rope_type="yarn", rope_theta=10000.0)
    del raw["rope_parameters"]["type"]
    assert ModelConfig.from_dict(raw).rope == preset("deepseek-v3").rope


def test_v32_indexer_refused_naming_field():
    raw = dict(PRESETS["deepseek-v3"], index_topk=2048, architectures=["DeepseekV32ForCausalLM"])
    with pytest.raises(ValueError, match="index_topk"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "llama", "model_type"),
    ("topk_method", "random", "topk_method"),
    ("scoring_func", "relu", "scoring_func"),
    ("n_group", 3, "n_group"),
    ("num_key_value_heads", 8, "num_key_value_heads"),
    ("hidden_act", "gelu", "hidden_act"),
    ("qk_rope_head_dim", 63, "qk_rope_head_dim"),
])
def test_bad_fields_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(dict(PRESETS["deepseek-v3"], **{field: value}))


def test_missing_and_malformed_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)


def test_to_dict_round_trip():
    cfg = preset("deepseek-v2-lite")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
