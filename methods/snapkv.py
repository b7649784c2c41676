"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation",
arXiv 2404.14469).

The last ``window`` prompt queries (the observation window) vote for earlier tokens with
their softmax attention, summed over the window; votes are smoothed by 1-D max pooling of
width ``kernel`` so that a kept token keeps its neighbours. Defaults (window 32, kernel 7,
max pooling) are the paper's LongBench settings. The window itself is always kept. With GQA
the votes of the query heads that share a KV head are averaged, so one selection is made per
KV head and the cache is never expanded per query head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvbench.methods.base import LayerInputs, TokenMethod, recency


@dataclass
class SnapKV(TokenMethod):
    name: ClassVar[str] = "snapkv"
    summary: ClassVar[str] = "observation-window attention votes + pooling, per KV head (Li et al. 2024)"
    uses_queries: ClassVar[bool] = True

    window: int = 32
    kernel: int = 7
    pooling: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"snapkv needs window >= 1 and an odd kernel >= 1, got window={self.window}, "
                             f"kernel={self.kernel}")
        if self.pooling not in ("max", "avg"):
            raise ValueError("snapkv pooling must be 'max' or 'avg'")

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        keys = inputs.keys
        batch, kv_heads, n_tokens, head_dim = keys.shape
        window = min(self.window, n_tokens, inputs.queries.shape[2])
        queries = inputs.queries[:, :, -window:].reshape(batch, kv_heads, inputs.group_size, window, head_dim)
        logits = torch.einsum("bhgwd,bhtd->bhgwt", queries.float(), keys.float()) * inputs.scaling
        # Query i of the window sits at position n_tokens - window + i and sees no later key.
        future = torch.ones(window, window, dtype=torch.bool, device=keys.device).triu(1)
        logits[..., n_tokens - window :] = logits[..., n_tokens - window :].masked_fill(future, float("-inf"))
        votes = logits.softmax(dim=-1)[..., : n_tokens - window].sum(dim=3)
        if votes.shape[-1] > 0:
            pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
            flat = votes.reshape(-1, 1, votes.shape[-1])
            votes = pool(flat, self.kernel, stride=1, padding=self.kernel // 2).reshape(votes.shape)
        votes = votes.mean(dim=2)
        # The window outranks every vote (a vote is at most `window`), later tokens first.
        window_scores = window + 1 + recency(window, keys.device).expand(batch, kv_heads, window)
        return torch.cat([votes, window_scores], dim=-1)
