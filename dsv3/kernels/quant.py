"""Weight-only integer quantisation (int8, int4) in groups along the input dimension: the formats and their math.

Dimension letters: O output features, I input features (a multiple of the group size G), E experts (any leading
dims), n = I // G groups per row.

  int8: codes q int8 [..., O, I] in [-127, 127], one float16 scale d per group: w = q * d (GGUF's Q8_0 values).
  int4: codes in [0, 15] two to a byte, column 2j in the low nibble of byte j: uint8 [..., O, I // 2];
        one float16 scale d per group, w = (q - 8) * d (GGUF's Q4_0 values).
Scales are float16 [..., O, n]. Dequantisation forms every product in float32 (exact: a 4- or 8-bit integer times a
float16 has at most 19 significant bits), which is what the quantised products compute with: `linear` here is the
reference every quantised kernel is tested against.

GGUF's K-quants (dsv3/gguf/blocks.py repacks them losslessly) need three more freedoms, so a Scheme also has:
  scale_dtype float32: a K-quant group's scale is d * sc (a float16 times a 6- or 8-bit integer: exact in float32,
        not in float16);
  with_min: w = q * s - m with unsigned codes (no offset) and scales [..., O, n, 2] holding (s, m) per group
        (Q4_K: 4-bit codes packed as int4; Q5_K: 5-bit codes held as int8);
  group_size 16 (Q6_K: int8 codes q - 32, one float32 scale per 16).
Dequantisation computes q * s - m in float32 in that order, the same two roundings as gguf.quants.dequantize, so the
values are GGUF's exactly. `quantize` makes only dsv3's own int8/int4; K-quant codes are only ever read from files.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

GROUP_SIZE = 32
SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class Scheme:
    """One quantisation format: its bits per code, group size, scale dtype and whether groups have a min."""

    bits: int
    group_size: int = GROUP_SIZE
    scale_dtype: torch.dtype = SCALE_DTYPE
    with_min: bool = False
    label: str | None = field(default=None, compare=False)  # a display name (GGUF's type, e.g. "q4_k")

    @property
    def name(self) -> str:
        if self.label is not None:
            return self.label
        if self.is_default:
            return f"int{self.bits}"
        return (f"int{self.bits}{'-min' if self.with_min else ''}-g{self.group_size}"
                f"-{str(self.scale_dtype).removeprefix('torch.')}")

    @property
    def is_default(self) -> bool:
        """dsv3's own int8 / int4 (what `quantize` makes and the C++ kernels run)."""
        return self.group_size == GROUP_SIZE and self.scale_dtype == SCALE_DTYPE and not self.with_min

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.bits == 8 else torch.uint8

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, the group's scale (and min) included."""
        return self.bits + self.scale_dtype.itemsize * 8 * (2 if self.with_min else 1) / self.group_size

    def code_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        *lead, o, i = shape
        return (*lead, o, i * self.bits // 8)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        *lead, o, i = shape
        return (*lead, o, i // self.group_size, *((2,) if self.with_min else ()))

    def offset(self) -> int:
        """What is subtracted from a code before it is scaled: 8 for int4 without a min, else 0."""
        return 8 if self.bits == 4 and not self.with_min else 0

    def in_features(self, code_shape: tuple[int, ...]) -> int:
        """The input dimension of a weight from the last dimension of its codes."""
        return code_shape[-1] * 8 // self.bits

    def check_divides(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) < 2 or shape[-1] % self.group_size or shape[-1] == 0:
            raise ValueError(f"{name}: {self.name} quantisation groups {self.group_size} weights along the input "
                             f"dimension, which must be a positive multiple of {self.group_size}; this weight is "
                             f"{list(shape)}")


SCHEMES = {"int8": Scheme(8), "int4": Scheme(4)}
QUANTIZE_CHOICES = tuple(SCHEMES)


def scheme(name: str) -> Scheme:
    """The scheme called `name` ('int8' or 'int4'), or a ValueError that lists the choices."""
    if name not in SCHEMES:
        raise ValueError(f"unknown quantisation {name!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    return SCHEMES[name]


def _int4_scales(g: torch.Tensor) -> torch.Tensor:
    """Per-group float16 scales for int4 codes of float32 groups g [..., n, G]: the scale that minimises the squared
    error of round-to-nearest codes among 12 candidates m / k, m the group's value of largest magnitude: k = -8
    (Q4_0's choice: m lands on code -8), k from -8.5 to -6.75 and from 6.75 to 7.5 (m on the positive side or
    slightly clipped). On the embedded model this lowers the next-token KL divergence from 0.0047 (k = -8 alone)
    to 0.0042 (docs/quantization.md); 12 candidates cost ~0.04 s per million weights on two cores."""
    amax_idx = g.abs().argmax(-1, keepdim=True)
    signed_max = torch.gather(g, -1, amax_idx)  # the value of largest magnitude, with its sign
    best_d = (signed_max / -8).to(SCALE_DTYPE)
    best_err = _int4_error(g, best_d)
    for k in _INT4_CANDIDATES:
        d = (signed_max / k).to(SCALE_DTYPE)
        err = _int4_error(g, d)
        better = err < best_err
        best_d = torch.where(better, d, best_d)
        best_err = torch.where(better, err, best_err)
    return best_d.squeeze(-1)


_INT4_CANDIDATES = (-8.5, -8.25, -7.75, -7.5, -7.25, -7.0, -6.75, 6.75, 7.0, 7.25, 7.5)


def _int4_codes(g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest codes in [0, 15] (offset 8) of groups g [..., n, G] for scales d [..., n, 1]."""
    df = d.float()
    inv = torch.where(df != 0, 1.0 / df, torch.zeros_like(df))
    return (torch.round(g * inv) + 8).clamp_(0, 15)


def _int4_error(g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    q = _int4_codes(g, d)
    return ((q - 8) * d.float() - g).pow_(2).sum(-1, keepdim=True)


def quantize(w: torch.Tensor, s: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., O, I] (any float dtype) -> (codes, scales) in the format of scheme s (see the module docstring)."""
    if not s.is_default:
        raise ValueError(f"dsv3 quantises to int8 or int4 only; {s.name} weights are read from GGUF files as stored")
    s.check_divides("weight", tuple(w.shape))
    *lead, o, i = w.shape
    n = i // s.group_size
    g = w.to(torch.float32).reshape(*lead, o, n, s.group_size)
    if s.bits == 8:
        d = (g.abs().amax(-1, keepdim=True) / 127).to(SCALE_DTYPE)
        df = d.float()
        inv = torch.where(df != 0, 1.0 / df, torch.zeros_like(df))
        q = torch.round(g * inv).clamp_(-127, 127).to(torch.int8).reshape(*lead, o, i)
        return q, d.reshape(*lead, o, n)
    d = _int4_scales(g).unsqueeze(-1)
    q = _int4_codes(g, d).to(torch.uint8).reshape(*lead, o, i)
    return pack_int4(q), d.reshape(*lead, o, n)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes [..., I] in [0, 15] (uint8) -> bytes [..., I // 2], column 2j in the low nibble of byte j."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(b: torch.Tensor) -> torch.Tensor:
    """Bytes [..., I // 2] -> codes [..., I] (uint8 in [0, 15])."""
    return torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, s: Scheme, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """(codes, scales) of scheme s -> the weight [..., O, I]: each code times its group's scale in float32 (exact),
    then cast to dtype."""
    want = s.scale_shape((*codes.shape[:-1], s.in_features(tuple(codes.shape))))
    if tuple(scales.shape) != want:
        raise ValueError(f"{s.name} scales {list(scales.shape)} do not match codes {list(codes.shape)} "
                         f"(expected {list(want)}: one scale per {s.group_size} weights of a row)")
    q = codes.to(torch.float32) if s.bits == 8 else unpack_int4(codes).to(torch.float32)
    if s.offset():
        q -= s.offset()
    *lead, o, i = q.shape
    sc = scales.to(torch.float32)
    w = q.view(*lead, o, i // s.group_size, s.group_size)
    if s.with_min:
        w = w * sc[..., 0:1] - sc[..., 1:2]  # two roundings in this order, as gguf.quants.dequantize
    else:
        w = w * sc.unsqueeze(-1)
    return w.reshape(*lead, o, i).to(dtype)


def linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, s: Scheme) -> torch.Tensor:
    """The reference quantised product: y = x W^T in float32 with W the exact dequantised weight, rounded to x's
    dtype. x [..., I] -> [..., O]."""
    return F.linear(x.to(torch.float32), dequantize(codes, scales, s)).to(x.dtype)
