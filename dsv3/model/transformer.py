"""The DeepSeek-V3 transformer: decoder blocks, the causal-LM head and the MTP modules.

Dimension letters: B batch, S sequence, D hidden, V vocabulary.
Module names equal the checkpoint's tensor names (model.layers.N.self_attn.kv_b_proj.weight, ...); MTP module k
lives at model.layers[num_hidden_layers + k - 1] exactly as the checkpoint stores it, and the main forward runs only
the first num_hidden_layers blocks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP, Linear, RMSNorm
from .mla import ATTENTION_IMPLS, MLA, LatentCache
from .moe import MoE
from .rope import RotaryEmbedding


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.cpu_layer = None  # kernels/cpu_pack.py (MTP blocks): the whole block as one C++ call, decode-only steps

    def forward(self, x, cos, sin, cache: LatentCache | None = None, impl: str = "naive") -> torch.Tensor:
        if self.cpu_layer is not None and getattr(cache, "kernel_only", False):
            return self.cpu_layer(x, cos, sin, cache)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, impl)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    """The MTP module's output norm; its `head` is the main lm_head (the checkpoint's copy is not loaded)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(Block):
    """h' = block(eh_proj([enorm(embed(t_{i+k})), hnorm(h_i)])); logits = head(shared_head.norm(h'))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.shared_head = SharedHead(cfg)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, with_mtp: bool = True):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        L = cfg.num_hidden_layers
        n_mtp = cfg.num_nextn_predict_layers if with_mtp else 0
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(L)] + [MTPLayer(cfg, L + k) for k in range(n_mtp)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """Causal LM. `forward(input_ids [B, S]) -> logits [B, S, V]`."""

    def __init__(self, cfg: ModelConfig, with_mtp: bool = True, attn_impl: str = "naive"):
        super().__init__()
        self.cfg = cfg
        self.model = DecoderModel(cfg, with_mtp)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim)
        self.attn_impl = attn_impl
        self.set_attention(attn_impl)
        self.cpu_blocks = None  # kernels/cpu_pack.py: all main blocks as one C++ call for decode-only steps
        self.cpu_model_step = None  # kernels/cpu_pack.py: embedding + blocks + norm + head, one C++ call

    # ------------------------------------------------------------------------------------------------------------
    def set_attention(self, impl: str) -> None:
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl {impl!r}: choose one of {ATTENTION_IMPLS}")
        self.attn_impl = impl

    @property
    def main_layers(self) -> list[Block]:
        return list(self.model.layers)[: self.cfg.num_hidden_layers]  # (slicing a ModuleList builds a new module)

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.model.layers)[self.cfg.num_hidden_layers:]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., D] (after the final norm) -> [..., V]"""
        if self.lm_head is None:
            return F.linear(h, self.model.embed_tokens.weight.to(h.dtype))
        return self.lm_head(h)

    def _positions(self, input_ids: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        return positions

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: LatentCache | None = None, impl: str | None = None) -> torch.Tensor:
        """input_ids [B, S], positions [B, S] (default 0..S-1) -> final hidden states [B, S, D] after model.norm."""
        cos, sin = self.rotary.cos_sin(self._positions(input_ids, positions))  # [B, S, P]
        x = self.model.embed_tokens(input_ids)
        if self.cpu_blocks is not None and getattr(cache, "kernel_only", False):
            cache.rope = (cos[0], sin[0])  # (B = 1 here) for an MTP pass over the same rows
            return self.model.norm(self.cpu_blocks(x, cos, sin, cache))
        impl = impl or self.attn_impl
        for layer in self.main_layers:
            x = layer(x, cos, sin, cache, impl)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: LatentCache | None = None, impl: str | None = None) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, positions, cache, impl))

    def mtp(self, k: int, h: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor | None = None,
            cache: LatentCache | None = None, impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module k (1-based). h [B, S, D]: hidden states of depth k-1 at positions i (the main model's final
        hidden states for k = 1); next_ids [B, S]: tokens t_{i+k}. Returns (logits [B, S, V] predicting t_{i+k+1},
        h' [B, S, D] for depth k+1)."""
        x = self.mtp_hidden(k, h, next_ids, positions, cache, impl)
        return self.mtp_logits(k, x), x

    def _mtp_layer(self, k: int) -> MTPLayer:
        mtp = self.mtp_layers
        if not 1 <= k <= len(mtp):
            raise ValueError(f"MTP module {k} requested but this model has {len(mtp)} "
                             f"(num_nextn_predict_layers={self.cfg.num_nextn_predict_layers}, loaded: {len(mtp)})")
        return mtp[k - 1]

    def mtp_hidden(self, k: int, h: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor | None = None,
                   cache: LatentCache | None = None, impl: str | None = None,
                   keep: torch.Tensor | None = None) -> torch.Tensor:
        """The MTP block's output h' [B, S, D] without the head (drafting needs logits of a few rows only).
        keep [K] (B = 1, increasing rows): only those rows' outputs are wanted -> [1, K, D]; on the C++ kernels the
        other rows then only store their latents (what later positions attend to)."""
        layer = self._mtp_layer(k)
        cos, sin = self.rotary.cos_sin(self._positions(next_ids, positions))
        x = self._mtp_input(layer, h, next_ids)
        if keep is None:
            return layer(x, cos, sin, cache, impl or self.attn_impl)
        if layer.cpu_layer is not None and getattr(cache, "kernel_only", False):
            return layer.cpu_layer(x, cos, sin, cache, keep)
        return layer(x, cos, sin, cache, impl or self.attn_impl)[:, keep]

    def _mtp_input(self, layer: MTPLayer, h: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """h [..., D], next_ids [...] -> eh_proj([enorm(embed(next_ids)), hnorm(h)]) [..., D]"""
        e = layer.enorm(self.model.embed_tokens(next_ids))
        return layer.eh_proj(torch.cat([e, layer.hnorm(h)], dim=-1))  # [..., 2D] -> [..., D]

    def mtp_store_latents(self, k: int, h: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                          kv: torch.Tensor, slots: torch.Tensor) -> None:
        """The part of MTP module k that later positions attend to, for rows whose own draft is not needed: h [T, D],
        next_ids [T], positions [T] -> the module's latents of those rows in its cache layer kv [S, C+R] at slots
        [T]. The module's attention output, FFN and head are skipped; the stored values equal a full pass's."""
        layer = self._mtp_layer(k)
        cos, sin = self.rotary.cos_sin(positions)  # [T, P]
        x = layer.input_layernorm(self._mtp_input(layer, h, next_ids))
        layer.self_attn.store_latents(x, cos, sin, kv, slots)

    def mtp_logits(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """h' [..., D] of MTP module k -> logits [..., V] through its shared_head norm and the shared head."""
        return self.logits(self._mtp_layer(k).shared_head.norm(x))


def build_model(cfg: ModelConfig, device: str | torch.device = "meta", dtype: torch.dtype | None = None,
                with_mtp: bool = True, attn_impl: str = "naive") -> Transformer:
    """Build on `device`: the meta device (the default) costs no memory and is instant even for 671B parameters;
    the loader then materialises each tensor. On a real device the weights are randomly initialised."""
    with torch.device(device):
        model = Transformer(cfg, with_mtp=with_mtp, attn_impl=attn_impl)
    if str(device) != "meta":
        init_weights(model)
        if dtype is not None:
            model.to(dtype)
    return model


@torch.no_grad()
def init_weights(model: Transformer, std: float = 0.02) -> None:
    """Random initialisation for fresh models (tests, training from scratch): normal(0, std) for matrices and
    embeddings, ones for norms, zeros for the routing bias."""
    from .moe import Gate, StackedLinear

    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.weight.fill_(1.0)
        elif isinstance(m, (Linear, StackedLinear, Gate, nn.Embedding)):
            m.weight.normal_(0.0, std)
            if isinstance(m, Gate) and m.e_score_correction_bias is not None:
                m.e_score_correction_bias.zero_()
