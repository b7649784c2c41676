"""DynaKV's cache layer (the paper's inference, §3.2 "Hard Masking"): each token's first ``r`` spectral
coefficients, stored for real, with ``r`` chosen per token, per layer and separately for K and V by the gate.

Stored per batch row and for K and V: one flat tensor of every held token's kept coefficients in token order
(ragged, no padding), each token's rank (uint8 when ``d <= 255``, else int16), and each token's position
(int32, needed to re-apply RoPE; one list shared by K and V). ``nbytes`` counts all of it. A token's
coefficients start at the running sum of the ranks before it, so reconstruction is one masked scatter into a
transient ``[held, d]`` block, a product with ``U⁻¹`` (zeros beyond each prefix, i.e. ``x̃[:r] U⁻¹[:r, :]``),
heads split, and RoPE at each token's true position for keys.

Tokens that arrive after compression (a question chunk, decoded tokens) are gated the same way, at the
layer's threshold, and stored compressed. Right after the prompt's compression the layer also holds each kept
coefficient's soft-mask value (``masks``, transient, counted while held) so that ``DynaKV.finish`` can raise the
threshold across all layers when the prompt's ranks exceed the budget; it then drops them.
"""

from __future__ import annotations

import torch

from kvbench.layers import LAST_UPDATE, CompressedLayer
from kvbench.methods.dynakv.spectral import (
    KINDS,
    SpectralGates,
    hard_ranks,
    merge_heads,
    rank_dtype,
    split_heads,
)
from kvbench.methods.lowrank.allocation import POSITION_DTYPE
from kvbench.rope import apply_rope, cos_sin, undo_rope

FIRST = 2.0  # the stored soft mask of a token's first coefficient: above any threshold (soft masks are <= 1)


def prefix_mask(ranks: torch.Tensor, dim: int) -> torch.Tensor:
    """``[tokens, dim]``: True for each token's first ``rank`` coefficients."""
    return torch.arange(dim, device=ranks.device) < ranks[:, None]


def uniform_ranks(mean: float, start: int, count: int, dim: int) -> torch.Tensor:
    """Ranks of tokens ``start .. start + count - 1`` when every token gets ``mean`` on average (floor/ceil, spread
    evenly so that any run of tokens keeps the mean to within one coefficient): the non-adaptive ablation."""
    index = torch.arange(start, start + count + 1, dtype=torch.float64)
    edges = torch.floor(index * mean)
    return (edges[1:] - edges[:-1]).long().clamp(1, dim)


