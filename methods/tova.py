"""TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104).

Token Omission Via Attention: keep the tokens with the highest softmax attention from the last
query, averaged over all attention heads, so every KV head keeps the same tokens. The paper has
no other hyperparameter; it evicts one token per generated token, which is ``decoding=true,
interval=1`` here. As in kvpress's TOVAPress, the last token itself is always kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.methods.base import LayerInputs, TokenMethod


@dataclass
class TOVA(TokenMethod):
    name: ClassVar[str] = "tova"
    summary: ClassVar[str] = "last query's attention averaged over all heads (Oren et al. 2024)"
    uses_queries: ClassVar[bool] = True

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        keys = inputs.keys.float()
        batch, kv_heads, n_tokens, head_dim = keys.shape
        last = inputs.queries[:, :, -1:].float().reshape(batch, kv_heads, inputs.group_size, head_dim)
        weights = (torch.einsum("bhgd,bhtd->bhgt", last, keys) * inputs.scaling).softmax(dim=-1)
        scores = weights.mean(dim=(1, 2))[:, None].expand(batch, kv_heads, n_tokens).clone()
        scores[..., -1] = 2.0  # above any attention weight
        return scores
