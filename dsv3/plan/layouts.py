"""The planner's layouts and the report they make: what a request asks (PlanRequest), the candidate layouts (all on
GPUs with tensor/expert parallelism, GPUs with the routed experts offloaded to CPU memory, CPU only), each one's
memory per device and roofline speed bounds, the choice among those that fit, the precision default, the `dsv3
serve` command of each layout (what the CLI runs today, and apart from it the flags of later work) and the cost
figures. plan() returns the report dict (what `dsv3 plan --json` prints).
"""
from __future__ import annotations

import math
import shlex
from dataclasses import dataclass

from ..config import ModelConfig
from ..hardware import GIB, Hardware
from .inventory import (CACHE_DTYPES, COMPONENTS, HEAD_PRECISION, PRECISIONS, QUANT_GROUP, QUANT_PRECISIONS,
                        ModelTotals, Tensor, expected_experts_touched, gib, linear_bytes, model_tensors,
                        predicted_cache_bytes, predicted_checkpoint_bytes, tensor_bytes)

ACT_BYTES = 2  # activations in bf16
PREFILL_CHUNK = 8192  # tokens per prefill step (chunked prefill), the activation estimate's batch
GPU_RESERVE = int(1.5 * GIB)  # CUDA context, cuBLAS/NCCL workspaces, allocator slack per GPU
CPU_RESERVE_MIN, CPU_RESERVE_FRAC = 8 * GIB, 0.05  # OS, page cache, the Python process itself
EP_IMBALANCE = 2.0  # headroom over the mean tokens an expert-parallel rank receives in one step
LAYOUT_ORDER = ("gpu", "hybrid", "cpu")  # preference when several fit: fastest first


@dataclass(frozen=True)
class PlanRequest:
    precision: str | None = None  # None: the checkpoint's own (fp8 when config.json says so, else bf16)
    cache_dtype: str = "bf16"
    context: int = 8192
    concurrency: int = 1
    with_mtp: bool | None = None  # None: load MTP when the model has it, as load_model does
    gpu_hour_price: float | None = None
    api_price_per_mtok: float | None = None
    model_arg: str = "MODEL"

    def validate(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"--cache-dtype {self.cache_dtype!r}: choose one of {', '.join(CACHE_DTYPES)}")
        for name in ("context", "concurrency"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name} {v!r}: must be a whole number >= 1")
        for name in ("gpu_hour_price", "api_price_per_mtok"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"--{name.replace('_', '-')} {v}: a price cannot be negative")


