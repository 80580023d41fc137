"""`dsv3 plan`: published facts, deployment verdicts, agreement with what load_model allocates, bad input, CLI."""
import json
import math

import pytest
import torch

import dsv3
from dsv3 import ModelConfig
from dsv3.cli import main
from dsv3.hardware import (CPU, GIB, GPUS, Hardware, find_gpu, measure_cpu_bandwidth, measure_cpu_flops,
                           parse_bandwidth, parse_gpus, parse_size, resolve_hardware)
from dsv3.model import build_model
from dsv3.plan import (PlanRequest, expected_experts_touched, linear_bytes, plan, predicted_cache_bytes,
                       predicted_checkpoint_bytes, predicted_weight_bytes, render)
from dsv3.presets import preset
from dsv3.checkpoint import model_bytes
from hf_ref import v2, v3

# Fixed CPU figures so no test measures this (shared, busy) machine.
CPU_FLAGS = ["--cpu-bandwidth", "200GB/s", "--cpu-tflops", "2"]


def hw(gpus: str | None, cpu_mem: str = "512GB", bandwidth: str = "200GB/s") -> Hardware:
    found = parse_gpus(gpus) if gpus else None
    gpu, n = found if found else (None, 0)
    return Hardware(gpu, n, CPU(parse_size(cpu_mem), parse_bandwidth(bandwidth), 2e12))


def run_plan(model: str = "deepseek-v3", gpus: str | None = "8xH200", cpu_mem: str = "512GB", **kw) -> dict:
    return plan(preset(model), hw(gpus, cpu_mem), PlanRequest(**kw), model_name=model, is_preset=True)


def layout(report: dict, name: str) -> dict:
    return next(lay for lay in report["layouts"] if lay["name"] == name)


# ------------------------------------------------------------------------------------------------------------------
# Published facts
def test_v3_parameters_and_sizes():
    r = run_plan()
    assert r["params_total"] == pytest.approx(671e9, rel=0.002)  # 671B in the main model
    assert r["params_active"] == pytest.approx(37e9, rel=0.02)  # ~37B activated per token
    assert r["params_mtp"] == pytest.approx(11.5e9, rel=0.02)
    assert r["precision"] == "fp8" and r["mtp"]
    # FP8 checkpoint: ~685 GB (the files on the Hub total 688.6 GB: weights, scales, bf16 embed/head/norms, the MTP
    # layer with its copies of embedding and head).
    assert r["checkpoint_bytes"] == pytest.approx(688.6e9, rel=0.005)
    assert r["weights_bytes"] == pytest.approx(685e9, rel=0.02)  # resident: the MTP copies are not loaded
    assert r["kv_bytes_per_token"] == 70_272 == 576 * 61 * 2


def test_components_add_up_to_the_config_counts():
    cfg = preset("deepseek-v3")
    counts = cfg.param_counts()
    r = run_plan()
    comp = {c["name"]: c for c in r["components"]}
    for name in ("embedding", "attention", "dense_mlp", "routed_experts", "shared_experts", "router"):
        assert comp[name]["params"] == counts[name], name
    assert comp["head"]["params"] == counts["lm_head"] + counts["final_norm"]
    assert comp["mtp"]["params"] == counts["mtp_unique"]
    assert sum(c["params"] for c in r["components"]) == counts["main"] + counts["mtp_unique"]
    assert sum(c["bytes"] for c in r["components"]) == r["weights_bytes"]


