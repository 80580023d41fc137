"""Correctness checks of the Triton kernels against plain torch, shared by the tests (tiny shapes, CPU interpreter)
and benchmarks/gpu.py (real shapes, compiled on the GPU), so both run exactly the same comparisons.

Dimension letters: E experts, D hidden, I expert intermediate, T tokens, K experts per token, B sequences, H heads,
C kv_lora_rank, R rope dim, Z block size, M activation rows, Kin/N GEMM input/output features.
Each check draws fresh random inputs from its seed and returns relative errors ||got - want|| / ||want||, where want
is computed in float32 from the very same (already rounded) inputs; TOLERANCE holds the issue's budgets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fp8
from .grouped import grouped_mm_reference

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
# Quantising activations to e4m3 (3-bit mantissa) costs ~2.5% relative on random data; the budget leaves room for
# the interpreter's fp8 rounding bug (see check_fp8).
FP8_QUANT_TOLERANCE = 5e-2


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return ((got.float() - want).norm() / want.norm().clamp_min(1e-30)).item()


def _offsets(flat: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)).cumsum(0).to(torch.int32)


def check_moe(device: str, dtype: torch.dtype, E: int, D: int, I: int, T: int, K: int, use_fp8: bool = False,
              seed: int = 0, grouped_tiles: dict | None = None, small_tiles: dict | None = None) -> dict[str, float]:
    from . import triton_moe

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype).to(device)
    # Skewed routing (some experts crowded, some empty) exercises multi-tile groups and experts with no rows.
    probs = torch.rand(E, generator=g) ** 3
    idx = torch.stack([torch.multinomial(probs, K, generator=g) for _ in range(T)]).to(device)  # [T, K]
    rw = torch.rand(T, K, generator=g).to(device)
    ws, scales, dense = [], [], []
    for shape in ((E, I, D), (E, I, D), (E, D, I)):
        w = torch.randn(*shape, generator=g) * shape[-1] ** -0.5
        if use_fp8:
            q, s = fp8.quantize(w)
            ws.append(q.to(device))
            scales.append(s.to(device))
            dense.append(fp8.dequantize(q, s).to(device))
        else:
            ws.append(w.to(dtype).to(device))
            scales.append(None)
            dense.append(ws[-1].float())
    wg, wu, wd = dense
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    xs = x[order // K]  # [N, D] sorted by expert
    offsets = _offsets(flat, E)
    h = F.silu(grouped_mm_reference(xs.float(), wg.transpose(1, 2), offsets)) * \
        grouped_mm_reference(xs.float(), wu.transpose(1, 2), offsets)  # [N, I]
    want_sorted = grouped_mm_reference(h, wd.transpose(1, 2), offsets)  # [N, D]
    want_pairs = torch.empty_like(want_sorted)
    want_pairs[order] = want_sorted
    want = (want_pairs.view(T, K, D) * rw[..., None]).sum(1)  # [T, D]
    got_sorted = triton_moe.moe_grouped(xs, offsets, *ws, *scales, **(grouped_tiles or {}))
    got_small = triton_moe.moe_small(x, rw, idx, *ws, *scales, **(small_tiles or {}))
    return {"grouped": rel(got_sorted, want_sorted), "small": rel(got_small, want)}


def check_mla(device: str, dtype: torch.dtype, H: int, C: int, R: int, Z: int, lens: list[int], num_splits: int,
              seed: int = 0, **tiles) -> float:
    from . import triton_mla

    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    M = max(-(-L // Z) for L in lens)
    n_blocks = B * M + 3
    kv = torch.randn(n_blocks * Z, C + R, generator=g).to(dtype).to(device)
    # Each sequence gets distinct blocks in a scrambled order, as a long-running allocator hands them out.
    perm = torch.randperm(n_blocks, generator=g)[: B * M].view(B, M).to(torch.int32).to(device)
    q = torch.randn(B, H, C + R, generator=g).to(dtype).to(device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    scale = (C + R) ** -0.5
    want = triton_mla.mla_decode_reference(q.float(), kv.float(), perm, seq_lens, Z, C, scale)
    got = triton_mla.mla_decode(q, kv, perm, seq_lens, Z, C, scale, num_splits, **tiles)
    return rel(got, want)


def fp8_rounding_slips(q: torch.Tensor, q_ref: torch.Tensor, scaled: torch.Tensor) -> int:
    """How many elements of q (from scaled = x / s) differ from the torch rounding q_ref in the two ways Triton's
    interpreter rounds float32 -> e4m3 wrongly (triton PR #11897): it drops the carry when rounding overflows the
    mantissa (124.3 -> 64, not 128) and rounds ties away from zero (336 -> 352, not 320). -1 if any other
    difference exists. Compiled kernels round like torch, so on a GPU this must be 0."""
    a, b, v = q.float(), q_ref.float(), scaled.float()
    differ = a != b
    carry_lost = (a * 2 == b) & (b.abs().log2() == b.abs().log2().round())
    tie_away = ((v - a).abs() == (v - b).abs()) & (a.abs() > b.abs())
    explained = differ & (carry_lost | tie_away)
    return int(explained.sum()) if bool((differ == explained).all()) else -1


def check_fp8(device: str, M: int, Kin: int, N: int, x_dtype: torch.dtype = torch.bfloat16, seed: int = 0,
              **tiles) -> dict[str, float]:
    """act_quant against its torch twin; fp8_gemm against the same math emulated in float32 (quantised x and W both
    dequantised, then one matmul); fp8_linear against that emulation of its own quantised x, and against
    x @ dequantize(W)^T (which adds the activation quantisation error; on the interpreter also its rounding slips)."""
    from . import triton_fp8

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, Kin, generator=g).to(x_dtype)
    x[0, : min(Kin, 128)] = 0  # an all-zero group
    x = x.to(device)
    w, ws = fp8.quantize(torch.randn(N, Kin, generator=g) * Kin ** -0.5)
    w, ws = w.to(device), ws.to(device)
    q, s = triton_fp8.act_quant(x)
    q_ref, s_ref = triton_fp8.act_quant_reference(x)
    x_deq = (F.pad(q_ref.float(), (0, -Kin % 128)).view(M, -1, 128) * s_ref[..., None]).view(M, -1)[:, :Kin]
    w_deq = fp8.dequantize(w, ws)
    emulated = x_deq @ w_deq.T
    got = triton_fp8.fp8_gemm(q_ref, s_ref, w, ws, torch.float32, **tiles)
    scaled = F.pad(x.float(), (0, -Kin % 128)).view(M, -1, 128) / s_ref[..., None]
    slips = fp8_rounding_slips(q, q_ref, scaled.view(M, -1)[:, :Kin])
    linear = triton_fp8.fp8_linear(x, w, ws, **tiles)
    own = (F.pad(q.float(), (0, -Kin % 128)).view(M, -1, 128) * s[..., None]).view(M, -1)[:, :Kin] @ w_deq.T
    exact = x.float() @ w_deq.T
    return {"act_quant_scales": rel(s, s_ref), "act_quant_slips": slips,
            "gemm_vs_emulation": rel(got, emulated),
            "linear_vs_own_quantisation": rel(linear, own),  # act_quant + gemm composed, whatever the rounding
            "quantisation_error": rel(emulated, exact),  # what FP8 activations cost by themselves
            "linear_vs_dequantised": rel(linear, exact)}
