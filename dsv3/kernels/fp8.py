"""FP8 (float8_e4m3fn) weights with one float32 scale per 128x128 block, as in the official checkpoints.

Dimension letters: O output features, I input features, E experts, b block size (128).
A weight w[O, I] is stored as fp8 q[O, I] and scale_inv[ceil(O/b), ceil(I/b)]; the real weight is
q[i, j] * scale_inv[i // b, j // b], edge blocks being partial.
"""
from __future__ import annotations

import torch

BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def scale_shape(weight_shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, ...]:
    *lead, o, i = weight_shape
    return (*lead, -(-o // block), -(-i // block))


def expand_scales(scale_inv: torch.Tensor, o: int, i: int, block: int = BLOCK) -> torch.Tensor:
    """[..., ceil(O/b), ceil(I/b)] -> [..., O, I] by repeating each scale over its block (edges cropped)."""
    s = scale_inv.repeat_interleave(block, dim=-2)[..., :o, :]
    return s.repeat_interleave(block, dim=-1)[..., :i]


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
               block: int = BLOCK) -> torch.Tensor:
    """Exact block dequantisation: the product is formed in float32, then cast to `dtype`."""
    *_, o, i = q.shape
    if tuple(scale_inv.shape) != scale_shape(tuple(q.shape), block):
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match weight shape {tuple(q.shape)} "
                         f"(expected {scale_shape(tuple(q.shape), block)} for {block}x{block} blocks)")
    if o % block == 0 and i % block == 0:
        # Fast path without materialising expanded scales: view as blocks and broadcast.
        lead = q.shape[:-2]
        qb = q.reshape(*lead, o // block, block, i // block, block).to(torch.float32)
        w = qb * scale_inv.to(torch.float32).reshape(*lead, o // block, 1, i // block, 1)
        return w.reshape(*lead, o, i).to(dtype)
    return (q.to(torch.float32) * expand_scales(scale_inv.to(torch.float32), o, i, block)).to(dtype)


def quantize(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise quantisation to the official format: scale_inv = amax(block) / 448, q = w / scale_inv."""
    *lead, o, i = w.shape
    po, pi = -(-o // block) * block, -(-i // block) * block
    wf = w.to(torch.float32)
    if (po, pi) != (o, i):
        wf = torch.nn.functional.pad(wf, (0, pi - i, 0, po - o))
    blocks = wf.reshape(*lead, po // block, block, pi // block, block)
    amax = blocks.abs().amax(dim=(-3, -1), keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(*lead, po, pi)[..., :o, :i].contiguous()
    return q, scale.reshape(*lead, po // block, pi // block).contiguous()