def test_precision_rules():
    # FP8: one byte per weight plus a float32 scale per 128x128 block, partial edge blocks included.
    assert linear_bytes(7168, 2048, "fp8") == 7168 * 2048 + 4 * 56 * 16
    assert linear_bytes(576, 7168, "fp8") == 576 * 7168 + 4 * 5 * 56
    assert linear_bytes(100, 200, "bf16") == 40_000
    # int8/int4 as dsv3 runs them (kernels/quant.py): 8- or 4-bit codes plus one float16 scale per 32 inputs of a
    # row, no zero point.
    assert linear_bytes(7168, 2048, "int8") == 7168 * 2048 + 2 * 7168 * 2048 // 32
    assert linear_bytes(7168, 2048, "int4") == 7168 * 2048 // 2 + 2 * 7168 * 2048 // 32
    assert linear_bytes(7168, 2048, "int8") * 8 / (7168 * 2048) == 8.5
    assert linear_bytes(7168, 2048, "int4") * 8 / (7168 * 2048) == 4.5
    sizes = {p: run_plan(precision=p)["weights_bytes"] for p in ("bf16", "fp8", "int8", "int4")}
    assert sizes["bf16"] > sizes["int8"] > sizes["fp8"] > sizes["int4"]
    assert sizes["bf16"] == pytest.approx(2 * 683e9, rel=0.01)


@pytest.mark.parametrize("precision,bits", [("int8", 8.5), ("int4", 4.5)])
def test_v3_int_bytes_from_first_principles(precision, bits):
    # Main model: the projections at `bits` per weight, the head at int8 (8.5 bits) for both, embedding and norms
    # bf16, the router weight and bias float32 (as loaded).
    cfg = preset("deepseek-v3")
    c, D, L = cfg.param_counts(), cfg.hidden_size, cfg.num_hidden_layers
    norms = L * (2 * D + cfg.q_lora_rank + cfg.kv_lora_rank) + D
    proj = c["main"] - c["embedding"] - c["lm_head"] - norms - c["router"]
    assert proj == c["attention"] - L * (2 * D + cfg.q_lora_rank + cfg.kv_lora_rank) + c["dense_mlp"] + \
        c["routed_experts"] + c["shared_experts"]
    expected = proj * bits / 8 + c["lm_head"] * 8.5 / 8 + 2 * (c["embedding"] + norms) + 4 * c["router"]
    got = predicted_weight_bytes(cfg, precision)
    assert got == pytest.approx(expected, rel=1e-12)
    assert run_plan(precision=precision, with_mtp=False)["weights_bytes"] == got
    if precision == "int4":  # issue 20's memory target: int4 resident weights <= 0.30x bf16
        assert got / predicted_weight_bytes(cfg, "bf16") < 0.29


def test_cache_bytes_hook_matches_the_config():
    cfg = preset("deepseek-v3")
    assert predicted_cache_bytes(cfg, 1000, "bf16") == 1000 * cfg.kv_cache_bytes_per_token(2)
    assert predicted_cache_bytes(cfg, 1000, "fp8") == 1000 * cfg.kv_cache_bytes_per_token(1)
    assert predicted_cache_bytes(cfg, 1, "bf16", with_mtp=True) == 576 * 62 * 2
    r = run_plan(context=32768, concurrency=8, with_mtp=False, cache_dtype="fp8")
    assert r["kv_cache_bytes"] == 32768 * 8 * 576 * 61


def test_expected_experts_touched_matches_sampling():
    assert expected_experts_touched(256, 8, 1) == pytest.approx(8)
    assert expected_experts_touched(256, 8, 4096) == pytest.approx(256)
    g = torch.Generator().manual_seed(0)
    picks = torch.rand(400, 16, 256, generator=g).topk(8, dim=-1).indices  # 400 trials of 16 uniform tokens
    distinct = torch.tensor([len(torch.unique(p)) for p in picks], dtype=torch.float64)
    assert distinct.mean().item() == pytest.approx(expected_experts_touched(256, 8, 16), rel=0.01)


