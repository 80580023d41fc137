#!/usr/bin/env python3
"""dsv3 bf16 / int8 / int4 vs llama.cpp bf16 / Q8_0 / Q4_0 on the CPU: same checkpoint, same machine, same run.

The checkpoint is hf_anchor.py's seeded model of --shape (bench-small by default) with the embedded model's
vocabulary and tokenizer (llama.cpp's converter needs a real tokenizer), saved in bf16; llama.cpp converts it with its
own converter and llama-quantize (../shared/bench/llamacpp_anchor.py, built once: `python llamacpp_anchor.py build`).
dsv3 runs the same bf16 checkpoint and its int8 / int4 copies (`dsv3 quantize`, made once before the rounds)
through the engine on its C++ CPU kernels. Each round times every configuration once, alternating dsv3 and
llama.cpp so that drift of this shared VM falls on both; the table gives the median ratio over the rounds and its
range. Metrics: prefill of a --prefill-token prompt; decode at batch 1 in the peer's conditions (llama-bench tg
decodes from an empty context: dsv3 after a 1-token prompt) and at depth 128 (llama-bench -d 128: after a 128-token
context; dsv3 after a 128-token prompt); 16 concurrent sequences (llama-batched-bench S_TG over all sequences,
after 8-token prompts, -npp 8; dsv3's continuous-batching engine after 8-token prompts).
The batch-1 memory-bandwidth floor is each side's weight bytes read per token over the read bandwidth measured around
its decode (benchmarks/cpu.py's method): for dsv3 its formats' bits per weight, scales included (the int4 model's
head is int8); for llama.cpp the stored bytes of the GGUF file's tensors (its Q4_0 file keeps the head at Q6_K),
routed experts weighted by top-k / experts, the token embedding not counted (a row lookup). Resident weight bytes
are those of each loaded dsv3 model.

  python benchmarks/llamacpp.py [--shape bench-small] [--rounds 3] [--threads 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# Run as a script, this folder is first on the import path and its gguf.py (a benchmark) would shadow the gguf
# package that gguf_active_bytes reads files with: import the package with the folder off the path first.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != HERE]
import gguf  # noqa: E402,F401
sys.path.insert(0, HERE)
from cpu import read_bandwidth, time_dsv3  # noqa: E402  (benchmarks/cpu.py: the same dsv3 timing as vs transformers)

ANCHOR = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "bench", "llamacpp_anchor.py"))
HF_ANCHOR = os.path.join(os.path.dirname(ANCHOR), "hf_anchor.py")
PAIRS = (("bf16", None, "bf16"), ("int8", "int8", "Q8_0"), ("int4", "int4", "Q4_0"))  # (name, quantize, GGUF type)


def save_checkpoint(shape: str, path: str):
    """hf_anchor.py's seeded model of `shape` with the embedded model's vocabulary, in bf16, with its tokenizer."""
    sys.path.insert(0, os.path.dirname(HF_ANCHOR))
    from hf_anchor import SHAPES
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from dsv3 import ModelConfig
    from dsv3.assets import default_model_path

    src = default_model_path()
    vocab = ModelConfig.from_pretrained(src).vocab_size
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**SHAPES[shape], "vocab_size": vocab}))
    model.to(torch.bfloat16).save_pretrained(path)
    for f in os.listdir(src):
        if f.startswith("tokenizer") or f == "special_tokens_map.json":
            shutil.copy(os.path.join(src, f), path)
    return ModelConfig.from_pretrained(path)


def active_bytes(cfg, name: str) -> float:
    """Weight bytes a batch-1 decode step reads: projections at the format's bits per weight (scales included),
    the head at bf16 / int8."""
    from dsv3.kernels import quant

    counts = cfg.param_counts()
    head = cfg.vocab_size * cfg.hidden_size
    body = counts["active_read_per_token"] - head
    if name == "bf16":
        return (body + head) * 2
    head_bpw = quant.scheme("int8").bits_per_weight
    return body * quant.scheme(name).bits_per_weight / 8 + head * head_bpw / 8


def resident_bytes(path: str) -> int:
    """Weight bytes of the model at `path` as dsv3 runs it: loaded in bf16 and packed for the CPU kernels (the
    blobs of the quantised kinds, csrc/qpacked.h, with their scales; rows padded to 16)."""
    from dsv3 import load_model
    from dsv3.kernels.cpu_pack import prepack_for_cpu, resident_weight_bytes

    model = load_model(path, dtype="bfloat16", progress=False)
    prepack_for_cpu(model)
    return resident_weight_bytes(model)


def gguf_active_bytes(gguf_path: str, cfg) -> float:
    """Bytes of a GGUF file's tensors that a batch-1 decode step reads (see the module docstring)."""
    from gguf import GGUFReader

    total = 0.0
    for t in GGUFReader(gguf_path).tensors:
        if t.name == "token_embd.weight":
            continue
        share = cfg.num_experts_per_tok / cfg.n_routed_experts if "_exps." in t.name else 1.0
        total += int(t.n_bytes) * share
    return total


