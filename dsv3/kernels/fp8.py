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


def scale_shape(weight_shape: tuple[int, ...], block: int = BLOCK, offset: tuple[int, int] = (0, 0)
                ) -> tuple[int, ...]:
    """Shape of the scales covering a weight (or a window of one starting `offset` rows/cols into a block)."""
    *lead, o, i = weight_shape
    return (*lead, -(-(offset[0] + o) // block), -(-(offset[1] + i) // block))


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
               block: int = BLOCK, offset: tuple[int, int] = (0, 0), out: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Exact block dequantisation: each product q * scale is formed in float32, then cast to `dtype`
    (bit-identical to `q.float() * scale_inv[i // b, j // b]`).

    q [..., O, I] may be a window of a larger weight whose first element sits `offset` = (row, col) into its block;
    scale_inv then holds the scales of the blocks the window touches. With `out`, the result is written there
    (any dtype) instead of allocating."""
    *lead, o, i = q.shape
    ro, co = offset
    want = scale_shape(tuple(q.shape), block, offset)
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match weight shape {tuple(q.shape)} "
                         f"(expected {want} for {block}x{block} blocks)")
    nbo, nbi = want[-2], want[-1]
    s = scale_inv.to(torch.float32).reshape(*lead, nbo, 1, nbi, 1)
    if ro == co == 0 and o == nbo * block and i == nbi * block:
        # Whole blocks: broadcast the scales over a block view, no padding needed.
        w = (q.reshape(*lead, nbo, block, nbi, block).to(torch.float32) * s).reshape(*lead, o, i)
    else:
        # Partial blocks: place q inside a block-aligned float32 buffer, scale it block-wise in place, crop.
        # The padding is never read, so it is left uninitialised.
        buf = torch.empty(*lead, nbo * block, nbi * block, dtype=torch.float32, device=q.device)
        w = buf[..., ro:ro + o, co:co + i]
        w.copy_(q)
        buf.view(*lead, nbo, block, nbi, block).mul_(s)
    if out is not None:
        return out.copy_(w)
    return w.to(dtype).contiguous()


def quantize(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise quantisation to the official format: scale_inv = amax(block) / 448, q = w / scale_inv.
    All-zero blocks get scale 1 (the official recipe would divide by zero)."""
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
