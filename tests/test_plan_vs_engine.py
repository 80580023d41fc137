"""The planner's predictions against what dsv3 actually allocates, for the tiny and the bench-small models."""

import torch

import dsv3
from dsv3.engine.engine import EngineConfig, LLMEngine
from dsv3.model import build_model
from dsv3.plan import predicted_cache_bytes, predicted_weight_bytes
from dsv3.checkpoint import model_bytes

BENCH_SMALL = dict(  # ../shared/bench/hf_anchor.py's CPU shape (~220M parameters)
    model_type="deepseek_v3", vocab_size=32000, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
    num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=64,
    num_experts_per_tok=6, n_group=8, topk_group=4, n_shared_experts=1, q_lora_rank=192, kv_lora_rank=128,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, routed_scaling_factor=2.5, max_position_embeddings=4096,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}, num_nextn_predict_layers=0)


def within(pred, actual, tol=0.05):
    return abs(pred - actual) <= tol * actual


def test_tiny_fp8_checkpoint_weights_and_cache(tiny_ckpt):
    cfg = dsv3.ModelConfig.from_pretrained(tiny_ckpt)
    kept = dsv3.load_model(tiny_ckpt, dtype=torch.bfloat16, fp8_mode="keep")
    assert within(predicted_weight_bytes(cfg, "fp8", with_mtp=True), model_bytes(kept))
    bf16 = dsv3.load_model(tiny_ckpt, dtype=torch.bfloat16)
    assert within(predicted_weight_bytes(cfg, "bf16", with_mtp=True), model_bytes(bf16))
    eng = LLMEngine(bf16, config=EngineConfig(num_blocks=40, block_size=16, cache_dtype=torch.bfloat16))
    assert eng.cache.total_bytes == predicted_cache_bytes(cfg, 40 * 16, "bf16", with_mtp=True)


def test_bench_small_weights_and_cache():
    cfg = dsv3.ModelConfig.from_dict(BENCH_SMALL)
    model = build_model(cfg, "cpu", torch.bfloat16)
    # Router weights and biases stay float32 when loaded; a freshly built bf16 model casts them, so compare the
    # prediction with the loaded layout: everything bf16 except the router in float32.
    router = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith(".mlp.gate"))
    actual = model_bytes(model) + 2 * router
    assert within(predicted_weight_bytes(cfg, "bf16"), actual)
    eng = LLMEngine(model, config=EngineConfig(cache_memory_bytes=64 * 2**20, block_size=16,
                                               cache_dtype=torch.bfloat16))
    tokens = eng.cache.num_blocks * 16
    assert eng.cache.total_bytes == predicted_cache_bytes(cfg, tokens, "bf16")
    assert eng.cache.total_bytes <= 64 * 2**20
