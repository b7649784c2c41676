"""A KV cache that physically holds only what a method keeps.

``CompressedCache`` is a transformers ``Cache``, so ``model.generate(cache=cache)`` (``past_key_values=`` on
transformers before 5.2x) works unchanged. Each layer keeps the GQA layout (one entry per KV head) and, after
compression, holds smaller tensors: evicted tokens are gathered out, never masked.

The storage of each layer is the method's ``layer_class()`` (see ``kvbench.layers``); what to keep
is the method's ``compress`` hook, so the cache itself knows no method family.

Compression happens during the prefill forward, layer by layer, right after the layer's
attention has run on the full states (see ``kvbench.attention``): the layer's output is exact
and the full cache of the whole model never exists at once.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers.cache_utils import Cache

from kvbench.methods import LayerInputs, Method

ACTIVE_CACHE: ContextVar[CompressedCache | None] = ContextVar("kvbench_active_cache", default=None)


class CompressedCache(Cache):
    """The cache a compression method works on.

    ``budget`` is the fraction of the full cache's bytes a method may keep. Compression runs
    once per layer, during the first forward made inside ``with cache.compressing():``.
    """

    def __init__(self, method: Method, budget: float = 1.0, seed: int = 0) -> None:
        super().__init__(layer_class_to_replicate=method.layer_class())
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
        self.method.finish(self)

    def after_attention(self, layer_idx: int, queries: torch.Tensor, scaling: float) -> None:
        """Called by kvbench's attention function once a layer's attention has run."""
        layer = self.layers[layer_idx]
        if not self._armed or layer.full_nbytes is not None:
            return
        layer.owner = weakref.ref(self)  # a weak reference: a finished cell's cache is freed at once
        layer.full_nbytes = layer.nbytes()
        inputs = LayerInputs(layer.keys, layer.values, queries, layer_idx, scaling, self.seed)
        self.method.compress(layer, inputs, self.budget)

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds now, measured from the tensors."""
        return sum(layer.nbytes() for layer in self.layers)

    def full_nbytes(self) -> int:
        """Bytes the compressed layers held before compression, measured when it happened."""
        return sum(layer.full_nbytes or 0 for layer in self.layers)

    def held_tokens(self) -> list[int]:
        return [layer.held_tokens() for layer in self.layers]
