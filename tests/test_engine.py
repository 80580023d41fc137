"""The generation engine against transformers and against itself (batched vs single, cached vs recomputed)."""
import pytest
import torch

import dsv3
from dsv3.engine.engine import EngineConfig, LLMEngine
from dsv3.engine.kv_cache import LatentKVCache
from dsv3.engine.sampling import SamplingParams
from dsv3.engine.scheduler import QueueFullError
from hf_ref import YARN, hf_model, run_all, v3

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = hf_model(v3(num_hidden_layers=3, rope_scaling=dict(YARN), max_position_embeddings=256))
    path = tmp_path_factory.mktemp("engine-model")
    ref.save_pretrained(path)
    return ref, dsv3.load_model(path, dtype=torch.float32)


PROMPTS = [[5, 17, 42, 9, 100, 3, 77], [200, 1, 3], list(range(30, 70)), [8] * 13, [250, 2, 99, 4, 4, 4, 12, 7, 19]]


def test_greedy_matches_transformers_generate(pair):
    ref, model = pair
    eng = LLMEngine(model, config=EngineConfig(num_blocks=64, block_size=4, max_num_batched_tokens=16))
    outs = run_all(eng, PROMPTS, SamplingParams(max_tokens=12, **GREEDY))
    for p, out in zip(PROMPTS, outs):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert out.token_ids == want
        assert out.finish_reason == "length"


def test_batched_equals_one_at_a_time(pair):
    _, model = pair
    params = SamplingParams(max_tokens=10, **GREEDY)
    cfg = EngineConfig(num_blocks=128, block_size=8, max_num_batched_tokens=32)
    together = run_all(LLMEngine(model, config=cfg), PROMPTS, params)
    for p, out in zip(PROMPTS, together):
        alone = run_all(LLMEngine(model, config=cfg), [p], params)[0]
        assert out.token_ids == alone.token_ids


def test_cached_decode_logits_equal_recomputation(pair):
    _, model = pair
    eng = LLMEngine(model, config=EngineConfig(num_blocks=32, block_size=4, max_num_batched_tokens=5))
    seen = []
    orig = eng.runner.run

    def spy(batch, rows):
        logits, h = orig(batch, rows)
        k = 0
        for seq, r in zip(batch.seqs, rows):
            for off in r:
                seen.append((seq.num_computed + off, logits[k].clone()))
                k += 1
        return logits, h

    eng.runner.run = spy
    out = run_all(eng, [PROMPTS[2][:11]], SamplingParams(max_tokens=8, **GREEDY))[0]
    full = torch.tensor([out.prompt_token_ids + out.token_ids])
    with torch.no_grad():
        want = model(full)[0]
    assert len(seen) == 8
    for pos, got in seen:
        assert ((got - want[pos]).norm() / want[pos].norm()).item() <= 1e-4


def test_cache_bytes_per_token(pair):
    _, model = pair
    cfg = model.cfg
    eng = LLMEngine(model, config=EngineConfig(num_blocks=4, block_size=4, cache_dtype=torch.bfloat16))
    assert eng.cache.bytes_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2
    assert eng.cache.kv.shape == (cfg.num_hidden_layers, 16, cfg.kv_lora_rank + cfg.qk_rope_head_dim)


def test_prefix_cache_reuse_gives_same_tokens(pair):
    _, model = pair
    system = list(range(100, 140))
    a, b = system + [1, 2, 3], system + [7, 8]
    params = SamplingParams(max_tokens=6, **GREEDY)
    eng = LLMEngine(model, config=EngineConfig(num_blocks=64, block_size=8))
    first = run_all(eng, [a], params)[0]
    second = run_all(eng, [b], params)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 40  # the 5 full blocks of the shared prefix
    fresh = run_all(LLMEngine(model, config=EngineConfig(num_blocks=64, block_size=8,
                                                          enable_prefix_caching=False)), [b], params)[0]
    assert second.token_ids == fresh.token_ids


def test_preemption_under_a_small_cache(pair):
    _, model = pair
    params = SamplingParams(max_tokens=16, **GREEDY)
    big = run_all(LLMEngine(model, config=EngineConfig(num_blocks=256, block_size=4)), PROMPTS, params)
    small_eng = LLMEngine(model, config=EngineConfig(num_blocks=20, block_size=4, enable_prefix_caching=False))
    small = run_all(small_eng, PROMPTS, params)
    assert [o.token_ids for o in small] == [o.token_ids for o in big]
    assert small_eng.scheduler.num_preemptions > 0
    assert small_eng.cache.allocator.num_used == 0


def test_abort_frees_blocks(pair):
    _, model = pair
    eng = LLMEngine(model, config=EngineConfig(num_blocks=32, block_size=4, enable_prefix_caching=False))
    rid = eng.add_request(PROMPTS[2], SamplingParams(max_tokens=50, **GREEDY))
    eng.step()
    assert eng.cache.allocator.num_used > 0
    assert eng.abort(rid)
    assert eng.cache.allocator.num_used == 0 and not eng.has_unfinished()
    assert not eng.abort(rid)


def test_refusals_before_any_work(pair):
    _, model = pair
    eng = LLMEngine(model, config=EngineConfig(num_blocks=4, block_size=4, max_waiting=1, max_model_len=64))
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="exceeds the context length 64"):
        eng.add_request(list(range(60)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="whole cache holds 16"):
        eng.add_request(list(range(10)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request([1, 999], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="strings or|string or"):
        eng.add_request("hello", SamplingParams(max_tokens=1)) if eng.tokenizer else eng.add_request(
            [1.5], SamplingParams(max_tokens=1))
    eng.add_request([1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(QueueFullError):
        eng.add_request([1, 2], SamplingParams(max_tokens=2))
    assert eng.cache.allocator.num_used == 0


def test_budget_sizing():
    cfg = dsv3.ModelConfig.from_dict(v3())
    per_token = LatentKVCache.bytes_per_token_for(cfg, torch.bfloat16)
    assert LatentKVCache.blocks_for_budget(cfg, per_token * 16 * 10, 16, torch.bfloat16) == 10
