"""AdaKV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
Efficient LLM Inference", arXiv 2407.11550).

Head-adaptive budgets: within a layer the KV heads share one pool of ``floor(budget x tokens) x
kv_heads`` tokens, filled by the top SnapKV scores across all heads (Ada-SnapKV, the paper's main
variant; SnapKV's options apply), so heads whose attention is concentrated give tokens to heads
whose attention is spread. A safeguard keeps, in every head, at least ``alpha`` (0.2, the paper's)
of the average count: its own top ``floor(alpha x count)`` tokens, at least one.

The heads then hold different numbers of tokens, stored for real (``kvbench.layers.PerHeadLayer``):
packed per head without padding, masking or repeating KV per query head; the achieved budget is
measured from those tensors plus the per-head lengths, which the pool pays for (a token fewer when
``floor(budget x tokens)`` per head would leave no room for them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from kvbench.methods.base import LayerInputs
from kvbench.methods.snapkv import SnapKV

if TYPE_CHECKING:
    from kvbench.layers import PerHeadLayer


@dataclass
class AdaKV(SnapKV):
    name: ClassVar[str] = "adakv"
    summary: ClassVar[str] = "SnapKV scores pooled across the KV heads of a layer, alpha 0.2 floor (Feng et al. 2024)"
    uniform: ClassVar[bool] = False
    layout: ClassVar[str] = "kvbench.layers:PerHeadLayer"

    alpha: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"adakv needs 0 <= alpha <= 1, got {self.alpha}")

    def compress(self, layer: PerHeadLayer, inputs: LayerInputs, budget: float) -> None:
        from kvbench.layers import lengths_reserve

        n_keep = self.keep_count(inputs, budget)
        kv_heads = (layer.lengths.shape if layer.packed else layer.keys.shape[:2])[1]
        group = inputs.group_size if not layer.packed else inputs.queries.shape[1] // kv_heads
        if int(layer.head_lengths().sum()) <= n_keep * layer.head_lengths().numel():
            return
        scores = self.head_scores(layer, inputs, kv_heads, group)
        pool = n_keep * kv_heads - lengths_reserve(n_keep * kv_heads, budget, inputs.n_seen, kv_heads,
                                                   inputs.token_bytes)
        indices: list[torch.Tensor] = []
        for row in range(0, len(scores), kv_heads):
            indices += self.allocate(scores[row:row + kv_heads], n_keep, pool)
        layer.keep_per_head(indices)

    def head_scores(self, layer: PerHeadLayer, inputs: LayerInputs, kv_heads: int, group: int) -> list[torch.Tensor]:
        """SnapKV scores of every (batch, kv_head), each ``[held]``."""
        if not layer.packed:
            return list(self.score(inputs).flatten(0, 1).unbind(0))
        found = []
        for row, (keys, values) in enumerate(layer.heads()):
            b, h = divmod(row, kv_heads)
            queries = inputs.queries[b:b + 1, h * group:(h + 1) * group]
            head = LayerInputs(keys[None, None], values[None, None], queries, inputs.layer_idx, inputs.scaling,
                               inputs.seed)
            found.append(self.score(head)[0, 0])
        return found

    def allocate(self, scores: list[torch.Tensor], n_keep: int, pool: int | None = None) -> list[torch.Tensor]:
        """Sorted indices per head: a pool of ``pool`` (default ``n_keep x heads``) top scores across heads, with the
        alpha floor of ``n_keep``."""
        floor = max(1, math.floor(n_keep * self.alpha)) if self.alpha > 0 else 0
        protected = []
        for head in scores:
            head = head.float().clone()
            head[head.topk(min(floor, head.numel())).indices] = float("inf")
            protected.append(head)
        pooled = torch.cat(protected)
        chosen = torch.zeros_like(pooled, dtype=torch.bool)
        pool = n_keep * len(scores) if pool is None else pool
        chosen[pooled.topk(min(pool, pooled.numel())).indices] = True
        return [mask.nonzero().flatten() for mask in chosen.split([len(s) for s in scores])]
