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
KIND_INT8X = 3  # int8 codes, float32 scales per 16 inputs, float32 mins per 32 (GGUF's K-quants, mixtures)
KIND_INT4M = 4  # int4 codes (no offset), float32 scales and mins per 32 (GGUF's Q4_K, Q4_1): 6 bits per weight
KIND_INT6X = 5  # int8x with every code in [-32, 31] (Q6_K, Q5_K, Q5_1, Q4_K, mixtures) in 6 bits: 9 bits per weight
KIND_INT6 = 6  # int6x whose mins are all zero (Q6_K), stored without them: 8 bits per weight
KIND_INT4K = 7  # int4m with GGUF's own scales: float16 per 256 inputs x uint8 per 32 (Q4_K): 4.625 bits per weight
KIND_INT6K = 8  # 6-bit codes with GGUF's own scales (float16 per 256 inputs x int8 per 16) and int8 activations (Q6_K)
KIND_INT5K = 9  # 5-bit codes with int4k's scales and mins, int8 activations (Q5_K): 5.625 bits per weight


def native(s: quant.Scheme) -> bool:
    """dsv3's own int8 / int4 (groups of 32, float16 scales): the kernels' compact kinds 1 and 2."""
    return s.bits in KIND and s == quant.Scheme(s.bits)


def _with_min_32(s: quant.Scheme) -> bool:
    return s.with_min and s.group_size == 32 and s.scale_dtype == torch.float32


def int5k_form(codes: torch.Tensor, scales: torch.Tensor, s: quant.Scheme, compact: bool = True):
    """For Q5_K-like weights (int8 codes in [0, 31], a float32 scale and min per 32): (d, sc, dmin, m) of GGUF's own
    scales (factor_scales) when they factor exactly, else None (the weights go to int6x)."""
    if not (compact and s.bits == 8 and _with_min_32(s) and codes.numel() and int(codes.min()) >= 0
            and int(codes.max()) <= 31):
        return None
    fs, fm = (factor_scales(scales[..., k], 8, (63,), 0, 255) for k in (0, 1))
    return None if fs is None or fm is None else (*fs, *fm)


def int4m(s: quant.Scheme) -> bool:
    """Schemes the compact int4-with-min kind holds as they are (Q4_K, Q4_1)."""
    return s.bits == 4 and _with_min_32(s)


def supported(s: quant.Scheme) -> bool:
    """Whether the kernels run scheme s: the native kinds, int4m, or (kind int8x, exactly: the codes widened to
    int8, scales and mins in float32) GGUF's other schemes with float32 scales."""
    if native(s):
        return True
    return (s.bits in KIND and s.scale_dtype == torch.float32
            and (s.group_size == 32 or (s.group_size == 16 and not s.with_min)))