# ------------------------------------------------------------------------------------------------------------------
# Verdicts that published deployment guidance states
def test_v3_fp8_fits_8x_h200():
    r = run_plan(gpus="8xH200", context=32768, concurrency=8)
    assert r["fits"] and r["layout"] == "gpu"
    gpu = layout(r, "gpu")
    assert gpu["tp"] == gpu["ep"] == 8 and gpu["max_concurrency"] >= 8
    assert r["decode_tokens_per_s_upper"] > 0 and r["prefill_tokens_per_s_upper"] > 0
    cmd = r["recommended_command"]
    assert cmd.startswith("torchrun --nproc-per-node 8 -m dsv3 serve ") and cmd.endswith(" --tp 8")
    assert r["recommended_not_yet_available"] == [] and r["runnable_command"] == cmd


def test_v3_fp8_does_not_fit_8x_h100_without_offload():
    r = run_plan(gpus="8xH100", context=8192)
    gpu = layout(r, "gpu")
    assert not gpu["fits"]
    assert "per GPU" in gpu["reason"] and "has 80.0 GiB" in gpu["reason"]
    assert gpu["devices"]["gpu"]["parts"]["weights"] > 78 * GIB  # the weights alone leave no room
    assert r["min_gpus_for_gpu_layout"] == 16  # two 8-GPU nodes
    # With enough CPU memory, offloading the routed experts makes it run.
    r = run_plan(gpus="8xH100", cpu_mem="1TB", context=8192)
    assert r["layout"] == "hybrid"


def test_single_24gb_gpu_needs_hybrid_int4():
    r = run_plan(gpus="1xRTX4090", cpu_mem="400GB", precision="int4")
    assert not layout(r, "gpu")["fits"]
    assert r["fits"] and r["layout"] == "hybrid"
    hyb = layout(r, "hybrid")
    assert hyb["devices"]["gpu"]["need_bytes"] <= 24 * GIB
    # The CPU side reads the touched experts at CPU bandwidth: that bounds decode to tens of tokens/s at most.
    assert 1 < r["decode_tokens_per_s_upper"] < 50
    # Experts in CPU memory beside a GPU is later work: marked, not printed as runnable. The int4 model (~360 GiB)
    # does not fit 400 GB all in CPU memory, so no layout runs as planned today; with 512 GB the CPU layout does.
    assert "--experts-device cpu" in r["recommended_not_yet_available"]
    assert "--experts-device" not in r["recommended_command"]
    assert r["runnable_layout"] is None and r["runnable_command"] is None
    r = run_plan(gpus="1xRTX4090", cpu_mem="512GB", precision="int4")
    assert r["layout"] == "hybrid" and r["runnable_layout"] == "cpu"
    assert "--device cpu --dtype bfloat16 --quantize int4" in r["runnable_command"]
    assert not run_plan(gpus="1xRTX4090", cpu_mem="400GB", precision="fp8")["fits"]  # fp8 needs ~650 GB


@pytest.mark.parametrize("model,total,active", [
    ("kimi-k2", 1.03e12, 32e9), ("moonlight-16b-a3b", 16e9, 3e9), ("deepseek-v2-lite", 15.7e9, 2.7e9),
    ("deepseek-v2", 236e9, 21e9), ("deepseek-r1", 671e9, 37e9), ("deepseek-v3.1", 671e9, 37e9)])
def test_family_members(model, total, active):
    r = run_plan(model, gpus="2xH100", cpu_mem="2TB", context=4096, concurrency=4)
    assert r["params_total"] == pytest.approx(total, rel=0.03)
    assert r["params_active"] == pytest.approx(active, rel=0.1)
    assert r["fits"]
    best = layout(r, r["layout"])
    d = best["decode"]
    assert 0 < d["tokens_per_s_per_seq_upper"] <= d["tokens_per_s_single_stream_upper"]
    assert d["tokens_per_s_aggregate_upper"] == pytest.approx(4 * d["tokens_per_s_per_seq_upper"])
    assert json.loads(json.dumps(r)) == r
    assert "recommendation" in render(r)


