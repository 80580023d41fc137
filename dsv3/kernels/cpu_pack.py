"""CPU inference: weights pre-packed into oneDNN's blocked layout, with projections that read the same input
fused into one matrix (q_a + kv_a, gate + up).

On the CPU, torch's plain bf16 matmul is slow for the skinny shapes of decoding (a few rows against a large weight);
oneDNN's pre-packed weights run the same products 1.5-3x faster with bit-identical results (checked in the tests).
Packing happens once after loading; the plain weights are then dropped so memory does not double, which makes the
packed model an inference-only object (saving or re-slicing it needs a fresh load).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.bfloat16,)


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [..., I] -> [..., O] with a weight packed by _pack([O, I])."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], "")


def available(dtype: torch.dtype) -> bool:
    if dtype not in PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.randn(8, 16).to(dtype)
        x = torch.randn(2, 16).to(dtype)
        return torch.equal(packed_linear(x, _pack(w)), torch.nn.functional.linear(x, w))
    except (RuntimeError, AttributeError):
        return False


def _drop(param_owner: nn.Module, name: str = "weight") -> None:
    p = getattr(param_owner, name)
    setattr(param_owner, name, nn.Parameter(p.new_empty(0), requires_grad=False))


@torch.no_grad()
def prepack_for_cpu(model: nn.Module, kernels: bool = True) -> bool:
    """Pack a loaded CPU model in place; returns False (and changes nothing) when oneDNN packing is unavailable
    for its dtype or the model holds FP8 weights. kernels: also hand the MoE layers, norms and decode attention to
    the C++ CPU kernels (kernels/cpu_ext.py) when they can be built here; the MoE weights are then packed in the
    kernel's layout instead of oneDNN's."""
    from ..model.layers import MLP, Linear, RMSNorm
    from ..model.mla import MLA
    from ..model.moe import MoE, CpuMoE, Experts

    dtype = model.model.embed_tokens.weight.dtype
    if model.model.embed_tokens.weight.device.type != "cpu" or not available(dtype):
        return False
    if any(getattr(m, "weight", None) is not None and m.weight.dtype not in PACKABLE_DTYPES
           for m in model.modules() if isinstance(m, Linear)):
        return False
    ops = None
    if kernels:
        from . import cpu_ext

        ops = cpu_ext.load()
    handled: set[int] = set()  # modules whose weights the C++ MoE kernel owns
    if ops is not None:
        for m in model.modules():
            if isinstance(m, MoE):
                m.cpu = CpuMoE(ops, m, model.cfg)
                owned = [m.gate, m.experts.gate_proj, m.experts.up_proj, m.experts.down_proj]
                if m.shared_experts is not None:
                    owned += [m.shared_experts.gate_proj, m.shared_experts.up_proj, m.shared_experts.down_proj]
                    handled.add(id(m.shared_experts))
                handled.add(id(m.experts))
                for lin in owned:
                    _drop(lin)
                    handled.add(id(lin))
            elif isinstance(m, (RMSNorm, MLA)):
                m.cpu_ops = ops
    for m in model.modules():
        if id(m) in handled:
            continue
        if isinstance(m, MLA):
            if hasattr(m, "q_a_proj"):
                m.packed_qkv_a = _pack(torch.cat([m.q_a_proj.weight, m.kv_a_proj_with_mqa.weight]))
                _drop(m.q_a_proj)
                _drop(m.kv_a_proj_with_mqa)
            for lin in (getattr(m, "q_proj", None), getattr(m, "q_b_proj", None), m.o_proj):
                if lin is not None:
                    lin.packed = _pack(lin.weight)
                    _drop(lin)
            # kv_b_proj stays plain: the absorbed attention splits it per head.
        elif isinstance(m, MLP):
            m.packed_gate_up = _pack(torch.cat([m.gate_proj.weight, m.up_proj.weight]))
            m.down_proj.packed = _pack(m.down_proj.weight)
            for lin in (m.gate_proj, m.up_proj, m.down_proj):
                _drop(lin)
        elif isinstance(m, Experts):
            g, u, d = m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight
            m.packed = [(_pack(torch.cat([g[e], u[e]])), _pack(d[e])) for e in range(m.n_experts)]
            for lin in (m.gate_proj, m.up_proj, m.down_proj):
                _drop(lin)
    for name, m in model.named_modules():  # the rest (lm_head, MTP eh_proj); kv_b_proj is split per head instead
        if (isinstance(m, Linear) and id(m) not in handled and m.packed is None and m.weight.numel()
                and not name.endswith("kv_b_proj")):
            m.packed = _pack(m.weight)
            _drop(m)
    model.prepacked = True
    model.cpu_kernels = ops is not None
    log.info("packed the model's projections for oneDNN CPU matmuls%s",
             "; MoE layers, norms and decode attention on the C++ CPU kernels" if ops is not None else "")
    return True
