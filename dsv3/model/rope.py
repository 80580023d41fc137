"""Rotary position embedding with YaRN frequency blending, applied to INTERLEAVED pairs (x0,x1),(x2,x3),...

Dimension letters: S positions, R rotary dim (qk_rope_head_dim), P = R/2 pairs.
"""
from __future__ import annotations

import math

import torch

from ..config import RopeConfig


def inv_frequencies(rope: RopeConfig, dim: int) -> torch.Tensor:
    """[P] float32 inverse frequencies; with YaRN, blended between f/factor and f over a linear ramp of dims."""
    base = rope.theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not rope.is_yarn:
        return freqs

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp 0 (high-frequency dims): keep f (extrapolate); ramp 1 (low-frequency dims): use f / factor.
    return freqs / rope.factor * ramp + freqs * (1 - ramp)


class RotaryEmbedding:
    """Computes cos/sin for arbitrary position tensors; holds no module state so meta-device builds are free."""

    def __init__(self, rope: RopeConfig, dim: int):
        self.rope, self.dim = rope, dim
        self._inv: dict[torch.device, torch.Tensor] = {}
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # CPU: cos/sin of positions 0..n-1

    def _compute(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev = positions.device
        if dev not in self._inv:
            self._inv[dev] = inv_frequencies(self.rope, self.dim).to(dev)
        angles = positions.to(torch.float32)[..., None] * self._inv[dev]
        s = self.rope.cos_sin_scale
        return angles.cos() * s, angles.sin() * s

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] int -> cos, sin [..., P] float32 (YaRN's mscale ratio folded in). On the CPU they are
        looked up in a table that grows by doubling (two index operations per step instead of five)."""
        if positions.device.type != "cpu" or positions.numel() == 0:
            return self._compute(positions)
        cos, sin = self.tables(int(positions.max()) + 1)
        return cos[positions], sin[positions]

    def tables(self, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The CPU tables cos, sin [N, P] float32 of positions 0..N-1, N >= need (grown by doubling)."""
        if self._table is None or self._table[0].shape[0] < need:
            n = max(need, 4096, 2 * (0 if self._table is None else self._table[0].shape[0]))
            self._table = self._compute(torch.arange(n))
        return self._table


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., S, (heads,) R] with cos/sin broadcastable to [..., S, (heads,) P]; rotation in float32, output in
    x's dtype, pairs stay interleaved (the layout the checkpoints' projections produce)."""
    xf = x.float().unflatten(-1, (-1, 2))  # [..., P, 2]
    x1, x2 = xf[..., 0], xf[..., 1]
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)