def test_speed_bounds_move_the_right_way():
    base = run_plan(gpus="1xRTX4090", precision="int4", context=4096)
    slow_cpu = plan(preset("deepseek-v3"), hw("1xRTX4090", bandwidth="50GB/s"),
                    PlanRequest(precision="int4", context=4096))
    assert slow_cpu["decode_tokens_per_s_upper"] < base["decode_tokens_per_s_upper"] / 2
    longer = run_plan(gpus="1xRTX4090", precision="int4", context=65536)
    assert longer["decode_tokens_per_s_upper"] < base["decode_tokens_per_s_upper"]
    one, many = run_plan(concurrency=1), run_plan(concurrency=32)
    # Batching helps less than 32x: 32 tokens touch ~163 of 256 experts per layer, and every rank reads the cache.
    assert one["decode_aggregate_tokens_per_s_upper"] < many["decode_aggregate_tokens_per_s_upper"]
    assert many["decode_tokens_per_s_upper"] < one["decode_tokens_per_s_upper"]


def test_cpu_decode_bound_is_bytes_over_bandwidth():
    cfg = preset("moonlight-16b-a3b")
    B, ctx = 4, 2048
    h = Hardware(None, 0, CPU(parse_size("1TB"), 100e9, 1e18))  # compute so fast that memory bounds it
    r = plan(cfg, h, PlanRequest(context=ctx, concurrency=B))
    assert r["layout"] == "cpu"
    counts = cfg.param_counts()
    n_moe, E, k = cfg.layer_kinds.count("moe"), cfg.n_routed_experts, cfg.num_experts_per_tok
    other = counts["main"] - counts["embedding"] - counts["routed_experts"] - counts["router"]
    read = (2 * other + 4 * counts["router"] + n_moe * E * (1 - (1 - k / E) ** B) * 2 * cfg.expert_params()
            + B * cfg.hidden_size * 2 + B * ctx * cfg.kv_cache_bytes_per_token(2))
    assert r["decode_aggregate_tokens_per_s_upper"] == pytest.approx(B / (read / 100e9), rel=1e-9)


def test_cost_comparison():
    r = run_plan(concurrency=16, gpu_hour_price=2.5, api_price_per_mtok=1.1)
    c = r["cost"]
    assert c["local_per_mtok"] == pytest.approx(2.5 * 8 / (r["decode_aggregate_tokens_per_s_upper"] * 3600) * 1e6)
    assert c["break_even_tokens_per_s"] == pytest.approx(2.5 * 8 / 3600 / 1.1e-6)
    assert run_plan()["cost"] is None


# ------------------------------------------------------------------------------------------------------------------
# Against our own model: what load_model allocates
SMALL_CONFIGS = pytest.mark.parametrize("config", [
    v3(),  # MTP, every matrix smaller than one FP8 block
    v2(hidden_size=200, intermediate_size=300, moe_intermediate_size=136, kv_lora_rank=130, num_attention_heads=3,
       num_key_value_heads=3, vocab_size=300, num_hidden_layers=2),  # partial 128-blocks, no MTP, no bias
], ids=["v3-tiny-mtp", "v2-partial-blocks"])


def _saved(tmp_path, config, fp8_weights: bool):
    cfg = ModelConfig.from_dict(config)
    model = build_model(cfg, "cpu", torch.float32)
    # One head matrix per shard keeps the MTP layer's embedding/head copies out of the file holding the originals
    # (save_model hands them to safetensors as views of the same storage).
    dsv3.save_model(model, tmp_path, fp8_weights=fp8_weights, max_shard_bytes=cfg.vocab_size * cfg.hidden_size * 4)
    return cfg, cfg.num_nextn_predict_layers > 0


@SMALL_CONFIGS
def test_predicted_bf16_bytes_equal_what_load_model_allocates(tmp_path, config):
    cfg, with_mtp = _saved(tmp_path, config, fp8_weights=False)
    got = model_bytes(dsv3.load_model(tmp_path, dtype=torch.bfloat16))
    assert got == pytest.approx(predicted_weight_bytes(cfg, "bf16", with_mtp), rel=0.01)


