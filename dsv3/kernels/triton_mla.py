"""Absorbed MLA decode attention over the paged latent cache (one query token per sequence).

Dimension letters: B sequences, H heads, C kv_lora_rank (512 in V3), R qk_rope_head_dim (64), W = C + R (576),
Y cache slots (num_blocks * block_size), Z block size, M blocks per sequence in the block table, S splits of the
context, L a sequence's context length (including the token being decoded).

After absorption every head's query is q [B, H, W] = [q_nope W_uk, q_pe], and every head attends to the same cached
latent rows kv [Y, W]: keys are the whole 576-dim row, values its first C dims. So one program takes a tile of heads
of one sequence and streams that sequence's latent rows once for all of them (the heads form the M side of the
matrix products), gathering rows by slot = block_table[b, pos // Z] * Z + pos % Z.

Decode has few sequences but long contexts, so the context is split S ways (split-K over the sequence, as FlashMLA
does): pass 1 writes each split's normalised partial output and its log-sum-exp, pass 2 merges the splits with
weights exp(lse_s - lse). A split past the end of its sequence writes lse = -inf and contributes nothing, which lets
S stay fixed across steps (a CUDA graph replays one grid whatever the lengths are).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_util import INTERPRET, dot_precision


@triton.jit
def _split_kernel(q_ptr, kv_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr,
                  n_heads, rank, rope, block_size, scale,
                  sq_b, sq_h, skv, sbt_b, so_b, so_s, so_h, sl_b, sl_s,
                  UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    b = tl.program_id(0)
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    hmask = rh < n_heads
    rc = tl.arange(0, BLOCK_C)
    cmask = rc < rank
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < rope
    dot_dtype = tl.float32 if UPCAST else kv_ptr.dtype.element_ty

    length = tl.load(lens_ptr + b)
    # Splits are whole key tiles so that only the last tile of a sequence is partial.
    per_split = tl.cdiv(tl.cdiv(length, n_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, length)

    q_row = q_ptr + b * sq_b + rh[:, None] * sq_h
    q_c = tl.load(q_row + rc[None, :], mask=hmask[:, None] & cmask[None, :], other=0.0).to(dot_dtype)  # [BH, BC]
    q_r = tl.load(q_row + rank + rr[None, :], mask=hmask[:, None] & rmask[None, :], other=0.0).to(dot_dtype)

    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    denom = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pmask = pos < hi
        block = tl.load(bt_ptr + b * sbt_b + pos // block_size, mask=pmask, other=0)
        row = kv_ptr + (block.to(tl.int64) * block_size + pos % block_size) * skv  # [BN]
        k_c = tl.load(row[:, None] + rc[None, :], mask=pmask[:, None] & cmask[None, :], other=0.0)  # [BN, BC]
        k_r = tl.load(row[:, None] + rank + rr[None, :], mask=pmask[:, None] & rmask[None, :], other=0.0)
        k_c = k_c.to(dot_dtype)
        s = tl.dot(q_c, tl.trans(k_c), input_precision=PREC)
        s = tl.dot(q_r, tl.trans(k_r.to(dot_dtype)), s, input_precision=PREC)  # [BH, BN]
        s = tl.where(pmask[None, :], s * scale, float("-inf"))
        # Every tile holds at least one live position, so m_new is finite and alpha is exp(-inf) = 0 at first.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        # Probabilities are rounded to the cache dtype before the value product, like the torch path.
        acc = tl.dot(p.to(kv_ptr.dtype.element_ty).to(dot_dtype), k_c, acc * alpha[:, None], input_precision=PREC)
        m = m_new
    live = denom > 0
    o = acc / tl.where(live, denom, 1.0)[:, None]
    lse = tl.where(live, m + tl.log(tl.where(live, denom, 1.0)), float("-inf"))
    tl.store(o_ptr + b * so_b + split * so_s + rh[:, None] * so_h + rc[None, :], o,
             mask=hmask[:, None] & cmask[None, :])
    tl.store(lse_ptr + b * sl_b + split * sl_s + rh, lse, mask=hmask)


@triton.jit
def _merge_kernel(o_part_ptr, lse_ptr, out_ptr, n_splits, rank,
                  sp_b, sp_s, sp_h, sl_b, sl_s, so_b, so_h,
                  BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    rs = tl.arange(0, BLOCK_S)
    smask = rs < n_splits
    rc = tl.arange(0, BLOCK_C)
    cmask = rc < rank
    lse = tl.load(lse_ptr + b * sl_b + rs * sl_s + h, mask=smask, other=float("-inf"))  # [BS]
    top = tl.max(lse, axis=0)  # finite: split 0 always holds the first position
    w = tl.exp(lse - top)
    w = w / tl.sum(w, axis=0)
    parts = tl.load(o_part_ptr + b * sp_b + rs[:, None] * sp_s + h * sp_h + rc[None, :],
                    mask=smask[:, None] & cmask[None, :], other=0.0)  # [BS, BC]
    o = tl.sum(parts * w[:, None], axis=0)
    tl.store(out_ptr + b * so_b + h * so_h + rc, o.to(out_ptr.dtype.element_ty), mask=cmask)


def default_splits(batch: int, heads: int, max_len: int, block_n: int = 64, block_h: int = 16,
                   target_programs: int = 264) -> int:
    """Enough splits to give ~2 programs per SM (132 SMs on H100/H200) without splits shorter than two tiles."""
    programs = batch * triton.cdiv(heads, block_h)
    by_length = max(1, max_len // (2 * block_n))
    return max(1, min(by_length, triton.cdiv(target_programs, programs), 128))


def mla_decode(q: torch.Tensor, kv: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
               block_size: int, rank: int, scale: float, num_splits: int, block_h: int = 16, block_n: int = 32,
               num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """q [B, H, W] (absorbed query, W = rank + rope), kv [Y, W] (one layer of the cache), block_table [B, M] int32,
    seq_lens [B] int32 (>= 1) -> latent output o_c [B, H, C] in q's dtype (before W_uv)."""
    B, H, W = q.shape
    if kv.dim() != 2 or kv.shape[1] != W:
        raise ValueError(f"cache layer must be [slots, {W}], got {tuple(kv.shape)}")
    if kv.stride(1) != 1:
        raise ValueError("cache layer rows must be contiguous")
    rope = W - rank
    q = q.contiguous()
    o_part = torch.empty(B, num_splits, H, rank, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, num_splits, H, dtype=torch.float32, device=q.device)
    out = q.new_empty(B, H, rank)
    if B == 0:
        return out
    # H is padded up to at least 16: tl.dot needs 16 rows.
    block_h = max(16, min(block_h, triton.next_power_of_2(H)))
    _split_kernel[(B, triton.cdiv(H, block_h), num_splits)](
        q, kv, block_table, seq_lens, o_part, lse,
        H, rank, rope, block_size, scale,
        q.stride(0), q.stride(1), kv.stride(0), block_table.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        UPCAST=INTERPRET, PREC=dot_precision(kv.dtype), BLOCK_H=block_h, BLOCK_N=block_n,
        BLOCK_C=max(16, triton.next_power_of_2(rank)), BLOCK_R=max(16, triton.next_power_of_2(rope)),
        num_warps=num_warps, num_stages=num_stages)
    _merge_kernel[(B, H)](
        o_part, lse, out, num_splits, rank,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_C=triton.next_power_of_2(rank), num_warps=4)
    return out


def mla_decode_reference(q: torch.Tensor, kv: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                         block_size: int, rank: int, scale: float) -> torch.Tensor:
    """The same contract in plain torch, one sequence at a time (the test oracle)."""
    out = q.new_empty(q.shape[0], q.shape[1], rank)
    for b in range(q.shape[0]):
        L = int(seq_lens[b])
        pos = torch.arange(L, device=q.device)
        ctx = kv[block_table[b, pos // block_size].long() * block_size + pos % block_size].float()  # [L, W]
        p = ((q[b].float() @ ctx.T) * scale).softmax(-1)  # [H, L]
        out[b] = (p @ ctx[:, :rank]).to(q.dtype)
    return out
