"""DynaKV's cache layer (the paper's inference, §3.2 "Hard Masking"): each token's first ``r`` spectral
coefficients, stored for real, with ``r`` chosen per token, per layer and separately for K and V by the gate.

Stored per batch row and for K and V: every held token's kept coefficients (ragged, no padding; bucketed by
rank class, ``ragged.py``), each token's rank (uint8 when ``d <= 255``, else int16), and each token's position
(int32, needed to re-apply RoPE; one list shared by K and V). ``nbytes`` counts all of it. Attention reads the
coefficients directly (``ragged.py``): the reconstruction ``x̃[:r] U⁻¹[:r, :]`` is the latent codec whose basis
is ``U⁻¹ᵀ``, keys re-rotated at their true positions inside the attention, values mixed as latents.

Tokens that arrive after compression (a question chunk, decoded tokens) are gated the same way, at the
layer's threshold, and stored compressed. Right after the prompt's compression the layer holds the prompt's kept
coefficients in held order, not yet bucketed (``pending``), with each one's soft-mask value (``masks``; both
counted while held), so that ``DynaKV.finish`` can raise the threshold across all layers when the prompt's ranks
exceed the budget; ``truncate`` then cuts them once and buckets them once (bucketing at compression and again
after the cut cost about a third of DynaKV's prefill overhead at 8K tokens). Reading the layer before that
settles it at its own threshold.
"""

from __future__ import annotations

import torch

from kvbench.methods.dynakv.ragged import KINDS, RaggedLayer, prefix_mask
from kvbench.methods.dynakv.spectral import SpectralGates, hard_ranks, merge_heads, rank_dtype
from kvbench.methods.lowrank.allocation import POSITION_DTYPE
from kvbench.methods.lowrank.codec import LowRankCodec
from kvbench.methods.lowrank.latent_attention import LatentBlock, pre_rope

FIRST = 2.0  # the stored soft mask of a token's first coefficient: above any threshold (soft masks are <= 1)


def cut_threshold(masks: list[torch.Tensor], remove: int, bins: int = 4096) -> float:
    """The ``remove``-th smallest of all ``masks`` (``torch.kthvalue`` of their concatenation), without that copy
    and a selection over all of them (at 8K tokens, some 60M values: a third of a second): a histogram over
    [0, 1] finds the bin that holds it, and only that bin's values are ranked. Exact: the values below the bin are
    counted with the same comparisons; if rounding put the value outside the bin, the concatenation decides."""
    cumulative = sum(torch.histc(m, bins, 0.0, 1.0).double() for m in masks).cumsum(0)
    found = int(torch.searchsorted(cumulative, cumulative.new_tensor([float(remove)])))
    low, high = found / bins, (found + 1) / bins
    below = sum(int((m < low).sum()) for m in masks)
    inside = torch.cat([m[(m >= low) & (m <= high)] for m in masks])
    rank = remove - below
    if 1 <= rank <= inside.numel():
        return float(torch.kthvalue(inside, rank).values)
    return float(torch.kthvalue(torch.cat(masks), remove).values)


def uniform_ranks(mean: float, start: int, count: int, dim: int) -> torch.Tensor:
    """Ranks of tokens ``start .. start + count - 1`` when every token gets ``mean`` on average (floor/ceil, spread
    evenly so that any run of tokens keeps the mean to within one coefficient): the non-adaptive ablation."""
    index = torch.arange(start, start + count + 1, dtype=torch.float64)
    edges = torch.floor(index * mean)
    return (edges[1:] - edges[:-1]).long().clamp(1, dim)


