"""Storage layouts a compressed cache's layers can have.

``CompressedLayer`` holds dense ``[batch, kv_heads, held_tokens, head_dim]`` tensors (the GQA
layout, one entry per KV head) and the *logical* length. Positions stay true after eviction:
``get_seq_length`` reports the logical length (tokens seen, which places new tokens and their
RoPE), ``get_mask_sizes`` the *physical* length (tokens held) with an offset of
``logical - physical``, so causality among new tokens stays right.

Other layouts (latent, per-head variable length) subclass it and keep the same contract: ``nbytes``
counts every tensor the layer stores, and ``full_nbytes`` records what it held before compression.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class CompressedLayer(DynamicLayer):
    """One layer's cache: tensors ``[batch, kv_heads, held_tokens, head_dim]`` plus the logical length."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen_tokens = 0
        self.full_nbytes: int | None = None  # bytes the layer held before compression, measured

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.seen_tokens += key_states.shape[-2]
        return keys, values

    def held_tokens(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.held_tokens()
        return held + query_length, self.seen_tokens - held

    def crop(self, tokens_to_remove: int) -> None:
        held = self.held_tokens()
        super().crop(tokens_to_remove)
        self.seen_tokens -= held - self.held_tokens()

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
        self.full_nbytes = None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer stores; what ``nbytes`` counts."""
        return [t for t in (self.keys, self.values) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def keep(self, indices: torch.Tensor) -> None:
        """Replace the held tensors by new, smaller ones holding only ``indices`` per KV head."""
        gather = indices.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, gather).contiguous()
        self.values = self.values.gather(2, gather.expand(-1, -1, -1, self.values.shape[-1])).contiguous()
