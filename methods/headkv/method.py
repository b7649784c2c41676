"""HeadKV (Fu et al., ICLR 2025, "Not All Heads Matter: A Head-Level KV Cache Compression Method with Integrated
Retrieval and Reasoning", arXiv 2410.19258), the HeadKV-R2 variant.

Each head's budget comes from its retrieval-reasoning score (profiled offline on the model, ``profile``; or a
head-score JSON in HeadKV's published format, ``scores=FILE``): a fixed share per head plus a pool split by the
normalised scores (``beta``, ``temp``; see ``allocation``). Inside each head, tokens are selected as SnapKV does in
HeadKV's code: the last ``window`` (8) queries vote with their softmax attention, votes are max-pooled (``kernel``
7), the window is always kept. Defaults are HeadKV's; ``beta`` is tuned per setting in the paper (from 1.005 to 2
in its App. Table 4): 1.2, the most frequent best value for HeadKV-R2 there (with 1.1).

Stored for real: heads keep different numbers of tokens, packed per KV head (``kvbench.layers.PerHeadLayer``), and
the achieved budget counts those tensors plus the per-head lengths, paid for in tokens. GQA folding and the
allocation are described in ``allocation``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvbench.methods.base import LayerInputs, Method
from kvbench.methods.headkv.allocation import head_capacities, kv_head_shares, profiled_scores, read_head_scores
from kvbench.methods.snapkv import SnapKV

if TYPE_CHECKING:
    from kvbench.layers import PerHeadLayer


@dataclass
class HeadBudgets(Method):
    """Options and state of a method whose per-head budgets follow HeadKV's head scores (HeadKV, MixedDimKV-H).

    ``calibration_tokens`` is the head profile's longest haystack (``profile_lengths`` lengths from 0, HeadKV's 5;
    ``profile_depths`` depths, HeadKV's 10), ``data`` its haystack text (default: Paul Graham's essays),
    ``calibration_seed`` the needles' seed; ``scores`` a head-score JSON instead of a profile.
    """

    beta: float = 1.2
    temp: float = 1.0
    scores: str = ""
    calibration_tokens: int = 2000
    calibration_seed: int = 0
    data: str = ""
    profile_lengths: int = 5
    profile_depths: int = 10

    def __post_init__(self) -> None:
        if self.beta < 1.0 or self.temp <= 0 or self.calibration_tokens < 16:
            raise ValueError(f"{self.name} needs beta >= 1, temp > 0 and calibration_tokens >= 16")
        if self.profile_lengths < 1 or self.profile_depths < 1:
            raise ValueError(f"{self.name} needs profile_lengths >= 1 and profile_depths >= 1")
        if self.scores and not Path(self.scores).is_file():
            raise ValueError(f"{self.name} scores={self.scores}: no such file (a HeadKV head-score JSON)")
        self.shares: torch.Tensor | None = None  # [layers, kv_heads], set by prepare
        self.head_meta: dict[str, Any] = {}

    def prepare(self, model: torch.nn.Module, tokenizer: Any, force: bool = False) -> None:
        config = model.config.get_text_config()
        if self.scores:
            found = read_head_scores(self.scores, config.num_hidden_layers, config.num_attention_heads)
            self.head_meta, self.head_artifact = {"source": str(Path(self.scores).resolve())}, Path(self.scores)
        else:
            found, self.head_meta, self.head_artifact = profiled_scores(
                model, tokenizer, self.calibration_tokens, self.calibration_seed, self.data or None,
                self.profile_lengths, self.profile_depths, force=force)
        self.shares = kv_head_shares(found, config.num_key_value_heads, self.temp)

    def calibrate(self, model: torch.nn.Module, tokenizer: Any, force: bool = False) -> Path:
        """``python -m kvbench calibrate``: profile the heads (or check the JSON); returns the artifact's path."""
        self.prepare(model, tokenizer, force=force)
        return self.head_artifact

    def capacities(self, layer_idx: int, average: int, window: int, n_tokens: int, reserve: int = 0) -> torch.Tensor:
        """``[kv_heads]`` tokens (window included) each KV head of a layer keeps (``reserve``: see
        ``head_capacities``)."""
        if self.shares is None:
            raise RuntimeError(f"{self.name} has no head scores: call prepare(model, tokenizer) first")
        return head_capacities(self.shares, average, window, self.beta, n_tokens, reserve)[layer_idx]


@dataclass
class HeadKV(HeadBudgets):
    name: ClassVar[str] = "headkv"
    family: ClassVar[str] = "token"
    summary: ClassVar[str] = ("per-head budgets from retrieval-reasoning head scores, SnapKV selection inside each "
                              "head, packed per KV head (Fu et al. 2025)")
    uses_queries: ClassVar[bool] = True
    uniform: ClassVar[bool] = False
    layout: ClassVar[str] = "kvbench.layers:PerHeadLayer"

    window: int = 8
    kernel: int = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        self._selector = SnapKV(window=self.window, kernel=self.kernel)  # validates window and kernel

    def compress(self, layer: PerHeadLayer, inputs: LayerInputs, budget: float) -> None:
        n_tokens = inputs.keys.shape[2]
        average = max(1, math.floor(budget * n_tokens + 1e-9))
        if average >= n_tokens:
            return
        counts = self.capacities(inputs.layer_idx, average, self.window, n_tokens, self.lengths_reserve(
            inputs, average, budget)).tolist()
        scores = self._selector.score(inputs)  # [batch, kv_heads, tokens], the window ranked first
        indices = [head.topk(count).indices.sort().values
                   for row in scores for head, count in zip(row, counts, strict=True)]
        layer.keep_per_head(indices)

    def lengths_reserve(self, inputs: LayerInputs, average: int, budget: float) -> int:
        """Tokens the whole model gives up to pay for its packed heads' lengths (the pool is global)."""
        from kvbench.layers import lengths_reserve

        n_tokens = inputs.keys.shape[2]
        everything = head_capacities(self.shares, average, self.window, self.beta, n_tokens)  # every layer's heads
        return lengths_reserve(int(everything.sum()), budget, n_tokens, everything.numel(), inputs.token_bytes)
