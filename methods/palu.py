"""Palu (Chang et al., 2024, "Palu: KV-Cache Compression with Low-Rank Projection", arXiv 2407.21118).

Every token keeps a fixed-rank latent of its keys and values per group of KV heads (group-head low-rank
decomposition, paper default 4 heads per group; all heads when the model has fewer, e.g. SmolLM2's 3). The
basis of a group is the SVD of ``W_k`` / ``W_v`` whitened by calibration activations, i.e. the principal
basis of the uncentered second moment of the group's pre-RoPE keys / values; the cache holds ``x A`` and
keys get RoPE back at attention time (the paper's pre-RoPE latent). Ranks differ per layer and between K and
V: Palu allocates them by Fisher information; kvbench uses the documented simpler fallback, a greedy
allocation on the *measured* held-out reconstruction-error curves (largest error drop per stored byte
first) within the byte budget, ranks rounded to ``multiple`` (``allocation=uniform`` gives every matrix the
same rank, up to one ``multiple``). The budget counts every stored tensor: latents and the int32 positions of
held tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvbench.methods.base import LayerInputs
from kvbench.methods.lowrank.allocation import allocate_ranks, latent_capacity, uniform_ranks
from kvbench.methods.lowrank.method import LowRankMethod
from kvbench.methods.lowrank.statistics import group_slices

if TYPE_CHECKING:
    from kvbench.methods.lowrank.codec import LatentLayer


@dataclass
class Palu(LowRankMethod):
    name: ClassVar[str] = "palu"
    summary: ClassVar[str] = ("fixed-rank pre-RoPE latents per head group, ranks allocated on measured error "
                               "(Chang et al. 2024)")

    group_size: int = 4
    rank: int = 0  # per-group rank of K and V for every layer, ignoring the budget (0: allocate from the budget)
    multiple: int = 8
    allocation: str = "greedy"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 1 or self.multiple < 1 or self.rank < 0:
            raise ValueError(f"palu needs group_size >= 1, multiple >= 1 and rank >= 0, got group_size="
                             f"{self.group_size}, multiple={self.multiple}, rank={self.rank}")
        if self.allocation not in ("greedy", "uniform"):
            raise ValueError("palu allocation must be 'greedy' or 'uniform'")
        self._ranks: dict[tuple[float, int], list[tuple[int, int]]] = {}

    def prepare(self, model: torch.nn.Module, tokenizer: Any, force: bool = False) -> None:
        super().prepare(model, tokenizer, force=force)
        self._ranks = {}  # allocations belong to the model whose statistics they came from

    def ranks(self, budget: float, element_size: int) -> list[tuple[int, int]]:
        """Per-group (key rank, value rank) of every layer for a budget (fraction of full bytes)."""
        stats = self._require_stats()
        groups = len(group_slices(stats.kv_heads, stats.head_dim, self.group_size))
        group_dim = stats.kv_heads * stats.head_dim // groups
        layers = stats.key_fit.shape[0]
        if self.rank:
            return [(min(self.rank, group_dim),) * 2] * layers
        key = (budget, element_size)
        if key not in self._ranks:
            capacity = latent_capacity(budget, layers, stats.kv_heads * stats.head_dim, element_size)
            if self.allocation == "uniform":
                flat = uniform_ranks(2 * layers, groups, group_dim, capacity, self.multiple)
            else:
                curves = [self.error_curve(i, kind, self.group_size)
                          for i in range(layers) for kind in ("key", "value")]
                flat = allocate_ranks(curves, [groups] * len(curves), capacity, self.multiple)
            self._ranks[key] = [(flat[2 * i], flat[2 * i + 1]) for i in range(layers)]
        return self._ranks[key]

    def compress_kept(self, layer: LatentLayer, inputs: LayerInputs, budget: float,
                      positions: torch.Tensor | None) -> None:
        key_rank, value_rank = self.ranks(budget, layer.keys.element_size())[inputs.layer_idx]
        codec = self.codec(inputs.layer_idx, self.group_size, key_rank, value_rank, layer.keys.device,
                           layer.keys.dtype)
        layer.to_latent(codec, positions)
