"""MixedDimKV and MixedDimKV-H (Miao et al., 2026, "Beyond Token Eviction: Mixed-Dimension Budget Allocation for
Efficient KV Cache Compression", arXiv 2603.20616).

Eviction keeps each token at zero or full dimension; MixedDimKV gives each token a dimension from a small candidate
set. Stage 1 scores every token at every candidate ratio; stage 2 minimises the total loss within the memory budget
(``allocation``). What the paper states, and kvbench does: projections are eigenvectors of ``KᵀK/N`` and
``VᵀV/N`` (uncentred), truncated, so nested, and only the largest is stored; keys are projected after RoPE;
compression is per (KV) head with per-head projections, whose bytes count against the budget; tokens of equal
dimension are packed into contiguous tensors and attention runs per group, the results combined (``storage``).

Where the paper's text was not available (docs/methods/mixeddimkv.md), kvbench chooses, and each choice is an
option:

- ``loss``: the importance-weighted reconstruction error of the token's key and value, the weight being its
  SnapKV-style attention from the last ``window`` queries (32 and max-pooling kernel 7, SnapKV's LongBench
  setting), ``relative`` (each error over the vector's own energy: dropping a token costs its weight twice) or
  ``absolute`` (over the head's mean energy);
- ``candidates``: the ratios ``0;0.125;0.25;0.5;1`` (0 is eviction; 1 keeps the token whole; ``;`` separates them,
  as ``,`` separates options: quote it in a shell);
- ``kv_ratio``: ``shared`` (K and V of a token get one ratio) or ``independent`` (any non-zero pair);
- the optimiser: a Lagrange-multiplier bisection per head, trying every largest rank so the projection's cost is
  paid only when it buys less loss (pure eviction when the budget cannot carry a projection);
- ``projections``: ``prompt`` (from the prompt's own K/V, stored per head and counted) or ``calibration`` (per-head
  moments of calibration text, ``calibration_tokens``/``data``; then shared by every prompt like weights, not
  counted);
- budgets: every head gets the same share (MixedDimKV); the observation window is kept whole, as SnapKV keeps it
  (with a chat template the last 8 tokens are the template's assistant header: a window of 8 lost a 2K needle at
  budget 0.25 on SmolLM2 that a window of 32 keeps).

MixedDimKV-H gives each KV head HeadKV's budget (its retrieval-reasoning head scores, ``beta``, ``temp``: see
``kvbench.methods.headkv``; HeadKV's window is this method's ``window``) and allocates dimensions inside each head
within it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvbench.methods.base import LayerInputs, Method
from kvbench.methods.headkv.method import HeadBudgets
from kvbench.methods.mixeddim.allocation import plan_head
from kvbench.methods.mixeddim.projections import head_bases, moment_bases, token_errors
from kvbench.methods.snapkv import SnapKV

if TYPE_CHECKING:
    from kvbench.methods.mixeddim.storage import HeadStore, MixedDimLayer

LOSSES = ("relative", "absolute")
KV_RATIOS = ("shared", "independent")
PROJECTIONS = ("prompt", "calibration")


def parse_ratios(text: str) -> tuple[float, ...]:
    try:
        ratios = tuple(sorted({float(r) for r in str(text).split(";") if r.strip()}))
    except ValueError:
        raise ValueError(f"candidates must be ratios separated by ';', like 0;0.25;1, got {text!r}") from None
    if not ratios or ratios[0] != 0.0 or ratios[-1] != 1.0 or any(not 0 <= r <= 1 for r in ratios):
        raise ValueError("candidates must lie in [0, 1] and include 0 (eviction) and 1 (whole token)")
    return ratios


@dataclass
class MixedDimKV(Method):
    name: ClassVar[str] = "mixeddimkv"
    family: ClassVar[str] = "dimension"
    summary: ClassVar[str] = ("a dimension per token from candidate ratios (0 = evicted), per-head prompt "
                              "projections, loss-minimising allocation, grouped attention (Miao et al. 2026)")
    uses_queries: ClassVar[bool] = True
    layout: ClassVar[str] = "kvbench.methods.mixeddim.storage:MixedDimLayer"

    candidates: str = "0;0.125;0.25;0.5;1"
    loss: str = "relative"
    kv_ratio: str = "shared"
    projections: str = "prompt"
    window: int = 32
    kernel: int = 7
    calibration_tokens: int = 16384
    calibration_seed: int = 0
    data: str = ""

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        self.ratios = parse_ratios(self.candidates)
        for option, valid in (("loss", LOSSES), ("kv_ratio", KV_RATIOS), ("projections", PROJECTIONS)):
            if getattr(self, option) not in valid:
                raise ValueError(f"{self.name} {option} must be one of {', '.join(valid)}")
        if self.calibration_tokens < 64:
            raise ValueError(f"{self.name} needs calibration_tokens >= 64")
        self._selector = SnapKV(window=self.window, kernel=self.kernel)  # validates window and kernel
        self.moments: dict[str, torch.Tensor] | None = None
        self._calibrated: dict[tuple[int, str], torch.Tensor] = {}

    def prepare(self, model: torch.nn.Module, tokenizer: Any, force: bool = False) -> None:
        self._calibrated = {}
        if self.projections == "calibration":
            from kvbench.methods.mixeddim.calibration import head_moments

            self.moments, _ = head_moments(model, tokenizer, self.calibration_tokens, self.calibration_seed,
                                           self.data or None, force=force)

    def options_per_token(self, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value dimensions of every option (eviction first)."""
        dims = [round(r * head_dim) for r in self.ratios if r > 0]
        pairs = [(d, d) for d in dims] if self.kv_ratio == "shared" else [(k, v) for k in dims for v in dims]
        pairs = [(0, 0), *dict.fromkeys(pairs)]
        return torch.tensor([k for k, _ in pairs]), torch.tensor([v for _, v in pairs])

    def head_capacity(self, layer_idx: int, n_tokens: int, budget: float, head_dim: int) -> torch.Tensor:
        """``[kv_heads]`` numbers each KV head of the layer may store (window included); the same for every head."""
        return torch.tensor([budget * n_tokens * 2 * head_dim])

    def bases(self, layer_idx: int, kind: str, states: torch.Tensor) -> torch.Tensor:
        """``[batch, kv_heads, d, d]`` projection bases of one layer's keys or values."""
        if self.projections == "prompt":
            return head_bases(states)
        if self.moments is None:
            raise RuntimeError(f"{self.name} projections=calibration needs prepare(model, tokenizer) first")
        if (layer_idx, kind) not in self._calibrated:
            self._calibrated[layer_idx, kind] = moment_bases(self.moments[kind][layer_idx])
        return self._calibrated[layer_idx, kind].to(states.device, states.dtype).expand(states.shape[0], -1, -1, -1)

    def compress(self, layer: MixedDimLayer, inputs: LayerInputs, budget: float) -> None:
        from kvbench.methods.mixeddim.storage import HeadStore

        keys, values = inputs.keys, inputs.values
        batch, kv_heads, n_tokens, head_dim = keys.shape
        if budget >= 1.0:
            return
        capacity = self.head_capacity(inputs.layer_idx, n_tokens, budget, head_dim).expand(kv_heads)
        window = min(self.window, n_tokens, int(capacity.min()) // (2 * head_dim))  # kept whole, paid first
        weights = self._selector.score(inputs)[..., :n_tokens - window].float()  # [batch, kv_heads, candidates]
        key_dims, value_dims = self.options_per_token(head_dim)
        ranks = sorted({*key_dims.tolist(), *value_dims.tolist()})
        key_bases, value_bases = self.bases(inputs.layer_idx, "key", keys), self.bases(inputs.layer_idx, "value",
                                                                                      values)
        errors = {kind: token_errors(states[:, :, :n_tokens - window], bases, ranks, self.loss)
                  for kind, states, bases in (("key", keys, key_bases), ("value", values, value_bases))}
        column = {rank: i for i, rank in enumerate(ranks)}
        key_loss = errors["key"][..., [column[int(r)] for r in key_dims]]  # [batch, kv_heads, tokens, options]
        value_loss = errors["value"][..., [column[int(r)] for r in value_dims]]
        loss = weights[..., None] * (key_loss + value_loss)
        counted = self.projections == "prompt"
        stores: list[HeadStore] = []
        for b in range(batch):
            for h in range(kv_heads):
                room = float(capacity[h]) - window * 2 * head_dim
                plan = plan_head(loss[b, h], key_dims, value_dims, head_dim, room)
                stores.append(self._store(keys[b, h], values[b, h], key_bases[b, h], value_bases[b, h], plan,
                                          key_dims, value_dims, window, counted, HeadStore))
        layer.store(stores)

    @staticmethod
    def _store(keys: torch.Tensor, values: torch.Tensor, key_basis: torch.Tensor, value_basis: torch.Tensor,
               plan: Any, key_dims: torch.Tensor, value_dims: torch.Tensor, window: int, counted: bool,
               store_class: type) -> HeadStore:
        """Pack one head: a group per option used (tokens in order), the window with the full-dimension group."""
        n_tokens, head_dim = keys.shape
        whole = int(((key_dims == head_dim) & (value_dims == head_dim)).nonzero()[0])
        choice = torch.cat([plan.choice, torch.full((window,), whole, dtype=torch.long)])
        key_basis = key_basis[:, :plan.key_rank].contiguous() if plan.key_rank else None
        value_basis = value_basis[:, :plan.value_rank].contiguous() if plan.value_rank else None
        groups = []
        for option in choice.unique().tolist():
            key_rank, value_rank = int(key_dims[option]), int(value_dims[option])
            if key_rank == 0:
                continue  # evicted
            rows = (choice == option).nonzero().flatten()
            k, v = keys[rows], values[rows]
            groups.append(((k if key_rank == head_dim else k @ key_basis[:, :key_rank]).contiguous(),
                           (v if value_rank == head_dim else v @ value_basis[:, :value_rank]).contiguous()))
        bases = [b for b in (key_basis, value_basis) if b is not None] if counted else []
        return store_class(groups, key_basis, value_basis, bases)


@dataclass
class MixedDimKVH(MixedDimKV, HeadBudgets):
    name: ClassVar[str] = "mixeddimkv-h"
    summary: ClassVar[str] = ("MixedDimKV inside HeadKV's per-head budgets from retrieval-reasoning head scores "
                              "(Miao et al. 2026)")

    calibration_tokens: int = 2000  # the head profile's longest haystack (and the K/V calibration size)

    def prepare(self, model: torch.nn.Module, tokenizer: Any, force: bool = False) -> None:
        HeadBudgets.prepare(self, model, tokenizer, force=force)
        MixedDimKV.prepare(self, model, tokenizer, force=force)

    def head_capacity(self, layer_idx: int, n_tokens: int, budget: float, head_dim: int) -> torch.Tensor:
        """HeadKV's per-head token budgets (window included), in numbers."""
        average = max(1, math.floor(budget * n_tokens + 1e-9))
        return self.capacities(layer_idx, average, self.window, n_tokens).double() * 2 * head_dim
