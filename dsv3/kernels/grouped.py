"""Grouped matrix multiply for routed experts: rows sorted by expert, one call for all experts.

Dimension letters: N rows (token-expert pairs sorted by expert), I input features, O output features, E experts.
`offsets[e]` is the end row of expert e's group (a cumulative count, int32), so no host sync is needed to split.
torch._grouped_mm runs the forward on CPU and CUDA; its autograd is incomplete on CPU, so the backward is
written here with the same primitive.
"""
from __future__ import annotations

import torch


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [N, I], w [E, I, O] -> [N, O]: the obvious loop, used as the test oracle."""
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        out[start:end] = x[start:end] @ w[e]
        start = end
    return out


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets):
        ctx.save_for_backward(x, w, offsets)
        return torch._grouped_mm(x, w, offs=offsets)

    @staticmethod
    def backward(ctx, grad):
        x, w, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch._grouped_mm(grad, w.transpose(-1, -2), offs=offsets)
        if ctx.needs_input_grad[1]:
            gw = torch._grouped_mm(x.t(), grad, offs=offsets)  # [E, I, O]; empty groups give zeros
        return gx, gw, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [N, I] (rows sorted by group), w [E, I, O], offsets [E] int32 cumulative ends -> [N, O]."""
    if x.shape[0] == 0:
        return x.new_zeros(0, w.shape[-1])
    if x.dtype != w.dtype:
        raise TypeError(f"grouped_mm: x is {x.dtype} but w is {w.dtype}")
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _GroupedMM.apply(x, w, offsets)
    return torch._grouped_mm(x, w, offs=offsets)
