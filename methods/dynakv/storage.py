"""DynaKV's ragged storage (ranker variant): each token's first ``r_t`` latent coefficients, stored for real."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.methods.dynakv.ragged import RaggedLayer, prefix_mask
from kvbench.methods.dynakv.ranker import LayerBasis, RankGates, allocate, arrival_levels
from kvbench.methods.lowrank.allocation import POSITION_DTYPE


@dataclass
class TokenRanker:
    """What a layer needs to rank its tokens: the layer's gate, basis, levels and mean dims per token for K and V."""

    gates: RankGates | None  # None: every token the same rank (the non-adaptive ablation)
    layer_idx: int
    basis: LayerBasis
    levels: torch.Tensor
    key_mean: float  # coefficients per token the budget allows, on average
    value_mean: float

    def scores(self, key_latent: torch.Tensor, value_latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gates is None:
            zeros = torch.zeros(key_latent.shape[0], device=key_latent.device)
            return zeros, zeros
        with torch.no_grad():
            return self.gates.scores(self.layer_idx, key_latent.float(), value_latent.float(), self.basis)


class VariableRankLayer(RaggedLayer):
    """Per-token rank latents, physically: each token's first ``r_t`` coefficients, concatenated (ragged).

    Stored per batch row and for K and V: every held token's kept coefficients (ragged, bucketed by rank class)
    and each token's level (uint8, an index into the fixed ladder of ranks), plus each token's position (int32,
    from ``LatentLayer``); ``nbytes`` counts all of it. Attention reads the coefficients directly (``ragged.py``).
    Prompt tokens are ranked together at compression by the gate (``allocate``); later ones get the layer's mean
    rank within the budget left (``arrival_levels``), so the cache stays within budget while decoding.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ranker: TokenRanker | None = None
        self._clear()

    def _clear(self) -> None:
        self.token_levels: dict[str, torch.Tensor | None] = {"key": None, "value": None}  # [batch, held] uint8
        self.used: dict[str, list[float]] = {"key": [], "value": []}
        self.carry: dict[str, list[float]] = {"key": [], "value": []}  # rank wanted but not yet given

    def store_latents(self, key_latents: torch.Tensor, value_latents: torch.Tensor, positions: torch.Tensor) -> None:
        if self.ranker is None:
            raise RuntimeError("a VariableRankLayer needs its ranker (set by DynaKV.compress_kept) before to_latent")
        ranker, levels = self.ranker, self.ranker.levels.to(key_latents.device)
        first = self.positions is None
        held = 0 if first else self.positions.shape[1]
        new = key_latents.shape[1]
        indices: dict[str, list[torch.Tensor]] = {"key": [], "value": []}
        for b in range(key_latents.shape[0]):
            if first:
                scores = dict(zip(("key", "value"), ranker.scores(key_latents[b], value_latents[b]), strict=True))
            for kind, mean, latents in (("key", ranker.key_mean, key_latents[b]),
                                        ("value", ranker.value_mean, value_latents[b])):
                if first:
                    index = allocate(scores[kind], levels, mean * new)[0]
                    self.used[kind].append(0.0)
                    self.carry[kind].append(0.0)
                else:
                    allowance = mean * (held + new) - self.used[kind][b]
                    index, self.carry[kind][b] = arrival_levels(new, mean, levels, allowance, self.carry[kind][b])
                ranks = levels[index]
                self.used[kind][b] += float(ranks.sum())
                self.append(kind, b, latents[prefix_mask(ranks, latents.shape[-1])], ranks)
                indices[kind].append(index.to(torch.uint8))
        for kind in ("key", "value"):
            stacked = torch.stack(indices[kind])
            self.token_levels[kind] = self.appends.append(("levels", kind), self.token_levels[kind], stacked, 1)
        self.positions = self.appends.append("positions", self.positions, positions.to(POSITION_DTYPE), 1)

    def store(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        self.store_latents(*self.codec.encode(keys, values, positions), positions)

    def row_ranks(self, kind: str, row: int) -> torch.Tensor:
        return self.ranker.levels.to(self.positions.device)[self.token_levels[kind][row].long()]

    def tensors(self) -> list[torch.Tensor]:
        if not self.is_latent:
            return super().tensors()
        stored = self.stored_buckets() + [t for t in self.token_levels.values() if t is not None]
        return super().tensors() + stored

    def reset(self) -> None:
        super().reset()
        self._clear()

