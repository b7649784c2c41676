"""StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks",
arXiv 2309.17453): keep the first ``sink_tokens`` tokens (attention sinks) and the most recent
ones; the paper uses 4 sinks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.methods.base import LayerInputs, TokenMethod, recency


@dataclass
class StreamingLLM(TokenMethod):
    name: ClassVar[str] = "streamingllm"
    summary: ClassVar[str] = "keep 4 attention-sink tokens + the most recent window (Xiao et al. 2024)"

    sink_tokens: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sink_tokens < 0:
            raise ValueError(f"streamingllm needs sink_tokens >= 0, got {self.sink_tokens}")

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        batch, kv_heads, n_tokens, _ = inputs.keys.shape
        scores = recency(n_tokens, inputs.keys.device)
        scores[: self.sink_tokens] += n_tokens
        return scores.expand(batch, kv_heads, n_tokens)
