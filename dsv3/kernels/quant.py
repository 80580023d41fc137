"""Weight-only integer quantisation (int8, int4) in groups along the input dimension: the formats and their math.

Dimension letters: O output features, I input features (a multiple of the group size G), E experts (any leading
dims), n = I // G groups per row.

  int8: codes q int8 [..., O, I] in [-127, 127], one float16 scale d per group: w = q * d (GGUF's Q8_0 values).
  int4: codes in [0, 15] two to a byte, column 2j in the low nibble of byte j: uint8 [..., O, I // 2];
        one float16 scale d per group, w = (q - 8) * d (GGUF's Q4_0 values).
Scales are float16 [..., O, n]. Dequantisation forms every product in float32 (exact: a 4- or 8-bit integer times a
float16 has at most 19 significant bits), which is what the quantised products compute with: `linear` here is the
reference every quantised kernel is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUP_SIZE = 32
SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class Scheme:
    """One quantisation format: its bits per code and group size."""

    bits: int
    group_size: int = GROUP_SIZE

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.bits == 8 else torch.uint8

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, the group's float16 scale included."""
        return self.bits + 16 / self.group_size

    def code_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        *lead, o, i = shape
        return (*lead, o, i * self.bits // 8)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        *lead, o, i = shape
        return (*lead, o, i // self.group_size)

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
    q = codes.to(torch.float32) if s.bits == 8 else unpack_int4(codes).to(torch.float32) - 8
    *lead, o, i = q.shape
    w = q.view(*lead, o, i // s.group_size, s.group_size) * scales.to(torch.float32).unsqueeze(-1)
    return w.view(*lead, o, i).to(dtype)


def linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, s: Scheme) -> torch.Tensor:
    """The reference quantised product: y = x W^T in float32 with W the exact dequantised weight, rounded to x's
    dtype. x [..., I] -> [..., O]."""
    return F.linear(x.to(torch.float32), dequantize(codes, scales, s)).to(x.dtype)
