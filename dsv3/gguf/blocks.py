"""GGUF's block formats -> dsv3's quantised weights (kernels/quant.py), losslessly: the codes are GGUF's codes and the
group scales (and mins) are GGUF's d * sc (and dmin * m) in float32, exact products of a float16 and an integer of at
most 8 bits, so quant.dequantize gives back exactly what gguf.quants.dequantize gives.

Layouts (one block of a row; d, dmin float16 little-endian; ggml's ggml-common.h defines them):
  Q8_0  34 B / 32:  d, 32 int8 q.                                  w = d * q              -> int8 (identical)
  Q4_0  18 B / 32:  d, 16 B: value j in the low nibble of byte j,   w = d * (q - 8)        -> int4 (nibbles
                    value j + 16 in its high nibble.                                          re-paired)
  Q4_1  20 B / 32:  d, m, nibbles as Q4_0.                         w = d * q + m          -> int4 with min -m
  Q5_0  22 B / 32:  d, qh (uint32: bit j = bit 4 of value j), nibbles as Q4_0.  w = d * (q - 16) -> int8 (codes
                    q - 16, a float16 scale per 32: dsv3's own int8, so these run on the C++ kernels too)
  Q5_1  24 B / 32:  d, m, qh, nibbles.                             w = d * q + m          -> int8 codes with min -m
  (llama.cpp's K-quant files fall back to these for rows that are not a multiple of 256, e.g. DeepSeek's attn_k_b.)
  Q4_K 144 B / 256: d, dmin, 12 B of 6-bit (sc, m) x 8 sub-blocks, 128 B of nibbles: each 32-byte chunk c holds
                    sub-block 2c in its low nibbles and 2c + 1 in its high ones.  w = d*sc * q - dmin*m
  Q5_K 176 B / 256: as Q4_K plus 32 B qh before the nibbles: bit b of qh[j] is bit 4 of value j of sub-block b.
  Q6_K 210 B / 256: 128 B ql, 64 B qh, 16 int8 scales, d. 16 groups of 16: w = d*sc * (q - 32), q 6-bit: the low
                    4 bits from ql (each 64-byte half holds 4 runs of 32 values, low nibbles then high), the top 2
                    from qh (each 32-byte quarter holds 4 runs of 32 values at bit shifts 0, 2, 4, 6).
Dimension letters: R rows, n blocks per row.
"""
from __future__ import annotations

import numpy as np
import torch

from ..kernels import quant

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# The scheme each quantised GGUF type is repacked to.
SCHEMES = {
    "Q8_0": quant.Scheme(8),
    "Q4_0": quant.Scheme(4),
    "Q4_1": quant.Scheme(4, 32, torch.float32, True, label="q4_1"),
    "Q5_0": quant.Scheme(8),
    "Q5_1": quant.Scheme(8, 32, torch.float32, True, label="q5_1"),
    "Q4_K": quant.Scheme(4, 32, torch.float32, True, label="q4_k"),
    "Q5_K": quant.Scheme(8, 32, torch.float32, True, label="q5_k"),
    "Q6_K": quant.Scheme(8, 16, torch.float32, False, label="q6_k"),
}
BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
SUPPORTED = tuple(FLOAT_TYPES) + tuple(SCHEMES)


def _owned(raw: np.ndarray) -> np.ndarray:
    """A writable uint8 copy of a chunk of the read-only memory map (torch refuses to wrap read-only memory)."""
    return np.array(raw, copy=True, order="C").view(np.uint8)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 (little-endian) -> [...] float32."""
    return b.contiguous().view(torch.float16)[..., 0].float()


def _nibbles(b: torch.Tensor) -> torch.Tensor:
    """[..., k] bytes -> [..., 2, k]: low nibbles, then high nibbles."""
    return torch.stack((b & 0xF, b >> 4), dim=-2)


def _scale_min_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 scale bytes [..., 12] -> 6-bit scales and mins [..., 8] (ggml's get_scale_min_k4)."""
    d, m, md = sc[..., 0:4], sc[..., 4:8], sc[..., 8:12]
    scales = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mins = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return scales, mins


