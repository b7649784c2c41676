"""What a compression method is.

A method is a small dataclass: its fields are its options (defaults from the paper), and it
overrides one hook. Token methods only score tokens; the cache turns scores into a physical
top-k gather per KV head, so a new eviction method is a ``score`` function and a docstring.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.layers import CompressedLayer


@dataclass(frozen=True)
class LayerInputs:
    """Everything a method may look at when it compresses one layer after prefill.

    ``keys``/``values`` are the layer's cached states, one entry per KV head (GQA layout,
    ``[batch, kv_heads, tokens, head_dim]``, keys after RoPE). ``queries`` are the
    post-RoPE queries of the forward pass that filled the cache (``[batch, heads, q_len,
    head_dim]``), so query-based scores need no second projection.
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    layer_idx: int
    scaling: float
    seed: int

    @property
    def group_size(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]


@dataclass
class Method:
    """Base of every method. Subclasses are dataclasses whose fields are their options."""

    name: ClassVar[str]
    family: ClassVar[str]  # "reference" | "token" | "dimension"
    summary: ClassVar[str]
    uses_queries: ClassVar[bool] = False  # whether scores depend on the prompt's queries (query-aware)
    layer_class: ClassVar[type[CompressedLayer]] = CompressedLayer  # how a layer stores what is kept

    @classmethod
    def options(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    def prepare(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """Called once per loaded model before any cell runs (e.g. load or fit a calibration artifact)."""

    def compress(self, layer: CompressedLayer, inputs: LayerInputs, budget: float) -> None:
        """Shrink one layer right after its prefill attention ran; the reference keeps everything."""


@dataclass
class Full(Method):
    """No compression: the reference every other method is compared with."""

    name: ClassVar[str] = "full"
    family: ClassVar[str] = "reference"
    summary: ClassVar[str] = "no compression (reference)"


@dataclass
class TokenMethod(Method):
    """Eviction: keep ``floor(budget * tokens)`` tokens per KV head, the ones with the highest score."""

    family: ClassVar[str] = "token"

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        """Return ``[batch, kv_heads, tokens]`` scores; higher means keep."""
        raise NotImplementedError

    def compress(self, layer: CompressedLayer, inputs: LayerInputs, budget: float) -> None:
        indices = self.keep_indices(inputs, budget)
        if indices is not None:
            layer.keep(indices)

    def keep_indices(self, inputs: LayerInputs, budget: float) -> torch.Tensor | None:
        """Sorted token indices to keep per KV head, or None when every token fits the budget."""
        n_tokens = inputs.keys.shape[2]
        n_keep = max(1, math.floor(budget * n_tokens + 1e-9))
        if n_keep >= n_tokens:
            return None
        scores = self.score(inputs)
        return scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values


def recency(n_tokens: int, device: torch.device) -> torch.Tensor:
    """Scores that rank later tokens higher; used to protect windows and break ties."""
    return torch.arange(n_tokens, device=device, dtype=torch.float32)
