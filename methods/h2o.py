"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models", arXiv 2306.14048).

Keep the heavy hitters, the tokens with the largest attention accumulated over all queries, plus
the most recent tokens. The paper splits the cache evenly between the two (``recent_ratio`` 0.5,
e.g. 10 % heavy + 10 % recent for a 20 % cache). With GQA the attention of the query heads that
share a KV head is summed, so there is one selection per KV head.

Prefill: every prompt query's softmax attention is accumulated, ``chunk`` queries at a time, so
the ``tokens x tokens`` attention matrix never exists at once (memory ``chunk x tokens`` per query head).
sdpa does not return its attention weights, so H2O computes them a second time: its prefill costs more
than full's (docs/speed.md).
Decoding (``decoding=true``, the paper's own setting with ``interval=1``): the running sums stay on
the layer (``layer.scores``, counted in its bytes, so the layer keeps a few tokens fewer to stay
within the budget in bytes), each new query's attention is added to them, and the lowest-scoring
tokens outside the recent window are evicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from kvbench.methods.base import LayerInputs, TokenMethod, recency, softmax_chunks

if TYPE_CHECKING:
    from kvbench.layers import CompressedLayer


@dataclass
class H2O(TokenMethod):
    name: ClassVar[str] = "h2o"
    summary: ClassVar[str] = "accumulated attention (heavy hitters) + recent window, chunked (Zhang et al. 2023)"
    uses_queries: ClassVar[bool] = True

    recent_ratio: float = 0.5
    chunk: int = 64  # queries per chunk: at 8K tokens on a CPU 0.34 s a layer against 1.06 s with 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent_ratio <= 1.0 or self.chunk < 1:
            raise ValueError(f"h2o needs 0 <= recent_ratio <= 1 and chunk >= 1, got recent_ratio={self.recent_ratio}, "
                             f"chunk={self.chunk}")

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        """Attention accumulated over ``inputs.queries`` (the last ``q_len`` keys' queries), per KV head: each
        chunk's rows summed by one product with their normalisers."""
        batch, kv_heads, n_tokens, _ = inputs.keys.shape
        total = inputs.keys.new_zeros(batch, kv_heads, 1, n_tokens, dtype=torch.float32)
        for _, weights, normalisers in softmax_chunks(inputs.queries, inputs.keys, inputs.scaling, self.chunk):
            total[..., :weights.shape[-1]] += torch.matmul(normalisers.transpose(-1, -2), weights)
        return total.squeeze(2)

    def keep_count(self, inputs: LayerInputs, budget: float) -> int:
        if not self.decoding:
            return super().keep_count(inputs, budget)
        share = inputs.token_bytes / (inputs.token_bytes + 4)  # the running sum is one float32 per token and head
        return max(1, math.floor(budget * inputs.n_seen * share + 1e-9))

    def _select(self, scores: torch.Tensor, n_keep: int) -> torch.Tensor:
        """Sorted indices: the ``recent_ratio`` share of ``n_keep`` most recent tokens, then the heaviest."""
        n_recent = math.floor(n_keep * self.recent_ratio + 1e-9)
        if n_recent:
            scores = scores.clone()
            scores[..., -n_recent:] = scores.max() + 1 + recency(n_recent, scores.device)
        return scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values

    def keep_indices(self, inputs: LayerInputs, budget: float) -> torch.Tensor | None:
        n_keep = self.keep_count(inputs, budget)
        if n_keep >= inputs.keys.shape[2]:
            return None
        return self._select(self.score(inputs), n_keep)

    def compress(self, layer: CompressedLayer, inputs: LayerInputs, budget: float) -> None:
        scores = self.score(inputs)
        if self.decoding:
            layer.scores = scores  # the running sums decoding adds to
        n_keep = self.keep_count(inputs, budget)
        if n_keep < inputs.keys.shape[2]:
            layer.keep(self._select(scores, n_keep))

    def decode_step(self, layer: CompressedLayer, queries: torch.Tensor, layer_idx: int, scaling: float,
                    budget: float, seed: int) -> None:
        inputs = LayerInputs(layer.keys, layer.values, queries, layer_idx, scaling, seed, layer.seen_tokens)
        layer.scores = layer.scores + self.score(inputs)
        n_keep = self.keep_count(inputs, budget)
        if layer.held_tokens() - n_keep >= self.interval:
            layer.keep(self._select(layer.scores, n_keep))