def llamacpp_version() -> str:
    """The llama-cpp-python release whose vendored llama.cpp was built, and llama.cpp's own build number/commit."""
    import glob
    import re

    home = os.path.expanduser(os.environ.get("LLAMACPP_HOME", "~/.cache/llamacpp-anchor"))
    trees = sorted(glob.glob(os.path.join(home, "llama_cpp_python-*", "vendor", "llama.cpp")))
    if not trees:
        return "unknown"
    release = os.path.basename(os.path.dirname(os.path.dirname(trees[-1])))
    info = ""
    for f in glob.glob(os.path.join(trees[-1], "build", "common", "build-info.cpp")):
        text = open(f).read()
        num = re.search(r"LLAMA_BUILD_NUMBER\s*=\s*(\d+)", text)
        commit = re.search(r'LLAMA_COMMIT\s*=\s*"([^"]*)"', text)
        info = f" (llama.cpp build {num.group(1) if num else '?'}, commit {commit.group(1) if commit else '?'})"
    return release + info


# The contexts the peer's decode runs at (llamacpp_anchor.py bench): llama-bench tg starts from an empty context,
# llama-batched-bench's sequences after -npp 8 prompt tokens. dsv3 decodes after prompts of these lengths (one token
# at least), plus DEPTH at batch 1 on both sides.
PEER_BS1_PROMPT, PEER_BATCHED_PROMPT, DEPTH = 1, 8, 128


