"""Building blocks shared by attention and MoE: RMSNorm, a Linear that may hold FP8 block-scaled or int8/int4
group-quantised weights, and the SwiGLU MLP.

Dimension letters: T tokens (any leading shape), D hidden, I intermediate, O/Iin output/input features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import dispatch, fp8, quant


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.cpu_ops = None  # torch.ops.dsv3_cpu for bf16 CPU inference (kernels/cpu_ext.py), same rounding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_ops is not None and x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16:
            return self.cpu_ops.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        # Statistics in float32 whatever the activation dtype; scaled in the input dtype like the reference.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * xf.to(x.dtype)


class Linear(nn.Module):
    """y = x W^T with W [O, Iin]. When W is float8_e4m3fn, `weight_scale_inv` [ceil(O/128), ceil(Iin/128)] holds
    the block scales and the weight is dequantised block-wise at call time (kept FP8 in memory). When `quant` is an
    int8/int4 scheme (kernels/quant.py), `weight` holds its codes and `weight_scale` [O, Iin / 32] its float16
    group scales; the product is computed in float32 with the exact dequantised weight."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_buffer("weight_scale_inv", None)  # set by set_fp8 when the weight is kept in FP8
        self.register_buffer("weight_scale", None)  # set by set_quantized (int8/int4 group scales)
        self.quant: quant.Scheme | None = None
        self.packed = None  # kernels/cpu_pack.py: a packed copy for CPU inference, called as packed(x)

    def set_fp8(self, scale_inv: torch.Tensor) -> None:
        self.register_buffer("weight_scale_inv", scale_inv)

    def set_quantized(self, codes: torch.Tensor, scales: torch.Tensor, scheme: quant.Scheme) -> None:
        """Hold int8/int4 codes [O, Iin * bits / 8] and float16 scales [O, Iin / group] of `scheme` as the weight."""
        set_quantized(self, codes, scales, scheme)

    def effective_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.quant is not None:
            return quant.dequantize(self.weight, self.weight_scale, self.quant, dtype)
        if self.weight.dtype == fp8.FP8_DTYPE:
            return fp8.dequantize(self.weight, self.weight_scale_inv, dtype)
        return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed(x)
        if self.quant is not None:
            return quant.linear(x, self.weight, self.weight_scale, self.quant)
        y = dispatch.linear(x, self.weight, self.weight_scale_inv)  # FP8 weights on CUDA: kernels/triton_fp8.py
        if y is not None:
            return y
        return F.linear(x, self.effective_weight(x.dtype))

    def extra_repr(self) -> str:
        kind = self.quant.name if self.quant is not None else self.weight.dtype
        return f"in={self.in_features}, out={self.out_features}, dtype={kind}"


def set_quantized(mod: nn.Module, codes: torch.Tensor, scales: torch.Tensor, scheme: quant.Scheme) -> None:
    """Make a Linear or StackedLinear hold quantised codes and scales (checked against each other)."""
    want = scheme.scale_shape((*codes.shape[:-1], scheme.in_features(tuple(codes.shape))))
    if codes.dtype != scheme.code_dtype or tuple(scales.shape) != want:
        raise ValueError(f"{scheme.name} codes {list(codes.shape)} {codes.dtype} and scales {list(scales.shape)} do "
                         f"not fit together (expected {scheme.code_dtype} codes and scales {list(want)})")
    mod._parameters["weight"] = nn.Parameter(codes, requires_grad=False)
    mod.__dict__.pop("weight_scale", None)
    mod.register_buffer("weight_scale", scales)
    mod.quant = scheme


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the dense layers and the shared experts."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(dim, inter)
        self.up_proj = Linear(dim, inter)
        self.down_proj = Linear(inter, dim)
        self.packed_gate_up = None  # [gate; up] packed for CPU inference (kernels/cpu_pack.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_gate_up is not None:
            g, u = self.packed_gate_up(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(g) * u)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
