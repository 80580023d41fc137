#!/usr/bin/env python3
"""dsv3 running GGUF files vs llama.cpp running the same files, on the CPU (issue 21's measurement).

For each model (the embedded model, dequantised to bf16 with `dsv3 convert fp8-to-bf16`, and hf_anchor.py's
bench-small checkpoint, benchmarks/llamacpp.py's save_checkpoint), llama.cpp's own converter and llama-quantize
make the GGUF files (../shared/bench/llamacpp_anchor.py convert; build it once with `python llamacpp_anchor.py
build`). Then:
- memory: the file's size and the weight bytes dsv3 holds for it once packed for the CPU kernels (its blobs);
- agreement: greedy tokens of dsv3 on each GGUF file from the same prompt ids as dsv3 on the original checkpoint
  (and, for Q8_0, as dsv3 --quantize int8 on it): the first position where they differ (None: all equal). The BF16
  file holds the checkpoint's bf16 weights, so it must agree everywhere; Q8_0 and Q4_K_M round the weights;
- speed: each round times dsv3 (the engine, as benchmarks/llamacpp.py does: prefill, decode at batch 1 from the
  context llama-bench's tg starts at (dsv3: a 1-token prompt) and after 128 tokens (llama-bench -d 128), 16
  concurrent sequences after 8-token prompts) and llama.cpp (llama-bench, llama-batched-bench) on the same file,
  alternating which goes first; the table gives the median ratio and its range against issue 21's targets
  (dsv3 >= 1.3x at batch 1 and >= 1.5x at 16 concurrent for Q4_K_M and Q8_0).
Not a test: it builds llama.cpp and takes minutes; run it on a quiet machine.

  python benchmarks/gguf.py [--models embedded,bench-small] [--types bf16,Q8_0,Q4_K_M] [--rounds 3]
                            [--threads 2] [--decode-steps 64] [--prefill 512] [--json out.json]
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# This file is named like the gguf package: take its folder off the import path before anything imports `gguf`,
# and load the sibling benchmarks by file path (benchmarks/llamacpp.py puts the folder back for its own imports,
# by which time the real package is in sys.modules).
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != HERE]
import gguf  # noqa: E402,F401  (the package, cached before the folder comes back)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TARGETS = {"bs1": 1.3, "c16": 1.5}  # issue 21, for Q4_K_M and Q8_0
TARGET_TYPES = ("Q4_K_M", "Q8_0")


def make_checkpoint(model: str, path: str, llamacpp) -> None:
    """A bf16 checkpoint with per-expert tensors and a tokenizer, as llama.cpp's converter wants it."""
    if model == "embedded":
        from dsv3.assets import default_model_path

        subprocess.run([sys.executable, "-m", "dsv3", "convert", "fp8-to-bf16", default_model_path(), path],
                       check=True, stdout=subprocess.DEVNULL)
    else:
        llamacpp.save_checkpoint(model, path)


