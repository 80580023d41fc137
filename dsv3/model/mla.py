"""Multi-head Latent Attention (MLA).

Dimension letters: B batch, S query positions, L key positions (cached context + S), H heads, D hidden,
C kv_lora_rank (latent), R qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim, P = R/2.

Per token the layer keeps only c_kv [C] (after kv_a_layernorm) and the rotated shared key k_pe [R]. Two ways to
attend over them, both exact:
  naive:    expand c_kv with kv_b_proj into per-head k_nope [H, N] and v [H, V]; ordinary attention in 192/128 dims.
  absorbed: fold kv_b_proj's key half into the query (q_c = q_nope W_uk, [H, C]) and its value half into the output
            (o = (P c_kv) W_uv); attention runs directly on the 576-dim latent, shared by all heads (MQA-like).
Naive is cheaper when S ~ L (prefill, training); absorbed reads far less memory when S << L (decode).
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import Linear, RMSNorm
from .rope import apply_rotary

ATTENTION_IMPLS = ("naive", "absorbed")

# The reference implementations give the two latent norms the default eps (1e-6) whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6


class LatentCache(Protocol):
    """What the engine hands each layer: it stores this step's latents and runs the attention over the cached
    context (paged, packed sequences, chunked), calling back into `mla.attend` for the math."""

    def attend(self, mla: "MLA", q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
               impl: str) -> torch.Tensor:
        """q_nope [B, S, H, N], q_pe [B, S, H, R], c_kv [B, S, C], k_pe [B, S, R] -> [B, S, H, V]"""
        ...


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, D = cfg.num_attention_heads, cfg.hidden_size
        self.nope, self.rope, self.v_dim, self.rank = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                                                       cfg.kv_lora_rank)
        self.softmax_scale = cfg.softmax_scale
        H, qk = self.n_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(D, H * qk)
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * qk)
        self.kv_a_proj_with_mqa = Linear(D, self.rank + self.rope)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.rank, H * (self.nope + self.v_dim))
        self.o_proj = Linear(H * self.v_dim, D)
        self.packed_qkv_a = None  # [q_a; kv_a] packed for CPU inference (kernels/cpu_pack.py)
        self.cpu_ops = None  # torch.ops.dsv3_cpu when the C++ CPU kernels run this layer (kernels/cpu_ext.py)

    def store_latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor,
                      slots: torch.Tensor) -> None:
        """Only the cache half of the layer: x [T, D] (normalised input), cos/sin [T, P] -> the latents (c_kv
        normalised, k_pe rotated) written to kv[slots] ([S, C+R] cache layer), bit for bit what a full pass over
        these rows stores (the C++ kernel's rounding when this layer runs on it)."""
        if self.packed_qkv_a is not None:
            kv_a = self.packed_qkv_a(x)[:, self.q_b_proj.in_features:]
        else:
            kv_a = self.kv_a_proj_with_mqa(x)
        if self.cpu_ops is not None and kv.dtype == torch.bfloat16:
            self.cpu_ops.store_latents(kv_a, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, cos.contiguous(),
                                       sin.contiguous(), kv, slots)
            return
        kv[slots] = torch.cat(self._latent(kv_a, cos, sin), dim=-1).to(kv.dtype)

    def _latent(self, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_a_proj output [..., C+R] -> (c_kv [..., C] normalised, k_pe [..., R] rotated): what the cache holds."""
        c_kv, k_pe = kv_a.split([self.rank, self.rope], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rotary(k_pe, cos, sin)

    def latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, D], cos/sin [B, S, P] -> q_nope [B, S, H, N], q_pe [B, S, H, R] (rotated),
        c_kv [B, S, C] (normalised), k_pe [B, S, R] (rotated)."""
        if self.packed_qkv_a is not None:  # one matmul for the two projections of x
            q_a, kv = self.packed_qkv_a(x).split([self.q_b_proj.in_features, self.rank + self.rope],
                                                                dim=-1)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        else:
            if hasattr(self, "q_proj"):
                q = self.q_proj(x)
            else:
                q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
            kv = self.kv_a_proj_with_mqa(x)
        q = q.unflatten(-1, (self.n_heads, self.nope + self.rope))  # [B, S, H, N+R]
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rotary(q_pe, cos[:, :, None], sin[:, :, None])
        return (q_nope, q_pe, *self._latent(kv, cos, sin))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                impl: str = "naive") -> torch.Tensor:
        if self.cpu_ops is not None and getattr(cache, "cpu_kernels", False):
            return self._forward_projected(x, cos, sin, cache)
        q_nope, q_pe, c_kv, k_pe = self.latents(x, cos, sin)
        if cache is None:
            o = self.attend(impl, q_nope, q_pe, c_kv, k_pe, None)
        else:
            o = cache.attend(self, q_nope, q_pe, c_kv, k_pe, impl)
        return self.o_proj(o.flatten(-2))  # [B, S, H*V] -> [B, S, D]

    def _forward_projected(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
        """The CPU-kernel path: the projections here, rotary + latent norm + cache write + attention in the
        cache's attend_projected (two kernel calls). x [1, T, D] -> [1, T, D]"""
        B, T, _ = x.shape
        x2 = x.reshape(B * T, -1)
        if self.packed_qkv_a is not None:
            qkv = self.packed_qkv_a(x2)  # [T, q_lora + C + R]
            q_lora = self.q_b_proj.in_features
            q = self.q_b_proj(self.q_a_layernorm(qkv[:, :q_lora]))
            kv_a = qkv[:, q_lora:]
        else:
            q = self.q_proj(x2) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x2)))
            kv_a = self.kv_a_proj_with_mqa(x2)
        q = q.view(B * T, self.n_heads, self.nope + self.rope)
        o = cache.attend_projected(self, q, kv_a, cos.reshape(B * T, -1), sin.reshape(B * T, -1))  # [T, H, V]
        return self.o_proj(o.view(B, T, -1))

    def attend(self, impl: str, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """q_nope [B, S, H, N], q_pe [B, S, H, R], context c_kv [B, L, C] and k_pe [B, L, R], mask [B, S, L] bool
        (True = attend) or None for plain causal with S == L -> [B, S, H, V]"""
        if impl == "naive":
            return self.attend_naive(q_nope, q_pe, c_kv, k_pe, mask)
        if impl == "absorbed":
            return self.attend_absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        raise ValueError(f"attention impl {impl!r}: choose one of {ATTENTION_IMPLS}")

    def _kv_b(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.effective_weight(dtype).unflatten(0, (self.n_heads, self.nope + self.v_dim))  # [H, N+V, C]
        return w[:, : self.nope], w[:, self.nope:]  # W_uk [H, N, C], W_uv [H, V, C]

    def attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """-> [B, S, H, V]"""
        kv = self.kv_b_proj(c_kv).unflatten(-1, (self.n_heads, self.nope + self.v_dim))  # [B, L, H, N+V]
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, self.n_heads, -1)], dim=-1)  # [B, L, H, N+R]
        q = torch.cat([q_nope, q_pe], dim=-1)  # [B, S, H, N+R]
        o = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.softmax_scale)
        return o.transpose(1, 2)

    def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """-> [B, S, H, V]"""
        return self.attend_latent(q_nope, q_pe, torch.cat([c_kv, k_pe], dim=-1), mask)

    def attend_latent(self, q_nope, q_pe, latent, mask) -> torch.Tensor:
        """The absorbed form on the cache's own layout: latent [B, L, C+R] = [c_kv | k_pe] -> [B, S, H, V].
        Written with plain batched matmuls: every head of every query reads the same latent, so the S*H query
        rows share one matmul against it (no per-head expansion of the context)."""
        B, S, H, _ = q_nope.shape
        L = latent.shape[1]
        w_uk, w_uv = self._kv_b(q_nope.dtype)
        q_c = torch.einsum("bshn,hnc->bshc", q_nope, w_uk)  # [B, S, H, C]
        q = torch.cat([q_c, q_pe], dim=-1).reshape(B, S * H, -1)  # [B, S*H, C+R]
        scores = torch.bmm(q, latent.transpose(1, 2)).float() * self.softmax_scale  # [B, S*H, L]
        scores = scores.view(B, S, H, L)
        if mask is None:
            mask = torch.ones(S, L, dtype=torch.bool, device=q.device).tril_(L - S)[None]
        scores = scores.masked_fill_(~mask[:, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(latent.dtype).view(B, S * H, L)
        o_c = torch.bmm(probs, latent[..., :self.rank]).view(B, S, H, -1)  # [B, S, H, C]
        return torch.einsum("bshc,hvc->bshv", o_c, w_uv)


def _sdpa(q, k, v, mask, scale) -> torch.Tensor:
    """q [B, H, S, d], k [B, H, L, d], v [B, H, L, dv], mask [B, S, L] bool or None (causal, S == L).
    MLA's value dim (128) is smaller than its query/key dim (192); the fused (flash) kernels want them equal, so v is
    zero-padded and the padding dropped from the output: ~2.5x faster on the CPU than the unfused fallback."""
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    if mask is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)
    return o[..., :dv]
