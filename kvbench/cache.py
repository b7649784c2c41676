"""A KV cache that physically holds only what a method keeps.

``CompressedCache`` is a transformers ``Cache``, so ``model.generate(past_key_values=cache)``
works unchanged. Each layer keeps the GQA layout (one entry per KV head) and, after
compression, holds smaller tensors: evicted tokens are gathered out, never masked.

Positions stay true after eviction: ``get_seq_length`` reports the *logical* length (tokens
seen, which places new tokens and their RoPE), ``get_mask_sizes`` the *physical* length (tokens
held) with an offset of ``logical - physical``, so causality among new tokens stays right.

Compression happens during the prefill forward, layer by layer, right after the layer's
attention has run on the full states (see ``kvbench.attention``): the layer's output is exact
and the full cache of the whole model never exists at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvbench.methods import LayerInputs, Method, TokenMethod

ACTIVE_CACHE: ContextVar[CompressedCache | None] = ContextVar("kvbench_active_cache", default=None)


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


class CompressedCache(Cache):
    """The cache a compression method works on.

    ``budget`` is the fraction of the full cache's bytes a method may keep. Compression runs
    once per layer, during the first forward made inside ``with cache.compressing():``.
    """

    def __init__(self, method: Method, budget: float = 1.0, seed: int = 0) -> None:
        super().__init__(layer_class_to_replicate=CompressedLayer)
        self.method = method
        self.budget = budget
        self.seed = seed
        self._armed = False

    @contextmanager
    def compressing(self) -> Iterator[CompressedCache]:
        """Compress every layer in the forward pass run inside this block."""
        token = ACTIVE_CACHE.set(self)
        self._armed = True
        try:
            yield self
        finally:
            self._armed = False
            ACTIVE_CACHE.reset(token)
        missing = [i for i, layer in enumerate(self.layers) if layer.full_nbytes is None]
        if not self.layers or missing:
            raise RuntimeError(
                "the cache was not compressed: load the model with kvbench.models.enable_compression "
                f"(layers not compressed: {missing or 'all'})"
            )

    def after_attention(self, layer_idx: int, queries: torch.Tensor, scaling: float) -> None:
        """Called by kvbench's attention function once a layer's attention has run."""
        layer = self.layers[layer_idx]
        if not self._armed or layer.full_nbytes is not None:
            return
        layer.full_nbytes = layer.nbytes()
        if isinstance(self.method, TokenMethod):
            inputs = LayerInputs(layer.keys, layer.values, queries, layer_idx, scaling, self.seed)
            indices = self.method.keep_indices(inputs, self.budget)
            if indices is not None:
                layer.keep(indices)

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds now, measured from the tensors."""
        return sum(layer.nbytes() for layer in self.layers)

    def full_nbytes(self) -> int:
        """Bytes the compressed layers held before compression, measured when it happened."""
        return sum(layer.full_nbytes or 0 for layer in self.layers)

    def held_tokens(self) -> list[int]:
        return [layer.held_tokens() for layer in self.layers]
