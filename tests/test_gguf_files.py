"""GGUF files written here with the gguf package's own writer (a tiny model of the deepseek2 architecture, in the
layout llama.cpp's converter writes): the helpers the other test_gguf_* files use, the block decoders against
gguf.quants.dequantize, the metadata -> config mapping, and every bad-input case of issue 21 (a named error, the
files left as they were)."""
from __future__ import annotations

import hashlib
import os
import shutil

import gguf
import numpy as np
import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.gguf import GGUFError, gguf_config, read_gguf
from dsv3.gguf import blocks, names
from dsv3.model.transformer import build_model
from dsv3.tiny import tiny_config

T = gguf.GGMLQuantizationType
# Dimensions that let K-quants (rows of 256) appear on most projections: hidden 256, q_lora 256, experts 256 wide.
GGUF_TINY = dict(vocab_size=320, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                 num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                 n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                 q_lora_rank=256, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                 num_nextn_predict_layers=0, quantization_config=None)
# One file with every supported type on some tensor (K-quants where rows are multiples of 256).
MIXED = {"token_embd": "Q4_K", "output": "Q6_K", "attn_q_a": "Q5_K", "attn_q_b": "Q4_K", "attn_kv_a_mqa": "Q8_0",
         "attn_kv_b": "Q4_0", "attn_k_b": "Q8_0", "attn_v_b": "BF16", "attn_output": "F16", "ffn_gate": "Q4_K",
         "ffn_up": "Q5_K", "ffn_down": "Q6_K", "ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q4_0",
         "ffn_down_exps": "Q6_K", "ffn_gate_shexp": "BF16", "ffn_up_shexp": "Q8_0", "ffn_down_shexp": "Q5_K"}


def gguf_tiny_cfg(**over) -> ModelConfig:
    return ModelConfig.from_dict(tiny_config(**{**GGUF_TINY, **over}))


def _inverse_names(n_layers: int) -> dict[str, str]:
    out = {v: k for k, v in names.TOP.items()}
    for i in range(n_layers):
        for g, m in names.BLOCK.items():
            out[f"model.layers.{i}.{m}"] = f"blk.{i}.{g}"
        for g, m in names.MTP.items():
            out[f"model.layers.{i}.{m}"] = f"blk.{i}.{g}"
    return out