def decode(type_name: str, raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes [R, n * block bytes] of one GGUF type -> (codes, scales) of SCHEMES[type_name] for the [R, n * block
    values] weight they hold."""
    b = torch.from_numpy(_owned(raw))
    rows = b.shape[0]
    vals, size = BLOCK[type_name]
    b = b.view(rows, -1, size)  # [R, n, block bytes]
    n = b.shape[1]
    if type_name == "Q8_0":
        return b[..., 2:].contiguous().view(torch.int8).reshape(rows, n * 32), b[..., :2].contiguous().view(
            torch.float16)[..., 0]
    if type_name == "Q4_0":
        q = _nibbles(b[..., 2:]).reshape(rows, n * 32)
        return quant.pack_int4(q), b[..., :2].contiguous().view(torch.float16)[..., 0]
    if type_name in ("Q4_1", "Q5_0", "Q5_1"):
        d = b[..., :2].contiguous().view(torch.float16)[..., 0]
        q = _nibbles(b[..., -16:]).reshape(rows, n, 32)
        if type_name != "Q4_1":
            qh = b[..., -20:-16].contiguous().view(torch.int32)[..., 0]  # [R, n], little-endian bits
            hi = torch.stack([(qh >> k) & 1 for k in range(32)], dim=-1).to(torch.uint8)  # [R, n, 32]
            q = q | (hi << 4)
        if type_name == "Q5_0":
            return (q.to(torch.int16) - 16).to(torch.int8).reshape(rows, n * 32), d
        m = b[..., 2:4].contiguous().view(torch.float16)[..., 0]
        scales = torch.stack((d.float(), -m.float()), dim=-1)  # w = d * q - (-m)
        codes = quant.pack_int4(q.reshape(rows, n * 32)) if type_name == "Q4_1" else q.view(torch.int8)
        return codes.reshape(rows, -1), scales
    if type_name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # [R, n]
        sc, m = _scale_min_k4(b[..., 4:16])  # [R, n, 8]
        scales = torch.stack((d[..., None] * sc.float(), dmin[..., None] * m.float()), dim=-1)  # [R, n, 8, 2]
        qs = b[..., -128:].reshape(rows, n, 4, 32)
        q = _nibbles(qs).reshape(rows, n, 8, 32)  # sub-block 2c: low nibbles of chunk c, 2c + 1: high
        if type_name == "Q5_K":
            qh = b[..., 16:48]  # [R, n, 32]
            hi = torch.stack([(qh >> k) & 1 for k in range(8)], dim=-2)  # [R, n, 8, 32]
            q = (q | (hi << 4)).view(torch.int8).reshape(rows, n * 256)
        else:
            q = quant.pack_int4(q.reshape(rows, n * 256))
        return q, scales.reshape(rows, n * 8, 2)
    if type_name == "Q6_K":
        ql, qh = b[..., 0:128], b[..., 128:192]
        sc = b[..., 192:208].contiguous().view(torch.int8).float()  # [R, n, 16]
        d = _f16(b[..., 208:210])
        low = _nibbles(ql.reshape(rows, n, 2, 64)).reshape(rows, n, 2, 2, 2, 32)  # [half, nibble, run, 32]
        low = low.reshape(rows, n, 8, 32)
        high = torch.stack([(qh.reshape(rows, n, 2, 32) >> s) & 3 for s in (0, 2, 4, 6)], dim=-2)  # [R,n,2,4,32]
        q = (low | (high.reshape(rows, n, 8, 32) << 4)).to(torch.int16) - 32
        return q.to(torch.int8).reshape(rows, n * 256), (d[..., None] * sc).reshape(rows, n * 16)
    raise ValueError(f"no decoder for GGUF type {type_name}")


def to_float(type_name: str, raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes of any supported type -> the float32 values [*shape] (F32/F16/BF16 converted, quantised dequantised
    exactly)."""
    if type_name in FLOAT_TYPES:
        t = torch.from_numpy(_owned(raw)).view(FLOAT_TYPES[type_name])
        return t.float().reshape(shape)
    flat = np.ascontiguousarray(raw).reshape(-1, raw.shape[-1])
    codes, scales = decode(type_name, flat)
    return quant.dequantize(codes, scales, SCHEMES[type_name]).reshape(shape)
