"""Deployment planner: memory, layouts and speed bounds for a model of the family on given hardware.

Pure arithmetic on a ModelConfig and hardware figures. `plan()` returns a dict with stable keys (what `dsv3 plan
--json` prints); `render()` turns it into the text report. docs/plan.md states every formula and assumption.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ModelConfig
from .hardware import GIB, Hardware

PRECISIONS = ("fp8", "bf16", "int8", "int4")
CACHE_DTYPES = {"bf16": 2, "fp8": 1}
FP8_BLOCK = 128  # the official checkpoints' 128x128 weight blocks, one float32 scale each
QUANT_GROUP = 128  # int8/int4: one bf16 scale (int4: and one bf16 zero point) per 128 input values of a row
ACT_BYTES = 2  # activations in bf16
PREFILL_CHUNK = 8192  # tokens per prefill step (chunked prefill), the activation estimate's batch
GPU_RESERVE = int(1.5 * GIB)  # CUDA context, cuBLAS/NCCL workspaces, allocator slack per GPU
CPU_RESERVE_MIN, CPU_RESERVE_FRAC = 8 * GIB, 0.05  # OS, page cache, the Python process itself
EP_IMBALANCE = 2.0  # headroom over the mean tokens an expert-parallel rank receives in one step
COMPONENTS = ("embedding", "attention", "dense_mlp", "routed_experts", "shared_experts", "router", "head", "mtp")
LAYOUT_ORDER = ("gpu", "hybrid", "cpu")  # preference when several fit: fastest first


@dataclass(frozen=True)
class Tensor:
    """One kind of weight tensor, repeated `count` times (over layers, experts)."""

    component: str
    role: str  # linear (quantised at the chosen precision) | norm | router | bias | embed | head | bf16
    shard: str  # how the GPU layout splits it: heads | tp | vocab | experts | replicated
    shape: tuple[int, ...]
    count: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.count


def _layer_tensors(cfg: ModelConfig, moe: bool, n: int, comp: str | None) -> list[Tensor]:
    D, H, C, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    c = (lambda name: comp or name)
    # The down-projections (q_a, kv_a) produce one latent per token shared by all heads: tensor-parallel engines
    # replicate them rather than split them; everything per head splits by heads.
    ts = [Tensor(c("attention"), "norm", "replicated", (D,), 2 * n)]
    if cfg.q_lora_rank is None:
        ts.append(Tensor(c("attention"), "linear", "heads", (H * cfg.qk_head_dim, D), n))
    else:
        ts += [Tensor(c("attention"), "linear", "replicated", (cfg.q_lora_rank, D), n),
               Tensor(c("attention"), "norm", "replicated", (cfg.q_lora_rank,), n),
               Tensor(c("attention"), "linear", "heads", (H * cfg.qk_head_dim, cfg.q_lora_rank), n)]
    ts += [Tensor(c("attention"), "linear", "replicated", (C + R, D), n),
           Tensor(c("attention"), "norm", "replicated", (C,), n),
           Tensor(c("attention"), "linear", "heads", (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), C), n),
           Tensor(c("attention"), "linear", "heads", (D, H * cfg.v_head_dim), n)]
    if moe:
        E, I, S = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.shared_intermediate_size
        ts.append(Tensor(c("router"), "router", "replicated", (E, D), n))
        if cfg.uses_score_bias:
            ts.append(Tensor(c("router"), "bias", "replicated", (E,), n))
        ts += [Tensor(c("routed_experts"), "linear", "experts", (I, D), 2 * E * n),
               Tensor(c("routed_experts"), "linear", "experts", (D, I), E * n)]
        if S:
            ts += [Tensor(c("shared_experts"), "linear", "tp", (S, D), 2 * n),
                   Tensor(c("shared_experts"), "linear", "tp", (D, S), n)]
    else:
        I = cfg.intermediate_size
        ts += [Tensor(c("dense_mlp"), "linear", "tp", (I, D), 2 * n), Tensor(c("dense_mlp"), "linear", "tp", (D, I), n)]
    return ts


def model_tensors(cfg: ModelConfig, with_mtp: bool = False) -> list[Tensor]:
    """Every weight the model holds in memory (MTP layers share the main embedding and head, as load_model does).
    The MTP layers' tensors come last, after everything of the main model."""
    D, V = cfg.hidden_size, cfg.vocab_size
    kinds = cfg.layer_kinds
    ts = [Tensor("embedding", "embed", "vocab", (V, D))]
    ts += _layer_tensors(cfg, False, kinds.count("dense"), None) if kinds.count("dense") else []
    ts += _layer_tensors(cfg, True, kinds.count("moe"), None) if kinds.count("moe") else []
    ts.append(Tensor("head", "norm", "replicated", (D,)))
    if not cfg.tie_word_embeddings:
        ts.append(Tensor("head", "head", "vocab", (V, D)))
    if with_mtp:
        for k in range(cfg.num_nextn_predict_layers):
            ts += _layer_tensors(cfg, cfg.is_moe_layer(cfg.num_hidden_layers + k), 1, "mtp")
            ts += [Tensor("mtp", "norm", "replicated", (D,), 3),  # enorm, hnorm, shared_head.norm
                   Tensor("mtp", "bf16", "replicated", (D, 2 * D))]  # eh_proj: bf16 in the official checkpoint
    return ts