@SMALL_CONFIGS
def test_predicted_fp8_bytes_equal_what_load_model_keeps(tmp_path, config):
    cfg, with_mtp = _saved(tmp_path, config, fp8_weights=True)
    got = model_bytes(dsv3.load_model(tmp_path, dtype=torch.bfloat16, fp8_mode="keep"))
    assert got == pytest.approx(predicted_weight_bytes(cfg, "fp8", with_mtp), rel=0.01)


@pytest.mark.parametrize("config", [  # every input dimension a multiple of 32, as int8/int4 need
    v3(kv_lora_rank=32, v_head_dim=16),  # MTP, untied head
    v3(kv_lora_rank=32, v_head_dim=16, num_nextn_predict_layers=0, tie_word_embeddings=True),
], ids=["v3-mtp", "v3-tied-no-mtp"])
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_predicted_int_bytes_equal_what_dsv3_quantize_writes_and_loads(tmp_path, config, precision):
    from dsv3.checkpoint import CheckpointLayout
    from dsv3.convert import quantize_checkpoint

    cfg, with_mtp = _saved(tmp_path / "src", config, fp8_weights=False)
    predicted = predicted_weight_bytes(cfg, precision, with_mtp)
    assert model_bytes(dsv3.load_model(tmp_path / "src", dtype=torch.bfloat16, quantize=precision)) == predicted
    quantize_checkpoint(tmp_path / "src", tmp_path / precision, precision)
    tensors = CheckpointLayout.read(tmp_path / precision).tensors.values()
    on_disk = sum(math.prod(t.shape) * t.dtype.itemsize for t in tensors)
    assert on_disk == predicted_checkpoint_bytes(cfg, precision, with_mtp)
    assert model_bytes(dsv3.load_model(tmp_path / precision, dtype=torch.bfloat16)) == predicted


# ------------------------------------------------------------------------------------------------------------------
# Hardware table and parsing
def test_hardware_table():
    for g in GPUS.values():
        assert g.source and g.memory_gib > 0 and g.bandwidth_gbs > 0 and g.bf16_tflops > 0
        assert g.fp8_tflops is None or g.fp8_tflops >= 1.9 * g.bf16_tflops
    assert not find_gpu("A100-80GB").has_fp8 and not find_gpu("rtx 3090").has_fp8
    assert find_gpu("h100").name == "H100-SXM" and find_gpu("H100_PCIe").name == "H100-PCIe"
    assert parse_gpus("8xH200") == (GPUS["H200"], 8) and parse_gpus("2 x rtx4090") == (GPUS["RTX4090"], 2)
    assert parse_gpus("B200") == (GPUS["B200"], 1) and parse_gpus("none") is None
    assert parse_size("512GB") == 512e9 and parse_size("1.5TiB") == 1.5 * 2**40
    assert parse_bandwidth("200GB/s") == parse_bandwidth("200") == parse_bandwidth("0.2TB/s") == 200e9


def test_cpu_measurements_and_detection():
    assert measure_cpu_bandwidth(mib=16, repeats=2) > 1e8
    assert measure_cpu_flops(n=256, repeats=2) > 1e8
    h = resolve_hardware(None, None, "100GB/s", 1.0)  # GPUs and memory detected here
    assert h.cpu.memory_bytes > GIB and h.cpu.bandwidth == 100e9
    assert (h.gpu is None) == (not torch.cuda.is_available())


def test_unknown_detected_gpu_gives_memory_verdicts_without_speeds():
    from dsv3.hardware import GPU, match_gpu_name

    assert match_gpu_name("NVIDIA H100 80GB HBM3", 80 * GIB).name == "H100-SXM"
    assert match_gpu_name("NVIDIA A100-SXM4-40GB", 40 * GIB).name == "A100-40GB"
    assert match_gpu_name("NVIDIA GeForce RTX 4090", 24 * GIB).name == "RTX4090"
    assert match_gpu_name("Some Future GPU", 96 * GIB) is None
    odd = Hardware(GPU("Some Future GPU", 96, None, None, None, "detected"), 2, CPU(parse_size("64GB"), 50e9, 1e12))
    r = plan(preset("moonlight-16b-a3b"), odd, PlanRequest())
    assert r["fits"] and r["layout"] == "gpu" and r["decode_tokens_per_s_upper"] is None
    assert any("not in the hardware table" in n for n in r["notes"])
    assert "decode <= - tok/s" in render(r)