class PrefixLayer(CompressedLayer):
    """Dense (``CompressedLayer``) until ``compress``; then per-token prefixes of spectral coefficients."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gates: SpectralGates | None = None
        self.layer_idx = 0
        self.threshold = 0.1  # the hard mask's tau for this layer (raised by the budget guard)
        self.uniform: tuple[float, float] | None = None  # mean K and V ranks: the non-adaptive ablation
        self.rotary: torch.nn.Module | None = None
        self.kv_heads = 0
        self._clear()

    def _clear(self) -> None:
        self.coefficients: dict[str, list[torch.Tensor]] = {kind: [] for kind in KINDS}  # per batch row, flat
        self.ranks: dict[str, torch.Tensor | None] = dict.fromkeys(KINDS)  # [batch, held]
        self.masks: dict[str, list[torch.Tensor]] | None = None  # per batch row, flat: soft mask of each kept one
        self.positions: torch.Tensor | None = None  # [batch, held] int32

    @property
    def is_prefix(self) -> bool:
        return self.gates is not None

    def compress(self, gates: SpectralGates, layer_idx: int, threshold: float, rotary: torch.nn.Module,
                 positions: torch.Tensor | None = None, uniform: tuple[float, float] | None = None) -> None:
        """Replace the dense tensors (post-RoPE keys) by per-token prefixes; ``positions`` ``[batch, held]`` default
        to the last held ones."""
        batch, _, held, _ = self.keys.shape
        if positions is None:
            positions = torch.arange(self.seen_tokens - held, self.seen_tokens, device=self.keys.device)
            positions = positions.expand(batch, held)
        keys, values = self.keys, self.values
        self.gates, self.layer_idx, self.threshold, self.rotary, self.uniform = (
            gates, layer_idx, threshold, rotary, uniform)
        self.kv_heads = keys.shape[1]
        self.keys = self.values = None
        self._store(keys, values, positions, keep_masks=uniform is None)

    def _tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos_sin(self.rotary, positions.reshape(-1).long(), torch.float32)
        shape = (*positions.shape, cos.shape[-1])
        return cos.reshape(shape).unsqueeze(1), sin.reshape(shape).unsqueeze(1)

    def _store(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               keep_masks: bool = False) -> None:
        """Gate and append new tokens (post-RoPE ``keys``, ``values`` ``[batch, kv_heads, new, head_dim]``);
        ``keep_masks``: also hold the kept coefficients' soft masks (the prompt's, for the budget guard)."""
        cos, sin = self._tables(positions)
        states = (merge_heads(undo_rope(keys.float(), cos, sin)), merge_heads(values.float()))
        dim, dtype = self.gates.dim, keys.dtype
        held = 0 if self.positions is None else self.positions.shape[1]
        if keep_masks:
            self.masks = {kind: [] for kind in KINDS}
        with torch.no_grad():
            for kind_index, (kind, flat) in enumerate(zip(KINDS, states, strict=True)):
                coefficients = flat @ self.gates.basis[self.layer_idx, kind_index]  # [batch, new, d]
                if self.uniform is None:
                    mask = self.gates.mask(coefficients, self.layer_idx, kind_index)
                    mask[..., 0] = FIRST  # m_0 = Σ p = 1 > τ: the first coefficient always stays, whatever the guard
                    ranks = hard_ranks(mask, self.threshold)
                else:
                    ranks = uniform_ranks(self.uniform[kind_index], held, flat.shape[1], dim).to(flat.device)
                    ranks = ranks.expand(flat.shape[0], -1)
                rows = []
                for b in range(flat.shape[0]):
                    keep = prefix_mask(ranks[b], dim)
                    kept = coefficients[b][keep].to(dtype)
                    rows.append(kept if held == 0 else torch.cat([self.coefficients[kind][b], kept]))
                    if keep_masks:
                        self.masks[kind].append(mask[b][keep])
                self.coefficients[kind] = rows
                stored = ranks.to(rank_dtype(dim))
                old = self.ranks[kind]
                self.ranks[kind] = stored if old is None else torch.cat([old, stored], dim=1)
        positions = positions.to(POSITION_DTYPE)
        self.positions = positions.contiguous() if held == 0 else torch.cat([self.positions, positions], dim=1)

    def truncate(self, threshold: float) -> None:
        """Raise the threshold to ``threshold``: keep only coefficients whose soft mask exceeds it (a prefix again,
        since the mask does not increase along a token), then drop the soft masks."""
        if self.masks is not None and threshold > self.threshold:
            for kind in KINDS:
                ranks = []
                for b, (flat, mask) in enumerate(zip(self.coefficients[kind], self.masks[kind], strict=True)):
                    keep = mask > threshold
                    self.coefficients[kind][b] = flat[keep]
                    token = torch.repeat_interleave(torch.arange(self.ranks[kind].shape[1], device=flat.device),
                                                    self.ranks[kind][b].long())
                    ranks.append(torch.bincount(token[keep], minlength=self.ranks[kind].shape[1]))
                self.ranks[kind] = torch.stack(ranks).to(self.ranks[kind].dtype)
            self.threshold = threshold
        self.masks = None

    def soft_masks(self) -> list[torch.Tensor]:
        return [] if self.masks is None else [m for kind in KINDS for m in self.masks[kind]]

    def reconstruct(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE keys and values ``[batch, kv_heads, held, head_dim]`` of every held token."""
        dim = self.gates.dim
        out = []
        for kind_index, kind in enumerate(KINDS):
            rows = []
            for b, flat in enumerate(self.coefficients[kind]):
                dense = flat.new_zeros(self.positions.shape[1], dim)
                dense[prefix_mask(self.ranks[kind][b].long(), dim)] = flat
                rows.append(dense)
            inverse = self.gates.inverse(self.layer_idx, kind_index).to(rows[0].dtype)
            out.append(split_heads(torch.stack(rows) @ inverse, self.kv_heads))
        cos, sin = self._tables(self.positions)
        return apply_rope(out[0], cos.to(out[0].dtype), sin.to(out[0].dtype)), out[1]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_prefix:
            return super().update(key_states, value_states, *args, **kwargs)
        batch, _, new, _ = key_states.shape
        positions = torch.arange(self.seen_tokens, self.seen_tokens + new, device=key_states.device)
        self._store(key_states, value_states, positions.expand(batch, new))
        self.seen_tokens += new
        keys, values = self.reconstruct()
        LAST_UPDATE.set((self, keys))
        return keys, values

    def held_tokens(self) -> int:
        if not self.is_prefix:
            return super().held_tokens()
        return 0 if self.positions is None else self.positions.shape[-1]

    def tensors(self) -> list[torch.Tensor]:
        if not self.is_prefix:
            return super().tensors()
        stored = [t for kind in KINDS for t in self.coefficients[kind]]
        stored += [t for t in self.ranks.values() if t is not None] + self.soft_masks()
        return stored + [t for t in (self.positions, self.scores, self.recent_queries) if t is not None]

    def crop(self, tokens_to_remove: int) -> None:
        if not self.is_prefix:
            return super().crop(tokens_to_remove)
        raise NotImplementedError("a DynaKV cache cannot be cropped")

    def reset(self) -> None:
        super().reset()
        self.gates = None
        self._clear()