def _kquant_blocks(rows: int, cols: int, qtype: str, rng: np.random.Generator, std: float) -> np.ndarray:
    """Random valid K-quant blocks (the gguf package cannot quantise K types), scaled so the dequantised values
    have roughly `std`."""
    vals, size = blocks.BLOCK[qtype]
    raw = rng.integers(0, 256, (rows, cols // vals, size), dtype=np.uint8)
    if qtype == "Q6_K":
        raw[..., 192:208] = rng.integers(-63, 64, raw[..., 192:208].shape).astype(np.int8).view(np.uint8)
        raw[..., 192] = 0x80  # as llama.cpp makes them: the largest sub-block scale is d * -128
        d = np.float16(rng.uniform(0.5, 1.5, raw.shape[:2]) * std / (32 * 18))
        raw[..., 208:210] = d[..., None].view(np.uint8)
    else:
        q = 15 if qtype == "Q4_K" else 31
        d = np.float16(rng.uniform(0.5, 1.5, raw.shape[:2]) * std / (32 * q / 2))
        dmin = np.float16(rng.uniform(0.5, 1.5, raw.shape[:2]) * std / (32 * 2))
        raw[..., 0:2] = d[..., None].view(np.uint8)
        raw[..., 2:4] = dmin[..., None].view(np.uint8)
        raw[..., 4] |= 0x3F  # as llama.cpp makes them: sub-block 0's scale and min are the largest, d * 63 and
        raw[..., 8] |= 0x3F  # dmin * 63 (6-bit codes 63: the low 6 bits of bytes 0 and 4 of the 12 scale bytes)
    return raw.reshape(rows, -1)


def encode(arr: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """float32 [..., rows, cols] -> the GGUF bytes (or typed array) of qtype."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == "F32":
        return arr
    if qtype == "F16":
        return arr.astype(np.float16)
    if qtype in ("BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        return gguf.quants.quantize(arr, T[qtype])
    lead = arr.shape[:-1]
    raw = _kquant_blocks(int(np.prod(lead)), arr.shape[-1], qtype, rng, float(arr.std()) or 0.05)
    return raw.reshape(*lead, -1)


def dequantized(data: np.ndarray, qtype: str, shape) -> np.ndarray:
    """What gguf's own dequantize makes of a tensor: the oracle."""
    if qtype == "F32":
        return data.astype(np.float32).reshape(shape)
    return gguf.quants.dequantize(data, T[qtype]).astype(np.float32).reshape(shape)


def write_gguf(path, cfg: ModelConfig, types: dict[str, str] | None = None, tokenizer=None, split_kv_b=False,
               split_max_tensors: int = 0, chat_template: str | None = None, seed: int = 0,
               extra_tensors: dict | None = None, drop: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """A tiny random model of cfg written as a deepseek2 GGUF file (metadata keys and tensor layout as llama.cpp's
    convert_hf_to_gguf.py writes them); `types` maps GGUF tensor kinds ("ffn_up_exps") to types (default F32; norms
    and the router stay F32). Returns {dsv3 parameter name: float32 values gguf.quants.dequantize gives}."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    types = types or {}
    mtp = cfg.num_nextn_predict_layers
    model = build_model(cfg, "cpu", with_mtp=bool(mtp))
    w = gguf.GGUFWriter(os.fspath(path), "deepseek2", split_max_tensors=split_max_tensors)
    w.add_block_count(cfg.num_hidden_layers + mtp)  # (llama.cpp counts the MTP layers in block_count)
    if mtp:
        w.add_nextn_predict_layers(mtp)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.q_lora_rank:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    if cfg.norm_topk_prob:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    if cfg.rope.is_yarn:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(cfg.rope.factor)
        w.add_rope_scaling_orig_ctx_len(cfg.rope.original_max_position_embeddings)
        w.add_rope_scaling_yarn_beta_fast(cfg.rope.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(cfg.rope.beta_slow)
        w.add_rope_scaling_yarn_log_mul(0.1 * cfg.rope.mscale_all_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    if tokenizer is not None:
        add_tokenizer(w, tokenizer)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    inverse = _inverse_names(cfg.num_hidden_layers + mtp)
    out: dict[str, np.ndarray] = {}
    H, nope, v, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    for pname, p in model.state_dict().items():
        gname = inverse[pname]
        kind = gname.split(".")[-2] if gname.startswith("blk.") else gname.split(".")[0]
        if gname in drop:
            continue
        arr = p.detach().float().numpy()
        if kind == "attn_kv_b" and split_kv_b:
            kv = arr.reshape(H, nope + v, C)
            k_b, v_b = np.ascontiguousarray(kv[:, :nope].transpose(0, 2, 1)), np.ascontiguousarray(kv[:, nope:])
            parts = []
            for sub, sub_arr in (("attn_k_b", k_b), ("attn_v_b", v_b)):
                qt = types.get(sub, "F32")
                data = encode(sub_arr, qt, rng)
                w.add_tensor(gname.replace("attn_kv_b", sub), data, raw_dtype=T[qt])
                parts.append(torch.from_numpy(dequantized(data, qt, sub_arr.shape)))
            out[pname] = names.compose_kv_b(*parts).numpy()
            continue
        qt = "F32" if arr.ndim == 1 or kind == "ffn_gate_inp" else types.get(kind, "F32")
        data = encode(arr, qt, rng)
        w.add_tensor(gname, data, raw_dtype=T[qt])
        out[pname] = dequantized(data, qt, arr.shape)
    for gname, arr in (extra_tensors or {}).items():  # name -> array, or (bytes, GGUF type)
        w.add_tensor(gname, *arr) if isinstance(arr, tuple) else w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def add_tokenizer(w, tok, pre: str = "gpt2") -> None:
    """tokenizer.ggml.* from a tokenizers.Tokenizer, as llama.cpp's converter writes a byte-level BPE."""
    import json

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    n = max(max(vocab.values()), max(added or [0])) + 1
    tokens = [""] * n
    for t, i in vocab.items():
        tokens[i] = t
    types = [gguf.TokenType.NORMAL] * n
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = gguf.TokenType.CONTROL if t["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)


def reference_model(cfg: ModelConfig, weights: dict[str, np.ndarray]):
    """dsv3 in float32 holding exactly the dequantised values."""
    model = build_model(cfg, "cpu", with_mtp=bool(cfg.num_nextn_predict_layers))
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})
    return model.eval()


def digest(folder) -> dict[str, str]:
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in sorted(
        os.listdir(folder))}


# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "BF16", "F16"])
def test_blocks_decode_to_gguf_dequantize_exactly(qtype):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 512)).astype(np.float32) * 0.05
    data = encode(w, qtype, rng)
    want = dequantized(data, qtype, w.shape)
    got = blocks.to_float(qtype, data, w.shape).numpy()
    assert np.array_equal(got, want)
    if qtype in blocks.SCHEMES:  # the repacked codes + scales are what the model holds: the same values
        from dsv3.kernels import quant

        codes, scales = blocks.decode(qtype, data)
        s = blocks.SCHEMES[qtype]
        assert codes.dtype == s.code_dtype and scales.dtype == s.scale_dtype
        assert np.array_equal(quant.dequantize(codes, scales, s).numpy(), want)


