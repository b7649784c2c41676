"""Expected Attention (Devoto et al., 2025, "Expected Attention: KV Cache Compression by Estimating
Attention from Future Queries Distribution", arXiv 2510.00636; kvpress's ExpectedAttentionPress).

Score each key by the attention that *future* queries are expected to pay it. The queries are
modelled as Gaussian: mean and covariance of the prompt's queries before RoPE (the first
``n_sink`` positions left out: attention-sink outliers), rotated by RoPE averaged over the next
``n_future_positions`` positions. For a Gaussian query, E[exp(q.k s)] = exp(mu.k s + s^2 k'Sigma k / 2)
(s the attention scaling); these are softmax-normalised over the keys, averaged over the query heads
of a GQA group, and multiplied by the value norm (``use_vnorm``), since a token's contribution to the
output is its weight times its value. The first ``n_sink`` tokens are always kept. Defaults are
kvpress's: 512 future positions, 4 sinks, covariance and value norm on, epsilon 0.

kvbench's attention hook sees post-RoPE queries; they are un-rotated exactly with the model's own
RoPE tables (``kvbench.rope``), so ``prepare`` must have been called with the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.methods.base import LayerInputs, TokenMethod
from kvbench.rope import cos_sin, rotary_module, undo_rope


@dataclass
class ExpectedAttention(TokenMethod):
    name: ClassVar[str] = "expected_attention"
    summary: ClassVar[str] = (
        "attention expected from future queries (Gaussian, averaged RoPE) x value norm (Devoto et al. 2025)"
    )
    uses_queries: ClassVar[bool] = True

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_future_positions < 1 or self.n_sink < 0:
            raise ValueError("expected_attention needs n_future_positions >= 1 and n_sink >= 0")
        if not 0.0 <= self.epsilon < math.inf:  # also refuses nan, which would make every score nan
            raise ValueError(f"expected_attention needs a finite epsilon >= 0, got {self.epsilon}")

    def prepare(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self._rotary = rotary_module(model)  # not an option: a plain attribute, never in the result rows

    def _rotation(self, first: int, head_dim: int, device: torch.device) -> torch.Tensor:
        """RoPE as a matrix, averaged over positions ``first .. first + n_future_positions - 1``."""
        positions = torch.arange(first, first + self.n_future_positions, device=device)
        cos, sin = (t.float() for t in cos_sin(self._rotary, positions, torch.float32))
        half = head_dim // 2
        swap = torch.zeros(head_dim, head_dim, device=device)  # rotate_half as a matrix
        swap[half:, :half] = torch.eye(half, device=device)
        swap[:half, half:] = -torch.eye(half, device=device)
        eye = torch.eye(head_dim, device=device)
        return (cos[:, :, None] * eye + sin[:, :, None] * swap).mean(dim=0)

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        if getattr(self, "_rotary", None) is None:
            raise RuntimeError("expected_attention needs the model's RoPE: call prepare(model, tokenizer) first")
        keys, values = inputs.keys.float(), inputs.values.float()
        batch, kv_heads, n_tokens, head_dim = keys.shape
        q_len = inputs.queries.shape[2]
        first = inputs.n_seen - q_len  # position of the first query
        skip = min(q_len, max(0, self.n_sink - first))  # the sinks' own queries do not predict future ones
        positions = torch.arange(first + skip, inputs.n_seen, device=keys.device)
        cos, sin = (t.float() for t in cos_sin(self._rotary, positions, torch.float32))
        queries = undo_rope(inputs.queries[:, :, skip:].float(), cos, sin)
        mean = queries.mean(dim=2)  # [batch, heads, head_dim]
        rotation = self._rotation(inputs.n_seen, head_dim, keys.device)
        sinks = min(self.n_sink, n_tokens)
        keys, values = keys[:, :, sinks:], values[:, :, sinks:]
        grouped = (mean @ rotation.T).reshape(batch, kv_heads, inputs.group_size, head_dim)
        logits = grouped @ keys.transpose(-1, -2) * inputs.scaling  # [batch, kv_heads, group, tokens]
        if self.use_covariance:
            moment = queries.transpose(-1, -2) @ queries / queries.shape[2]
            cov = rotation @ (moment - mean.unsqueeze(-1) * mean.unsqueeze(-2)) @ rotation.T
            cov = cov.reshape(batch, kv_heads, inputs.group_size, head_dim, head_dim)
            spread = ((keys.unsqueeze(2) @ cov) * keys.unsqueeze(2)).sum(-1)  # k^T C k per group and token
            logits = logits + spread * inputs.scaling ** 2 / 2
        scores = logits.softmax(dim=-1).mean(dim=2)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values.norm(dim=-1)
        sink_scores = scores.new_full((batch, kv_heads, sinks), float(scores.max()) + 1 if scores.numel() else 1.0)
        return torch.cat([sink_scores, scores], dim=-1)