class PrefixLayer(RaggedLayer):
    """Dense (``CompressedLayer``) until ``compress``; then per-token prefixes of spectral coefficients."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gates: SpectralGates | None = None
        self.layer_idx = 0
        self.threshold = 0.1  # the hard mask's tau for this layer (raised by the budget guard)
        self.uniform: tuple[float, float] | None = None  # mean K and V ranks: the non-adaptive ablation
        self._clear()

    def _clear(self) -> None:
        self.ranks: dict[str, torch.Tensor | None] = dict.fromkeys(KINDS)  # [batch, held]
        self.masks: dict[str, list[torch.Tensor]] | None = None  # per batch row, flat: soft mask of each kept one
        self.pending: dict[str, list[torch.Tensor]] | None = None  # per batch row, flat: the prompt's kept ones

    @property
    def is_prefix(self) -> bool:
        return self.gates is not None

    def compress(self, gates: SpectralGates, layer_idx: int, threshold: float, rotary: torch.nn.Module,
                 positions: torch.Tensor | None = None, uniform: tuple[float, float] | None = None) -> None:
        """Replace the dense tensors (post-RoPE keys) by per-token prefixes; ``positions`` ``[batch, held]`` default
        to the last held ones."""
        batch, kv_heads, held, head_dim = self.keys.shape
        if positions is None:
            positions = torch.arange(self.seen_tokens - held, self.seen_tokens, device=self.keys.device)
            positions = positions.expand(batch, held)
        keys, values = self.keys, self.values
        self.gates, self.layer_idx, self.threshold, self.uniform = gates, layer_idx, threshold, uniform
        inverse = [gates.inverse(layer_idx, kind).T[None].to(keys.dtype) for kind in range(len(KINDS))]
        self.codec = LowRankCodec(inverse[0], inverse[1], kv_heads, head_dim, rotary)
        self.keys = self.values = None
        self.first_position = self.gapless(positions)
        self.store(keys, values, positions, keep_masks=uniform is None)

    def store(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              keep_masks: bool = False) -> None:
        """Gate and append new tokens (post-RoPE ``keys``, ``values`` ``[batch, kv_heads, new, head_dim]``);
        ``keep_masks``: hold the kept coefficients unbucketed, with their soft masks, for the budget guard (the
        prompt's: ``truncate`` settles them)."""
        self.settle()
        (batch, _, new, _), dim, dtype = keys.shape, self.gates.dim, keys.dtype
        held = 0 if self.positions is None else self.positions.shape[1]
        with torch.no_grad():
            pre = pre_rope(keys, positions, self.codec.rotary)
            states = torch.stack([merge_heads(pre), merge_heads(values.float())])
            coefficients = states @ self.gates.basis[self.layer_idx, :, None]  # [2 (K, V), batch, new, d]
            if self.uniform is None:
                mask = self.gates.layer_masks(coefficients, self.layer_idx)
                mask[..., 0] = FIRST  # m_0 = Σ p = 1 > τ: the first coefficient always stays, whatever the guard
                ranks = hard_ranks(mask, self.threshold)  # [2, batch, new]
            else:
                ranks = torch.stack([uniform_ranks(mean, held, new, dim) for mean in self.uniform])
                ranks = ranks.to(keys.device)[:, None].expand(2, batch, new)
            if keep_masks:
                self.masks, self.pending = {kind: [] for kind in KINDS}, {kind: [] for kind in KINDS}
            for index, kind in enumerate(KINDS):
                for b in range(batch):
                    keep = prefix_mask(ranks[index, b], dim).view(-1).nonzero().squeeze(1)
                    kept = coefficients[index, b].reshape(-1).index_select(0, keep).to(dtype)
                    if keep_masks:
                        self.pending[kind].append(kept)
                        self.masks[kind].append(mask[index, b].reshape(-1).index_select(0, keep))
                    else:
                        self.append(kind, b, kept, ranks[index, b])
                stored = ranks[index].to(rank_dtype(dim))
                self.ranks[kind] = self.appends.append(("ranks", kind), self.ranks[kind], stored, 1)
        self.positions = self.appends.append("positions", self.positions, positions.to(POSITION_DTYPE), 1)

    def row_ranks(self, kind: str, row: int) -> torch.Tensor:
        return self.ranks[kind][row]

    def truncate(self, threshold: float) -> None:
        """Settle the prompt's pending coefficients at ``threshold`` if it is above the layer's own (keep only those
        whose soft mask exceeds it: a prefix again, since the mask does not increase along a token), bucket them,
        then drop the soft masks."""
        if self.pending is None:
            return
        raise_to = threshold > self.threshold
        for kind in KINDS:
            ranks = []
            for b, (flat, mask) in enumerate(zip(self.pending[kind], self.masks[kind], strict=True)):
                row = self.ranks[kind][b]
                if raise_to:  # a token's new rank: its kept ones, counted at its last coefficient (ranks >= 1)
                    keep = mask > threshold
                    counted = keep.cumsum(0)[row.long().cumsum(0) - 1]
                    flat, row = flat[keep], torch.diff(counted, prepend=counted.new_zeros(1)).to(row.dtype)
                self.append(kind, b, flat, row)
                ranks.append(row)
            self.ranks[kind] = torch.stack(ranks)
        self.threshold = max(threshold, self.threshold)
        self.masks = self.pending = None

    def settle(self) -> None:
        """Bucket pending coefficients at the layer's threshold (the layer is read before ``DynaKV.finish`` ran)."""
        self.truncate(self.threshold)

    def row_blocks(self, row: int) -> tuple[list[LatentBlock], list[LatentBlock]]:
        self.settle()
        return super().row_blocks(row)

    def row_latents(self, kind: str, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.settle()
        return super().row_latents(kind, row)

    def stored_buckets(self) -> list[torch.Tensor]:
        pending = [] if self.pending is None else [t for kind in KINDS for t in self.pending[kind]]
        return super().stored_buckets() + pending

    def soft_masks(self) -> list[torch.Tensor]:
        return [] if self.masks is None else [m for kind in KINDS for m in self.masks[kind]]

    def tensors(self) -> list[torch.Tensor]:
        if not self.is_prefix:
            return super().tensors()
        stored = self.stored_buckets() + [t for t in self.ranks.values() if t is not None] + self.soft_masks()
        return stored + [t for t in (self.positions, self.scores, self.recent_queries) if t is not None]

    def reset(self) -> None:
        super().reset()
        self.gates = None
        self._clear()