@pytest.mark.parametrize("spec,match", [
    ("8xH300", r"unknown GPU 'H300'.*H200.*RTX4090"), ("x4090", r"unknown GPU 'x4090'.*COUNTxNAME"),
    ("8x", "malformed.*H200"), ("0xH100", "at least 1"), ("eight x H100", "unknown GPU 'eight x H100'"),
    ("8xH100,2xA100", "malformed")])
def test_bad_gpu_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_gpus(spec)


@pytest.mark.parametrize("kw,match", [
    (dict(context=-1), "--context -1"), (dict(concurrency=0), "--concurrency 0"),
    (dict(precision="fp4"), "fp8, bf16, int8, int4"), (dict(cache_dtype="int8"), "bf16, fp8"),
    (dict(gpu_hour_price=-2.0), "negative")])
def test_bad_requests(kw, match):
    with pytest.raises(ValueError, match=match):
        run_plan(**kw)


def test_bad_sizes():
    for text in ("512", "lots", "-4GB", "0GB"):
        with pytest.raises(ValueError, match="--cpu-mem"):
            parse_size(text)
    with pytest.raises(ValueError, match="--cpu-bandwidth"):
        parse_bandwidth("fast")


# ------------------------------------------------------------------------------------------------------------------
# The command
def test_cli_json(capsys):
    assert main(["plan", "--model", "deepseek-v3", "--gpus", "8xH200", "--cpu-mem", "512GB", "--context", "32768",
                 "--concurrency", "4", "--json", *CPU_FLAGS]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("params_total", "params_active", "weights_bytes", "kv_bytes_per_token", "fits", "layout",
                "decode_tokens_per_s_upper"):
        assert key in r
    assert r["fits"] is True and r["layout"] == "gpu" and r["kv_bytes_per_token"] == 70272


def test_cli_text(capsys):
    assert main(["plan", "--model", "deepseek-v3", "--gpus", "1xRTX4090", "--cpu-mem", "512GB", "--precision",
                 "int4", "--gpu-hour-price", "0.4", "--api-price-per-mtok", "1.1", *CPU_FLAGS]) == 0
    out = capsys.readouterr().out
    for text in ("routed_experts", "70,272 bytes/token", "does not fit: needs", "recommendation: hybrid",
                 "dsv3 serve", "cost: local"):
        assert text in out, text


def test_cli_checkpoint_dir_and_no_gpu(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(v3()))
    assert main(["plan", "--model", str(tmp_path), "--gpus", "none", "--cpu-mem", "64GB", "--json",
                 *CPU_FLAGS]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [lay["name"] for lay in r["layouts"]] == ["cpu"] and r["layout"] == "cpu"
    assert r["precision"] == "bf16" and r["weights_bytes"] == predicted_weight_bytes(
        ModelConfig.from_dict(v3()), "bf16", True)


@pytest.mark.parametrize("args,match", [
    (["--model", "deepseek-v9"], r"--model 'deepseek-v9'.*deepseek-v3.*kimi-k2"),
    (["--gpus", "8xH300"], r"unknown GPU 'H300'.*H200"),
    (["--gpus", "8x"], "malformed"),
    (["--context", "-5"], "--context -5"),
    (["--cpu-mem", "lots"], "--cpu-mem"),
])
def test_cli_errors(args, match, capsys):
    assert main(["plan", "--cpu-mem", "512GB", *CPU_FLAGS, *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dsv3 plan: error:")
    assert __import__("re").search(match, err), err