def _workspace(cfg: ModelConfig, chunk: int, context: int, concurrency: int, parts: set[str], tp: int = 1,
               ep: int = 1) -> int:
    """Transient activations of one step on one device: the residual stream (3 x D per token) plus the largest
    per-token intermediate of a layer, for `chunk` tokens; the per-head K/V that the naive prefill expands from the
    latent for the whole context of one layer; float32 logits of the decode batch."""
    D, H = cfg.hidden_size, -(-cfg.num_attention_heads // tp)
    inter = 0
    if "attention" in parts:
        inter = max(inter, H * (cfg.qk_head_dim + cfg.v_head_dim))
    if "dense" in parts:
        inter = max(inter, 3 * cfg.intermediate_size // tp)
    moe = 0
    if "routed" in parts and cfg.has_moe:
        moe += min(1.0, EP_IMBALANCE / ep) * cfg.num_experts_per_tok * (3 * cfg.moe_intermediate_size + D)
    if "shared" in parts:
        moe += 3 * cfg.shared_intermediate_size / tp
    inter = max(inter, moe)
    ws = ACT_BYTES * chunk * (3 * D + inter)
    if "attention" in parts:
        ws += ACT_BYTES * context * H * (cfg.qk_head_dim + cfg.v_head_dim)
    if "head" in parts:
        ws += 4 * concurrency * cfg.vocab_size / tp
    return int(ws)


def _need(parts: dict[str, float], capacity: float, per: str) -> dict:
    need = sum(parts.values())
    fits = need <= capacity
    detail = " + ".join(f"{k.replace('_', ' ')} {v / GIB:.1f}" for k, v in parts.items() if v)
    return {"per": per, "parts": {k: int(v) for k, v in parts.items()}, "need_bytes": int(need),
            "capacity_bytes": int(capacity), "fits": fits,
            "text": f"{'uses' if fits else 'needs'} {gib(need)} {per} ({detail}), has {gib(capacity)}"}


def _roofline(bytes_: float, flops: float, bandwidth: float | None, compute: float | None) -> float | None:
    if not bandwidth or not compute:
        return None
    return max(bytes_ / bandwidth, flops / compute)


def _layout_gpu(m: ModelTotals, req: PlanRequest, hw: Hardware, n: int, cache: int, chunk: int) -> dict:
    cfg, gpu = m.cfg, hw.gpu
    H, E = cfg.num_attention_heads, cfg.n_routed_experts or 1

    def frac(t: Tensor) -> float:
        return {"heads": -(-H // n) / H, "tp": 1 / n, "vocab": 1 / n, "experts": -(-E // n) / E}.get(t.shard, 1.0)

    weights = m.bytes(m.tensors, frac=frac)
    ws = _workspace(cfg, chunk, req.context, req.concurrency, {"attention", "dense", "routed", "shared", "head"},
                    tp=n, ep=n)
    # MLA's latent is one vector per token shared by all heads: every tensor-parallel rank needs all of it.
    mem = _need({"weights": weights, "kv_cache": cache, "workspace": ws, "reserve": GPU_RESERVE},
                gpu.memory_bytes, "per GPU")

    def decode(B: int) -> float | None:
        touched = m.n_moe * expected_experts_touched(E, cfg.num_experts_per_tok, B) / n * m.expert_bytes
        dense = m.bytes(m.main, keep=lambda t: t.shard != "experts" and t.role != "embed", frac=frac)
        read = dense + touched + B * cfg.hidden_size * 2 / n + B * req.context * m.kv_tok
        flops = B * (m.other_flops_tok + m.expert_flops_tok + m.attn_flops_tok(req.context, True)) / n
        return _roofline(read, flops, gpu.bandwidth, gpu.flops(m.precision))

    def prefill(T: int) -> float | None:
        flops = T * (m.other_flops_tok + m.expert_flops_tok + m.attn_flops_tok(req.context / 2, False)) / n
        return _roofline(m.bytes(m.main, frac=frac), flops, gpu.bandwidth, gpu.flops(m.precision))

    # dsv3's --tp n splits each routed expert's width n ways: 1/n of the expert bytes per rank, as EP n would hold.
    label = f"{n}x {gpu.name}, TP{n}" + (f", routed experts split {n} ways" if n > 1 and cfg.has_moe else "")
    return {"name": "gpu", "label": label, "tp": n, "ep": n if cfg.has_moe else 1, "gpus": n,
            "devices": {"gpu": mem}, "fits": mem["fits"], "cache_per_seq": {"gpu": req.context * m.kv_all},
            "_decode": decode, "_prefill": prefill}


def _layout_hybrid(m: ModelTotals, req: PlanRequest, hw: Hardware, cache: int, chunk: int) -> dict:
    cfg, gpu, cpu, n = m.cfg, hw.gpu, hw.cpu, hw.gpu_count
    E = cfg.n_routed_experts or 1
    # Routed experts and the embedding (only gathered, a row per token) in CPU memory; the rest split by layers
    # over the GPUs, so each GPU holds 1/n of the layers and of the cache and they run one after another.
    on_cpu = (lambda t: t.shard == "experts" or t.role == "embed")
    gpu_w = m.bytes(m.tensors, keep=lambda t: not on_cpu(t))
    cpu_w = m.bytes(m.tensors, keep=on_cpu)
    gws = _workspace(cfg, chunk, req.context, req.concurrency, {"attention", "dense", "shared", "head"})
    cws = _workspace(cfg, chunk, req.context, req.concurrency, {"routed"})
    g = _need({"weights": gpu_w / n, "kv_cache": cache / n, "workspace": gws, "reserve": GPU_RESERVE},
              gpu.memory_bytes, "per GPU")
    c = _need({"weights": cpu_w, "workspace": cws, "reserve": _cpu_reserve(cpu.memory_bytes)},
              cpu.memory_bytes, "of CPU memory")
    dense_main = m.bytes(m.main, keep=lambda t: not on_cpu(t))
    gflops = gpu.flops(m.precision)

    def decode(B: int) -> float | None:
        # Each layer's experts need that layer's attention output and the next layer needs theirs: the GPU and the
        # CPU parts run one after the other, so their times add.
        t_gpu = _roofline(dense_main + B * req.context * m.kv_tok,
                          B * (m.other_flops_tok + m.attn_flops_tok(req.context, True)), gpu.bandwidth, gflops)
        touched = m.n_moe * expected_experts_touched(E, cfg.num_experts_per_tok, B) * m.expert_bytes
        t_cpu = _roofline(touched + B * cfg.hidden_size * 2, B * m.expert_flops_tok, cpu.bandwidth, cpu.flops)
        return None if t_gpu is None else t_gpu + t_cpu

    def prefill(T: int) -> float | None:
        t_gpu = _roofline(dense_main, T * (m.other_flops_tok + m.attn_flops_tok(req.context / 2, False)),
                          gpu.bandwidth, gflops)
        t_cpu = _roofline(m.bytes(m.main, keep=on_cpu), T * m.expert_flops_tok, cpu.bandwidth, cpu.flops)
        return None if t_gpu is None else t_gpu + t_cpu

    split = " (layers split across GPUs)" if n > 1 else ""
    return {"name": "hybrid", "label": f"{n}x {gpu.name}{split} + routed experts in CPU memory",
            "tp": 1, "ep": 1, "gpus": n, "devices": {"gpu": g, "cpu": c}, "fits": g["fits"] and c["fits"],
            "cache_per_seq": {"gpu": req.context * m.kv_all / n}, "_decode": decode, "_prefill": prefill}


def _layout_cpu(m: ModelTotals, req: PlanRequest, hw: Hardware, cache: int, chunk: int) -> dict:
    cfg, cpu = m.cfg, hw.cpu
    E = cfg.n_routed_experts or 1
    w = m.bytes(m.tensors)
    ws = _workspace(cfg, chunk, req.context, req.concurrency, {"attention", "dense", "routed", "shared", "head"})
    c = _need({"weights": w, "kv_cache": cache, "workspace": ws, "reserve": _cpu_reserve(cpu.memory_bytes)},
              cpu.memory_bytes, "of CPU memory")
    dense_main = m.bytes(m.main, keep=lambda t: t.shard != "experts" and t.role != "embed")

    def decode(B: int) -> float | None:
        touched = m.n_moe * expected_experts_touched(E, cfg.num_experts_per_tok, B) * m.expert_bytes
        read = dense_main + touched + B * cfg.hidden_size * 2 + B * req.context * m.kv_tok
        flops = B * (m.other_flops_tok + m.expert_flops_tok + m.attn_flops_tok(req.context, True))
        return _roofline(read, flops, cpu.bandwidth, cpu.flops)

    def prefill(T: int) -> float | None:
        flops = T * (m.other_flops_tok + m.expert_flops_tok + m.attn_flops_tok(req.context / 2, False))
        return _roofline(m.bytes(m.main), flops, cpu.bandwidth, cpu.flops)

    return {"name": "cpu", "label": "CPU only", "tp": 1, "ep": 1, "gpus": 0, "devices": {"cpu": c},
            "fits": c["fits"], "cache_per_seq": {"cpu": req.context * m.kv_all}, "_decode": decode,
            "_prefill": prefill}


def _cpu_reserve(memory: int) -> int:
    return int(max(CPU_RESERVE_MIN, CPU_RESERVE_FRAC * memory))


def _finish(layout: dict, req: PlanRequest, chunk: int) -> dict:
    decode, prefill = layout.pop("_decode"), layout.pop("_prefill")
    # How many sequences of --context tokens the memory left after weights, workspace and reserve can cache.
    free = min(d["capacity_bytes"] - d["need_bytes"] + d["parts"].get("kv_cache", 0)
               for k, d in layout["devices"].items() if k in layout["cache_per_seq"])
    per_seq = max(layout["cache_per_seq"].values())
    layout["max_concurrency"] = max(0, int(free // per_seq)) if per_seq else None
    layout.pop("cache_per_seq")
    failing = [d["text"] for d in layout["devices"].values() if not d["fits"]]
    layout["reason"] = "; ".join(failing or [d["text"] for d in layout["devices"].values()])
    t1, tb, tp = (decode(1), decode(req.concurrency), prefill(chunk)) if layout["fits"] else (None, None, None)
    layout["decode"] = {
        "tokens_per_s_per_seq_upper": None if tb is None else 1 / tb,
        "tokens_per_s_aggregate_upper": None if tb is None else req.concurrency / tb,
        "tokens_per_s_single_stream_upper": None if t1 is None else 1 / t1,
    }
    layout["prefill"] = {"tokens_per_s_upper": None if tp is None else chunk / tp, "chunk_tokens": chunk}
    return layout


def _command(layout: dict, req: PlanRequest, precision: str, stored: str | None, with_mtp: bool, has_mtp: bool,
             is_preset: bool) -> dict:
    """The layout's `dsv3 serve` line in the CLI's own flags (each one is in dsv3/commands; tests/test_plan_commands.py
    parses every line with the real parser), and apart from it the flags the layout needs that belong to later work
    (`not_yet_available`: the CLI rejects them today). --model wants a checkpoint directory."""
    n, name = layout["gpus"], layout["name"]
    model = f"PATH/TO/{req.model_arg}" if is_preset else req.model_arg
    cache = math.ceil(_cache_per_device(layout) / GIB * 10) / 10
    cmd = (["torchrun", "--nproc-per-node", str(n), "-m", "dsv3", "serve"] if name == "gpu" and n > 1
           else ["dsv3", "serve"])
    cmd += ["--model", model, "--device", "cpu" if name == "cpu" else "cuda", "--dtype", "bfloat16"]
    if precision == "fp8":
        cmd += ["--fp8-mode", "keep"]
    elif precision in QUANT_PRECISIONS and precision != stored:  # a checkpoint dsv3 quantize wrote needs no flag
        cmd += ["--quantize", precision]
    cmd += ["--max-model-len", str(req.context), "--max-num-seqs", str(req.concurrency),
            "--cache-memory", f"{cache:g}GiB"]
    if name == "gpu" and n > 1:
        cmd += ["--tp", str(n)]
    later = []
    if name == "hybrid":
        later.append("--experts-device cpu")  # routed experts in CPU memory beside the GPUs
        if n > 1:
            later.append(f"--pipeline-parallel {n}")  # layers split over the GPUs
    if req.cache_dtype != "bf16":
        later.append(f"--kv-cache-dtype {req.cache_dtype}")
    if has_mtp and not with_mtp:
        later.append("--no-mtp")  # dsv3 serve loads the MTP layers whenever the checkpoint has them
    return {"command": shlex.join(cmd), "not_yet_available": later}


def plan(cfg: ModelConfig, hw: Hardware, req: PlanRequest, model_name: str = "", is_preset: bool = False) -> dict:
    req.validate()
    stored = f"int{cfg.int_quantization['bits']}" if cfg.int_quantization else None  # written by dsv3 quantize
    precision = req.precision or stored or ("fp8" if cfg.is_fp8 else "bf16")
    with_mtp = cfg.num_nextn_predict_layers > 0 if req.with_mtp is None else req.with_mtp
    if with_mtp and not cfg.num_nextn_predict_layers:
        raise ValueError("--mtp: this model has no MTP layers (num_nextn_predict_layers = 0)")
    m = ModelTotals(cfg, precision, req.cache_dtype, with_mtp)
    counts = cfg.param_counts()
    comps = {c: {"params": 0, "bytes": 0} for c in COMPONENTS}
    for t in m.tensors:
        comps[t.component]["params"] += t.numel
        comps[t.component]["bytes"] += tensor_bytes(t, precision)
    if not with_mtp and cfg.num_nextn_predict_layers:  # shown for information, not loaded
        for t in model_tensors(cfg, True)[len(m.main):]:
            comps["mtp"]["params"] += t.numel
    tokens = req.context * req.concurrency
    cache = predicted_cache_bytes(cfg, tokens, req.cache_dtype, with_mtp)
    chunk = max(req.concurrency, min(PREFILL_CHUNK, tokens))
    notes = []
    if req.context > cfg.max_position_embeddings:
        notes.append(f"context {req.context} exceeds the model's max_position_embeddings "
                     f"({cfg.max_position_embeddings})")
    layouts = []
    if hw.gpu is not None:
        layouts.append(_layout_gpu(m, req, hw, hw.gpu_count, cache, chunk))
        if cfg.has_moe:
            layouts.append(_layout_hybrid(m, req, hw, cache, chunk))
        if precision == "fp8" and not hw.gpu.has_fp8:
            notes.append(f"{hw.gpu.name} has no FP8 tensor cores: FP8 weights stay FP8 in memory and are dequantised "
                         f"block-wise to bf16 inside each matmul; compute bounds use its bf16 rate")
        if hw.gpu.name == "MI300X" and precision == "fp8":
            notes.append("MI300X implements FP8 as e4m3fnuz: the e4m3fn checkpoint's weights are reinterpreted with "
                         "scales doubled on load (same bytes)")
        if hw.gpu.bandwidth is None:
            notes.append(f"{hw.gpu.name} is not in the hardware table: no GPU speed bounds (pass --gpus NAME)")
    layouts.append(_layout_cpu(m, req, hw, cache, chunk))
    layouts = [_finish(lay, req, chunk) for lay in layouts]
    for lay in layouts:
        lay.update({"command": None, "not_yet_available": []})
        if lay["fits"]:
            lay.update(_command(lay, req, precision, stored, with_mtp, cfg.num_nextn_predict_layers > 0, is_preset))
    fitting = [lay for name in LAYOUT_ORDER for lay in layouts if lay["name"] == name and lay["fits"]]
    best = fitting[0] if fitting else None
    # The first layout that fits and that the CLI runs as planned today (the recommended one when it needs no flag
    # of later work).
    runnable = next((lay for lay in fitting if not lay["not_yet_available"]), None)
    min_gpus = None
    if hw.gpu is not None:
        # Tensor parallelism splits heads: engines need the degree to divide the head count.
        min_gpus = next((n for n in range(1, 257) if cfg.num_attention_heads % n == 0
                         and _layout_gpu(m, req, hw, n, cache, chunk)["fits"]), None)
        if cfg.num_attention_heads % hw.gpu_count:
            notes.append(f"{hw.gpu_count} GPUs: tensor parallelism needs a degree that divides the "
                         f"{cfg.num_attention_heads} heads; memory counted for the busiest rank")
        if hw.gpu_count > 1:
            notes.append("GPU speed bounds ignore communication: two all-reduces (or all-to-alls) per layer add "
                         "latency that dominates single-stream decode on several GPUs")
    if precision in QUANT_PRECISIONS:
        bpw = linear_bytes(1, QUANT_GROUP, precision) * 8 / QUANT_GROUP
        head = HEAD_PRECISION[precision]
        notes.append(f"{precision}: projections at {bpw:g} bits per weight ({precision} codes and one float16 scale "
                     f"per {QUANT_GROUP} inputs of a row), the output head {head} "
                     f"({linear_bytes(1, QUANT_GROUP, head) * 8 / QUANT_GROUP:g} bits), embeddings, norms, router "
                     f"and MTP eh_proj unquantised: what --quantize {precision} loads and dsv3 quantize --to "
                     f"{precision} writes")
    if stored and precision != stored:
        notes.append(f"this checkpoint is stored as {stored} (written by dsv3 quantize): dsv3 loads it only as "
                     f"{stored}; the {precision} figures need the original checkpoint")
    elif precision == "fp8" and not cfg.is_fp8:
        notes.append("fp8 weights need a checkpoint in the official FP8 format: dsv3 loads a bf16 checkpoint as "
                     "bf16 (--fp8-mode keep only keeps FP8 weights FP8)")
    if with_mtp:
        notes.append("MTP weights and cache are counted (loaded by default); speed bounds exclude MTP speculative "
                     "decoding (the V3 report measures 1.8x tokens/s with it)")
    report = {
        "model": model_name or cfg.model_type,
        "model_type": cfg.model_type,
        "precision": precision,
        "cache_dtype": req.cache_dtype,
        "context": req.context,
        "concurrency": req.concurrency,
        "mtp": with_mtp,
        "params_total": counts["main"],
        "params_active": counts["active_per_token"],
        "params_mtp": counts["mtp_unique"],
        "weights_bytes": int(m.bytes(m.tensors)),
        "checkpoint_bytes": predicted_checkpoint_bytes(cfg, precision, with_mtp),
        "components": [{"name": c, **v} for c, v in comps.items() if v["params"]],
        "kv_bytes_per_token": m.kv_tok,
        "kv_bytes_per_token_loaded": m.kv_all,
        "kv_cache_bytes": cache,
        "workspace_chunk_tokens": chunk,
        "hardware": _hardware_dict(hw),
        "layouts": layouts,
        "fits": best is not None,
        "layout": best["name"] if best else None,
        "layout_label": best["label"] if best else None,
        "decode_tokens_per_s_upper": best["decode"]["tokens_per_s_per_seq_upper"] if best else None,
        "decode_aggregate_tokens_per_s_upper": best["decode"]["tokens_per_s_aggregate_upper"] if best else None,
        "prefill_tokens_per_s_upper": best["prefill"]["tokens_per_s_upper"] if best else None,
        "min_gpus_for_gpu_layout": min_gpus,
        "recommended_command": best["command"] if best else None,
        "recommended_not_yet_available": best["not_yet_available"] if best else [],
        "runnable_layout": runnable["name"] if runnable else None,
        "runnable_layout_label": runnable["label"] if runnable else None,
        "runnable_command": runnable["command"] if runnable else None,
        "cost": _cost(best, req),
        "notes": notes,
    }
    return report


def _cache_per_device(layout: dict) -> int:
    return max(d["parts"].get("kv_cache", 0) for d in layout["devices"].values())


def _hardware_dict(hw: Hardware) -> dict:
    g = hw.gpu
    gpu = None if g is None else {
        "name": g.name, "count": hw.gpu_count, "memory_bytes": g.memory_bytes, "bandwidth": g.bandwidth,
        "bf16_flops": None if g.bf16_tflops is None else g.bf16_tflops * 1e12,
        "fp8_flops": None if g.fp8_tflops is None else g.fp8_tflops * 1e12, "fp8": g.has_fp8,
        "source": g.source, "from": hw.gpu_source}
    c = hw.cpu
    return {"gpu": gpu, "cpu": {"memory_bytes": c.memory_bytes, "bandwidth": c.bandwidth, "flops": c.flops,
                                "sources": dict(c.sources)}}


def _cost(best: dict | None, req: PlanRequest) -> dict | None:
    if req.gpu_hour_price is None and req.api_price_per_mtok is None:
        return None
    out = {"gpu_hour_price": req.gpu_hour_price, "api_price_per_mtok": req.api_price_per_mtok,
           "local_per_mtok": None, "break_even_tokens_per_s": None}
    if req.gpu_hour_price is not None and best is not None and best["gpus"]:
        per_hour = req.gpu_hour_price * best["gpus"]
        agg = best["decode"]["tokens_per_s_aggregate_upper"]
        if agg:
            # At the throughput bound, so this is the least the local run can cost per output token.
            out["local_per_mtok"] = per_hour / (agg * 3600) * 1e6
        if req.api_price_per_mtok:
            out["break_even_tokens_per_s"] = per_hour / 3600 / (req.api_price_per_mtok / 1e6)
    return out
