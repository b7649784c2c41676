"""What a compression method is.

A method is a small dataclass: its fields are its options (defaults from the paper), and it
overrides one hook. Token methods only score tokens; the cache turns scores into a physical
top-k gather per KV head, so a new eviction method is a ``score`` function and a docstring.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvbench.registry import load_object

if TYPE_CHECKING:
    from kvbench.layers import CompressedLayer


@dataclass(frozen=True)
class LayerInputs:
    """Everything a method may look at when it compresses one layer after prefill.

    ``keys``/``values`` are the layer's cached states, one entry per KV head (GQA layout,
    ``[batch, kv_heads, tokens, head_dim]``, keys after RoPE). ``queries`` are the
    post-RoPE queries of the forward pass that filled the cache (``[batch, heads, q_len,
    head_dim]``), so query-based scores need no second projection; they belong to the last
    ``q_len`` keys. ``seen_tokens`` is the logical length (tokens seen, which the budget is a
    fraction of); None means every seen token is in ``keys`` (prefill).
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    layer_idx: int
    scaling: float
    seed: int
    seen_tokens: int | None = None

    @property
    def n_seen(self) -> int:
        return self.keys.shape[2] if self.seen_tokens is None else self.seen_tokens

    @property
    def group_size(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's key and value in one KV head."""
        return self.keys.shape[-1] * self.keys.element_size() + self.values.shape[-1] * self.values.element_size()


@dataclass
class Method:
    """Base of every method. Subclasses are dataclasses whose fields are their options."""

    name: ClassVar[str]
    family: ClassVar[str]  # "reference" | "token" | "dimension"
    summary: ClassVar[str]
    uses_queries: ClassVar[bool] = False  # whether scores depend on the prompt's queries (query-aware)
    # How a cache layer stores what is kept ("module:Class" of a kvbench.layers.CompressedLayer subclass), imported
    # only when a cache is built, so that naming a method on the command line stays cheap.
    layout: ClassVar[str] = "kvbench.layers:CompressedLayer"

    @classmethod
    def options(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    def layer_class(self) -> type[CompressedLayer]:
        return load_object(self.layout)

    def prepare(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """Called once per loaded model before any cell runs (e.g. load or fit a calibration artifact).

        Call it through ``kvbench.prefill.prepare``, which records that it ran: ``kvbench.prefill.prefill``
        refuses a method that was not prepared for the model it runs on.
        """

    def compress(self, layer: CompressedLayer, inputs: LayerInputs, budget: float) -> None:
        """Shrink one layer right after its prefill attention ran; the reference keeps everything."""

    def finish(self, cache: Any) -> None:
        """Called once after the compressing forward, when every layer has been through ``compress``.

        Methods that allocate one budget across layers (KVCompose's global allocation) score in ``compress`` and
        evict here, from ``cache.layers``; ``cache.budget`` is the budget. The bytes are counted after this hook.
        """

    def prefill_context(self, model: torch.nn.Module, budget: float) -> AbstractContextManager:
        """Entered around the compressing prefill forward (an external library's hooks, e.g. a kvpress press)."""
        return nullcontext()

    def row_fields(self, model: torch.nn.Module) -> dict[str, Any]:
        """Fields added to each result row after prefill. ``masked``: the method hid tokens without removing them."""
        return {"masked": False}


@dataclass
class Full(Method):
    """No compression: the reference every other method is compared with."""

    name: ClassVar[str] = "full"
    family: ClassVar[str] = "reference"
    summary: ClassVar[str] = "no compression (reference)"


@dataclass
class TokenMethod(Method):
    """Eviction: keep ``floor(budget * tokens)`` tokens per KV head, the ones with the highest score.

    Decoding-phase compression (``decoding=true``): while tokens are generated, each layer is cut back to
    ``floor(budget * tokens seen)`` tokens whenever it holds ``interval`` more than that, so it never holds
    more than the budget plus ``interval`` tokens. Query-aware scores then see the queries of the tokens
    added since the last compression (kept in ``layer.recent_queries``, counted in the cache's bytes).
    """

    family: ClassVar[str] = "token"
    uniform: ClassVar[bool] = True  # every layer and KV head keeps the same number of tokens

    decoding: bool = False
    interval: int = 16

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError("interval must be >= 1 (tokens generated between two decoding compressions)")

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        """Return ``[batch, kv_heads, tokens]`` scores; higher means keep."""
        raise NotImplementedError

    def compress(self, layer: CompressedLayer, inputs: LayerInputs, budget: float) -> None:
        indices = self.keep_indices(inputs, budget)
        if indices is not None:
            layer.keep(indices)

    def keep_count(self, inputs: LayerInputs, budget: float) -> int:
        """Tokens to keep per KV head: ``floor(budget * tokens seen)``, at least one."""
        return max(1, math.floor(budget * inputs.n_seen + 1e-9))

    def keep_indices(self, inputs: LayerInputs, budget: float) -> torch.Tensor | None:
        """Sorted token indices to keep per KV head, or None when every token fits the budget."""
        n_tokens = inputs.keys.shape[2]
        n_keep = self.keep_count(inputs, budget)
        if n_keep >= n_tokens:
            return None
        scores = self.score(inputs)
        return scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values

    def decode_step(self, layer: CompressedLayer, queries: torch.Tensor, layer_idx: int, scaling: float,
                    budget: float, seed: int) -> None:
        """Called after each attention once the prompt is compressed (only with ``decoding=true``)."""
        if self.uses_queries:  # query-agnostic scores need no buffer
            recent = layer.recent_queries
            queries = layer.recent_queries = queries if recent is None else torch.cat([recent, queries], dim=2)
        inputs = LayerInputs(layer.keys, layer.values, queries, layer_idx, scaling, seed, layer.seen_tokens)
        if layer.tokens_per_head() - self.keep_count(inputs, budget) < self.interval:
            return
        layer.recent_queries = None
        self.compress(layer, inputs, budget)


def recency(n_tokens: int, device: torch.device) -> torch.Tensor:
    """Scores that rank later tokens higher; used to protect windows and break ties."""
    return torch.arange(n_tokens, device=device, dtype=torch.float32)


def softmax_chunks(queries: torch.Tensor, keys: torch.Tensor, scaling: float, chunk: int
                   ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Causal softmax attention of ``queries`` ``[batch, heads, q, dim]``, the last ``q`` of ``keys``
    ``[batch, kv_heads, m, dim]``, ``chunk`` queries at a time, for methods that need the weights sdpa does not
    return. Yields ``(size, weights, normalisers)``: ``weights`` ``[batch, kv_heads, size * group, visible]``
    holds ``exp(l - max)`` of the chunk's queries (rows: query, then query head of the KV head's group, as
    ``repeat_kv`` groups them) over the keys they can see, ``normalisers`` ``[..., 1]`` the inverses of its row sums
    (the probabilities are their product, left to the caller to fuse with its reduction). One product per chunk and
    KV head, the causal mask on the chunk's own columns only, the softmax in place: on a CPU, with chunks whose
    logits stay near the caches, several times faster than masking and normalising into new tensors."""
    batch, heads, q_len, head_dim = queries.shape
    kv_heads, m = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    grouped = (queries.float() * scaling).reshape(batch, kv_heads, group, q_len, head_dim).transpose(2, 3)
    keys = keys.float().transpose(-1, -2)  # [batch, kv_heads, dim, m]
    offset = m - q_len  # the first query's position
    for start in range(0, q_len, chunk):
        size = min(chunk, q_len - start)
        rows = grouped[:, :, start:start + size].reshape(batch, kv_heads, size * group, head_dim)
        weights = torch.matmul(rows, keys[..., :offset + start + size])
        future = torch.ones(size, size, dtype=torch.bool, device=keys.device).triu(1)
        weights[..., offset + start:].masked_fill_(future.repeat_interleave(group, 0), float("-inf"))
        weights.sub_(weights.amax(-1, keepdim=True)).exp_()
        yield size, weights, weights.sum(-1, keepdim=True).reciprocal_()
