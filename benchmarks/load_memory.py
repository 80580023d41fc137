"""Peak resident memory while loading an FP8 checkpoint: dsv3's streaming loader against the usual alternatives.

Builds a synthetic checkpoint in the official FP8 format (sharded index, float8_e4m3fn projections with 128x128
block scales, bf16 embeddings/head, an MTP layer) of >= 1 GiB in a temporary directory, then loads it in a fresh
subprocess per row and reads that process's peak RSS (VmHWM) and its RSS just before the load (VmRSS), both from
/proc/self/status. (getrusage's ru_maxrss is not used: on Linux a child started by fork/vfork + exec inherits the
parent's high-water mark, so it would report the benchmark driver's own peak whenever that is higher.) The rows:

  dsv3 dequantize    dsv3.load_model(fp8_mode="dequantize", dtype=bfloat16)  (the CPU default)
  dsv3 keep          dsv3.load_model(fp8_mode="keep"): FP8 + scales stay in memory
  dsv3 no MTP        dequantize with with_mtp=False: the MTP layer's bytes are never read
  dsv3 int8 / int4   dsv3.load_model(quantize="int8" / "int4"): quantised while loading, one matrix at a time
  dsv3 get_slice     dequantize, with the reader's positioned reads replaced by safetensors' own
                     safe_open(...).get_slice windows (memory-mapped), to decide whether the hand-written reader
                     must stay (dsv3/checkpoint/reader.py)
  load_file          safetensors.torch.load_file per shard, dequantised into a bf16 state dict (whole-file reads)
  transformers       AutoModelForCausalLM.from_pretrained with FineGrainedFP8Config(dequantize=True); needs the
                     `accelerate` package (not a dsv3 dependency), skipped when it is missing

The bound checked for the dsv3 rows is the issue's: peak - RSS before the load <= 1.3 x the loaded model's bytes +
its largest tensor; for the int8/int4 rows, <= 1.15 x the quantised model's bytes. Prints a markdown table and one JSON object.

    python benchmarks/load_memory.py                 # ~1.4 GB checkpoint, all rows
    python benchmarks/load_memory.py --rows dsv3     # only the dsv3 rows
    python benchmarks/load_memory.py --rows "dsv3 int8,dsv3 int4" --layers 12   # ~3.7 GB FP8 checkpoint
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Moonlight-like blocks; every dimension a multiple of 128 so that transformers' FP8 path can load it too.
CONFIG = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=32000, hidden_size=2048,
    intermediate_size=5632, moe_intermediate_size=512, num_hidden_layers=4, first_k_dense_replace=1,
    num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6,
    n_group=8, topk_group=4, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
    routed_scaling_factor=2.5, q_lora_rank=768, kv_lora_rank=448, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=4096,
    num_nextn_predict_layers=1, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16",
)
ROWS = ("dsv3 dequantize", "dsv3 keep", "dsv3 no MTP", "dsv3 int8", "dsv3 int4", "dsv3 get_slice", "load_file",
        "transformers")


def synthetic_tensors(cfg, seed: int = 0):
    """Random tensors for every checkpoint name in official dtypes. Values do not matter for memory, so FP8 weights
    are random finite bytes (fast) rather than quantised floats."""
    import torch

    from dsv3.kernels import fp8
    from dsv3.model import build_model
    from dsv3.checkpoint.fp8 import SCALE_SUFFIX, official_fp8
    from dsv3.checkpoint.write import checkpoint_tensors

    gen = torch.Generator().manual_seed(seed)
    for name, like in checkpoint_tensors(build_model(cfg, "meta", with_mtp=True)):
        if official_fp8(name):
            bits = torch.randint(0, 256, like.shape, dtype=torch.uint8, generator=gen)
            bits[(bits & 0x7F) == 0x7F] = 0  # 0x7f/0xff are NaN in e4m3
            yield name, bits.view(fp8.FP8_DTYPE)
            yield name + SCALE_SUFFIX, torch.rand(fp8.scale_shape(like.shape), generator=gen) * 1e-3
        elif name.endswith("e_score_correction_bias"):
            yield name, torch.zeros(like.shape)
        else:
            yield name, (torch.randn(like.shape, generator=gen) * 0.02).to(torch.bfloat16)


def build_checkpoint(path: str, shard_bytes: int, layers: int = CONFIG["num_hidden_layers"]) -> dict:
    from dsv3.config import ModelConfig
    from dsv3.checkpoint.fp8 import FP8_QUANTIZATION_CONFIG
    from dsv3.checkpoint.write import write_checkpoint

    cfg = ModelConfig.from_dict(dict(CONFIG, quantization_config=FP8_QUANTIZATION_CONFIG, num_hidden_layers=layers))
    return write_checkpoint(path, cfg, synthetic_tensors(cfg), shard_bytes, dtype_name="bfloat16")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


def _rss_now() -> int:
    return _status("VmRSS")


def _peak() -> int:
    return _status("VmHWM")


def use_get_slice() -> None:
    """Swap the checkpoint reader's byte reads for safetensors' memory-mapped get_slice windows."""
    from safetensors import safe_open

    from dsv3.checkpoint.reader import TensorReader

    class Opened:  # the reader closes what it opened; safe_open handles close through their context manager
        def __init__(self, fpath):
            self.handle = safe_open(fpath, framework="pt")
            self.f = self.handle.__enter__()

        def close(self):
            self.handle.__exit__(None, None, None)

    def read_rows(self, info, r0, cols, out):
        if out.numel() == 0:
            return
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = Opened(os.path.join(self.layout.path, info.file))
        sl = f.f.get_slice(info.name)
        window = sl[r0:r0 + out.shape[0], cols[0]:cols[1]] if len(info.shape) == 2 else sl[cols[0]:cols[1]]
        out.copy_(window.reshape(out.shape))
        self.on_bytes(window.numel() * window.element_size())

    TensorReader._read_rows = read_rows


def child(path: str, row: str) -> dict:
    """Runs in a fresh process: load `path` the way `row` says and report memory."""
    import torch

    torch.set_num_threads(1)
    import dsv3
    from dsv3.checkpoint import model_bytes

    before = _rss_now()
    t0 = time.perf_counter()
    if row == "dsv3 get_slice":
        use_get_slice()
    if row.startswith("dsv3"):
        model = dsv3.load_model(path, dtype=torch.bfloat16, fp8_mode="keep" if row == "dsv3 keep" else "dequantize",
                                with_mtp=False if row == "dsv3 no MTP" else None, progress=False,
                                quantize=row.split()[1] if row in ("dsv3 int8", "dsv3 int4") else None)
        tensors = list(model.parameters()) + list(model.buffers())
    elif row == "load_file":
        from safetensors import safe_open
        from safetensors.torch import load_file

        from dsv3.kernels import fp8
        state = {}
        index = json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"]
        for fname in sorted(set(index.values())):
            shard = load_file(os.path.join(path, fname))
            for name, t in shard.items():
                if name.endswith("_scale_inv"):
                    continue
                if t.dtype == fp8.FP8_DTYPE:
                    sname = name + "_scale_inv"
                    if sname in shard:
                        scale = shard[sname]
                    else:
                        with safe_open(os.path.join(path, index[sname]), framework="pt") as f:
                            scale = f.get_tensor(sname)
                    t = fp8.dequantize(t, scale, torch.bfloat16)
                state[name] = t
            del shard
        tensors = list(state.values())
        model = state
    else:
        import transformers
        from transformers import AutoModelForCausalLM, FineGrainedFP8Config

        transformers.logging.set_verbosity_error()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                     quantization_config=FineGrainedFP8Config(dequantize=True))
        tensors = list(model.parameters()) + list(model.buffers())
    seconds = time.perf_counter() - t0
    loaded = sum(t.numel() * t.element_size() for t in tensors)
    if row.startswith("dsv3"):
        assert loaded == model_bytes(model)
    largest = max(t.numel() * t.element_size() for t in tensors)
    peak = _peak()
    return {"row": row, "seconds": seconds, "rss_before": before, "peak_rss": peak, "rss_after": _rss_now(),
            "load_peak": peak - before,
            "model_bytes": loaded, "largest_tensor": largest, "ratio": (peak - before) / loaded,
            "bound_ok": peak - before <= (1.15 * loaded if row in ("dsv3 int8", "dsv3 int4") else
                                          1.3 * loaded + largest)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="all", help="comma list of: " + ", ".join(ROWS) + "; 'dsv3' for the dsv3 rows")
    ap.add_argument("--workdir", default=None, help="where the temporary checkpoint goes (default: the system tmp)")
    ap.add_argument("--shard-mb", type=int, default=400, help="shard size in MB (default 400)")
    ap.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"],
                    help="decoder layers of the synthetic model (default 4: ~1.4 GB; more for a larger checkpoint, "
                         "where the loader's fixed ~0.2 GB of process overhead weighs less)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and print its path")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", nargs=2, metavar=("PATH", "ROW"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(*a.child)))
        return 0
    rows = ROWS if a.rows == "all" else [r for r in ROWS if r.startswith("dsv3")] if a.rows == "dsv3" \
        else [r.strip() for r in a.rows.split(",")]
    work = tempfile.mkdtemp(prefix="dsv3-load-memory-", dir=a.workdir)
    try:
        t0 = time.perf_counter()
        info = build_checkpoint(os.path.join(work, "ckpt"), a.shard_mb * 10**6, a.layers)
        print(f"synthetic FP8 checkpoint: {info['bytes'] / 2**30:.2f} GiB in {info['files']} shards, "
              f"{info['tensors']} tensors (written in {time.perf_counter() - t0:.0f} s)", flush=True)
        results = []
        for row in rows:
            if row == "transformers":
                try:
                    import accelerate  # noqa: F401  (transformers' FP8 loader requires it)
                except ImportError:
                    print("transformers: skipped (needs the accelerate package)", flush=True)
                    continue
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", info["path"], row],
                                  capture_output=True, text=True)
            if proc.returncode:
                last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{row}: failed: {last}", flush=True)
                results.append({"row": row, "error": last})
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{row}: done", flush=True)
        gib = 2**30
        print("\n| loader | model bytes | RSS before load | peak RSS | load peak (peak - before) | load peak / model "
              "| bound 1.3x + largest tensor | time |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in results:
            if "error" in r:
                print(f"| {r['row']} | failed: {r['error']} | | | | | | |")
                continue
            print(f"| {r['row']} | {r['model_bytes'] / gib:.2f} GiB | {r['rss_before'] / gib:.2f} GiB | "
                  f"{r['peak_rss'] / gib:.2f} GiB | {r['load_peak'] / gib:.2f} GiB | {r['ratio']:.3f} | "
                  f"{'holds' if r['bound_ok'] else 'exceeded'} | {r['seconds']:.1f} s |")
        out = {"checkpoint": {k: info[k] for k in ("files", "tensors", "bytes")},
               "config": dict(CONFIG, num_hidden_layers=a.layers), "rows": results}
        print(json.dumps(out))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=2)
        return 0 if all(r.get("bound_ok", True) for r in results if r["row"].startswith("dsv3")) else 1
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
