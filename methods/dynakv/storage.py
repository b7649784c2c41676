"""DynaKV's ragged storage (ranker variant): each token's first ``r_t`` latent coefficients, stored for real."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.methods.dynakv.ranker import LayerBasis, RankGates, allocate, arrival_levels
from kvbench.methods.lowrank.allocation import POSITION_DTYPE
from kvbench.methods.lowrank.codec import LatentLayer


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


class VariableRankLayer(LatentLayer):
    """Per-token rank latents, physically: each token's first ``r_t`` coefficients, concatenated (ragged).

    Stored per batch row and for K and V: one flat tensor of every held token's kept coefficients in token order
    and each token's level (uint8, an index into the fixed ladder of ranks), plus each token's position (int32,
    from ``LatentLayer``); ``nbytes`` counts all of it. Where a token's coefficients start is the running sum of
    the ranks before it, so reconstruction is one masked scatter. Prompt tokens are ranked together at
    compression by the gate (``allocate``); later ones get the layer's mean rank within the budget left
    (``arrival_levels``), so the cache stays within budget while decoding.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ranker: TokenRanker | None = None
        self._clear()

    def _clear(self) -> None:
        self.coefficients: dict[str, list[torch.Tensor]] = {"key": [], "value": []}  # per batch row, flat
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
                    self.coefficients[kind].append(latents.new_zeros(0))
                else:
                    allowance = mean * (held + new) - self.used[kind][b]
                    index, self.carry[kind][b] = arrival_levels(new, mean, levels, allowance, self.carry[kind][b])
                ranks = levels[index]
                self.used[kind][b] += float(ranks.sum())
                kept = latents[_prefix_mask(ranks, latents.shape[-1])]
                self.coefficients[kind][b] = torch.cat([self.coefficients[kind][b], kept])
                indices[kind].append(index.to(torch.uint8))
        for kind in ("key", "value"):
            stacked = torch.stack(indices[kind])
            old = self.token_levels[kind]
            self.token_levels[kind] = stacked if old is None else torch.cat([old, stacked], dim=1)
        positions = positions.to(POSITION_DTYPE)
        self.positions = positions.contiguous() if first else torch.cat([self.positions, positions], dim=1)

    def _dense(self, kind: str) -> torch.Tensor:
        """``[batch, held, dim]`` latents: each token's kept prefix in place, zeros beyond it."""
        levels = self.ranker.levels.to(self.positions.device)
        dim = int(levels[-1])
        rows = []
        for b, flat in enumerate(self.coefficients[kind]):
            ranks = levels[self.token_levels[kind][b].long()]
            dense = flat.new_zeros(ranks.shape[0], dim)
            dense[_prefix_mask(ranks, dim)] = flat
            rows.append(dense)
        return torch.stack(rows)

    def held_latents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._dense("key"), self._dense("value"), self.positions

    def tensors(self) -> list[torch.Tensor]:
        if not self.is_latent:
            return super().tensors()
        stored = [t for kind in ("key", "value") for t in self.coefficients[kind]]
        stored += [t for t in self.token_levels.values() if t is not None]
        return super().tensors() + stored

    def reset(self) -> None:
        super().reset()
        self._clear()


def _prefix_mask(ranks: torch.Tensor, dim: int) -> torch.Tensor:
    """``[tokens, dim]``: True for each token's first ``rank`` coefficients."""
    return torch.arange(dim, device=ranks.device) < ranks[:, None]
