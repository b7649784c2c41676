"""Compositions ``a+b``: a token method selects tokens, a dimension method stores the kept ones in low rank.

The latent of a dimension method is joint across the KV heads of a layer (or of a head group), so the token
selection is made once per layer for all heads: the token method's per-head scores are averaged over the
KV heads (DynaKV's "global eviction" with aggregated SnapKV scores). The achieved budget is the product of
the fraction of tokens kept and the fraction of their bytes the dimension method keeps; ``tokens`` sets the
split. The default rule, ``tokens = min(1, 1.25 * budget)`` (the kept tokens keep 80 % of their bytes), was chosen
by measurement: on SmolLM2-135M, palu+snapkv perplexity (essays, 1000-token prefix) at budgets 0.1 and 0.06 was
best at 1.25x of the candidates 1.25x, 1.5x, 2x, 3x, 4x, 6x budget and sqrt(budget) (e.g. 25.3 vs 32.1 at 2x and
72.7 at sqrt at 0.06; snapkv alone 23.9); fewer tokens at a higher rank won at every step. Measured again for
dynakv+snapkv with the paper's DynaKV (SmolLM2-135M, budget 0.06, perplexity after a 1000-token prefix, essays /
wiki, 2 windows each; run dynakv-split-smollm2), the same rule won among tokens = 1.25x, 1.5x, 2.08x (the paper's
split: 12.5 % of the tokens at ~47 %), 3x and 5x budget: 30.4 / 15.5 at 1.25x, 31.4 / 16.6 at 1.5x, 36.6 / 18.6 at
the paper's split, 47.8 / 23.1 at 3x, 82.4 / 45.2 at 5x (snapkv alone 29.3 / 14.4, full 25.3 / 13.2).
The dimension method's ``prefill_context`` gets its nominal share of the budget, ``budget / tokens`` (DynaKV picks
its trained gates by it), and its ``finish`` runs after the compressing forward (DynaKV's budget guard). Rows get
``token_fraction``.
Written canonically dimension method first (``dynakv+snapkv``); either order parses.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvbench.methods.base import LayerInputs, Method, TokenMethod
from kvbench.methods.lowrank.method import LowRankMethod

if TYPE_CHECKING:
    from kvbench.layers import CompressedLayer


def default_token_fraction(budget: float) -> float:
    """The documented default split: keep ``1.25 * budget`` of the tokens, each at 80 % of its bytes."""
    return min(1.0, 1.25 * budget)


@dataclass
class Composition(Method):
    """``dimension+token``; ``tokens`` is the fraction of tokens kept (0: ``default_token_fraction``)."""

    name: ClassVar[str] = "composition"
    family: ClassVar[str] = "composition"
    summary: ClassVar[str] = "a token method selects tokens (one selection per layer), a dimension method stores them"

    dimension: LowRankMethod
    token: TokenMethod
    tokens: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.tokens <= 1:
            raise ValueError(f"tokens must be in (0, 1] (0: the default rule), got {self.tokens}")
        if not getattr(self.token, "uniform", True):
            raise ValueError(f"{self.token.name} sets its own per-layer or per-head sizes; a composition needs a token "
                             "method that keeps the same number of tokens everywhere")
        if getattr(self.token, "decoding", False):
            raise ValueError("decoding-phase eviction is not supported inside a composition")
        # Instance attributes the cache and the runner read from a method.
        self.name = f"{self.dimension.name}+{self.token.name}"
        self.layout = self.dimension.layout
        self.uses_queries = self.token.uses_queries
        self._kept: float | None = None  # fraction of tokens the last prefill kept (a row field)

    def prepare(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self.token.prepare(model, tokenizer)
        self.dimension.prepare(model, tokenizer)

    def token_fraction(self, budget: float) -> float:
        fraction = self.tokens or default_token_fraction(budget)
        if fraction < budget:
            raise ValueError(f"tokens={fraction:g} keeps fewer tokens than the budget {budget:g} allows bytes")
        return fraction

    def prefill_context(self, model: torch.nn.Module, budget: float) -> AbstractContextManager:
        """Both methods' contexts; the dimension method's at its nominal share, ``budget / tokens``."""
        stack = ExitStack()
        stack.enter_context(self.token.prefill_context(model, budget))
        stack.enter_context(self.dimension.prefill_context(model, min(1.0, budget / self.token_fraction(budget))))
        return stack

    def finish(self, cache: Any) -> None:
        self.dimension.finish(cache)

    def row_fields(self, model: torch.nn.Module) -> dict[str, Any]:
        kept = {} if self._kept is None else {"token_fraction": round(self._kept, 5)}
        return self.token.row_fields(model) | self.dimension.row_fields(model) | kept

    def compress(self, layer: CompressedLayer, inputs: LayerInputs, budget: float) -> None:
        batch, kv_heads, n_tokens, _ = inputs.keys.shape
        n_keep = max(1, math.floor(self.token_fraction(budget) * n_tokens + 1e-9))
        self._kept = min(n_keep, n_tokens) / n_tokens
        positions = None
        if n_keep < n_tokens:
            scores = self.token.score(inputs).float().mean(dim=1)  # one selection shared by every KV head
            kept = scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values
            layer.keep(kept.unsqueeze(1).expand(batch, kv_heads, n_keep))
            positions = kept + (layer.seen_tokens - n_tokens)
        self.dimension.compress_kept(layer, inputs, min(1.0, budget * n_tokens / n_keep), positions)