def test_metadata_maps_to_the_config(tmp_path):
    cfg = gguf_tiny_cfg()
    write_gguf(tmp_path / "m.gguf", cfg, {"ffn_up_exps": "Q8_0"})
    got = gguf_config(read_gguf(tmp_path / "m.gguf"))
    for f in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
              "first_k_dense_replace", "num_attention_heads", "n_routed_experts", "n_shared_experts",
              "num_experts_per_tok", "n_group", "topk_group", "topk_method", "scoring_func", "norm_topk_prob",
              "routed_scaling_factor", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
              "v_head_dim", "rms_norm_eps", "rope", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(got, f) == getattr(cfg, f), f


def test_gating_function_defaults_follow_the_expert_bias(tmp_path):
    cfg = gguf_tiny_cfg()
    write_gguf(tmp_path / "m.gguf", cfg)
    g = read_gguf(tmp_path / "m.gguf")
    del g.metadata["deepseek2.expert_gating_func"]
    assert gguf_config(g).scoring_func == "sigmoid"  # the V3-only bias tensor is there
    g.tensors = {n: t for n, t in g.tensors.items() if not n.endswith("exp_probs_b.bias")}
    got = gguf_config(g)
    assert got.scoring_func == "softmax" and got.topk_method == "group_limited_greedy"


def test_a_foreign_architecture_and_a_missing_key_are_named(tmp_path):
    w = gguf.GGUFWriter(os.fspath(tmp_path / "llama.gguf"), "llama")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    with pytest.raises(GGUFError, match=r"llama\.gguf: general\.architecture is 'llama'.*deepseek2"):
        gguf_config(read_gguf(tmp_path / "llama.gguf"))
    cfg = gguf_tiny_cfg()
    write_gguf(tmp_path / "m.gguf", cfg)
    g = read_gguf(tmp_path / "m.gguf")
    del g.metadata["deepseek2.attention.kv_lora_rank"]
    with pytest.raises(GGUFError, match=r"m\.gguf: metadata key 'deepseek2\.attention\.kv_lora_rank' is missing"):
        gguf_config(g)


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    write_gguf(folder / "m.gguf", gguf_tiny_cfg(), {"ffn_up_exps": "Q8_0", "output": "Q6_K"})
    return folder / "m.gguf"


def _bad_copy(src, tmp_path, name="bad.gguf"):
    dst = tmp_path / name
    shutil.copy(src, dst)
    return dst


def test_truncated_file(good_file, tmp_path):
    import dsv3

    bad = _bad_copy(good_file, tmp_path)
    size = os.path.getsize(bad)
    with open(bad, "r+b") as f:
        f.truncate(size - 1000)
    before = digest(tmp_path)
    with pytest.raises(GGUFError, match=r"bad\.gguf: tensor '.*' .* ends past the end of the file"):
        dsv3.load_model(bad)
    assert digest(tmp_path) == before
    with open(bad, "r+b") as f:
        f.truncate(10)
    with pytest.raises(GGUFError, match=r"bad\.gguf: 10 bytes is too short to be a GGUF file"):
        dsv3.load_model(bad)


def _patch_tensor_offset(path, name: str, new_offset: int) -> None:
    r = gguf.GGUFReader(path)
    fld = next(t.field for t in r.tensors if t.name == name)
    pos = fld.offset + sum(p.nbytes for p in fld.parts[:-1])  # the offset is the entry's last part
    del r
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(int(new_offset).to_bytes(8, "little"))


def test_lying_offset_or_size_is_named(good_file, tmp_path):
    import dsv3

    bad = _bad_copy(good_file, tmp_path)
    _patch_tensor_offset(bad, "output.weight", 10**9)
    before = digest(tmp_path)
    with pytest.raises(GGUFError, match=r"bad\.gguf: tensor 'output\.weight' .* ends past the end of the file"):
        dsv3.load_model(bad)
    assert digest(tmp_path) == before
    bad2 = _bad_copy(good_file, tmp_path, "bad2.gguf")
    _patch_tensor_offset(bad2, "output.weight", 0)  # on top of the first tensor's bytes
    with pytest.raises(GGUFError, match=r"bad2\.gguf: tensors .* overlap"):
        dsv3.load_model(bad2)


