"""Block-scaled FP8 GEMM for checkpoints kept in FP8: y = x W^T with W in float8_e4m3fn.

Dimension letters: M activation rows (tokens), K input features, N output features, b the block (128),
Kb = ceil(K/b), Nb = ceil(N/b).
Weights: w [N, K] float8_e4m3fn with scale_inv [Nb, Kb] float32 (the official checkpoint format, dsv3.kernels.fp8).
Activations are quantised per token and per group of b input features (1 x b), as in DeepSeek-V3's own inference:
x_q [M, K] float8_e4m3fn with x_s [M, Kb] float32, x ~= x_q * x_s. Then for each block of b input features the
tensor cores form an FP8 x FP8 product in float32 and it is scaled by x_s[m, kb] * scale_inv[n // b, kb] before it
joins the accumulator, so the only rounding beyond float32 arithmetic is the two quantisations.

The error against x @ dequantize(W)^T therefore comes from quantising x (e4m3 has a 3-bit mantissa: each element
within 2^-4 relative), ~2-3% relative on random data; against the same math emulated in float32 (quantise x in
torch, dequantise both, matmul) the kernel agrees to float32 rounding. The tests check both.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_util import FP8_BLOCK, INTERPRET

FP8_MAX = 448.0


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, n_cols, sx_m, sq_m, ss_m, FP8_MAX_C: tl.constexpr,
                      BLOCK: tl.constexpr):
    m = tl.program_id(0)
    g = tl.program_id(1)
    cols = g * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + m * sx_m + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    s = tl.where(amax > 0, amax / FP8_MAX_C, 1.0)  # an all-zero group would otherwise divide by zero
    q = tl.minimum(tl.maximum(x / s, -FP8_MAX_C), FP8_MAX_C)
    tl.store(q_ptr + m * sq_m + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + m * ss_m + g, s)


@triton.jit
def _gemm_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K,
                 sxq_m, sxs_m, sw_n, sws_n, sy_m,
                 UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    # Programs walk the output in column bands GROUP_M row tiles tall so that neighbours reuse weight tiles in L2.
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * n_n
    first_m = (pid // band) * GROUP_M
    rows_in_band = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % rows_in_band
    pid_n = (pid % band) // rows_in_band

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    a_ptrs = xq_ptr + rm[:, None].to(tl.int64) * sxq_m + rk[None, :]
    b_ptrs = w_ptr + rn[None, :].to(tl.int64) * sw_n + rk[:, None]  # [BK, BN], read from w [N, K]
    ws_row = ws_ptr + (pid_n * BLOCK_N // BLOCK_K) * sws_n  # BLOCK_N divides the block: one scale row per tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        kmask = kb * BLOCK_K + rk < K
        a = tl.load(a_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        part = tl.dot(a, b)  # one whole scale block of K: the FP8 product is exact in float32
        sa = tl.load(xs_ptr + rm * sxs_m + kb, mask=mmask, other=0.0)
        sb = tl.load(ws_row + kb)
        acc += part * sa[:, None] * sb
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    tl.store(y_ptr + rm[:, None].to(tl.int64) * sy_m + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def act_quant(x: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> x_q [M, K] float8_e4m3fn, x_s [M, ceil(K/block)] float32 (per-token, per-group scales)."""
    M, K = x.shape
    x = x.contiguous()
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, triton.cdiv(K, block), dtype=torch.float32, device=x.device)
    if M:
        _act_quant_kernel[(M, s.shape[1])](x, q, s, K, x.stride(0), q.stride(0), s.stride(0),
                                           FP8_MAX_C=FP8_MAX, BLOCK=block, num_warps=1)
    return q, s


def fp8_gemm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, out_dtype: torch.dtype,
             block_m: int = 64, block_n: int = 128, group_m: int = 8, num_warps: int = 4, num_stages: int = 3
             ) -> torch.Tensor:
    """x_q [M, K] fp8 with x_s [M, Kb], w [N, K] fp8 with scale_inv [Nb, Kb] -> y [M, N] in out_dtype."""
    M, K = xq.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"fp8_gemm: x has {K} features but the weight is {tuple(w.shape)}")
    want = (triton.cdiv(N, FP8_BLOCK), triton.cdiv(K, FP8_BLOCK))
    if tuple(ws.shape) != want or tuple(xs.shape) != (M, want[1]):
        raise ValueError(f"fp8_gemm: scales {tuple(xs.shape)} / {tuple(ws.shape)} do not fit x {tuple(xq.shape)} "
                         f"and w {tuple(w.shape)} in {FP8_BLOCK}-blocks")
    assert FP8_BLOCK % block_n == 0, block_n
    y = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    if M == 0:
        return y
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _gemm_kernel[grid](xq, xs, w, ws, y, M, N, K,
                       xq.stride(0), xs.stride(0), w.stride(0), ws.stride(0), y.stride(0),
                       UPCAST=INTERPRET, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=FP8_BLOCK, GROUP_M=group_m,
                       num_warps=num_warps, num_stages=num_stages)
    return y


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, **tiles) -> torch.Tensor:
    """x [..., K] (bf16/fp32), w [N, K] float8_e4m3fn, scale_inv [Nb, Kb] -> [..., N] in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    xq, xs = act_quant(x2)
    return fp8_gemm(xq, xs, w.contiguous(), scale_inv.float().contiguous(), x.dtype, **tiles).reshape(*lead, -1)


def act_quant_reference(x: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quantisation in torch (test oracle)."""
    M, K = x.shape
    pad = -K % block
    xf = torch.nn.functional.pad(x.float(), (0, pad)).view(M, -1, block)
    amax = xf.abs().amax(-1)
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (xf / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(M, -1)[:, :K]
    return q.contiguous(), s
