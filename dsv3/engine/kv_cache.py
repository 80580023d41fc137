"""The paged latent KV cache: only MLA's c_kv and rotated k_pe per token per layer, in fixed-size blocks.

Dimension letters: Y cache layers (main layers, then MTP layers), K blocks, Z block size (tokens per block),
W = kv_lora_rank + qk_rope_head_dim (576 for V3), T tokens of one step.

Blocks are reference counted. A full block is registered under a hash of its tokens chained with its parent's
hash, so a later request whose prompt starts with the same tokens (a shared system prompt, earlier chat turns)
reuses it instead of recomputing. Unreferenced registered blocks stay cached and are evicted least recently used
first when the pool runs dry.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

import torch

from ..config import ModelConfig


class CacheFullError(RuntimeError):
    """No free block: the scheduler must preempt or wait (never surfaces to users as an out-of-memory crash)."""


def block_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


class BlockAllocator:
    """Host-side bookkeeping of K blocks: free list, reference counts, prefix hashes, LRU of cached blocks."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # never-hashed blocks, popped from the end
        self.hash_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self.hits = 0
        self.queries = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free + evictable)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self) -> int:
        if self.free:
            b = self.free.pop()
        elif self.evictable:
            b, _ = self.evictable.popitem(last=False)
            del self.block_of[self.hash_of.pop(b)]
        else:
            raise CacheFullError("latent cache is full")
        self.ref[b] = 1
        return b

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.ref[b] -= 1
            assert self.ref[b] >= 0, f"block {b} released twice"
            if self.ref[b] == 0:
                if b in self.hash_of:
                    self.evictable[b] = None
                else:
                    self.free.append(b)

    def register(self, block: int, h: bytes) -> None:
        """Mark a full block as holding the tokens hashed by h (first writer wins)."""
        if not self.enable_prefix_caching or block in self.hash_of or h in self.block_of:
            return
        self.hash_of[block] = h
        self.block_of[h] = block

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """Longest run of cached blocks for a chain of block hashes; each returned block gains a reference."""
        out = []
        if not self.enable_prefix_caching:
            return out
        for h in hashes:
            self.queries += 1
            b = self.block_of.get(h)
            if b is None:
                break
            self.hits += 1
            if self.ref[b] == 0:
                self.evictable.pop(b, None)
            self.ref[b] += 1
            out.append(b)
        return out


class LatentKVCache:
    """The cache tensor [Y, K*Z, W] plus its allocator."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", num_layers: int | None = None,
                 enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the latent cache needs at least one block, got num_blocks={num_blocks}")
        self.cfg = cfg
        self.block_size = block_size
        self.num_layers = num_layers if num_layers is not None else cfg.num_hidden_layers
        self.width = cfg.kv_cache_values_per_token_per_layer
        self.kv = torch.zeros(self.num_layers, num_blocks * block_size, self.width, dtype=dtype, device=device)
        self.allocator = BlockAllocator(num_blocks, enable_prefix_caching)

    @staticmethod
    def blocks_for_budget(cfg: ModelConfig, budget_bytes: int, block_size: int, dtype: torch.dtype,
                          num_layers: int | None = None) -> int:
        per_block = LatentKVCache.bytes_per_token_for(cfg, dtype, num_layers) * block_size
        return int(budget_bytes // per_block)

    @staticmethod
    def bytes_per_token_for(cfg: ModelConfig, dtype: torch.dtype, num_layers: int | None = None) -> int:
        layers = cfg.num_hidden_layers if num_layers is None else num_layers
        return cfg.kv_cache_values_per_token_per_layer * layers * dtype.itemsize

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.width * self.kv.element_size()

    @property
    def total_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences (cached-but-unreferenced blocks count as free)."""
        return self.allocator.num_used / self.num_blocks