def llamacpp_bench(gguf: str, threads: int, prefill: int, steps: int) -> dict:
    """llamacpp_anchor.py bench, plus batch-1 decode after DEPTH context tokens (llama-bench -d) as
    decode_bs1_depth{DEPTH}_tok_s."""
    out = subprocess.run([sys.executable, ANCHOR, "bench", gguf, "--threads", str(threads), "--prompt", str(prefill),
                          "--tokens", str(steps), "--reps", "3", "--batches", "16"], check=True, capture_output=True,
                         text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    rows = json.loads(subprocess.run([_anchor().bin_path("llama-bench"), "-m", gguf, "-t", str(threads), "-p", "0",
                                      "-n", str(steps), "-d", str(DEPTH), "-r", "3", "-o", "json"], check=True,
                                     capture_output=True, text=True).stdout)
    res[f"decode_bs1_depth{DEPTH}_tok_s"] = rows[0]["avg_ts"]
    return res


@functools.lru_cache(maxsize=None)
def _anchor():
    """../shared/bench/llamacpp_anchor.py as a module (for its bin_path), loaded once."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("llamacpp_anchor", ANCHOR)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dsv3_bench(path: str, threads: int, steps: int, prefill: int, cfg, active: float) -> dict:
    """cpu.time_dsv3 in the peer's conditions (PEER_BS1_PROMPT, PEER_BATCHED_PROMPT) and at DEPTH."""
    return time_dsv3(path, "bfloat16", threads, steps, prefill, cfg.vocab_size, active, floor_chunks=2,
                     bs1_prompt=PEER_BS1_PROMPT, batched_prompt=PEER_BATCHED_PROMPT, extra_depths=(DEPTH,))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="bench-small")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    runs: dict[str, list[dict]] = {f"{side} {n}": [] for n, _, _ in PAIRS for side in ("dsv3", "llama.cpp")}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, gguf = os.path.join(tmp, "ckpt"), os.path.join(tmp, "gguf")
        cfg = save_checkpoint(a.shape, ckpt)
        subprocess.run([sys.executable, ANCHOR, "convert", ckpt, gguf, "--types", ",".join(t for _, _, t in PAIRS)],
                       check=True, stdout=subprocess.DEVNULL)
        from dsv3.convert import quantize_checkpoint

        paths = {"bf16": ckpt}
        for name, q, _ in PAIRS:
            if q is not None:
                paths[name] = os.path.join(tmp, f"ckpt-{q}")
                print(f"quantising to {q} (once)", file=sys.stderr, flush=True)
                quantize_checkpoint(ckpt, paths[name], q, progress=False)
        resident = {name: resident_bytes(paths[name]) for name, _, _ in PAIRS}
        peer_bytes = {name: gguf_active_bytes(os.path.join(gguf, f"model-{t}.gguf"), cfg) for name, _, t in PAIRS}
        for r in range(a.rounds):
            for name, q, t in PAIRS:
                order = (("dsv3", name), ("llama.cpp", name)) if r % 2 == 0 else (("llama.cpp", name), ("dsv3", name))
                for side, n in order:
                    print(f"round {r + 1}/{a.rounds}: {side} {n}", file=sys.stderr, flush=True)
                    if side == "dsv3":
                        res = dsv3_bench(paths[n], a.threads, a.decode_steps, a.prefill, cfg, active_bytes(cfg, n))
                        runs[f"dsv3 {n}"].append({"prefill": res["prefill_tokens_per_s"],
                                                  "bs1": res["decode_bs1_tokens_per_s"],
                                                  "bs1d": res[f"decode_bs1_depth{DEPTH}_tokens_per_s"],
                                                  "c16": res["decode_bs16_tokens_per_s"],
                                                  "floor": [c["fraction"] for c in res["floor_chunks"]],
                                                  "kernels": res["kernels"]})
                    else:
                        before = read_bandwidth(a.threads)
                        res = llamacpp_bench(os.path.join(gguf, f"model-{t}.gguf"), a.threads, a.prefill,
                                             a.decode_steps)
                        bw = max(before, read_bandwidth(a.threads))
                        runs[f"llama.cpp {n}"].append({"prefill": res[f"prefill{a.prefill}_tok_s"],
                                                       "bs1": res["decode_bs1_tok_s"], "c16": res["decode_bs16_tok_s"],
                                                       "bs1d": res[f"decode_bs1_depth{DEPTH}_tok_s"],
                                                       "floor": [res["decode_bs1_tok_s"] * peer_bytes[n] / bw]})
    version = llamacpp_version()
    print(f"shape {a.shape} (vocab {cfg.vocab_size}), {a.threads} threads, {cfg.param_counts()['main'] / 1e6:.0f}M "
          f"params, {a.rounds} alternating rounds; dsv3 {runs['dsv3 bf16'][0]['kernels']}; {version}")
    print(f"{'weights':<8} {'metric':<16} {'dsv3 tok/s':>11} {'llama.cpp':>10} {'ratio (range)':>20}")
    table = {}
    for name, _, t in PAIRS:
        for metric, label in (("bs1", "decode bs=1"), ("bs1d", f"bs=1 @{DEPTH}"), ("c16", "16 concurrent"),
                              ("prefill", f"prefill {a.prefill}")):
            ours = [x[metric] for x in runs[f"dsv3 {name}"]]
            peer = [x[metric] for x in runs[f"llama.cpp {name}"]]
            ratios = sorted(o / p for o, p in zip(ours, peer))
            table[f"{name} {metric}"] = {"dsv3": statistics.median(ours), "llama.cpp": statistics.median(peer),
                                         "ratio_median": statistics.median(ratios), "ratio_min": ratios[0],
                                         "ratio_max": ratios[-1], "vs": t}
            print(f"{name:<8} {label:<16} {statistics.median(ours):>11.1f} {statistics.median(peer):>10.1f} "
                  f"{statistics.median(ratios):>7.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})  vs {t}")
        floor = sorted(f for x in runs[f"dsv3 {name}"] for f in x["floor"])
        peer_floor = sorted(f for x in runs[f"llama.cpp {name}"] for f in x["floor"])
        table[f"{name} floor"] = statistics.median(floor)
        table[f"{name} floor llama.cpp"] = statistics.median(peer_floor)
        print(f"{name:<8} {'bs=1 floor':<16} dsv3 at {statistics.median(floor):.2f} of the memory-bandwidth floor "
              f"({active_bytes(cfg, name) / 1e6:.1f} MB per token; range {floor[0]:.2f}-{floor[-1]:.2f}), llama.cpp "
              f"{t} at {statistics.median(peer_floor):.2f} ({peer_bytes[name] / 1e6:.1f} MB per token; range "
              f"{peer_floor[0]:.2f}-{peer_floor[-1]:.2f})")
    for name, _, _ in PAIRS:
        print(f"{name:<8} {'resident weights':<16} {resident[name] / 1e6:.1f} MB = "
              f"{resident[name] / resident['bf16']:.3f}x bf16")
    result = {"shape": a.shape, "threads": a.threads, "rounds": a.rounds, "runs": runs, "table": table,
              "resident_weight_bytes": resident, "llamacpp_active_bytes": peer_bytes, "llamacpp": version,
              "read_bandwidth_gb_s": read_bandwidth(a.threads) / 1e9}
    print(json.dumps(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
