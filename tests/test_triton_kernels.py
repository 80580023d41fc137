"""The Triton kernels (MoE grouped/small-batch GEMMs, paged MLA decode, FP8 block-scaled GEMM) against plain torch
under Triton's CPU interpreter, their wiring into the model and engine, the static decode step behind the CUDA
graphs, and benchmarks/gpu.py's command line.

The kernels are imported with TRITON_INTERPRET=1 (triton.jit fixes interpreted-or-compiled when a kernel is defined),
so on a CPU-only machine they run as numpy programs: shapes here are tiny. The same checks run compiled on a GPU at the
real shapes through benchmarks/gpu.py (dsv3.kernels.triton_checks is shared).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3 import ModelConfig
from dsv3.assets import default_model_path
from dsv3.tokenizer import Tokenizer
from dsv3.engine.engine import EngineConfig, LLMEngine
from dsv3.engine.request import run_to_completion
from dsv3.engine.sampling import SamplingParams
from dsv3.kernels import dispatch
from dsv3.model import build_model
from dsv3.model.moe import Experts
from hf_ref import v3

# Speculation at every batch size (the engine's default pauses drafting above a device-dependent batch size).
SPEC = dict(speculative="mtp", speculative_max_batch=0)

_prev = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton  # noqa: F401

    from dsv3.kernels import triton_checks, triton_fp8, triton_mla, triton_moe, triton_util  # noqa: F401

    HAVE_TRITON = triton_util.INTERPRET
    WHY = "dsv3's Triton kernels were imported without TRITON_INTERPRET=1 before this module, so they cannot run here"
except ImportError:
    HAVE_TRITON = False
    WHY = "Triton is not installed (pip install -e '.[test]' installs it; it runs on the CPU through its interpreter)"
finally:
    if _prev is None:
        os.environ.pop("TRITON_INTERPRET")
    else:
        os.environ["TRITON_INTERPRET"] = _prev

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason=WHY)
ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    # Triton consults TRITON_INTERPRET again at launch (and in modules it imports lazily), so it stays set while
    # this module's tests run, and only then.
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_on(monkeypatch):
    """Route CPU tensors through the (interpreted) Triton kernels, with errors raised rather than hidden."""
    monkeypatch.setenv("DSV3_TRITON", "1")


# ---------------------------------------------------------------------------------------------------- kernels
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_grouped_and_small_match_reference(dtype):
    err = triton_checks.check_moe("cpu", dtype, E=6, D=48, I=40, T=9, K=3, seed=1,
                                  grouped_tiles=dict(block_m=16, block_n=16, block_k=16),
                                  small_tiles=dict(block_n=16, block_k=32))
    assert err["grouped"] <= TOL[dtype] and err["small"] <= TOL[dtype], err


@needs_triton
def test_moe_fp8_weights_use_their_block_scales():
    # 144 x 160 weights span two 128-blocks each way, so a wrong scale index shows.
    err = triton_checks.check_moe("cpu", torch.float32, E=3, D=160, I=144, T=2, K=2, use_fp8=True, seed=2,
                                  grouped_tiles=dict(block_m=16, block_n=32, block_k=32),
                                  small_tiles=dict(block_n=32, block_k=64))
    assert err["grouped"] <= 1e-4 and err["small"] <= 1e-4, err


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_decode_split_k_matches_reference(dtype):
    # Lengths 1 and 5 with 4 splits leave splits empty; 37 crosses blocks and a partial last tile.
    for splits in (1, 4):
        err = triton_checks.check_mla("cpu", dtype, H=4, C=32, R=16, Z=4, lens=[1, 37, 5], num_splits=splits,
                                      block_n=16)
        assert err <= TOL[dtype], (splits, err)


@needs_triton
def test_fp8_gemm_matches_emulation_and_dequantised_result():
    err = triton_checks.check_fp8("cpu", M=3, Kin=200, N=160, x_dtype=torch.float32, block_m=16, block_n=32)
    assert err["act_quant_scales"] == 0.0
    assert err["act_quant_slips"] >= 0, "act_quant differs from torch beyond the interpreter's known fp8 slips"
    assert err["gemm_vs_emulation"] <= 1e-5, err
    assert err["linear_vs_own_quantisation"] <= 1e-5, err
    # Against the dequantised bf16/fp32 result only the quantisation itself differs (compiled, the GPU benchmark
    # also bounds linear_vs_dequantised; here the interpreter's rounding slips would inflate it).
    assert err["quantisation_error"] <= triton_checks.FP8_QUANT_TOLERANCE, err


# ---------------------------------------------------------------------------------------------------- wiring
def tiny_model(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig.from_dict(v3(**kw)), "cpu", dtype).eval()


def test_dispatch_keeps_cpu_on_torch_and_validates_the_switch(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv("DSV3_TRITON", raising=False)
    assert not dispatch.use_triton(x, "moe")  # CPU tensors without the interpreter: torch paths
    monkeypatch.setenv("DSV3_TRITON", "0")
    assert not dispatch.use_triton(x, "moe")
    monkeypatch.setenv("DSV3_TRITON", "yes")
    with pytest.raises(ValueError, match="DSV3_TRITON"):
        dispatch.use_triton(x, "moe")


@needs_triton
def test_training_keeps_autograd_paths(triton_on):
    assert dispatch.use_triton(torch.zeros(2), "moe")
    w = torch.zeros(2, requires_grad=True)
    assert not dispatch.use_triton(torch.zeros(2), "moe", w)
    with torch.no_grad():
        assert dispatch.use_triton(torch.zeros(2), "moe", w)


@needs_triton
@pytest.mark.parametrize("small_pairs", [64, 0])
def test_model_logits_through_triton_kernels(triton_on, monkeypatch, small_pairs):
    """Prefill logits of a tiny model with its routed experts in the Triton kernels (small-batch path, then grouped)
    equal the torch path's."""
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        monkeypatch.setenv("DSV3_TRITON", "0")
        want = model(ids)
        monkeypatch.setenv("DSV3_TRITON", "1")
        monkeypatch.setattr(dispatch, "SMALL_BATCH_PAIRS", small_pairs)
        got = model(ids)
    assert triton_checks.rel(got, want) <= 1e-4


