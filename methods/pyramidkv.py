"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling", arXiv 2406.02069).

SnapKV's scores (window 32, kernel 7, max pooling, as in the authors' KVCache-Factory code) with a
per-layer number of kept tokens that decreases linearly with depth: lower layers attend broadly
and keep more, upper layers keep fewer, with the same total. The per-layer counts follow the
authors' formula (as kvpress's PyramidKVPress does): the top layer keeps ``1/beta`` of the
average (``beta`` = 20, the paper's), the bottom layer the rest, each capped at ``tokens - window``.
When the pyramid does not fit (the smallest layer would keep fewer than ``window`` tokens, i.e.
``budget x tokens < beta x window``) every layer keeps the same count, i.e. PyramidKV is SnapKV,
as in the reference code. Layers then hold different lengths, which kvbench's attention handles
with a mask per layer (``kvbench.layers``). ``prepare`` reads the model's number of layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.methods.base import LayerInputs
from kvbench.methods.snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    name: ClassVar[str] = "pyramidkv"
    summary: ClassVar[str] = "SnapKV scores, per-layer budget decreasing with depth, beta 20 (Cai et al. 2024)"
    uniform: ClassVar[bool] = False

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise ValueError(f"pyramidkv needs beta >= 1, got {self.beta}")

    def prepare(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self._num_layers = model.config.get_text_config().num_hidden_layers  # not an option: never in the rows

    def keep_count(self, inputs: LayerInputs, budget: float) -> int:
        layers = getattr(self, "_num_layers", None)
        if layers is None:
            raise RuntimeError("pyramidkv needs the model's number of layers: call prepare(model, tokenizer) first")
        n_tokens, window = inputs.n_seen, self.window
        average = n_tokens * budget  # tokens a layer keeps on average
        smallest = average / self.beta
        largest = 2 * average - smallest
        if largest >= n_tokens - window:
            largest = n_tokens - window
            smallest = 2 * average - largest
        if not n_tokens >= largest >= smallest >= window:
            return super().keep_count(inputs, budget)
        step = (largest - smallest) / (layers - 1) if layers > 1 else 0.0
        return max(1, round(largest - inputs.layer_idx * step))
