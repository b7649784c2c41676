"""Random eviction: the floor any scoring method has to beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.methods.base import LayerInputs, TokenMethod


@dataclass
class RandomEviction(TokenMethod):
    """Keeps a uniformly random subset of tokens per KV head, seeded by the run seed and layer."""

    name: ClassVar[str] = "random"
    summary: ClassVar[str] = "keep a random subset of tokens per KV head (seeded)"

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        generator = torch.Generator().manual_seed(inputs.seed * 100_003 + inputs.layer_idx)
        batch, kv_heads, n_tokens, _ = inputs.keys.shape
        return torch.rand(batch, kv_heads, n_tokens, generator=generator).to(inputs.keys.device)