@needs_triton
def test_paged_decode_matches_attend_absorbed(triton_on):
    """dispatch.mla_decode_paged (Triton, then the torch fallback) against the model's own absorbed attention over
    the same gathered context."""
    model = tiny_model()
    mla = model.main_layers[0].self_attn
    H, N, R, C, Z = mla.n_heads, mla.nope, mla.rope, mla.rank, 4
    lens = torch.tensor([3, 9], dtype=torch.int32)
    tables = torch.tensor([[5, 1, 7], [2, 0, 6]], dtype=torch.int32)
    kv = torch.randn(8 * Z, C + R)
    q_nope, q_pe = torch.randn(2, H, N), torch.randn(2, H, R)
    want = []
    for b in range(2):
        pos = torch.arange(int(lens[b]))
        ctx = kv[tables[b, pos // Z].long() * Z + pos % Z][None]  # [1, L, W]
        want.append(mla.attend_absorbed(q_nope[b, None, None], q_pe[b, None, None], ctx[..., :C], ctx[..., C:],
                                        None)[0, 0])
    want = torch.stack(want)  # [B, H, V]
    with torch.no_grad():
        got = dispatch.mla_decode_paged(mla, q_nope, q_pe, kv, tables, lens, Z, num_splits=2)
        os.environ["DSV3_TRITON"] = "0"
        fallback = dispatch.mla_decode_paged(mla, q_nope, q_pe, kv, tables, lens, Z)
    assert triton_checks.rel(got, want) <= 1e-4
    assert triton_checks.rel(fallback, want) <= 1e-5


# ---------------------------------------------------------------------------------------------------- engine
def _generate(engine, prompts, steps):
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in run_to_completion(engine, prompts, [params] * len(prompts))]


PROMPTS = [[5, 17, 42, 9, 100], [200, 1, 3, 4, 4, 4, 12, 7, 19, 30]]


def _count_without_host_reads(monkeypatch, graphs, name: str) -> list[int]:
    """Wrap the static step graphs.<name> so that it fails on any read back to the host; returns its call count
    (a one-element list, updated in place)."""
    calls, step = [0], getattr(graphs, name)

    def checked(b):
        calls[0] += 1
        with monkeypatch.context() as m:
            for attr in ("item", "tolist", "cpu", "numpy"):
                m.setattr(torch.Tensor, attr, lambda *a, _n=attr, **k: pytest.fail(f"{_n}() inside the static step"))
            return step(b)

    monkeypatch.setattr(graphs, name, checked)
    return calls


def test_static_decode_step_matches_eager_engine(monkeypatch):
    """The graph runner's static step (run eagerly on the CPU) generates what the eager engine does, reads nothing
    back to the host inside the step, and parks padding rows on its own scratch block."""
    monkeypatch.setattr(Experts, "force_grouped_mm", True)  # the CPU MoE default loops with .tolist()
    model = tiny_model()
    cfg = EngineConfig(num_blocks=32, block_size=4, max_num_batched_tokens=32, speculative="off")
    want = _generate(LLMEngine(model, config=cfg), PROMPTS, 6)
    eng = LLMEngine(model, config=cfg)
    eng.runner.enable_decode_graphs(max_batch=4, max_model_len=64, capture=False)
    graphs = eng.runner.graphs
    assert graphs.buckets == (1, 2, 4) and eng.cache.allocator.ref[graphs.scratch_block] == 1
    calls = _count_without_host_reads(monkeypatch, graphs, "forward")
    got = _generate(eng, PROMPTS, 6)
    assert got == want
    assert calls[0] >= 5  # every pure decode step went through it (bucket 2, one padding-free)


def test_static_speculative_step_matches_eager_speculation(monkeypatch):
    """Greedy speculative steps (one MTP draft) through the static runner: one static step computes the main
    model's and the MTP module's argmaxes at both rows of every sequence, with no host read inside; the engine
    then generates exactly what plain decoding does and accepts exactly what eager speculation accepts."""
    # The embedded model (trained MTP module: most drafts are accepted, so the draft rows' outputs matter).
    monkeypatch.setattr(Experts, "force_grouped_mm", True)
    model = dsv3.load_model(default_model_path(), dtype=torch.float32)
    tok = Tokenizer.from_pretrained(default_model_path())
    prompts = [tok.encode(t) for t in ("def fibonacci(n):\n    ", "import os\nimport sys\n\n\ndef main(",
                                      "class Stack:\n    def __init__(self):\n        self.")]
    cfg = dict(num_blocks=48, block_size=4, max_num_batched_tokens=64)
    want = _generate(LLMEngine(model, config=EngineConfig(speculative="off", **cfg)), prompts, 12)
    eager = LLMEngine(model, config=EngineConfig(**SPEC, num_draft_tokens=1, **cfg))
    assert _generate(eager, prompts, 12) == want
    assert eager.spec_stats()["acceptance_rate"] > 0.5
    eng = LLMEngine(model, config=EngineConfig(**SPEC, num_draft_tokens=1, **cfg))
    eng.runner.enable_decode_graphs(max_batch=4, max_model_len=64, capture=False)
    calls = _count_without_host_reads(monkeypatch, eng.runner.graphs, "forward_spec")
    assert _generate(eng, prompts, 12) == want
    assert calls[0] >= 5
    assert eng.spec_stats()["drafted"] == eager.spec_stats()["drafted"] > 0
    assert eng.spec_stats()["accepted"] == eager.spec_stats()["accepted"]
    assert eng.cache.allocator.num_used == 1  # only the runner's scratch block is left


@needs_triton
@pytest.mark.parametrize("static", [False, True])
def test_engine_decode_through_triton_kernels(triton_on, static):
    """Eager steps read the cache through block tables (runner hook); static steps add a padding row (3 in bucket 4)."""
    model = tiny_model()
    cfg = EngineConfig(num_blocks=32, block_size=4, max_num_batched_tokens=32, speculative="off")
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0][:3]]
    os.environ["DSV3_TRITON"] = "0"
    want = _generate(LLMEngine(model, config=cfg), prompts, 3)
    os.environ["DSV3_TRITON"] = "1"
    eng = LLMEngine(model, config=cfg)
    if static:
        eng.runner.enable_decode_graphs(max_batch=4, max_model_len=64, capture=False)
    assert _generate(eng, prompts, 3) == want


# ---------------------------------------------------------------------------------------------------- benchmark
def test_gpu_benchmark_fails_fast_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    bench = str(ROOT / "benchmarks" / "gpu.py")
    r = subprocess.run([sys.executable, bench, "--json", "/dev/null"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "no CUDA device" in r.stderr
    r = subprocess.run([sys.executable, bench, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--skip-peer" in r.stdout
