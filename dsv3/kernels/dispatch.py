"""Which implementation runs: the Triton kernels for CUDA tensors when Triton is installed, the torch paths otherwise.

Dimension letters: T tokens, K experts per token, D hidden, B decode sequences, H heads, N/R/V head dims,
C kv_lora_rank, W = C + R, Y cache slots, M blocks per sequence in a block table.

DSV3_TRITON selects (read at each call, so a benchmark can switch it between runs):
  auto (default)  Triton for CUDA tensors; a kernel that fails to compile or launch is logged once and its torch
                  path is used from then on, so a Triton/driver mismatch costs speed, never a crash.
  1               Triton wherever possible and errors propagate (benchmarks and correctness checks use this). Under
                  TRITON_INTERPRET=1 CPU tensors take the Triton path too, which is how the tests run the wiring.
  0               never Triton.
The model code calls in here through small hooks that return None when the torch path should run.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from .fp8 import FP8_DTYPE

log = logging.getLogger(__name__)

SMALL_BATCH_PAIRS = 64  # token-expert pairs up to which the MoE reads weights per pair instead of sorting
_failed: set[str] = set()  # kernels that failed under DSV3_TRITON=auto; never retried in this process


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _mode() -> str:
    mode = os.environ.get("DSV3_TRITON", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"DSV3_TRITON={mode!r}: use auto, 1 or 0")
    return mode


def use_triton(t: torch.Tensor, kernel: str, *params: torch.Tensor) -> bool:
    mode = _mode()
    if mode == "0" or kernel in _failed or not triton_available():
        return False
    if torch.is_grad_enabled() and any(p.requires_grad for p in (t, *params)):
        return False  # the kernels have no backward: training keeps the autograd-aware torch paths
    if t.is_cuda:
        return True
    from .triton_util import INTERPRET

    return mode == "1" and INTERPRET


def _guarded(kernel: str, fn, *args, **kwargs):
    """Run a Triton wrapper; under auto a failure disables that kernel and returns None (the torch path runs)."""
    if _mode() == "1":
        return fn(*args, **kwargs)
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # compile errors surface as many exception types
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise
        _failed.add(kernel)
        log.warning("Triton kernel %s failed (%s: %s); using the torch path from now on (DSV3_TRITON=1 to raise)",
                    kernel, type(e).__name__, e)
        return None


# ----------------------------------------------------------------------------------------------------------------
def linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor | None) -> torch.Tensor | None:
    """y = x W^T for an FP8 block-scaled weight with the Triton FP8 GEMM, or None."""
    if weight.dtype != FP8_DTYPE or scale_inv is None or not use_triton(x, "fp8_gemm", weight):
        return None
    from . import triton_fp8

    return _guarded("fp8_gemm", _fp8_linear, triton_fp8, x, weight, scale_inv)


def _fp8_linear(mod, x, weight, scale_inv):
    M = x.numel() // x.shape[-1]
    # Decode has a handful of rows: narrow column tiles give the GPU enough programs to pull weights at full rate.
    tiles = dict(block_m=16, block_n=32) if M <= 16 else dict(block_m=64, block_n=128)
    return mod.fp8_linear(x, weight, scale_inv, **tiles)


def experts(module, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
    """The routed experts (dsv3.model.moe.Experts) on x [T, D] with routing weights/indices [T, K] -> [T, D],
    or None when the torch path should run."""
    g, u, d = module.gate_proj, module.up_proj, module.down_proj
    if module.packed is not None or g.quant is not None or g.weight.numel() == 0 or not use_triton(x, "moe", g.weight, u.weight, d.weight):
        return None
    from . import triton_moe

    return _guarded("moe", _experts, triton_moe, module.n_experts, x, weights, indices, g, u, d)


def _experts(mod, n_experts, x, weights, indices, g, u, d):
    ws = [lin.weight for lin in (g, u, d)]
    if ws[0].dtype not in (x.dtype, FP8_DTYPE):
        ws = [w.to(x.dtype) for w in ws]
    scales = [lin.weight_scale_inv.float() if lin.is_fp8 else None for lin in (g, u, d)]
    T, K = indices.shape
    if T * K <= SMALL_BATCH_PAIRS:
        return mod.moe_small(x, weights, indices, *ws, *scales)
    flat = indices.reshape(-1)  # [T*K]
    order = flat.argsort(stable=True)
    # scatter_add, not bincount: bincount reads the maximum back to the host on CUDA, which a graph cannot hold.
    counts = torch.zeros(n_experts, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offsets = counts.cumsum(0, dtype=torch.int32)
    big = dict(block_m=64, block_n=64, block_k=64) if x.is_cuda else dict(block_m=16, block_n=16, block_k=16)
    ys = mod.moe_grouped(x[order // K], offsets, *ws, *scales, **big)  # [T*K, D] in expert order
    y = torch.empty_like(ys)
    y[order] = ys
    return (y.view(T, K, -1).float() * weights[..., None].float()).sum(1).to(x.dtype)


def mla_decode_paged(mla, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, block_size: int, num_splits: int | None = None) -> torch.Tensor:
    """Absorbed attention of one new token per sequence over the paged cache: q_nope [B, H, N], q_pe [B, H, R],
    kv [Y, W] (one layer), block_table [B, M] int32, seq_lens [B] int32 (context length, this token included)
    -> [B, H, V]. No host synchronisation on either path, and every shape is fixed by the inputs' shapes, so a CUDA
    graph can capture it."""
    w_uk, w_uv = mla._kv_b(q_nope.dtype)  # [H, N, C], [H, V, C]
    q = torch.cat([torch.einsum("bhn,hnc->bhc", q_nope, w_uk), q_pe], dim=-1)  # [B, H, W]
    o_c = None
    if use_triton(q, "mla_decode"):
        from . import triton_mla

        if num_splits is None:
            num_splits = triton_mla.default_splits(q.shape[0], q.shape[1], block_table.shape[1] * block_size)
        o_c = _guarded("mla_decode", triton_mla.mla_decode, q, kv, block_table, seq_lens, block_size, mla.rank,
                       mla.softmax_scale, num_splits)
    if o_c is None:
        o_c = paged_decode_torch(q, kv, block_table, seq_lens, block_size, mla.rank, mla.softmax_scale)
    return torch.einsum("bhc,hvc->bhv", o_c, w_uv)


def paged_decode_torch(q: torch.Tensor, kv: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                       block_size: int, rank: int, scale: float) -> torch.Tensor:
    """q [B, H, W] -> o_c [B, H, C] over the whole block table (fixed [B, M*Z] context, masked by length)."""
    M = block_table.shape[1]
    pos = torch.arange(M * block_size, device=q.device)  # [L]
    slots = block_table.long()[:, pos // block_size] * block_size + pos % block_size  # [B, L]
    ctx = kv[slots].to(q.dtype)  # [B, L, W]
    scores = torch.bmm(q, ctx.transpose(1, 2)).float() * scale  # [B, H, L]
    scores = scores.masked_fill_((pos[None, :] >= seq_lens[:, None].long())[:, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)
    return torch.bmm(probs, ctx[..., :rank])  # [B, H, C]
