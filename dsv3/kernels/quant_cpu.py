"""int8/int4 weights for the C++ CPU kernels: the packed blob they read (csrc/qpacked.h) and the reference of the
product they compute.

The kernels quantise each input row per group of 32 - for int4 weights to int8 (as GGUF's Q8_0: d = max|x| / 127,
q = round(x / d)), for int8 weights to int16 (d = max|x| / 32767) - form every group's sum of code x input products
exactly in integers and accumulate scale_w * d * sum in float32: `linear_quant_acts` here is that computation in
plain PyTorch (float64 accumulation), the oracle the kernel tests compare against. Quantising the activations is
what makes the integer products possible; int8 activations beside int8 weights cost measurable top-token agreement,
int16 ones do not (docs/quantization.md; the weight-only reference `quant.linear` keeps float activations).

Dimension letters: O output features, I input features, n = I // 32 groups, E experts (a leading dim).
"""
from __future__ import annotations

import logging

import torch

from . import quant

log = logging.getLogger(__name__)

MAGIC = 0x3230305133565344  # "DSV3Q002", little-endian, the blob's first int64
HEADER_BYTES = 64
PANEL = 16  # output rows side by side in the codes: one 16-row block (the kernels' job unit)
KIND = {8: 1, 4: 2}  # csrc/qpacked.h QKind


def supported(s: quant.Scheme) -> bool:
    """Whether the kernels run scheme s: dsv3's own int8 and int4 (groups of 32, float16 scales)."""
    return s.bits in KIND and s == quant.Scheme(s.bits)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[-2] == rows:
        return t
    pad = t.new_zeros((*t.shape[:-2], rows - t.shape[-2], t.shape[-1]))
    return torch.cat([t, pad], dim=-2)


def pack(codes: torch.Tensor, scales: torch.Tensor, s: quant.Scheme) -> torch.Tensor:
    """(codes, scales) of scheme s for W [..., O, I] -> uint8 blobs [..., bytes], one per matrix, in the layout of
    csrc/qpacked.h (header, codes by panels of 16 rows, float16 scales [panels, n, 16])."""
    if not supported(s):
        raise ValueError(f"the CPU kernels run int8/int4 with groups of 32, not {s}")
    *lead, o = codes.shape[:-1]
    i = s.in_features(tuple(codes.shape))
    n, g = i // s.group_size, s.group_size
    rows = -(-o // PANEL) * PANEL
    panels = rows // PANEL
    if s.bits == 8:
        c = _pad_rows(codes.to(torch.int8), rows).view(*lead, panels, PANEL, n, g // 2, 2)
        c = c.movedim(-4, -2).contiguous().view(torch.uint8)  # [..., P, n, G/2, 16, 2]
    else:
        q = _pad_rows(quant.unpack_int4(codes), rows).view(*lead, panels, PANEL, n, g // 8, 2, 4)
        q = q.movedim(-5, -3).movedim(-2, -1)  # [..., P, n, G/8, 16, 4, 2]: (row, input, step of the pair)
        c = (q[..., 0] | (q[..., 1] << 4)).contiguous()
    sc = _pad_rows(scales.to(torch.float16), rows).view(*lead, panels, PANEL, n).movedim(-2, -1).contiguous()
    code_bytes = c.reshape(*lead, -1)
    scale_bytes = sc.view(torch.uint8).reshape(*lead, -1)
    codes_off = HEADER_BYTES
    scales_off = codes_off + code_bytes.shape[-1]
    total = -(-(scales_off + scale_bytes.shape[-1]) // 64) * 64
    header = torch.tensor([MAGIC, KIND[s.bits], o, i, g, codes_off, scales_off, total], dtype=torch.int64)
    blob = torch.zeros((*lead, total), dtype=torch.uint8)
    blob[..., :HEADER_BYTES] = header.view(torch.uint8)
    blob[..., codes_off:scales_off] = code_bytes
    blob[..., scales_off:scales_off + scale_bytes.shape[-1]] = scale_bytes
    return blob


ACT_QMAX = {4: 127, 8: 32767}  # by weight bits: the largest activation code (int8 / int16 inputs)


def quantize_acts(x: torch.Tensor, group: int = 32, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., I] -> (q [..., n, G] float32 integers in [-qmax, qmax], d [..., n, 1] float32), the kernels' input
    quantisation: d = max|x| / qmax, q = round_half_even(x * (1 / d)) (0 where d is 0), in float32."""
    g = x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // group, group)
    d = g.abs().amax(-1, keepdim=True) / qmax
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return torch.round(g * inv).clamp_(-qmax, qmax), d


def linear_quant_acts(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, s: quant.Scheme) -> torch.Tensor:
    """The product the kernels compute, y = sum_g scale_w[o, g] * d[g] * sum_i code[o, i] q[i] (int4 codes less 8):
    x [T, I] -> [T, O] float64 (integer sums exact, then accumulated in float64)."""
    q, d = quantize_acts(x, s.group_size, ACT_QMAX[s.bits])  # [T, n, G], [T, n, 1]
    w = (codes.to(torch.float64) if s.bits == 8 else quant.unpack_int4(codes).to(torch.float64) - 8)
    o, i = w.shape
    w = w.view(o, i // s.group_size, s.group_size)  # [O, n, G]
    isum = torch.einsum("tng,ong->ton", q.to(torch.float64), w)  # exact integers
    return (isum * scales.to(torch.float64)[None] * d[..., 0].to(torch.float64)[:, None]).sum(-1)


def kernel_matrix(ops, mods: list) -> torch.Tensor:
    """The tensor the C++ kernels read for the weights of `mods` (Linear or StackedLinear modules whose outputs are
    stacked along the rows, e.g. [gate; up]): a quantised blob (pack) when they all hold one scheme the kernels
    run, else ops.pack's bf16 layout of the (dequantised) weights, with a warning, since that costs memory."""
    schemes = {m.quant for m in mods}
    s = next(iter(schemes))
    if len(schemes) == 1 and s is not None and supported(s):
        return pack(torch.cat([m.weight for m in mods], dim=-2), torch.cat([m.weight_scale for m in mods], dim=-2), s)
    if schemes != {None}:
        log.warning("the CPU kernels run these weights (%s) in bf16: they run int8/int4 with groups of 32 when every "
                    "projection fused into one matrix holds the same scheme", ", ".join(sorted(
                        "bf16" if q is None else q.name for q in schemes)))
    w = [m.dense(slice(None), torch.bfloat16) if hasattr(m, "dense") else m.effective_weight(torch.bfloat16)
         for m in mods]
    return ops.pack(torch.cat(w, dim=-2).detach().contiguous())
