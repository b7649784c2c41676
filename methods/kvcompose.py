"""KVCompose (Akulov et al., 2025, "KVCompose: Efficient Structured KV Cache Compression with Composite Tokens",
arXiv 2509.05165), as its reference implementation (kvpress 0.5.5's ``KVComposePress``, by the first author) runs.

Training-free, at prefill, with one budget for the whole model:

1. *Task attention.* Every query head scores each context token by the softmax attention that the task's queries
   give it, reduced over those queries (``agg_task``, the reference's max). ``task=refeed`` (the reference's
   behaviour): the compressed input is fed a second time as the task, continuing the cache at positions
   n..2n-1, so the task queries are a second reading of the whole input; in query-aware cells the input ends with
   the question, in query-agnostic cells it is the context alone. Cost: a second forward over the input, over a
   cache of 2n tokens per layer while it runs (the re-fed half is dropped after), plus the explicit float32
   task attention of n queries on up to 2n keys per layer (a prefill at 2K tokens takes about 4x ``full``'s on a
   CPU). ``task=window``: the last ``window`` queries of the compressing
   forward are the task (in a query-aware cell, the question's tokens), at no extra forward.
2. The query heads of a GQA group are reduced to their KV head (``agg_group``, mean); optionally each score is
   multiplied by the token's value norm (``add_v_norm``); the mean over a layer's KV heads is added to each head
   (``add_mean_across_heads``, on by default).
3. *Composite scores.* Each KV head's scores are sorted in descending order and position j is reduced across the
   layer's heads (``agg_head``, mean): the layer's j-th composite token is every head's j-th best token. Layer 0
   takes the element-wise max over layers, so it never keeps fewer tokens than another layer.
4. *Global allocation.* The top ``floor(budget x layers x tokens)`` composite scores across all layers are kept;
   the number falling in layer l is its length B_l (at least ``max(1, keep_token_lower_bound)``, as in 0.5.5,
   but that floor is taken inside the top-k, so the budget holds; a budget below it is refused).
5. Each KV head keeps its own top B_l tokens in positional order, stacked into one dense
   ``[batch, kv_heads, B_l, head_dim]`` tensor per layer (keys post-RoPE; later tokens get their true positions).

``structured=false`` is the reference's unstructured variant: one global ranking of every (layer, KV head)'s sorted
scores gives each head its own count. kvpress only masks it; here it is stored packed per head, like ``adakv``,
every head keeps at least one token, and the per-head lengths are paid for in tokens. Scoring runs in chunks of
queries (never a tokens x tokens matrix). Differences from kvpress 0.5.5, all fixes of its behaviours: scores are
per batch row (kvpress maxes over the batch); ``add_v_norm`` uses the context's values (kvpress multiplies by the
norms of a 2n-token cache and fails); the unstructured variant removes tokens instead of masking them and keeps no
re-fed copy; the floor of one token per layer (or head) is taken inside the budget; kvbench's attention is sdpa,
kvpress's eager, so scores agree to float rounding. With batch > 1 the per-layer lengths come from the batch-mean
composite scores (a layer's tensor has one length).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvbench.methods.base import LayerInputs, Method, softmax_chunks

if TYPE_CHECKING:
    from kvbench.layers import CompressedLayer

AGGREGATIONS = ("max", "mean")
TASKS = ("refeed", "window")
# Attention probabilities computed at once: on a CPU 8 MB in float32, near the caches (6x faster than 64 MB at 8K
# tokens); on a GPU, where each chunk costs kernel launches, 128 MB.
CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 25}
BOOST = 1e9  # added to the first keep_token_lower_bound ranks, as in the reference


def task_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float, n_context: int,
                   reduce: str) -> torch.Tensor:
    """``[batch, heads, n_context]``: each query head's softmax attention on the first ``n_context`` keys, reduced
    (max or mean) over ``queries`` ``[batch, heads, q, dim]``, which are the last ``q`` of ``keys``
    ``[batch, kv_heads, m, dim]`` (causal). Probabilities are normalised over every visible key, as eager attention
    does; a chunk of queries at a time (``softmax_chunks``), the mean over queries one product with the normalisers."""
    batch, heads, q_len, _ = queries.shape
    kv_heads, m = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    chunk = max(1, CHUNK_ELEMENTS["cuda" if keys.is_cuda else "cpu"] // (heads * m * batch))
    out = None
    for size, weights, normalisers in softmax_chunks(queries, keys, scaling, chunk):
        context = weights[..., :n_context]
        if reduce == "max":
            part = context.mul_(normalisers).view(batch, kv_heads, size, group, n_context).amax(dim=2)
            out = part if out is None else torch.maximum(out, part)
        else:  # row (query i, head g) weighs into head g's sum
            rows = weights.new_zeros(batch, kv_heads, group, size, group)
            rows.diagonal(dim1=2, dim2=4).copy_(normalisers.view(batch, kv_heads, size, group))
            part = torch.matmul(rows.view(batch, kv_heads, group, size * group), context)
            out = part if out is None else out + part
    out = out if reduce == "max" else out / q_len
    return out.reshape(batch, heads, n_context)


def kept_count(budget: float, parts: int, n: int) -> int:
    """Tokens the global allocation keeps over ``parts`` layers (or heads) of ``n`` tokens: ``floor(budget x parts x
    n)``, at least one."""
    return max(1, math.floor(budget * parts * n + 1e-9))


def reduce(scores: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    return scores.amax(dim=dim) if how == "max" else scores.mean(dim=dim)


@dataclass
class KVCompose(Method):
    name: ClassVar[str] = "kvcompose"
    family: ClassVar[str] = "token"
    summary: ClassVar[str] = ("composite tokens: per-head task attention, rank-aligned across heads, one global "
                              "allocation over layers (Akulov et al. 2025)")
    uses_queries: ClassVar[bool] = True
    uniform: ClassVar[bool] = False  # per-layer lengths: not usable inside a composition

    structured: bool = True
    agg_task: str = "max"
    agg_group: str = "mean"
    agg_head: str = "mean"
    add_v_norm: bool = False
    add_mean_across_heads: bool = True
    keep_token_lower_bound: int = 0
    task: str = "refeed"
    window: int = 32

    def __post_init__(self) -> None:
        for option in ("agg_task", "agg_group", "agg_head"):
            if getattr(self, option) not in AGGREGATIONS:
                raise ValueError(f"kvcompose {option} must be one of {', '.join(AGGREGATIONS)}")
        if self.task not in TASKS:
            raise ValueError(f"kvcompose task must be one of {', '.join(TASKS)}")
        if self.keep_token_lower_bound < 0 or self.window < 1:
            raise ValueError("kvcompose needs keep_token_lower_bound >= 0 and window >= 1")
        self._model: weakref.ref | None = None
        self._clear()

    def _clear(self) -> None:
        self._task_scores: dict[int, torch.Tensor] = {}  # layer -> [batch, heads, n] reduced task attention
        self._input_ids: torch.Tensor | None = None
        self._n_context = 0
        self._recording = False

    def layer_class(self) -> type[CompressedLayer]:
        from kvbench.layers import CompressedLayer, PerHeadLayer

        return CompressedLayer if self.structured else PerHeadLayer

    def prepare(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self._model = weakref.ref(model)  # the task pass runs the model again after the compressing forward

    @contextmanager
    def prefill_context(self, model: torch.nn.Module, budget: float) -> Iterator[None]:
        """Records the compressed input's ids (the task pass re-feeds them); clears the per-prompt state after."""
        self._clear()

        def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if self._input_ids is None:
                self._input_ids = args[0] if args else kwargs.get("input_ids")

        hook = model.register_forward_pre_hook(record, with_kwargs=True) if self.task == "refeed" else None
        try:
            yield
        finally:
            if hook is not None:
                hook.remove()
            self._clear()

    @property
    def decoding(self) -> bool:
        """True only while the task pass runs: kvbench's attention then hands each layer's queries to decode_step."""
        return self._recording

    def compress(self, layer: CompressedLayer, inputs: LayerInputs, budget: float) -> None:
        """Nothing is evicted here (the allocation needs every layer); ``task=window`` scores now."""
        self._n_context = inputs.keys.shape[2]
        if budget < 1.0 and self.task == "window":
            window = min(self.window, inputs.queries.shape[2])
            self._task_scores[inputs.layer_idx] = task_attention(
                inputs.queries[:, :, -window:], inputs.keys, inputs.scaling, self._n_context, self.agg_task)

    def decode_step(self, layer: CompressedLayer, queries: torch.Tensor, layer_idx: int, scaling: float,
                    budget: float, seed: int) -> None:
        """Task pass: the re-fed tokens' attention on the context (the layer now holds context + task keys)."""
        if self._recording:
            self._task_scores[layer_idx] = task_attention(queries, layer.keys, scaling, self._n_context,
                                                          self.agg_task)

    def finish(self, cache: Any) -> None:
        if cache.budget >= 1.0:
            return
        if self.task == "refeed":
            self._refeed(cache)
        scores = self.head_scores(cache)
        if self.structured:
            lengths = self.layer_lengths(scores, cache.budget)
            for layer, layer_scores, length in zip(cache.layers, scores, lengths, strict=True):
                if length < self._n_context:
                    layer.keep(layer_scores.topk(length, dim=-1).indices.sort(dim=-1).values)
        else:
            counts = self.head_lengths(scores, cache.budget, self.lengths_reserve(cache))  # [layers, batch, kv_heads]
            for layer, layer_scores, layer_counts in zip(cache.layers, scores, counts, strict=True):
                indices = [head.topk(int(count)).indices.sort().values
                           for head, count in zip(layer_scores.flatten(0, 1), layer_counts.flatten(), strict=True)]
                layer.keep_per_head(indices)

    def _refeed(self, cache: Any) -> None:
        from kvbench.prefill import cache_arguments

        model = self._model() if self._model is not None else None
        if model is None or self._input_ids is None:
            raise RuntimeError("kvcompose task=refeed needs prepare(model, tokenizer) and the prefill's input ids")
        self._recording = True
        try:
            model(self._input_ids, **cache_arguments(model, cache), logits_to_keep=1)
        finally:
            self._recording = False
        for layer in cache.layers:
            layer.crop(self._n_context - layer.held_tokens())  # drop the re-fed copy: the context stays

    def head_scores(self, cache: Any) -> torch.Tensor:
        """``[layers, batch, kv_heads, n]``: task attention per KV head, enhanced as configured."""
        per_layer = []
        for index, layer in enumerate(cache.layers):
            task = self._task_scores[index]
            batch, heads, n = task.shape
            kv_heads = layer.keys.shape[1]
            scores = reduce(task.reshape(batch, kv_heads, heads // kv_heads, n), self.agg_group, dim=2)
            if self.add_v_norm:
                scores = scores * layer.values[:, :, :n].float().norm(dim=-1)
            if self.add_mean_across_heads:
                scores = scores + scores.mean(dim=1, keepdim=True)
            per_layer.append(scores)
        return torch.stack(per_layer)

    def floor(self, parts: int, n_kept: int, budget: float) -> int:
        """Tokens every layer (or head) keeps at least: ``max(1, keep_token_lower_bound)``; a budget below that for
        every one of ``parts`` is refused."""
        floor = max(1, self.keep_token_lower_bound)
        if n_kept < parts * floor:
            raise ValueError(f"kvcompose: budget {budget:g} keeps {n_kept} tokens, fewer than {floor} for each of "
                             f"{parts} layers or heads")
        return floor

    def allocate(self, ranked: torch.Tensor, n_kept: int, budget: float) -> torch.Tensor:
        """Counts per row of ``ranked`` ``[rows, n]`` (sorted scores) from their global top ``n_kept``. As the
        reference, the first ``keep_token_lower_bound`` ranks are boosted into it; where a row still gets fewer than
        the floor, the reference raises it afterwards (and keeps more than the budget); here the top-k is taken again
        with the floor boosted, so the floor is inside the budget (otherwise the counts, ties included, are the
        reference's)."""
        rows, n = ranked.shape
        floor = self.floor(rows, n_kept, budget)
        counts = None
        for boosted in (self.keep_token_lower_bound, floor):
            scores = ranked.clone()
            scores[:, :boosted] += BOOST
            if self.structured:
                scores[0] = scores.max(dim=0).values  # layer 0 never keeps fewer tokens than another layer
            kept = scores.flatten().topk(min(n_kept, scores.numel())).indices // n
            counts = torch.bincount(kept, minlength=rows).clamp(max=n)
            if int(counts.min()) >= floor:
                break
        return counts

    def layer_lengths(self, scores: torch.Tensor, budget: float) -> list[int]:
        """B_l per layer from the global top-k of the composite scores (structured)."""
        layers, _, _, n = scores.shape
        ranked = scores.sort(dim=-1, descending=True).values  # [layers, batch, kv_heads, n]
        composite = reduce(ranked, self.agg_head, dim=2).mean(dim=1)  # [layers, n]
        return self.allocate(composite, kept_count(budget, layers, n), budget).tolist()

    def head_lengths(self, scores: torch.Tensor, budget: float, reserve: int = 0) -> torch.Tensor:
        """``[layers, batch, kv_heads]`` counts from one ranking of every head's sorted scores (unstructured), less
        ``reserve`` tokens (what the packed heads' lengths cost)."""
        layers, batch, kv_heads, n = scores.shape
        ranked = scores.sort(dim=-1, descending=True).values
        n_kept = kept_count(budget, layers * kv_heads, n) - reserve
        counts = torch.empty(layers, batch, kv_heads, dtype=torch.long)
        for b in range(batch):
            counts[:, b] = self.allocate(ranked[:, b].flatten(0, 1), n_kept, budget).reshape(layers, kv_heads)
        return counts

    def lengths_reserve(self, cache: Any) -> int:
        """Tokens given up to pay for the lengths of every packed head (unstructured), per batch row."""
        from kvbench.layers import lengths_reserve

        layer = cache.layers[0]
        _, kv_heads, _, head_dim = layer.keys.shape
        heads = len(cache.layers) * kv_heads
        token_bytes = head_dim * (layer.keys.element_size() + layer.values.element_size())
        return lengths_reserve(kept_count(cache.budget, heads, self._n_context), cache.budget, self._n_context, heads,
                               token_bytes)
