#!/usr/bin/env python3
"""dsv3 on one GPU: kernel and model correctness against the torch reference, then speed against transformers.

One command, one job (docs/gpu.md says how to run it on the lent GPU machine and what it should take):
  python benchmarks/gpu.py --json $OUT/gpu.json [--skip-peer] [--skip-fp8] [--decode-steps 64] [--prefill 2048]
1. Each Triton kernel against its plain-torch twin at the real shapes (dsv3/kernels/triton_checks.py, the same
   checks the CPU tests run under the interpreter): bf16 rel error <= 1e-2, fp32 <= 1e-4.
2. The Moonlight-16B-A3B shape (../shared/bench/hf_anchor.py --shape moonlight) built with random bf16 weights; its
   prefill logits and its decode-step logits through the Triton kernels (and CUDA graphs) against the torch paths.
3. Timings through the engine: prefill of --prefill tokens, decode at batch 1 and 32 after a 128-token prompt, for
   torch (DSV3_TRITON=0, no graphs), Triton, and Triton + CUDA graphs; then the same model with FP8 block-scaled
   weights (decode at batch 1). The peer (hf_anchor.py) runs in a subprocess of the same job once our model is freed.
4. A table with ratios and the memory-bandwidth floor (active weight bytes per token / measured copy bandwidth);
   all numbers to --json.
Exits 2 at once, with a message, when there is no CUDA device or no Triton; 1 when a correctness check fails.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ANCHORS = [os.path.join(ROOT, "..", "shared", "bench", "hf_anchor.py"), os.path.join(ROOT, ".gpu", "hf_anchor.py")]
MOONLIGHT = dict(model_type="deepseek_v3", vocab_size=163840, hidden_size=2048, intermediate_size=11264,
                 moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16,
                 num_key_value_heads=16, n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1,
                 n_shared_experts=2, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                 v_head_dim=128, routed_scaling_factor=2.446, max_position_embeddings=8192, rope_theta=50000.0,
                 tie_word_embeddings=False, num_nextn_predict_layers=0)  # = hf_anchor.SHAPES["moonlight"]
TARGETS = {"decode_bs1": 400.0, "decode_bs32": 3000.0, "prefill": 40000.0, "fp8_speedup": 1.5}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="gpu_results.json", help="write all results here")
    ap.add_argument("--prefill", type=int, default=2048, help="prompt length of the prefill timing")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--anchor", default=None, help="path of hf_anchor.py (default: ../shared/bench or .gpu/)")
    ap.add_argument("--skip-peer", action="store_true", help="do not run transformers (hf_anchor.py)")
    ap.add_argument("--skip-fp8", action="store_true", help="do not time the FP8-weight model")
    ap.add_argument("--checks-only", action="store_true", help="kernel and model checks, no timings")
    return ap.parse_args(argv)


def fail_fast() -> None:
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device (torch.cuda.is_available() is False). This benchmark needs an NVIDIA "
              "GPU; run it on the GPU machine as docs/gpu.md says. The CPU-side checks are "
              "`pytest tests/test_triton_kernels.py` (Triton interpreter).", file=sys.stderr)
        sys.exit(2)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/gpu.py: Triton is not installed (pip install -e '.[gpu]')", file=sys.stderr)
        sys.exit(2)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("benchmarks/gpu.py: unset TRITON_INTERPRET; the kernels must be compiled for the GPU", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------------------- checks
def kernel_checks() -> list[dict]:
    import torch

    from dsv3.kernels import triton_checks as tc

    rows = []

    def add(name, dtype, errs: dict, tols: dict, **extra):
        ok = all(errs[k] <= tol for k, tol in tols.items())
        rows.append(dict(check=name, dtype=str(dtype).replace("torch.", ""), error=errs, tolerance=tols, ok=ok,
                         **extra))
        shown = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in errs.items())
        print(f"  {'ok ' if ok else 'BAD'} {name:<44} {rows[-1]['dtype']:<9} {shown}", flush=True)

    for dtype in (torch.bfloat16, torch.float32):
        tol = tc.TOLERANCE[dtype]
        for T in (1, 32, 512):  # decode (small path), batch 32, a prefill chunk (grouped)
            err = tc.check_moe("cuda", dtype, 64, 2048, 1408, T, 6, seed=T)
            add(f"moe moonlight E64 D2048 I1408 K6 T{T}", dtype, err, dict.fromkeys(err, tol))
        err = {"mla": tc.check_mla("cuda", dtype, 16, 512, 64, 16, [1, 130, 2048, 777], num_splits=8)}
        add("mla moonlight H16 C512 R64 Z16 8 splits", dtype, err, {"mla": tol})
        err = {"mla": tc.check_mla("cuda", dtype, 128, 512, 64, 64, [3000, 17], num_splits=1)}
        add("mla v3 H128 C512 R64 Z64 one split", dtype, err, {"mla": tol})
    for T, dtype in ((4, torch.float32), (256, torch.bfloat16)):
        err = tc.check_moe("cuda", dtype, 64, 2048, 1408, T, 6, use_fp8=True)
        add(f"moe fp8 weights E64 D2048 I1408 K6 T{T}", dtype, err, dict.fromkeys(err, tc.TOLERANCE[dtype]))
    for M in (1, 32, 2048):
        err = tc.check_fp8("cuda", M, 7168, 2048, torch.bfloat16, seed=M)
        # Compiled, act_quant must equal its torch twin exactly (the interpreter's rounding slips do not apply).
        err["act_quant_slips"] = float(err["act_quant_slips"])
        add(f"fp8 gemm M{M} K7168 N2048", torch.bfloat16, err,
            {"act_quant_scales": 0.0, "act_quant_slips": 0.0, "gemm_vs_emulation": 1e-4,
             "linear_vs_own_quantisation": 1e-2, "linear_vs_dequantised": tc.FP8_QUANT_TOLERANCE})
    return rows


def build_moonlight(dtype):
    import torch

    from dsv3 import ModelConfig
    from dsv3.model import build_model
    from dsv3.model.transformer import init_weights

    cfg = ModelConfig.from_dict(dict(MOONLIGHT))
    torch.manual_seed(0)
    model = build_model(cfg, "meta", with_mtp=False).to(dtype)  # bf16 from the start: no float32 copy on the GPU
    model = model.to_empty(device="cuda")
    with torch.no_grad():
        init_weights(model)
    return model.eval()


def to_fp8(model) -> None:
    """Quantise every projection the official FP8 checkpoints store in FP8 (attention, MLPs, experts; not the
    embedding, head, router or norms) to 128x128 block-scaled float8_e4m3fn, in place."""
    import torch

    from dsv3.kernels import fp8
    from dsv3.model.layers import Linear
    from dsv3.model.moe import StackedLinear

    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (Linear, StackedLinear)) and name != "lm_head":
                q, s = fp8.quantize(m.weight)
                m.weight = torch.nn.Parameter(q, requires_grad=False)
                m.__dict__.pop("weight_scale_inv", None)
                m.set_fp8(s)
    torch.cuda.empty_cache()


def make_engine(model, max_batch: int, prefill: int, steps: int, graphs: bool, max_prompt: int = 128):
    from dsv3.engine.engine import EngineConfig, LLMEngine

    block = 16
    blocks = (max_batch * (max_prompt + steps + 2 * block) + prefill + 4 * block) // block + 16
    eng = LLMEngine(model, config=EngineConfig(num_blocks=blocks, block_size=block, max_num_seqs=max_batch,
                                               max_num_batched_tokens=max(prefill, max_batch * 128),
                                               enable_prefix_caching=False, speculative="off"))
    if graphs:
        eng.runner.enable_decode_graphs(max_batch, max_prompt + steps + 2 * block)
    return eng


def decode_logits(eng, prompts, steps):
    """Greedy decode with the runner's logits recorded per pure-decode step: (tokens per prompt, [logits [B, V]])."""
    from dsv3.engine.request import run_to_completion
    from dsv3.engine.sampling import SamplingParams

    seen = []
    orig = eng.runner.run

    def spy(batch, rows):
        logits, h = orig(batch, rows)
        if all(n == 1 for n in batch.num_new) and len(batch.seqs) == len(prompts):
            seen.append(logits.float().clone())
        return logits, h

    eng.runner.run = spy
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    try:
        outs = run_to_completion(eng, prompts, [params] * len(prompts))
    finally:
        eng.runner.run = orig
    return [o.token_ids for o in outs], seen


