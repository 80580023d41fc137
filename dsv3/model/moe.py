"""DeepSeekMoE: router, stacked routed experts, shared experts.

Dimension letters: T tokens (flattened batch x sequence), D hidden, E routed experts, K experts per token,
G expert groups, I moe_intermediate_size, N = T*K token-expert pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels import dispatch, fp8, quant, quant_cpu
from ..kernels.grouped import grouped_mm
from .layers import MLP, set_quantized


def route(logits: torch.Tensor, cfg: ModelConfig, bias: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E] float32 -> weights [T, K] float32, indices [T, K] int64, scores [T, E] float32.

    The bias (auxiliary-loss-free balancing) shifts which experts are chosen, never their weights."""
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias
    E, G, K = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
    if cfg.uses_group_routing:
        grouped = choice.unflatten(-1, (G, E // G))  # [T, G, E/G]
        if cfg.topk_method == "noaux_tc":
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]: sum of each group's two best
        else:
            group_score = grouped.amax(dim=-1)  # group_limited_greedy: each group's best
        keep = group_score.topk(cfg.topk_group, dim=-1).indices  # [T, topk_group]
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(E // G, dim=-1), float("-inf"))
    indices = choice.topk(K, dim=-1).indices  # [T, K]
    weights = scores.gather(1, indices)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, indices, scores


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.uses_score_bias:
            # Updated by the balancing rule during training, not by gradients.
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D] -> weights [T, K] float32, indices [T, K], scores [T, E] float32"""
        logits = F.linear(x.float(), self.weight.float())  # [T, E], float32 like the reference
        bias = None if self.e_score_correction_bias is None else self.e_score_correction_bias.float()
        return route(logits, self.cfg, bias)


class StackedLinear(nn.Module):
    """E per-expert weights [E, O, I] in one tensor (checkpoint: experts.{e}.<name>.weight [O, I]); FP8 with block
    scales, or int8/int4 codes with group scales (`quant`, as in layers.Linear)."""

    def __init__(self, n: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features))
        self.register_buffer("weight_scale_inv", None)  # set by set_fp8 when the weight is kept in FP8
        self.register_buffer("weight_scale", None)  # set by set_quantized (int8/int4 group scales)
        self.quant: quant.Scheme | None = None

    def set_fp8(self, scale_inv: torch.Tensor) -> None:
        self.register_buffer("weight_scale_inv", scale_inv)

    def set_quantized(self, codes: torch.Tensor, scales: torch.Tensor, scheme: quant.Scheme) -> None:
        """Hold codes [E, O, I * bits / 8] and float16 scales [E, O, I / group] of `scheme` as the weights."""
        set_quantized(self, codes, scales, scheme)

    def project(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [N, I] through expert e: [N, O] in x's dtype (quantised weights: the float32 reference product)."""
        if self.quant is not None:
            return quant.linear(x, self.weight[e], self.weight_scale[e], self.quant)
        return F.linear(x, self.dense(e, x.dtype))

    @property
    def is_fp8(self) -> bool:
        return self.weight.dtype == fp8.FP8_DTYPE

    def dense(self, experts: torch.Tensor | slice, dtype: torch.dtype) -> torch.Tensor:
        """Weights of the selected experts in `dtype`: [len(experts), O, I]."""
        w = self.weight[experts]
        if self.quant is not None:
            return quant.dequantize(w, self.weight_scale[experts], self.quant, dtype)
        if self.is_fp8:
            return fp8.dequantize(w, self.weight_scale_inv[experts], dtype)
        return w.to(dtype)


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.n_experts = E
        self.gate_proj = StackedLinear(E, D, I)
        self.up_proj = StackedLinear(E, D, I)
        self.down_proj = StackedLinear(E, I, D)
        self.packed: list | None = None  # per expert ([gate; up], down) in oneDNN's layout (kernels/cpu_pack.py)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights [T, K], indices [T, K] -> sum_k weights[t, k] * expert_{indices[t, k]}(x[t]) [T, D]"""
        y = dispatch.experts(self, x, weights, indices)  # Triton on CUDA: kernels/triton_moe.py
        if y is not None:
            return y
        T, K = indices.shape
        flat = indices.reshape(-1)  # [N]
        order = flat.argsort(stable=True)  # token-expert pairs sorted by expert
        xs = x[order // K]  # [N, D]
        if self.use_grouped_mm(x):
            offsets = torch.bincount(flat, minlength=self.n_experts).cumsum(0).to(torch.int32)  # no host sync
            ys = self._grouped(xs, offsets)
        else:
            ys = self._per_expert(xs, torch.bincount(flat, minlength=self.n_experts).tolist())
        # Back to [T, K] pair order, then the weighted sum over each token's K experts in float32.
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y = ys[inverse].view(T, K, -1).float()
        return (y * weights[..., None].float()).sum(1).to(x.dtype)

    def use_grouped_mm(self, x: torch.Tensor) -> bool:
        # One grouped GEMM per projection is the GPU path. On the CPU torch runs it as a loop over all E groups,
        # so looping over only the experts that were hit (a free host sync there) is faster; FP8 weights are
        # dequantised per hit expert for the same reason.
        if self.packed is not None:
            return False
        aligned = all(d % 8 == 0 for d in self.down_proj.weight.shape[1:])  # _grouped_mm needs 16-byte strides
        if self.gate_proj.quant is not None:
            return False
        return aligned and (self.force_grouped_mm or (x.device.type != "cpu" and not self.gate_proj.is_fp8))

    force_grouped_mm = False

    def _grouped(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        dt = xs.dtype
        g = grouped_mm(xs, self.gate_proj.weight.to(dt).transpose(1, 2), offsets)  # [N, I]
        u = grouped_mm(xs, self.up_proj.weight.to(dt).transpose(1, 2), offsets)
        return grouped_mm(F.silu(g) * u, self.down_proj.weight.to(dt).transpose(1, 2), offsets)  # [N, D]

    def _per_expert(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # split, not slicing: the backward of a slice materialises a zero gradient of all of xs per expert (16
        # experts -> 16 full-size fills and adds per projection), split's backward is one concatenation.
        parts = []
        for e, xe in enumerate(xs.split(counts)):
            if not counts[e]:
                continue
            if self.packed is not None:
                gate_up, down = self.packed[e]
                g, u = gate_up(xe).chunk(2, dim=-1)
                parts.append(down(F.silu(g) * u))
            else:
                h = F.silu(self.gate_proj.project(e, xe)) * self.up_proj.project(e, xe)
                parts.append(self.down_proj.project(e, h))
        return torch.cat(parts) if parts else xs.new_zeros(0, xs.shape[1])


class CpuMoE:
    """Router, routed and shared experts of one MoE layer as a single call of the C++ CPU kernel
    (kernels/csrc/cpu_kernels.cpp), with its weights in the kernel's packed layout. Inference only, bf16 activations."""

    GROUP_RULES = {"noaux_tc": 1, "group_limited_greedy": 2}

    def __init__(self, ops, moe: "MoE", cfg: ModelConfig):
        e = moe.experts
        self.ops = ops
        g = moe.gate.weight.detach()  # float32 (as loaded) stays float32; bf16 is packed like the experts
        self.gate = g.float().contiguous() if g.dtype != torch.bfloat16 else ops.pack(g)
        bias = moe.gate.e_score_correction_bias
        self.bias = None if bias is None else bias.detach().float().contiguous()
        # bf16 packed or int8/int4 blobs (kernels/quant_cpu.py): [E][2I, D] and [E][D, I]
        self.w13 = quant_cpu.kernel_matrix(ops, [e.gate_proj, e.up_proj])
        self.w2 = quant_cpu.kernel_matrix(ops, [e.down_proj])
        self.inter = cfg.moe_intermediate_size
        s = moe.shared_experts
        self.shared = None if s is None else (quant_cpu.kernel_matrix(ops, [s.gate_proj, s.up_proj]),
                                              quant_cpu.kernel_matrix(ops, [s.down_proj]))
        self.shared_inter = cfg.shared_intermediate_size if s is not None else 0
        self.args = (cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group,
                     self.GROUP_RULES.get(cfg.topk_method, 0) if cfg.uses_group_routing else 0,
                     cfg.scoring_func == "softmax", cfg.norm_topk_prob, cfg.routed_scaling_factor)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] bf16 -> [T, D]"""
        sw13, sw2 = self.shared if self.shared is not None else (None, None)
        return self.ops.moe(x.contiguous(), self.gate, self.bias, *self.args, self.w13, self.w2, self.inter, sw13,
                            sw2, self.shared_inter)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.shared_intermediate_size) if cfg.n_shared_experts else None
        # Training reads these after each forward (per-expert counts and scores for balancing); off by default.
        self.record_routing = False
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None
        self.cpu_moe: CpuMoE | None = None  # set by kernels/cpu_pack.py: the whole layer as one C++ call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        if self.cpu_moe is not None:
            return self.cpu_moe(x).view(shape)
        weights, indices, scores = self.gate(x)
        if self.record_routing:
            self.last_routing = (indices, scores)
        y = self.experts(x, weights, indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.reshape(shape)
