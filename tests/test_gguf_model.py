"""Running GGUF files written with the gguf package's writer: logits equal dsv3 running the same weights as
gguf.quants.dequantize gives them (float32, rel <= 1e-5) for every supported type and both kv_b layouts; the
tokenizer built from tokenizer.ggml.* equals the `tokenizers` one of the same vocabulary; the chat template renders;
`python -m dsv3 generate --model file.gguf` generates greedily; Q8_0 / Q4_0 files run on the C++ kernels' schemes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

import dsv3
from dsv3.gguf import read_gguf
from dsv3.gguf.tokenizer import gguf_tokenizer
from dsv3.kernels import quant, quant_cpu
from dsv3.tokenizer_build import CHAT_TEMPLATE, save_tokenizer_files, train_bpe
from test_gguf_files import MIXED, add_tokenizer, gguf_tiny_cfg, reference_model, write_gguf

IDS = torch.tensor([[5, 17, 99, 250, 7, 42, 300, 1, 64]])


def _assert_logits_equal(model, ref):
    with torch.no_grad():
        a, b = model(IDS), ref(IDS)
    rel = ((a - b).norm() / b.norm()).item()
    assert rel <= 1e-5, rel
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("split_kv_b", [False, True], ids=["kv_b", "k_b+v_b"])
def test_every_type_gives_the_dequantized_logits(tmp_path, split_kv_b):
    cfg = gguf_tiny_cfg()
    weights = write_gguf(tmp_path / "m.gguf", cfg, MIXED, split_kv_b=split_kv_b)
    g = read_gguf(tmp_path / "m.gguf")
    assert {t.type_name for t in g.tensors.values()} >= {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K",
                                                          "Q6_K"} - ({"Q4_0"} if split_kv_b else set())
    assert any(n.endswith("attn_k_b.weight") for n in g.tensors) == split_kv_b
    model = dsv3.load_model(tmp_path / "m.gguf", dtype=torch.float32)
    # Projections keep their codes (no float copy): the schemes are GGUF's types.
    a0 = model.model.layers[0].self_attn
    assert a0.q_a_proj.quant.name == "q5_k" and a0.q_b_proj.quant.name == "q4_k"
    assert a0.kv_a_proj_with_mqa.quant == quant.Scheme(8) and model.lm_head.quant.name == "q6_k"
    experts = model.model.layers[1].mlp.experts
    assert experts.gate_proj.quant.name == "q4_k" and experts.up_proj.quant == quant.Scheme(4)
    _assert_logits_equal(model, reference_model(cfg, weights))


def test_mtp_layers_in_the_file_load_and_draft_like_the_reference(tmp_path):
    cfg = gguf_tiny_cfg(num_nextn_predict_layers=1)
    weights = write_gguf(tmp_path / "m.gguf", cfg, MIXED)
    assert "blk.3.nextn.eh_proj.weight" in read_gguf(tmp_path / "m.gguf").tensors
    model = dsv3.load_model(tmp_path / "m.gguf", dtype=torch.float32)
    assert len(model.mtp_layers) == 1
    ref = reference_model(cfg, weights)
    with torch.no_grad():
        h, r = model.hidden_states(IDS), ref.hidden_states(IDS)
        a, _ = model.mtp(1, h, IDS.roll(-1, 1))
        b, _ = ref.mtp(1, r, IDS.roll(-1, 1))
    assert ((a - b).norm() / b.norm()).item() <= 1e-5
    assert not dsv3.load_model(tmp_path / "m.gguf", dtype=torch.float32, with_mtp=False).mtp_layers


def test_bf16_compute_dtype_runs_the_quantized_weights(tmp_path):
    cfg = gguf_tiny_cfg()
    weights = write_gguf(tmp_path / "m.gguf", cfg, MIXED)
    model = dsv3.load_model(tmp_path / "m.gguf")  # bf16 activations, float32 products
    ref = reference_model(cfg, weights)
    with torch.no_grad():
        a, b = model(IDS).float(), ref(IDS)
    assert ((a - b).norm() / b.norm()).item() < 0.05


def test_q8_0_and_q4_0_files_land_on_the_kernels_schemes(tmp_path):
    from dsv3.kernels.cpu_pack import prepack_for_cpu

    cfg = gguf_tiny_cfg()
    types = {k: ("Q4_0" if "exps" in k else "Q8_0") for k in MIXED if k not in ("attn_k_b", "attn_v_b")}
    types["attn_output"] = "Q8_0"
    weights = write_gguf(tmp_path / "q.gguf", cfg, types)
    model = dsv3.load_model(tmp_path / "q.gguf", dtype=torch.float32)
    _assert_logits_equal(model, reference_model(cfg, weights))
    lins = [m for m in model.modules() if getattr(m, "quant", None) is not None]
    assert lins and all(quant_cpu.supported(m.quant) for m in lins)
    packed = dsv3.load_model(tmp_path / "q.gguf")
    if prepack_for_cpu(packed):  # where the C++ kernels build: the model runs on them
        with torch.no_grad():
            assert torch.isfinite(packed(IDS)).all()


def test_quantize_flag_is_refused_for_gguf(tmp_path):
    write_gguf(tmp_path / "m.gguf", gguf_tiny_cfg(), {"ffn_up": "Q8_0"})
    with pytest.raises(ValueError, match="GGUF file, whose weights run as they are stored"):
        dsv3.load_model(tmp_path / "m.gguf", quantize="int8")


# ---------------------------------------------------------------------------------------------------- tokenizer
TEXTS = ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
         "Numbers 1234567 and 3.14159, CJK 中文字符 ひらがな カタカナ, punctuation!!! ?? ...\n\n\tTabs  and  spaces",
         "<｜User｜>hello<｜Assistant｜>", "émigré naïve café — “quotes” ‘single’"]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog " * 5], 400, min_frequency=1)


# DeepSeek-V3's own tokenizer.json pre-tokenizer, as the checkpoint ships it.
DEEPSEEK_V3_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
    {"type": "Split", "pattern": {"Regex": "[一-龥\u3040-ゟ゠-ヿ]+"}, "behavior": "Isolated", "invert": False},
    {"type": "Split", "pattern": {"Regex": "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}"
                                           "\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|"
                                           "\\s+"}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def _write_vocab_only(path, bpe, pre, template=CHAT_TEMPLATE):
    w = gguf.GGUFWriter(os.fspath(path), "deepseek2")
    add_tokenizer(w, bpe, pre)
    if template is not None:
        w.add_chat_template(template)
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()


@pytest.mark.parametrize("pre", ["gpt2", "deepseek-v3"])
def test_tokenizer_from_metadata_equals_tokenizers(tmp_path, bpe, pre):
    import tokenizers

    _write_vocab_only(tmp_path / "v.gguf", bpe, pre)
    tok = gguf_tokenizer(read_gguf(tmp_path / "v.gguf"))
    spec = json.loads(bpe.to_str())
    if pre == "deepseek-v3":
        spec["pre_tokenizer"] = DEEPSEEK_V3_PRE
    ref = tokenizers.Tokenizer.from_str(json.dumps(spec))
    for text in TEXTS:
        want = ref.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_bos=False) == want
        assert tok.encode(text) == [0] + want  # bos from tokenizer.ggml.bos_token_id / add_bos_token
        assert tok.decode(want) == ref.decode(want, skip_special_tokens=False)
    assert tok.bos_id == 0 and tok.eos_ids == [1]
    assert tok.special_ids >= {0, 1, 2, 3}


KIMI_TEXTS = [t for t in TEXTS if "<｜" not in t] + ["DON'T stop: I'M here, we'RE fine and it's ok", "混合English中文Mixed日本語テキスト 한국어 텍스트",
                      "  indented\n\n\n    code(x)  \r\n trailing   ", "ÉCOLE naïve MacDonald's 12345.678"]


def test_kimi_k2_pre_tokenizer_is_tiktokens_split(tmp_path, bpe):
    """Kimi-K2's files carry pre 'kimi-k2': the oracle is tiktoken's semantics, its pattern's matches found left to
    right (the `regex` package, which supports the pattern's class intersections), each piece BPE-encoded alone
    (texts without special tokens: those are matched before any split)."""
    import regex
    import tokenizers

    from dsv3.gguf.tokenizer import PRE_SPLITS

    _write_vocab_only(tmp_path / "v.gguf", bpe, "kimi-k2")
    tok = gguf_tokenizer(read_gguf(tmp_path / "v.gguf"))
    spec = json.loads(bpe.to_str())
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    piece_bpe = tokenizers.Tokenizer.from_str(json.dumps(spec))
    pattern = regex.compile(PRE_SPLITS["kimi-k2"][0], flags=regex.V1)
    for text in KIMI_TEXTS:
        pieces = pattern.findall(text)
        assert "".join(pieces) == text  # the pattern covers every character
        want = [i for p in pieces for i in piece_bpe.encode(p, add_special_tokens=False).ids]
        assert tok.encode(text, add_bos=False) == want, text
        assert tok.decode(want) == text
    # Han runs split from other letters; contractions stay on their word (case-insensitively).
    assert pattern.findall("混合English中文") == ["混合", "English", "中文"]
    assert pattern.findall("DON'T I'M") == ["DON'T", " I'M"]


def test_chat_template_from_metadata_renders(tmp_path, bpe):
    _write_vocab_only(tmp_path / "v.gguf", bpe, "deepseek-v3")
    tok = gguf_tokenizer(read_gguf(tmp_path / "v.gguf"))
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert text == "<｜begin▁of▁sentence｜>Be brief.<｜User｜>hi<｜Assistant｜>"
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == 0 and ids.count(0) == 1


def test_tokenizer_json_beside_the_file_wins(tmp_path, bpe):
    _write_vocab_only(tmp_path / "v.gguf", bpe, "qwen2", template=None)
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre is 'qwen2'.*kimi-k2.*tokenizer\.json"):
        gguf_tokenizer(read_gguf(tmp_path / "v.gguf"))
    save_tokenizer_files(bpe, tmp_path)
    tok = gguf_tokenizer(read_gguf(tmp_path / "v.gguf"))
    assert tok.encode(TEXTS[0], add_bos=False) == bpe.encode(TEXTS[0], add_special_tokens=False).ids
    assert tok.chat_templates  # tokenizer_config.json's template


# ---------------------------------------------------------------------------------------------------- generation
def _greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids):]


def test_generate_command_runs_a_gguf_file(tmp_path, bpe):
    cfg = gguf_tiny_cfg(vocab_size=bpe.get_vocab_size())
    weights = write_gguf(tmp_path / "m.gguf", cfg, MIXED, tokenizer=bpe, chat_template=CHAT_TEMPLATE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(dsv3.__file__)),
                                                        os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "dsv3", "generate", "--model", str(tmp_path / "m.gguf"), "--dtype",
                        "float32", "--max-tokens", "6", "--ignore-eos", "--json", "def fibonacci(n):"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    tok = gguf_tokenizer(read_gguf(tmp_path / "m.gguf"))
    assert out["prompt_token_ids"] == tok.encode("def fibonacci(n):")
    assert out["token_ids"] == _greedy(reference_model(cfg, weights), out["prompt_token_ids"], 6)


def test_llm_api_chats_with_a_gguf_file(tmp_path, bpe):
    cfg = gguf_tiny_cfg(vocab_size=bpe.get_vocab_size())
    write_gguf(tmp_path / "m.gguf", cfg, {"ffn_up_exps": "Q8_0", "output": "Q6_K"}, tokenizer=bpe,
               chat_template=CHAT_TEMPLATE)
    llm = dsv3.LLM(str(tmp_path), max_model_len=64)  # the directory holding the file
    outs = llm.chat([{"role": "user", "content": "hi"}], dsv3.SamplingParams(max_tokens=4, temperature=0,
                                                                               ignore_eos=True))
    assert len(outs[0].token_ids) == 4
    assert llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<｜Assistant｜>")


def test_info_and_plan_accept_a_gguf_file(tmp_path, capsys):
    from dsv3.cli import main

    write_gguf(tmp_path / "m.gguf", gguf_tiny_cfg(), {**MIXED, "ffn_gate_exps": "Q8_0", "ffn_up_exps": "Q8_0",
                                                      "ffn_down_exps": "Q8_0"})
    assert main(["info", "--model", str(tmp_path / "m.gguf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["hidden_size"] == 256 and info["routed_experts"] == 8 and info["gguf_files"] == 1
    assert info["quantization"].startswith("GGUF Q8_0 ")
    assert main(["plan", "--model", str(tmp_path / "m.gguf"), "--gpus", "none", "--cpu-mem", "64GB",
                 "--cpu-bandwidth", "50GB/s", "--cpu-tflops", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    def commands(node):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from ([v] if k == "command" else commands(v))
        elif isinstance(node, list):
            for v in node:
                yield from commands(v)

    lines = list(commands(report))
    assert lines and all("--model " + str(tmp_path / "m.gguf") in c and "--quantize" not in c for c in lines)


# Column splits under TP 2 must fall on each type's blocks: the expert and shared down projections are 128 inputs
# wide per rank here, so they take 32-value types; the rest of MIXED stays.
TP_TYPES = dict(MIXED, ffn_down_exps="Q8_0", ffn_down_shexp="Q4_0")


def test_each_ranks_shard_holds_its_slices_of_the_single_process_model(tmp_path):
    """load_sharded on a GGUF file: every rank's tensors are exactly its windows of what the single process loads
    (codes and scales of quantised projections sliced alike), for TP 2 x EP 2 with non-contiguous experts."""
    from dsv3.parallel import ParallelState, load_sharded

    write_gguf(tmp_path / "m.gguf", gguf_tiny_cfg(), TP_TYPES)
    whole = dsv3.load_model(tmp_path / "m.gguf", dtype=torch.float32)
    full = {n: b for n, b in whole.named_buffers()} | {n: p for n, p in whole.named_parameters()}
    placement = {"placement": [[0, 3, 5, 6], [1, 2, 4, 7]]}
    for rank in range(4):
        ps = ParallelState(rank=rank, world_size=4, tp_size=2, tp_rank=rank % 2, ep_size=2, ep_rank=rank // 2)
        shard = load_sharded(tmp_path / "m.gguf", ps, dtype=torch.float32, device="cpu", placement=placement)
        owned = placement["placement"][rank // 2]
        checked = 0
        for name, t in list(shard.named_parameters()) + list(shard.named_buffers()):
            ref = full[name]
            if "experts." in name and "shared" not in name:
                ref = ref[owned]
            if ref.shape != t.shape:  # a split tensor: find its window along the dims that differ
                for d, (a, b) in enumerate(zip(ref.shape, t.shape)):
                    if a != b:
                        part = a // b if a % b == 0 else None
                        assert part, (name, ref.shape, t.shape)
                        k = (rank % 2) if part == 2 else rank  # TP halves, or the shared experts' quarters
                        ref = ref.narrow(d, k * b, b)
            assert torch.equal(t, ref), name
            checked += 1
        assert checked > 40
    ps = ParallelState(rank=0, world_size=2, tp_size=2, tp_rank=0)
    write_gguf(tmp_path / "k.gguf", gguf_tiny_cfg(), MIXED)  # Q6_K expert down projections: 256-value blocks
    with pytest.raises(ValueError, match=r"ffn_down_exps.*Q6_K.*256 values.*columns 0:128.*--tp"):
        load_sharded(tmp_path / "k.gguf", ps, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="GGUF file, whose weights run as they are stored"):
        load_sharded(tmp_path / "m.gguf", ps, dtype=torch.float32, device="cpu", quantize="int4")