def linear_bytes(out_features: int, in_features: int, precision: str) -> int:
    n = out_features * in_features
    groups = out_features * -(-in_features // QUANT_GROUP)
    if precision == "bf16":
        return 2 * n
    if precision == "fp8":
        return n + 4 * -(-out_features // FP8_BLOCK) * -(-in_features // FP8_BLOCK)
    if precision == "int8":
        return n + 2 * groups
    if precision == "int4":
        return out_features * -(-in_features // 2) + 4 * groups
    raise ValueError(f"precision {precision!r}: choose one of {PRECISIONS}")


def tensor_bytes(t: Tensor, precision: str, on_disk: bool = False) -> int:
    """Resident bytes (what load_model allocates with dtype bf16): projections at `precision`; norms, embedding,
    head and the MTP eh_proj in bf16 (the official FP8 checkpoint keeps them so); the router weight and bias in
    float32 (routing decisions are precision sensitive). On disk the router weight is bf16."""
    if t.role == "linear":
        return linear_bytes(*t.shape, precision) * t.count
    if t.role == "router":
        return t.numel * (2 if on_disk else 4)
    if t.role == "bias":
        return t.numel * 4
    return t.numel * 2


def predicted_weight_bytes(cfg: ModelConfig, precision: str, with_mtp: bool = False) -> int:
    return sum(tensor_bytes(t, precision) for t in model_tensors(cfg, with_mtp))


def predicted_checkpoint_bytes(cfg: ModelConfig, precision: str, with_mtp: bool = True) -> int:
    """Size of the safetensors files: the MTP layers carry their own copies of the embedding and head."""
    n = sum(tensor_bytes(t, precision, on_disk=True) for t in model_tensors(cfg, with_mtp))
    if with_mtp:
        n += cfg.num_nextn_predict_layers * 2 * (2 * cfg.vocab_size * cfg.hidden_size)
    return n


def predicted_cache_bytes(cfg: ModelConfig, tokens: int, cache_dtype: str = "bf16", with_mtp: bool = False) -> int:
    """Latent cache bytes for `tokens` cached positions: (kv_lora_rank + qk_rope_head_dim) x layers x element size.
    The hook the engine's cache test compares its allocation against."""
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype {cache_dtype!r}: choose one of {sorted(CACHE_DTYPES)}")
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0)
    return tokens * cfg.kv_cache_values_per_token_per_layer * layers * CACHE_DTYPES[cache_dtype]


def expected_experts_touched(n_experts: int, top_k: int, batch: float) -> float:
    """Distinct experts one MoE layer reads for `batch` tokens, routing uniform and independent per token."""
    return n_experts * (1 - (1 - top_k / n_experts) ** batch)


# ------------------------------------------------------------------------------------------------------------------
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


class _Model:
    """Byte and FLOP totals of one model at one precision, grouped the ways the layouts need them."""

    def __init__(self, cfg: ModelConfig, precision: str, cache_dtype: str, with_mtp: bool):
        self.cfg, self.precision = cfg, precision
        self.kv_tok = predicted_cache_bytes(cfg, 1, cache_dtype)
        self.kv_all = predicted_cache_bytes(cfg, 1, cache_dtype, with_mtp)
        self.tensors = model_tensors(cfg, with_mtp)
        self.main = model_tensors(cfg, False)
        self.n_moe = cfg.layer_kinds.count("moe")
        I, D = cfg.moe_intermediate_size, cfg.hidden_size
        self.expert_bytes = linear_bytes(I, D, precision) * 2 + linear_bytes(D, I, precision) if cfg.has_moe else 0
        counts = cfg.param_counts()
        self.expert_flops_tok = 2 * self.n_moe * cfg.num_experts_per_tok * (cfg.expert_params() if cfg.has_moe else 0)
        self.other_flops_tok = 2 * counts["active_read_per_token"] - self.expert_flops_tok

    def bytes(self, tensors: list[Tensor], keep=lambda t: True, frac=lambda t: 1.0) -> float:
        return sum(tensor_bytes(t, self.precision) * frac(t) for t in tensors if keep(t))

    def attn_flops_tok(self, position: float, absorbed: bool) -> float:
        # Scores plus weighted values, per head and attended position: naive form in qk/v head dims; the absorbed
        # (decode) form attends over the latent, C + R for scores and C for values.
        cfg = self.cfg
        dims = (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) if absorbed else (cfg.qk_head_dim + cfg.v_head_dim)
        return 2 * cfg.num_hidden_layers * cfg.num_attention_heads * position * dims


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


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _need(parts: dict[str, float], capacity: float, per: str) -> dict:
    need = sum(parts.values())
    fits = need <= capacity
    detail = " + ".join(f"{k.replace('_', ' ')} {v / GIB:.1f}" for k, v in parts.items() if v)
    return {"per": per, "parts": {k: int(v) for k, v in parts.items()}, "need_bytes": int(need),
            "capacity_bytes": int(capacity), "fits": fits,
            "text": f"{'uses' if fits else 'needs'} {_gib(need)} {per} ({detail}), has {_gib(capacity)}"}


def _roofline(bytes_: float, flops: float, bandwidth: float | None, compute: float | None) -> float | None:
    if not bandwidth or not compute:
        return None
    return max(bytes_ / bandwidth, flops / compute)


def _layout_gpu(m: _Model, req: PlanRequest, hw: Hardware, n: int, cache: int, chunk: int) -> dict:
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

    label = f"{n}x {gpu.name}, TP{n}" + (f" x EP{n}" if n > 1 and cfg.has_moe else "")
    return {"name": "gpu", "label": label, "tp": n, "ep": n if cfg.has_moe else 1, "gpus": n,
            "devices": {"gpu": mem}, "fits": mem["fits"], "cache_per_seq": {"gpu": req.context * m.kv_all},
            "_decode": decode, "_prefill": prefill}


def _layout_hybrid(m: _Model, req: PlanRequest, hw: Hardware, cache: int, chunk: int) -> dict:
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


def _layout_cpu(m: _Model, req: PlanRequest, hw: Hardware, cache: int, chunk: int) -> dict:
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


def _command(layout: dict, req: PlanRequest, precision: str, cache_per_device: int, is_preset: bool) -> str:
    """The `dsv3 serve` line for the layout, in the engine's flag names (--model wants a checkpoint directory)."""
    model = f"PATH/TO/{req.model_arg}" if is_preset else req.model_arg
    cmd = ["dsv3 serve", f"--model {model}", f"--device {'cpu' if layout['name'] == 'cpu' else 'cuda'}",
           "--dtype bfloat16"]
    if precision == "fp8":
        cmd.append("--fp8-mode keep")
    elif precision != "bf16":
        cmd.append(f"--quantize {precision}")
    cmd += [f"--max-model-len {req.context}", f"--max-num-seqs {req.concurrency}",
            f"--cache-memory {math.ceil(cache_per_device / GIB * 10) / 10:g}GiB"]
    if req.cache_dtype != "bf16":
        cmd.append(f"--kv-cache-dtype {req.cache_dtype}")
    if layout["name"] == "gpu" and layout["tp"] > 1:
        cmd.append(f"--tensor-parallel {layout['tp']}" + (f" --expert-parallel {layout['ep']}" if layout["ep"] > 1
                                                          else ""))
    elif layout["name"] == "hybrid":
        cmd.append("--experts-device cpu" + (f" --pipeline-parallel {layout['gpus']}" if layout["gpus"] > 1 else ""))
    return " ".join(cmd)


def plan(cfg: ModelConfig, hw: Hardware, req: PlanRequest, model_name: str = "", is_preset: bool = False) -> dict:
    req.validate()
    precision = req.precision or ("fp8" if cfg.is_fp8 else "bf16")
    with_mtp = cfg.num_nextn_predict_layers > 0 if req.with_mtp is None else req.with_mtp
    if with_mtp and not cfg.num_nextn_predict_layers:
        raise ValueError("--mtp: this model has no MTP layers (num_nextn_predict_layers = 0)")
    m = _Model(cfg, precision, req.cache_dtype, with_mtp)
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
    best = next((lay for name in LAYOUT_ORDER for lay in layouts if lay["name"] == name and lay["fits"]), None)
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
    if precision in ("int8", "int4"):
        notes.append(f"dsv3 loads fp8 and bf16 weights today; the {precision} figures describe a weight-only "
                     f"quantised runtime (groups of {QUANT_GROUP})")
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
        "recommended_command": _command(best, req, precision, _cache_per_device(best), is_preset) if best
        else None,
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


# ------------------------------------------------------------------------------------------------------------------
# Text report
def _num(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,.0f}"


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def render(r: dict) -> str:
    hw = r["hardware"]
    g, c = hw["gpu"], hw["cpu"]
    lines = [f"{r['model']} ({r['model_type']}): {_num(r['params_total'])} parameters, {_num(r['params_active'])} "
             f"active per token" + (f", MTP {_num(r['params_mtp'])}" if r["params_mtp"] else ""),
             f"weights {r['precision']}, KV cache {r['cache_dtype']}, context {r['context']:,} x concurrency "
             f"{r['concurrency']}" + (", MTP loaded" if r["mtp"] else ""),
             "hardware: " + (f"{g['count']}x {g['name']} ({g['memory_bytes'] / GIB:g} GiB"
                             + (f", {g['bandwidth'] / 1e12:.2f} TB/s" if g["bandwidth"] else "") + f", {g['from']})"
                             if g else "no GPU")
             + f"; CPU {_gib(c['memory_bytes'])} ({c['sources'].get('memory', '')}), "
               f"{c['bandwidth'] / 1e9:.0f} GB/s ({c['sources'].get('bandwidth', '')}), "
               f"{c['flops'] / 1e12:.2f} TFLOPS ({c['sources'].get('flops', '')})",
             "",
             f"{'component':<16}{'parameters':>12}{'bytes':>14}"]
    for comp in r["components"]:
        note = "" if r["mtp"] or comp["name"] != "mtp" else "   (not loaded)"
        lines.append(f"{comp['name']:<16}{_num(comp['params']):>12}{_gib(comp['bytes']):>14}{note}")
    lines += [f"{'resident total':<16}{'':>12}{_gib(r['weights_bytes']):>14}",
              f"checkpoint on disk: {_gib(r['checkpoint_bytes'])} ({r['checkpoint_bytes'] / 1e9:.1f} GB)",
              "",
              f"KV cache (MLA latent, {r['cache_dtype']}): {r['kv_bytes_per_token']:,} bytes/token"
              + (f" ({r['kv_bytes_per_token_loaded']:,} with the MTP layer)" if r["mtp"] else "")
              + f"; {r['context']:,} x {r['concurrency']} tokens = {_gib(r['kv_cache_bytes'])}"
                f" per replica (every tensor-parallel rank holds the whole latent)",
              f"workspace: activations of a {r['workspace_chunk_tokens']:,}-token step (see docs/plan.md)",
              "",
              "layouts (per device: weights + KV cache + workspace + runtime reserve; speeds are upper bounds)"]
    for lay in r["layouts"]:
        d = lay["decode"]
        verdict = "fits" if lay["fits"] else "does not fit"
        lines.append(f"  {lay['name']:<7}{lay['label']}: {verdict}: {lay['reason']}")
        if lay["fits"]:
            batch = "" if r["concurrency"] == 1 else (
                f", <= {_rate(d['tokens_per_s_per_seq_upper'])} per sequence and "
                f"{_rate(d['tokens_per_s_aggregate_upper'])} aggregate at {r['concurrency']} sequences")
            lines.append(f"  {'':<7}decode <= {_rate(d['tokens_per_s_single_stream_upper'])} tok/s single stream"
                         f"{batch}; prefill <= {_rate(lay['prefill']['tokens_per_s_upper'])} tok/s; room for "
                         f"{lay['max_concurrency']} sequences of {r['context']:,} tokens")
    lines.append("")
    if r["fits"]:
        lines += [f"recommendation: {r['layout']} ({r['layout_label']})", f"  {r['recommended_command']}"]
    else:
        lines.append("recommendation: nothing fits at this precision, context and concurrency"
                     + (f"; the GPU layout needs at least {r['min_gpus_for_gpu_layout']}x {g['name']}"
                        if g and r["min_gpus_for_gpu_layout"] else "")
                     + "; try --precision int4, a shorter --context, --cache-dtype fp8 or more memory")
    cost = r["cost"]
    if cost:
        parts = []
        if cost["local_per_mtok"] is not None:
            parts.append(f"local >= ${cost['local_per_mtok']:.2f} per million output tokens at the bound")
        if cost["api_price_per_mtok"] is not None:
            parts.append(f"hosted ${cost['api_price_per_mtok']:.2f}")
        if cost["break_even_tokens_per_s"] is not None:
            parts.append(f"break-even at {cost['break_even_tokens_per_s']:,.0f} tok/s aggregate")
        lines.append("cost: " + ("; ".join(parts) if parts else "needs a GPU layout that fits and --gpu-hour-price"))
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)