def test_wrong_magic_and_unsupported_version(good_file, tmp_path):
    import dsv3

    bad = _bad_copy(good_file, tmp_path)
    with open(bad, "r+b") as f:
        f.write(b"GGML")
    with pytest.raises(GGUFError, match=r"bad\.gguf: not a GGUF file"):
        dsv3.load_model(bad)
    with open(bad, "r+b") as f:
        f.write(b"GGUF" + (7).to_bytes(4, "little"))
    with pytest.raises(GGUFError, match=r"bad\.gguf: GGUF version 7 is not supported"):
        dsv3.load_model(bad)


def test_split_set_and_a_missing_part(tmp_path):
    import dsv3

    cfg = gguf_tiny_cfg()
    weights = write_gguf(tmp_path / "m.gguf", cfg, {"ffn_gate_exps": "Q4_K"}, split_max_tensors=20)
    parts = sorted(os.listdir(tmp_path))
    assert len(parts) > 2 and parts[0].endswith("-00001-of-%05d.gguf" % len(parts))
    model = dsv3.load_model(tmp_path / parts[0], dtype=torch.float32)
    ref = reference_model(cfg, weights)
    ids = torch.tensor([[3, 17, 99, 250, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), rtol=1e-5, atol=1e-6)
    assert dsv3.load_model(tmp_path, dtype=torch.float32) is not None  # the directory holding the set
    assert read_gguf(tmp_path / parts[-1]).files == [str(tmp_path / p) for p in parts]  # any part finds the set
    os.remove(tmp_path / parts[1])
    with pytest.raises(GGUFError, match=rf"part\(s\) {parts[1]} of this {len(parts)}-part split set are missing"):
        dsv3.load_model(tmp_path / parts[0])


def test_unsupported_type_names_tensor_type_and_choices(tmp_path):
    import dsv3

    cfg = gguf_tiny_cfg()
    path = tmp_path / "q2.gguf"
    w = gguf.GGUFWriter(os.fspath(path), "deepseek2")
    raw = np.random.default_rng(0).integers(0, 256, (320, 256 // 256 * 84), dtype=np.uint8)
    w.add_tensor("token_embd.weight", raw, raw_dtype=T.Q2_K)
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    g = read_gguf(path)
    assert g.tensors["token_embd.weight"].type_name == "Q2_K"
    # A whole model with one Q2_K tensor: the error names it, its type and the supported ones.
    write_gguf(tmp_path / "m.gguf", cfg, drop=("output.weight",),
               extra_tensors={"output.weight": (raw, None, T.Q2_K)})
    before = digest(tmp_path)
    with pytest.raises(GGUFError, match=r"m\.gguf: tensor types dsv3 does not run: output\.weight \(m\.gguf\): Q2_K\. "
                                        r"Supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K"):
        dsv3.load_model(tmp_path / "m.gguf")
    assert digest(tmp_path) == before


def test_unknown_tensor_and_wrong_shape_are_named(tmp_path):
    import dsv3

    cfg = gguf_tiny_cfg()
    write_gguf(tmp_path / "m.gguf", cfg, extra_tensors={"blk.0.attn_mystery.weight": np.zeros((4, 32), np.float32)})
    with pytest.raises(GGUFError, match=r"does not have: blk\.0\.attn_mystery\.weight"):
        dsv3.load_model(tmp_path / "m.gguf")
    write_gguf(tmp_path / "n.gguf", cfg, drop=("blk.1.ffn_norm.weight",),
               extra_tensors={"blk.1.ffn_norm.weight": np.ones(128, np.float32)})
    with pytest.raises(GGUFError, match=r"blk\.1\.ffn_norm\.weight \(n\.gguf\) is \[128\] but the metadata implies "
                                        r"\[256\]"):
        dsv3.load_model(tmp_path / "n.gguf")
    write_gguf(tmp_path / "o.gguf", cfg, drop=("blk.2.attn_output.weight",))
    with pytest.raises(GGUFError, match=r"lacks: model\.layers\.2\.self_attn\.o_proj\.weight"):
        dsv3.load_model(tmp_path / "o.gguf")