def to_int8x(codes: torch.Tensor, scales: torch.Tensor, s: quant.Scheme
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Any supported scheme's (codes, scales) for W [..., O, I] -> kind int8x's int8 codes [..., O, I] (code less
    the scheme's offset), float32 scales [..., O, I / 16] and mins [..., O, I / 32], the same weights exactly
    (w = c * scale - min; a float16 scale widens to float32 exactly; a scale per 32 is given to both halves)."""
    if not supported(s):
        raise ValueError(f"the CPU kernels run int8/int4 with groups of 32 and GGUF's schemes, not {s}")
    c = codes if s.bits == 8 else quant.unpack_int4(codes)
    c = (c.to(torch.int16) - s.offset()).to(torch.int8)
    sc = scales.to(torch.float32)
    if s.with_min:
        sc, mins = sc[..., 0], sc[..., 1]
    else:
        mins = torch.zeros((*sc.shape[:-1], c.shape[-1] // 32), dtype=torch.float32)
    if s.group_size == 32:
        sc = sc.repeat_interleave(2, dim=-1)
    return c, sc.contiguous(), mins.contiguous()


def factor_scales(v: torch.Tensor, per: int, extremes: tuple[int, ...], lo: int, hi: int
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """float32 scales v [..., O, m] -> (float16 d [..., O, m / per], integers c [..., O, m] in [lo, hi]) with
    float32(d) * c == v exactly, or None where no such form is found. GGUF's K types are made this way (llama.cpp
    sets d = the super-block's largest scale over the integer range's end: 63 for Q4_K's, -128 for Q6_K's), so d is
    sought as the largest-magnitude scale over each of `extremes` in turn, and every candidate checked exactly."""
    if v.shape[-1] % per or v.numel() == 0:
        return None
    vb = v.to(torch.float32).reshape(*v.shape[:-1], -1, per)
    vmax = vb.gather(-1, vb.abs().argmax(-1, keepdim=True))
    d = torch.zeros_like(vmax)
    c = torch.zeros_like(vb)
    solved = vmax == 0
    for e in extremes:
        cand = (vmax / e).to(torch.float16).to(torch.float32)
        safe = torch.where(cand == 0, torch.ones_like(cand), cand)
        q = torch.round(vb / safe)
        ok = ~solved & (cand != 0) & ((q >= lo) & (q <= hi) & (q * cand == vb)).all(-1, keepdim=True)
        d, c = torch.where(ok, cand, d), torch.where(ok, q, c)
        solved |= ok
    if not bool(solved.all()):
        return None
    return d[..., 0].to(torch.float16), c.reshape(v.shape)


def _panels(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[..., O, m] -> bytes of [..., P, m, 16] (each panel's 16 rows side by side), flattened per matrix."""
    *lead, _, m = t.shape
    p = _pad_rows(t, rows).view(*lead, rows // PANEL, PANEL, m).movedim(-2, -1).contiguous()
    return p.view(torch.uint8).reshape(*lead, -1)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[-2] == rows:
        return t
    pad = t.new_zeros((*t.shape[:-2], rows - t.shape[-2], t.shape[-1]))
    return torch.cat([t, pad], dim=-2)


def pack(codes: torch.Tensor, scales: torch.Tensor, s: quant.Scheme, compact: bool = True) -> torch.Tensor:
    """(codes, scales) of scheme s for W [..., O, I] -> uint8 blobs [..., bytes], one per matrix, in the layout of
    csrc/qpacked.h (header, codes by panels of 16 rows, float16 scales [panels, n, 16]). compact=False keeps
    GGUF's schemes in the float32-scale kinds (int4m, int8x), which compute the same bits in more bytes."""
    if not supported(s):
        raise ValueError(f"the CPU kernels run int8/int4 with groups of 32, not {s}")
    if not native(s) and not int4m(s):
        k5 = int5k_form(codes, scales, s, compact)
        if k5 is not None:
            return _pack_int5k(codes, k5)
        return pack_int8x(*to_int8x(codes, scales, s), compact=compact)
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
    code_bytes = c.reshape(*lead, -1)
    k4 = None
    if int4m(s) and compact:  # Q4_K in GGUF's own form (kind int4k) when its scales and mins factor exactly
        fs, fm = (factor_scales(scales[..., k], 8, (63,), 0, 255) for k in (0, 1))
        k4 = (fs, fm) if fs is not None and fm is not None else None
    if k4 is not None:  # float16 d, dmin [P, n/8, 16], then uint8 sc, m [P, n, 16]
        (d, sc), (dm, mq) = k4
        scale_bytes = torch.cat([_panels(d, rows), _panels(dm, rows), _panels(sc.to(torch.uint8), rows),
                                 _panels(mq.to(torch.uint8), rows)], dim=-1)
    elif int4m(s):  # float32 scales [P, n, 16], then float32 mins [P, n, 16]
        parts = [_pad_rows(scales[..., k].contiguous(), rows).view(*lead, panels, PANEL, n).movedim(-2, -1)
                 .contiguous().view(torch.uint8).reshape(*lead, -1) for k in (0, 1)]
        scale_bytes = torch.cat(parts, dim=-1)
    else:
        sc = _pad_rows(scales.to(torch.float16), rows).view(*lead, panels, PANEL, n).movedim(-2, -1).contiguous()
        scale_bytes = sc.view(torch.uint8).reshape(*lead, -1)
    kind = KIND_INT4K if k4 is not None else KIND_INT4M if int4m(s) else KIND[s.bits]
    return _header_blob(kind, o, i, g, code_bytes, scale_bytes)


def _six_bit(c: torch.Tensor) -> torch.Tensor:
    """int8x's code bytes [..., P, n, 16 steps, 32] (every code in [-32, 31]) -> kind int6x's [..., P, n, 384]:
    u = c + 32; 8 chunks of nibbles (step k low, step k + 8 high), then 4 chunks of top bits (steps k, k + 4,
    k + 8, k + 12 at shifts 0, 2, 4, 6), as csrc/qpacked.h reads them."""
    u = (c.to(torch.int16) + 32).to(torch.uint8)
    lo, top = u & 0x0F, u >> 4
    nib = lo[..., :8, :] | (lo[..., 8:, :] << 4)
    hi = top[..., 0:4, :] | (top[..., 4:8, :] << 2) | (top[..., 8:12, :] << 4) | (top[..., 12:16, :] << 6)
    return torch.cat([nib, hi], dim=-2).flatten(-2)


def _int4_layout(q: torch.Tensor, rows: int) -> torch.Tensor:
    """Values q [..., O, I] (one nibble's worth each, uint8) -> int4's code order [..., P, n, 4, 16, 4, 2]: per group
    4 chunks of (16 rows x 4 inputs), the last dim pairing the low-nibble value with the high-nibble one."""
    *lead, o, i = q.shape
    q = _pad_rows(q, rows).view(*lead, rows // PANEL, PANEL, i // 32, 4, 2, 4)
    return q.movedim(-5, -3).movedim(-2, -1)


def _header_blob(kind: int, o: int, i: int, g: int, code_bytes: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    lead = code_bytes.shape[:-1]
    codes_off = HEADER_BYTES
    scales_off = codes_off + code_bytes.shape[-1]
    total = -(-(scales_off + tail.shape[-1]) // 64) * 64
    header = torch.tensor([MAGIC, kind, o, i, g, codes_off, scales_off, total], dtype=torch.int64)
    blob = torch.zeros((*lead, total), dtype=torch.uint8)
    blob[..., :HEADER_BYTES] = header.view(torch.uint8)
    blob[..., codes_off:scales_off] = code_bytes
    blob[..., scales_off:scales_off + tail.shape[-1]] = tail
    return blob


def _pack_int5k(codes: torch.Tensor, form: tuple) -> torch.Tensor:
    """Kind int5k: the low nibbles in int4's layout, then per group 64 bytes of fifth bits (bit b of byte j: the
    top bit of the value behind nibble j of nibble vector b), then int4k's scales and mins."""
    *lead, o, i = codes.shape
    rows = -(-o // PANEL) * PANEL
    u = codes.to(torch.uint8)
    lo, top = _int4_layout(u & 0x0F, rows), _int4_layout(u >> 4, rows)  # [..., P, n, 4, 16, 4, 2]
    nib = (lo[..., 0] | (lo[..., 1] << 4)).flatten(-3)  # [..., P, n, 256]
    shifts = (2 * torch.arange(4).view(4, 1, 1, 1) + torch.arange(2)).to(torch.uint8)  # bit 2k + pair
    plane = (top << shifts).sum(-4, dtype=torch.uint8)  # [..., P, n, 16, 4, 2] -> bits of 4 chunks
    plane = (plane[..., 0] | plane[..., 1]).flatten(-2)  # [..., P, n, 64]
    code_bytes = torch.cat([nib, plane], dim=-1).reshape(*lead, -1)
    d, sc, dm, mq = form
    tail = torch.cat([_panels(d, rows), _panels(dm, rows), _panels(sc.to(torch.uint8), rows),
                      _panels(mq.to(torch.uint8), rows)], dim=-1)
    return _header_blob(KIND_INT5K, o, i, 32, code_bytes, tail)


def int6k_form(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, compact: bool = True):
    """For kind int8x's tensors (to_int8x) that are Q6_K's - every code in [-32, 31], no mins, scales per 16 that
    factor as GGUF makes them (factor_scales) - (float16 d [..., O, I/256], int8 sc [..., O, I/16]); else None.
    Such weights go to kind int6k, whose product reads int8 activations (linear_int6k_acts)."""
    if not (compact and codes.numel() and codes.shape[-1] % 256 == 0 and int(codes.min()) >= -32
            and int(codes.max()) <= 31 and not bool(mins.any())):
        return None
    k6 = factor_scales(scales, 16, (-128, 128, 127, -127), -128, 127)
    return None if k6 is None else (k6[0], k6[1].to(torch.int8))


def _pack_int6k(codes: torch.Tensor, form: tuple) -> torch.Tensor:
    """Kind int6k: u = c + 32 in [0, 63]; its low nibbles in int4's layout (256 bytes per group of a panel), then two
    64-byte planes of the top two bits (plane p, byte j: nibble vectors 4p .. 4p + 3 at shifts 0, 2, 4, 6, nibble
    vector b = 2k for the low nibbles of the k-th 64 bytes, 2k + 1 for their high ones), then float16 d
    [P, I/256, 16] and int8 sc [P, I/16, 16]."""
    *lead, o, i = codes.shape
    rows = -(-o // PANEL) * PANEL
    u = (codes.to(torch.int16) + 32).to(torch.uint8)
    lo, top = _int4_layout(u & 0x0F, rows), _int4_layout(u >> 4, rows)  # [..., P, n, 4, 16, 4, 2]
    nib = (lo[..., 0] | (lo[..., 1] << 4)).flatten(-3)  # [..., P, n, 256]
    shifts = (2 * (2 * torch.arange(4).view(4, 1, 1, 1) + torch.arange(2)) % 8).to(torch.uint8)  # 2 (b mod 4)
    t = top << shifts  # [..., P, n, 4 (k), 16, 4, 2 (pair)]: vector b = 2k + pair at its shift, plane k // 2
    planes = torch.stack([t[..., 0:2, :, :, :].sum(-4, dtype=torch.uint8),
                          t[..., 2:4, :, :, :].sum(-4, dtype=torch.uint8)], dim=-4)  # [..., P, n, 2, 16, 4, 2]
    planes = (planes[..., 0] | planes[..., 1]).flatten(-3)  # [..., P, n, 128]
    code_bytes = torch.cat([nib, planes], dim=-1).reshape(*lead, -1)
    d, sc = form
    tail = torch.cat([_panels(d, rows), _panels(sc, rows)], dim=-1)
    return _header_blob(KIND_INT6K, o, i, 16, code_bytes, tail)


def pack_int8x(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, compact: bool = True) -> torch.Tensor:
    """Kind int8x (to_int8x's tensors) -> blobs: codes laid out as int8's, then float32 scales [panels, I/16, 16]
    and mins [panels, I/32, 16] (header group size 16). compact: when every code is in [-32, 31] (all of GGUF's
    5- and 6-bit and 4-bit-with-min types), kind int6x instead: the same weights and product in 6-bit codes, and
    kind int6 when the mins are all zero as well (Q6_K: none stored; the product's bits are the same); Q6_K's own
    form (int6k_form) goes to kind int6k, which reads int8 activations as llama.cpp's Q6_K product does."""
    *lead, o, i = codes.shape
    if i % 32:
        raise ValueError(f"the CPU kernels need inputs in multiples of 32, not {i}")
    k6 = int6k_form(codes, scales, mins, compact)
    if k6 is not None:
        return _pack_int6k(codes, k6)
    n = i // 32
    rows = -(-o // PANEL) * PANEL
    panels = rows // PANEL
    c = _pad_rows(codes, rows).view(*lead, panels, PANEL, n, 16, 2).movedim(-4, -2).contiguous()
    six = compact and codes.numel() > 0 and int(codes.min()) >= -32 and int(codes.max()) <= 31
    c = _six_bit(c.view(*lead, panels, n, 16, 32)) if six else c.view(torch.uint8)
    sc = _pad_rows(scales, rows).view(*lead, panels, PANEL, 2 * n).movedim(-2, -1).contiguous()
    mn = _pad_rows(mins, rows).view(*lead, panels, PANEL, n).movedim(-2, -1).contiguous()
    code_bytes = c.reshape(*lead, -1)
    no_mins = six and not bool(mins.any())
    tail = sc.view(torch.uint8).reshape(*lead, -1)
    if not no_mins:
        tail = torch.cat([tail, mn.view(torch.uint8).reshape(*lead, -1)], dim=-1)
    kind = KIND_INT6 if no_mins else KIND_INT6X if six else KIND_INT8X
    return _header_blob(kind, o, i, 16, code_bytes, tail)


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
    five = int5k_form(codes, scales, s) is not None
    if int4m(s) or five:  # int8 activations (as int4's): y = sum_g d_g (scale sum_i c q - min sum_i q)
        q, d = quantize_acts(x, 32, ACT_QMAX[4])
        w = (codes if five else quant.unpack_int4(codes)).to(torch.float64)
        o, i = w.shape
        w = w.view(o, i // 32, 32)
        isum = torch.einsum("tng,ong->ton", q.to(torch.float64), w)
        sc = scales.to(torch.float64)
        per_group = isum * sc[None, ..., 0] - sc[None, ..., 1] * q.to(torch.float64).sum(-1)[:, None, :]
        return (per_group * d[..., 0].to(torch.float64)[:, None]).sum(-1)
    if not native(s):
        parts = to_int8x(codes, scales, s)
        if int6k_form(*parts) is not None:
            return linear_int6k_acts(x, parts[0], parts[1])
        return linear_int8x_acts(x, *parts)
    q, d = quantize_acts(x, s.group_size, ACT_QMAX[s.bits])  # [T, n, G], [T, n, 1]
    w = (codes.to(torch.float64) if s.bits == 8 else quant.unpack_int4(codes).to(torch.float64) - 8)
    o, i = w.shape
    w = w.view(o, i // s.group_size, s.group_size)  # [O, n, G]
    isum = torch.einsum("tng,ong->ton", q.to(torch.float64), w)  # exact integers
    return (isum * scales.to(torch.float64)[None] * d[..., 0].to(torch.float64)[:, None]).sum(-1)


def linear_int8x_acts(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
                      ) -> torch.Tensor:
    """Kind int8x's product: y = sum_g d[g] (sum_h in g scale[o, h] sum_i in h code[o, i] q[i] - min[o, g] sum_i q[i])
    with int16 activations per 32: x [T, I] -> [T, O] float64."""
    q, d = quantize_acts(x, 32, ACT_QMAX[8])  # [T, n, 32], [T, n, 1]
    o, i = codes.shape
    q64 = q.to(torch.float64)
    halves = torch.einsum("thk,ohk->toh", q64.reshape(q.shape[0], i // 16, 16),
                          codes.to(torch.float64).view(o, i // 16, 16))  # exact integers per 16
    per_group = (halves * scales.to(torch.float64)[None]).view(q.shape[0], o, i // 32, 2).sum(-1)
    per_group = per_group - mins.to(torch.float64)[None] * q64.sum(-1)[:, None, :]
    return (per_group * d[..., 0].to(torch.float64)[:, None]).sum(-1)


def linear_int6k_acts(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Kind int6k's product: linear_int8x_acts's with int8 activations per 32 and no mins: y = sum_g d[g] sum_h in g
    scale[o, h] sum_i in h code[o, i] q[i], x [T, I] -> [T, O] float64."""
    q, d = quantize_acts(x, 32, ACT_QMAX[4])
    o, i = codes.shape
    halves = torch.einsum("thk,ohk->toh", q.to(torch.float64).reshape(q.shape[0], i // 16, 16),
                          codes.to(torch.float64).view(o, i // 16, 16))
    per_group = (halves * scales.to(torch.float64)[None]).view(q.shape[0], o, i // 32, 2).sum(-1)
    return (per_group * d[..., 0].to(torch.float64)[:, None]).sum(-1)


def kernel_matrix(ops, mods: list) -> torch.Tensor:
    """The tensor the C++ kernels read for the weights of `mods` (Linear or StackedLinear modules whose outputs are
    stacked along the rows, e.g. [gate; up]): a quantised blob (pack) when they all hold one scheme the kernels
    run, an int8x blob when they hold different ones, else ops.pack's bf16 layout of the (dequantised) weights, with a warning, since that costs memory."""
    schemes = {m.quant for m in mods}
    s = next(iter(schemes))
    if len(schemes) == 1 and s is not None and supported(s):
        rows = -3 if s.with_min else -2  # scales with mins are [..., O, n, 2]
        return pack(torch.cat([m.weight for m in mods], dim=-2), torch.cat([m.weight_scale for m in mods], dim=rows), s)
    if None not in schemes and all(supported(q) for q in schemes):
        # Different schemes fused into one matrix (a GGUF file's q_a in Q4_K beside kv_a in Q6_K): all in int8x.
        parts = [to_int8x(m.weight, m.weight_scale, m.quant) for m in mods]
        return pack_int8x(*(torch.cat([p[k] for p in parts], dim=-2) for k in range(3)))
    if schemes != {None}:
        log.warning("the CPU kernels run these weights (%s) in bf16: they run int8/int4 with groups of 32 when every "
                    "projection fused into one matrix holds the same scheme", ", ".join(sorted(
                        "bf16" if q is None else q.name for q in schemes)))
    w = [m.dense(slice(None), torch.bfloat16) if hasattr(m, "dense") else m.effective_weight(torch.bfloat16)
         for m in mods]
    return ops.pack(torch.cat(w, dim=-2).detach().contiguous())
