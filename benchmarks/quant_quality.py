#!/usr/bin/env python3
"""Quality of dsv3's int8/int4 weights against the bf16 model, beside llama.cpp's Q8_0/Q4_0/Q4_K_M on the same model
and text, in the same run.

Text: the Python sources of installed third-party packages the embedded model was never trained on (it was trained
on the standard library; docs/training.md): jinja2, click, requests, tqdm, starlette by default. Measures, over
--windows windows of --ctx tokens spread evenly through the text: the mean KL divergence KL(p_bf16 || p_quant) of
the next-token distribution per position, and the share of positions whose top token agrees with the bf16 model's.
dsv3 runs in bf16 (the reference) and with quantize=int8 / int4 (weights quantised while loading), each packed for
the C++ CPU kernels as `dsv3 generate` runs them (activations quantised per group of 32 inside the products: to
int8 beside int4 weights, to int16 beside int8 ones); --no-kernels measures the PyTorch path instead (weight-only:
float activations).

With --llamacpp (needs ../shared/bench/llamacpp_anchor.py build first): the checkpoint is dequantised to bf16
(`dsv3 convert fp8-to-bf16`), converted to GGUF by llama.cpp's own converter, quantised by llama-quantize, and
llama-perplexity --kl-divergence measures the same figures on the same text (its windows are its own: --ctx
tokens, back to back, scored on their second half).

  python benchmarks/quant_quality.py [--model PATH] [--windows 64] [--ctx 256] [--llamacpp] [--json out.json]
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ANCHOR = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "bench", "llamacpp_anchor.py"))
PACKAGES = ("jinja2", "click", "requests", "tqdm", "starlette")


def held_out_text(packages: tuple[str, ...]) -> tuple[str, list[str]]:
    files = []
    for name in packages:
        mod = importlib.import_module(name)
        files += sorted(glob.glob(os.path.join(os.path.dirname(mod.__file__), "**", "*.py"), recursive=True))
    return "\n".join(open(f, encoding="utf-8", errors="replace").read() for f in files), files


def log_probs(model, windows: torch.Tensor) -> torch.Tensor:
    """[W, L] token ids -> [W * L, V] float32 next-token log-probabilities."""
    out = []
    with torch.inference_mode():
        for batch in windows.split(8):
            out.append(model(batch).float().log_softmax(-1).flatten(0, 1))
    return torch.cat(out)


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    kld = (ref.exp() * (ref - got)).sum(-1)
    return {"mean_kld": kld.mean().item(), "kld_p99": kld.quantile(0.99).item(),
            "same_top_pct": (ref.argmax(-1) == got.argmax(-1)).float().mean().item() * 100}


def llamacpp(model_path: str, text: str, ctx: int, threads: int) -> dict:
    import dsv3
    import dsv3.checkpoint
    import dsv3.convert

    with tempfile.TemporaryDirectory() as tmp:
        bf16 = os.path.join(tmp, "bf16")
        dsv3.convert.fp8_to_dtype(model_path, bf16) if dsv3.ModelConfig.from_pretrained(model_path).is_fp8 else \
            os.symlink(model_path, bf16)
        gguf = os.path.join(tmp, "gguf")
        run = [sys.executable, ANCHOR]
        subprocess.run(run + ["convert", bf16, gguf, "--types", "bf16,Q8_0,Q4_0,Q4_K_M"], check=True,
                       stdout=subprocess.DEVNULL)
        text_file = os.path.join(tmp, "text.txt")
        with open(text_file, "w", encoding="utf-8") as f:
            f.write(text)
        out = subprocess.run(run + ["kld", gguf, text_file, "--types", "Q8_0,Q4_0,Q4_K_M", "--threads", str(threads),
                                    "--ctx", str(ctx)], check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint (default: the embedded model)")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--packages", default=",".join(PACKAGES), help="held-out packages, comma separated")
    ap.add_argument("--llamacpp", action="store_true", help="llama.cpp's figures beside ours (builds GGUF files)")
    ap.add_argument("--no-kernels", action="store_true", help="the PyTorch reference products, not the C++ kernels")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import dsv3
    import dsv3.checkpoint
    import dsv3.convert
    from dsv3.assets import resolve_model
    from dsv3.tokenizer import Tokenizer

    path = resolve_model(a.model)
    text, files = held_out_text(tuple(a.packages.split(",")))
    ids = Tokenizer.from_pretrained(path).encode(text)
    step = len(ids) // a.windows
    if step < a.ctx:
        raise SystemExit(f"the text has {len(ids)} tokens, too few for {a.windows} windows of {a.ctx}")
    windows = torch.tensor([ids[i * step:i * step + a.ctx] for i in range(a.windows)])
    from dsv3.kernels.cpu_pack import prepack_for_cpu

    def load(quantize=None):
        model = dsv3.load_model(path, dtype="bfloat16", quantize=quantize)
        size = dsv3.checkpoint.model_bytes(model)
        packed = not a.no_kernels and prepack_for_cpu(model) and model.cpu_kernels
        return model, size, packed

    model, bf16_bytes, packed = load()
    ref = log_probs(model, windows)
    results = {"model": path, "files": len(files), "text_tokens": len(ids), "positions": windows.numel(),
               "packages": a.packages.split(","), "cpu_kernels": packed, "dsv3": {"bf16_weight_bytes": bf16_bytes}}
    for q in ("int8", "int4"):
        model, size, packed_q = load(q)
        results["dsv3"][q] = compare(ref, log_probs(model, windows))
        results["dsv3"][q].update(weight_bytes=size, cpu_kernels=packed_q)
        del model
    if a.llamacpp:
        results["llama.cpp"] = llamacpp(path, text, a.ctx, a.threads)
    print(f"held-out text: {len(files)} files of {', '.join(results['packages'])}, {len(ids)} tokens; "
          f"{windows.numel()} positions; products: {'C++ CPU kernels' if packed else 'PyTorch reference'}")
    print(f"{'weights':<18} {'mean KLD':>10} {'same top':>9}")
    for q in ("int8", "int4"):
        r = results["dsv3"][q]
        print(f"{'dsv3 ' + q:<18} {r['mean_kld']:>10.5f} {r['same_top_pct']:>8.2f}%")
    for t, r in results.get("llama.cpp", {}).items():
        kld = "n/a" if r["mean_kld"] is None else f"{r['mean_kld']:.5f}"
        top = "n/a" if r["same_top_pct"] is None else f"{r['same_top_pct']:.2f}%"
        print(f"{'llama.cpp ' + t:<18} {kld:>10} {top:>9}")
    print(json.dumps(results))
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
