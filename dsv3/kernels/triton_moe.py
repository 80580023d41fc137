"""Triton kernels for the routed experts: grouped GEMMs over expert-sorted rows, and a small-batch path.

Dimension letters: T tokens, K experts per token, N = T*K token-expert pairs, E experts, D hidden, I
moe_intermediate_size, b the FP8 block (128). Weights are stored like StackedLinear: gate/up [E, I, D],
down [E, D, I]; FP8 weights carry scale_inv [E, ceil(O/b), ceil(Iin/b)].

Two paths, both one launch per projection and both free of host synchronisation (CUDA-graph safe):
- grouped (prefill, large batches): rows xs [N, D] sorted by expert with cumulative ends offsets [E]. The grid is an
  upper bound on row tiles (cdiv(N, BLOCK_M) + E, since each expert adds at most one partial tile); every program
  finds its expert and row range from the offsets itself, so no tile map is built on the host. Experts with no rows
  own no tile, so their weights are never read.
- small (decode): no sorting at all. One program per (pair, output tile) reads its expert id from the routing indices
  and does a matrix-vector product, so exactly the selected experts' weights are read; the down kernel also applies
  the routing weights and sums each token's K experts, writing y [T, D] directly.
Gate and up are read by the same program and SwiGLU is applied before anything is stored, so the [N, 2I]
intermediate never exists.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_util import FP8_BLOCK, INTERPRET, dot_precision


@triton.jit
def _load_w(ptr, mask, s_ptr, SCALED: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """A weight tile in the compute dtype; FP8 tiles lie inside one scale block (the wrapper sizes them so)."""
    w = tl.load(ptr, mask=mask, other=0.0)
    if SCALED:
        w = (w.to(tl.float32) * tl.load(s_ptr)).to(OUT_DTYPE)
    else:
        w = w.to(OUT_DTYPE)
    return w


@triton.jit
def _tile_of_expert(offsets_ptr, n_experts, tile, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Which expert owns row tile `tile`, and the tile's row range [row0, row_end)."""
    ex = tl.arange(0, BLOCK_E)
    live = ex < n_experts
    ends = tl.load(offsets_ptr + ex, mask=live, other=0)
    starts = tl.load(offsets_ptr + ex - 1, mask=live & (ex > 0), other=0)
    tiles = tl.where(live, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    last = tl.cumsum(tiles, 0)  # one past each expert's last tile
    e = tl.sum((last <= tile).to(tl.int32), 0)
    first = tl.sum(tl.where(ex == e, last - tiles, 0), 0)
    row0 = tl.sum(tl.where(ex == e, starts, 0), 0) + (tile - first) * BLOCK_M
    row_end = tl.sum(tl.where(ex == e, ends, 0), 0)
    return e, row0, row_end


@triton.jit
def _grouped_kernel(x_ptr, w1_ptr, w2_ptr, out_ptr, offsets_ptr, s1_ptr, s2_ptr,
                    n_experts, n_in, n_out,
                    sx_m, sw_e, sw_o, sw_i, so_m, ss_e, ss_o, ss_i,
                    SWIGLU: tl.constexpr, SCALED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """out[rows] = x[rows] @ w1[e]^T, or silu(x @ w1[e]^T) * (x @ w2[e]^T) with SWIGLU."""
    e, row0, row_end = _tile_of_expert(offsets_ptr, n_experts, tl.program_id(0), BLOCK_M, BLOCK_E)
    if e >= n_experts:  # the grid is an upper bound on the tile count
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < n_out
    rk = tl.arange(0, BLOCK_K)
    e64 = e.to(tl.int64)
    dot_dtype = tl.float32 if UPCAST else x_ptr.dtype.element_ty
    w_base = e64 * sw_e + rn[None, :].to(tl.int64) * sw_o  # [1, BN]: weight rows are output features
    s_base = e64 * ss_e + ((tl.program_id(1) * BLOCK_N) // 128) * ss_o
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        kk = k0 + rk
        kmask = kk < n_in
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sx_m + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0).to(dot_dtype)
        wmask = kmask[:, None] & nmask[None, :]
        w_off = w_base + kk[:, None] * sw_i  # [BK, BN]: the transposed tile, read straight from [O, Iin]
        s_off = s_base + (k0 // 128) * ss_i
        acc1 = tl.dot(x, _load_w(w1_ptr + w_off, wmask, s1_ptr + s_off, SCALED, dot_dtype), acc1,
                      input_precision=PREC)
        if SWIGLU:
            acc2 = tl.dot(x, _load_w(w2_ptr + w_off, wmask, s2_ptr + s_off, SCALED, dot_dtype), acc2,
                          input_precision=PREC)
    if SWIGLU:
        acc1 = acc1 * tl.sigmoid(acc1) * acc2
    tl.store(out_ptr + rows[:, None].to(tl.int64) * so_m + rn[None, :], acc1.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _small_gate_up_kernel(x_ptr, idx_ptr, wg_ptr, wu_ptr, h_ptr, sg_ptr, su_ptr,
                          top_k, n_in, n_out,
                          sx_t, sw_e, sw_o, sw_i, sh_p, ss_e, ss_o, ss_i,
                          SCALED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[p] = silu(wg[e] @ x[t]) * (wu[e] @ x[t]) for pair p = t*K + k routed to expert e = idx[p]."""
    p = tl.program_id(0)
    t = p // top_k
    e = tl.load(idx_ptr + p).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < n_out
    rk = tl.arange(0, BLOCK_K)
    w_base = e * sw_e + rn[:, None].to(tl.int64) * sw_o  # [BN, 1]
    s_base = e * ss_e + ((tl.program_id(1) * BLOCK_N) // 128) * ss_o
    g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        kk = k0 + rk
        kmask = kk < n_in
        x = tl.load(x_ptr + t * sx_t + kk, mask=kmask, other=0.0).to(tl.float32)[None, :]
        wmask = nmask[:, None] & kmask[None, :]
        w_off = w_base + kk[None, :] * sw_i
        s_off = s_base + (k0 // 128) * ss_i
        g += tl.sum(_load_w(wg_ptr + w_off, wmask, sg_ptr + s_off, SCALED, tl.float32) * x, axis=1)
        u += tl.sum(_load_w(wu_ptr + w_off, wmask, su_ptr + s_off, SCALED, tl.float32) * x, axis=1)
    tl.store(h_ptr + p * sh_p + rn, (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _small_down_kernel(h_ptr, idx_ptr, rw_ptr, wd_ptr, y_ptr, sd_ptr,
                       top_k, n_in, n_out,
                       sh_p, sw_e, sw_o, sw_i, sy_t, ss_e, ss_o, ss_i,
                       SCALED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[t] = sum_k rw[t, k] * (wd[idx[t, k]] @ h[t*K + k]): the down projection and the weighted combine."""
    t = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < n_out
    rk = tl.arange(0, BLOCK_K)
    y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(0, top_k):
        p = t * top_k + j
        e = tl.load(idx_ptr + p).to(tl.int64)
        w_base = e * sw_e + rn[:, None].to(tl.int64) * sw_o
        s_base = e * ss_e + ((tl.program_id(1) * BLOCK_N) // 128) * ss_o
        part = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, n_in, BLOCK_K):
            kk = k0 + rk
            kmask = kk < n_in
            h = tl.load(h_ptr + p * sh_p + kk, mask=kmask, other=0.0).to(tl.float32)[None, :]
            w = _load_w(wd_ptr + w_base + kk[None, :] * sw_i, nmask[:, None] & kmask[None, :],
                        sd_ptr + s_base + (k0 // 128) * ss_i, SCALED, tl.float32)
            part += tl.sum(w * h, axis=1)
        y += tl.load(rw_ptr + p).to(tl.float32) * part
    tl.store(y_ptr + t * sy_t + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)


# ----------------------------------------------------------------------------------------------------------------
def _scale_args(w: torch.Tensor, s: torch.Tensor | None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    if s is None:
        return w, (0, 0, 0)  # never read: SCALED is off
    if s.dtype != torch.float32:
        raise TypeError(f"scale_inv must be float32, got {s.dtype}")
    return s, (s.stride(0), s.stride(1), s.stride(2))


def _check_weights(w: torch.Tensor, s: torch.Tensor | None, block_n: int, block_k: int) -> None:
    if w.dim() != 3:
        raise ValueError(f"expert weights must be [E, O, I], got shape {tuple(w.shape)}")
    if s is not None:
        want = (w.shape[0], -(-w.shape[1] // FP8_BLOCK), -(-w.shape[2] // FP8_BLOCK))
        if tuple(s.shape) != want:
            raise ValueError(f"scale_inv shape {tuple(s.shape)} does not match weight {tuple(w.shape)} (want {want})")
        # A tile must not straddle two scale blocks: one scale is loaded per tile.
        assert FP8_BLOCK % block_n == 0 and FP8_BLOCK % block_k == 0, (block_n, block_k)


def grouped_linear(xs: torch.Tensor, w1: torch.Tensor, offsets: torch.Tensor, w2: torch.Tensor | None = None,
                   s1: torch.Tensor | None = None, s2: torch.Tensor | None = None,
                   block_m: int = 64, block_n: int = 64, block_k: int = 64, num_warps: int = 4,
                   num_stages: int = 3) -> torch.Tensor:
    """xs [N, Iin] sorted by expert, w1 (and w2) [E, O, Iin], offsets [E] cumulative row ends ->
    [N, O] = xs @ w1[e]^T per group, or silu(xs @ w1[e]^T) * (xs @ w2[e]^T) when w2 is given."""
    N, n_in = xs.shape
    E, n_out, _ = w1.shape
    _check_weights(w1, s1, block_n, block_k)
    if w2 is not None:
        _check_weights(w2, s2, block_n, block_k)
    out = xs.new_empty(N, n_out)
    if N == 0:
        return out
    xs = xs.contiguous()
    sa, (sse, sso, ssi) = _scale_args(w1, s1)
    sb = sa if w2 is None else _scale_args(w2, s2)[0]
    grid = (triton.cdiv(N, block_m) + E, triton.cdiv(n_out, block_n))
    _grouped_kernel[grid](
        xs, w1, w1 if w2 is None else w2, out, offsets, sa, sb,
        E, n_in, n_out,
        xs.stride(0), w1.stride(0), w1.stride(1), w1.stride(2), out.stride(0), sse, sso, ssi,
        SWIGLU=w2 is not None, SCALED=s1 is not None, UPCAST=INTERPRET, PREC=dot_precision(xs.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_E=triton.next_power_of_2(E),
        num_warps=num_warps, num_stages=num_stages)
    return out


def moe_grouped(xs: torch.Tensor, offsets: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                w_down: torch.Tensor, s_gate: torch.Tensor | None = None, s_up: torch.Tensor | None = None,
                s_down: torch.Tensor | None = None, **tiles) -> torch.Tensor:
    """xs [N, D] sorted by expert, offsets [E] -> expert outputs [N, D] in the same order (two launches)."""
    h = grouped_linear(xs, w_gate, offsets, w_up, s_gate, s_up, **tiles)  # [N, I]
    return grouped_linear(h, w_down, offsets, None, s_down, None, **tiles)  # [N, D]


def moe_small(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w_gate: torch.Tensor,
              w_up: torch.Tensor, w_down: torch.Tensor, s_gate: torch.Tensor | None = None,
              s_up: torch.Tensor | None = None, s_down: torch.Tensor | None = None,
              block_n: int = 32, block_k: int = 128, num_warps: int = 4) -> torch.Tensor:
    """x [T, D], weights [T, K] (routing weights), indices [T, K] -> y [T, D] = sum_k weights * expert(x)."""
    T, D = x.shape
    K = indices.shape[1]
    E, I, _ = w_gate.shape
    for w, s in ((w_gate, s_gate), (w_up, s_up), (w_down, s_down)):
        _check_weights(w, s, block_n, block_k)
    y = x.new_empty(T, D)
    if T == 0:
        return y
    x = x.contiguous()
    idx = indices.reshape(-1).contiguous()  # [N]
    rw = weights.reshape(-1).float().contiguous()
    h = x.new_empty(T * K, I)
    scaled = s_gate is not None
    sg, (sse, sso, ssi) = _scale_args(w_gate, s_gate)
    su = _scale_args(w_up, s_up)[0]
    _small_gate_up_kernel[(T * K, triton.cdiv(I, block_n))](
        x, idx, w_gate, w_up, h, sg, su, K, D, I,
        x.stride(0), w_gate.stride(0), w_gate.stride(1), w_gate.stride(2), h.stride(0), sse, sso, ssi,
        SCALED=scaled, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    sd, (sse, sso, ssi) = _scale_args(w_down, s_down)
    _small_down_kernel[(T, triton.cdiv(D, block_n))](
        h, idx, rw, w_down, y, sd, K, I, D,
        h.stride(0), w_down.stride(0), w_down.stride(1), w_down.stride(2), y.stride(0), sse, sso, ssi,
        SCALED=scaled, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return y