def model_checks(model, vocab: int) -> list[dict]:
    import torch

    from dsv3.kernels.triton_checks import rel

    rows = []
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (1, 256), generator=g).cuda()
    with torch.inference_mode():
        os.environ["DSV3_TRITON"] = "0"
        want = model(ids)[0, -32:].float()
        os.environ["DSV3_TRITON"] = "1"
        got = model(ids)[0, -32:].float()
    err = rel(got, want)
    rows.append({"check": "model prefill logits (256 tokens), Triton MoE vs torch", "error": err, "tolerance": 2e-2,
                 "ok": err <= 2e-2})
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (128, 77, 300, 5)]
    os.environ["DSV3_TRITON"] = "0"
    tok_ref, log_ref = decode_logits(make_engine(model, 4, 512, 8, False, 300), prompts, 8)
    os.environ["DSV3_TRITON"] = "1"
    tok, logs = decode_logits(make_engine(model, 4, 512, 8, True, 300), prompts, 8)
    # Compare steps while every row still has the same history (random weights make near-ties in argmax common).
    errs = []
    for step, (a, b) in enumerate(zip(logs, log_ref)):
        if any(t[:step + 1] != r[:step + 1] for t, r in zip(tok, tok_ref)):
            break
        errs.append(rel(a, b))
    err = max(errs) if errs else float("nan")
    rows.append({"check": f"model decode logits over {len(errs)} steps, Triton + graphs vs torch eager",
                 "error": err, "tolerance": 2e-2, "ok": bool(errs) and err <= 2e-2})
    for r in rows:
        print(f"  {'ok ' if r['ok'] else 'BAD'} {r['check']:<60} {r['error']:.2e}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------- timing
def copy_bandwidth() -> float:
    """Bytes/s moved by a device-to-device copy of 4 GiB (read + write counted), best of 5."""
    import torch

    a = torch.empty(2**30, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        best = min(best, s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 4 * 2**30 / best


def time_engine(model, vocab: int, prefill: int, steps: int, batch_sizes: list[int], graphs: bool,
                do_prefill: bool = True) -> dict:
    import torch

    from dsv3.engine.sampling import SamplingParams

    eng = make_engine(model, max(batch_sizes), prefill, steps, graphs)
    g = torch.Generator().manual_seed(1)
    res = {}

    def prompt(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    def run(prompts, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        ids = [eng.add_request(p, params) for p in prompts]
        while any(not eng.seqs[i].output_ids for i in ids):  # prefill all, first token sampled
            eng.step()
        torch.cuda.synchronize()
        n0, t = eng.stats["generated_tokens"], time.perf_counter()
        while eng.has_unfinished():
            eng.step()
        torch.cuda.synchronize()
        return (eng.stats["generated_tokens"] - n0) / (time.perf_counter() - t)

    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    if do_prefill:
        eng.add_request(prompt(prefill), one)
        while eng.has_unfinished():
            eng.step()
        ts = []
        for _ in range(3):
            eng.add_request(prompt(prefill), one)
            torch.cuda.synchronize()
            t = time.perf_counter()
            while eng.has_unfinished():
                eng.step()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        res["prefill_tokens_per_s"] = prefill / statistics.median(ts)
    for bs in batch_sizes:
        run([prompt(128) for _ in range(bs)], 4)  # warm-up: compiles kernels, captures this bucket's graph
        res[f"decode_bs{bs}_tokens_per_s"] = run([prompt(128) for _ in range(bs)], steps + 1)
    return res  # the engine and its cache go with this frame


def run_peer(anchor: str, prefill: int, steps: int, batch_sizes: list[int]) -> dict:
    cmd = [sys.executable, anchor, "--shape", "moonlight", "--dtype", "bfloat16", "--prefill", str(prefill),
           "--decode-steps", str(steps), "--batch-sizes", ",".join(map(str, batch_sizes))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    a = parse_args(argv)
    fail_fast()
    sys.path.insert(0, ROOT)
    import torch
    import triton

    bss = [int(b) for b in a.batch_sizes.split(",")]
    t_start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
              "sms": props.multi_processor_count, "torch": torch.__version__, "triton": triton.__version__,
              "command": " ".join(sys.argv)}
    print(f"{result['device']} ({result['sms']} SMs), torch {torch.__version__}, triton {triton.__version__}")

    print("kernel checks against the torch reference:", flush=True)
    os.environ["DSV3_TRITON"] = "1"  # errors raise instead of falling back
    result["kernel_checks"] = kernel_checks()
    model = build_moonlight(torch.bfloat16)
    cfg = model.cfg
    print("model checks:", flush=True)
    result["model_checks"] = model_checks(model, cfg.vocab_size)
    ok = all(r["ok"] for r in result["kernel_checks"] + result["model_checks"])
    result["checks_ok"] = ok
    if not a.checks_only:
        bw = copy_bandwidth()
        active = cfg.param_counts()["active_read_per_token"]
        result["copy_bandwidth_tb_s"] = bw / 1e12
        result["floor_bf16_tokens_per_s"] = bw / (2 * active)
        result["floor_fp8_tokens_per_s"] = bw / active
        runs = {}
        for name, flag, graphs in (("torch", "0", False), ("triton", "1", False), ("triton+graphs", "1", True)):
            os.environ["DSV3_TRITON"] = flag
            print(f"timing dsv3 {name} ...", flush=True)
            runs[name] = time_engine(model, cfg.vocab_size, a.prefill, a.decode_steps, bss, graphs,
                                     do_prefill=not graphs)  # graphs change decode only
        runs["triton+graphs"]["prefill_tokens_per_s"] = runs["triton"]["prefill_tokens_per_s"]
        if not a.skip_fp8:
            print("timing dsv3 FP8 weights (triton+graphs) ...", flush=True)
            to_fp8(model)
            os.environ["DSV3_TRITON"] = "1"
            runs["fp8 triton+graphs"] = time_engine(model, cfg.vocab_size, a.prefill, a.decode_steps, [1], True,
                                                    do_prefill=False)
        result["dsv3"] = runs
        del model
        gc.collect()  # engines and captured graphs hold cache and pool memory the peer needs
        torch.cuda.empty_cache()
        anchor = a.anchor or next((p for p in ANCHORS if os.path.exists(p)), None)
        if not a.skip_peer and anchor:
            print(f"timing the peer ({anchor}) ...", flush=True)
            result["peer"] = run_peer(anchor, a.prefill, a.decode_steps, bss)
        elif not a.skip_peer:
            result["peer"] = {"error": f"hf_anchor.py not found (looked in {ANCHORS}); pass --anchor"}
        print_table(result, bss)
    result["wall_s"] = time.perf_counter() - t_start
    with open(a.json, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {a.json} ({result['wall_s']:.0f} s)")
    if not ok:
        print("CORRECTNESS CHECKS FAILED (see BAD lines above)", file=sys.stderr)
    return 0 if ok else 1


def print_table(result: dict, bss: list[int]) -> None:
    runs, peer = result["dsv3"], result.get("peer") or {}
    cols = list(runs)
    metrics = [("prefill_tokens_per_s", "prefill tok/s", TARGETS["prefill"])]
    metrics += [(f"decode_bs{b}_tokens_per_s", f"decode bs={b} tok/s", TARGETS.get(f"decode_bs{b}")) for b in bss]
    dash = "-"
    print(f"{'metric':<20}" + "".join(f"{c:>18}" for c in cols) + f"{'peer':>10}{'best/peer':>10}{'target':>9}")
    for key, label, target in metrics:
        vals = [runs[c].get(key) for c in cols]
        p = peer.get(key)
        best = max((v for v in vals if v), default=None)
        cells = "".join(f"{v:>18.1f}" if v else f"{dash:>18}" for v in vals)
        peer_cell = f"{p:>10.1f}" if p else f"{dash:>10}"
        ratio = f"{best / p:>9.1f}x" if best and p else f"{dash:>10}"
        print(f"{label:<20}{cells}{peer_cell}{ratio}" + (f"{target:>9.0f}" if target else ""))
    print(f"memory-bandwidth floor at batch 1: {result['floor_bf16_tokens_per_s']:.0f} tok/s bf16, "
          f"{result['floor_fp8_tokens_per_s']:.0f} tok/s fp8 (copy bandwidth {result['copy_bandwidth_tb_s']:.2f} TB/s)")
    g, f8 = runs.get("triton+graphs", {}).get("decode_bs1_tokens_per_s"), runs.get("fp8 triton+graphs", {}).get(
        "decode_bs1_tokens_per_s")
    if g and f8:
        print(f"fp8 / bf16 decode bs=1: {f8 / g:.2f}x (target >= {TARGETS['fp8_speedup']}x); bf16 reaches "
              f"{g / result['floor_bf16_tokens_per_s']:.2f} of its floor")
    if "error" in peer:
        print(f"peer failed: {peer['error'][-500:]}")


if __name__ == "__main__":
    sys.exit(main())