def greedy(path: str, prompt: list[int], n: int, quantize: str | None = None) -> list[int]:
    from dsv3 import LLM, SamplingParams

    llm = LLM(path, dtype="bfloat16", speculative="off", progress=False, quantize=quantize, max_model_len=256)
    out = llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    return out[0].token_ids


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="embedded,bench-small")
    ap.add_argument("--types", default="bf16,Q8_0,Q4_K_M")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (0: only the greedy-agreement check)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--greedy-tokens", type=int, default=32)
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args()
    llamacpp = _sibling("llamacpp")
    torch.set_num_threads(a.threads)
    types = a.types.split(",")
    result = {"threads": a.threads, "rounds": a.rounds, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models.split(","):
            ckpt, out = os.path.join(tmp, model, "ckpt"), os.path.join(tmp, model, "gguf")
            make_checkpoint(model, ckpt, llamacpp)
            subprocess.run([sys.executable, llamacpp.ANCHOR, "convert", ckpt, out, "--types", a.types], check=True,
                           stdout=subprocess.DEVNULL)
            files = {t: os.path.join(out, f"model-{t}.gguf") for t in types}
            from dsv3 import ModelConfig
            from dsv3.gguf import read_gguf

            cfg = ModelConfig.from_pretrained(ckpt)
            prompt = torch.randint(0, cfg.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
            base = greedy(ckpt, prompt, a.greedy_tokens)
            agree = {}
            for t, f in files.items():
                toks = greedy(f, prompt, a.greedy_tokens)
                agree[t] = {"types": read_gguf(f).describe_types(), "file_mb": os.path.getsize(f) / 1e6,
                            "dsv3_weights_mb": llamacpp.resident_bytes(f) / 1e6,
                            "first_divergence_vs_checkpoint": first_divergence(toks, base)}
                if t == "Q8_0":
                    agree[t]["first_divergence_vs_quantize_int8"] = first_divergence(
                        toks, greedy(ckpt, prompt, a.greedy_tokens, "int8"))
                print(f"{model} {t}: {agree[t]}", file=sys.stderr, flush=True)
            runs: dict[str, list[dict]] = {f"{side} {t}": [] for t in types for side in ("dsv3", "llama.cpp")}
            for r in range(a.rounds):
                for t, f in files.items():
                    order = ("dsv3", "llama.cpp") if r % 2 == 0 else ("llama.cpp", "dsv3")
                    for side in order:
                        print(f"{model} round {r + 1}/{a.rounds}: {side} {t}", file=sys.stderr, flush=True)
                        if side == "dsv3":
                            res = llamacpp.dsv3_bench(f, a.threads, a.decode_steps, a.prefill, cfg,
                                                      llamacpp.gguf_active_bytes(f, cfg))
                            runs[f"dsv3 {t}"].append({"prefill": res["prefill_tokens_per_s"],
                                                      "bs1": res["decode_bs1_tokens_per_s"],
                                                      "bs1d": res[f"decode_bs1_depth{llamacpp.DEPTH}_tokens_per_s"],
                                                      "c16": res["decode_bs16_tokens_per_s"],
                                                      "kernels": res["kernels"]})
                        else:
                            res = llamacpp.llamacpp_bench(f, a.threads, a.prefill, a.decode_steps)
                            # (llama-batched-bench prints no row for 16 sequences unless run with -np 16, which
                            # llamacpp_anchor.py bench does not pass on every llama.cpp version: then c16 is None)
                            runs[f"llama.cpp {t}"].append({"prefill": res[f"prefill{a.prefill}_tok_s"],
                                                           "bs1": res["decode_bs1_tok_s"],
                                                           "bs1d": res[f"decode_bs1_depth{llamacpp.DEPTH}_tok_s"],
                                                           "c16": res.get("decode_bs16_tok_s")})
            table = {}
            if not a.rounds:  # --rounds 0: the agreement check alone
                result["models"][model] = {"agreement": agree}
                continue
            print(f"\n{model}: {cfg.param_counts()['main'] / 1e6:.0f}M params, {a.threads} threads, {a.rounds} "
                  f"alternating rounds")
            print(f"{'file':<8} {'metric':<16} {'dsv3 tok/s':>11} {'llama.cpp':>10} {'ratio (range)':>20}  target")
            for t in types:
                for metric, label in (("bs1", "decode bs=1"), ("bs1d", f"bs=1 @{llamacpp.DEPTH}"),
                                      ("c16", "16 concurrent"), ("prefill", f"prefill {a.prefill}")):
                    ours = [x[metric] for x in runs[f"dsv3 {t}"]]
                    peer = [x[metric] for x in runs[f"llama.cpp {t}"]]
                    if None in peer:
                        print(f"{t:<8} {label:<16} {statistics.median(ours):>11.1f} {'n/a':>10}  (llama.cpp gave no "
                              f"result: see the comment in this script)")
                        table[f"{t} {metric}"] = {"dsv3": statistics.median(ours), "llama.cpp": None}
                        continue
                    ratios = sorted(o / p for o, p in zip(ours, peer))
                    goal = TARGETS.get(metric) if t in TARGET_TYPES else None
                    table[f"{t} {metric}"] = {"dsv3": statistics.median(ours), "llama.cpp": statistics.median(peer),
                                              "ratio_median": statistics.median(ratios), "ratio_min": ratios[0],
                                              "ratio_max": ratios[-1], "target": goal}
                    verdict = "" if goal is None else (f">= {goal}x " + ("met" if statistics.median(ratios) >= goal
                                                                          else "NOT met"))
                    print(f"{t:<8} {label:<16} {statistics.median(ours):>11.1f} {statistics.median(peer):>10.1f} "
                          f"{statistics.median(ratios):>7.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})  {verdict}")
                print(f"{t:<8} {'agreement':<16} {agree[t]}")
            result["models"][model] = {"agreement": agree, "runs": runs, "table": table}
    print(json.dumps(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
