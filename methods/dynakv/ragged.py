"""DynaKV's ragged storage, bucketed by rank class, and attention straight from it.

Both DynaKV layouts keep, per batch row and for K and V, each held token's first ``r`` latent coefficients,
unpadded, and each token's rank (the subclass stores the ranks; ``row_ranks``). The coefficients are bucketed by
rank class ``[RATIO^k, RATIO^(k+1))``: one flat tensor per class, its tokens in held order, new tokens appended
to their class. ``LatentLayer.attend`` (see ``methods/lowrank/latent_attention.py``) takes the held latents as
blocks of one width each: a class's bucket is viewed in place when its tokens all keep the same rank, else
copied into a transient block as wide as its largest rank, zeros beyond each token's prefix (``dense``; exact:
``x̃[:r] U⁻¹[:r, :]`` equals the zero-padded ``x̃`` times ``U⁻¹``). A block therefore holds less than ``RATIO``
times the coefficients its tokens store, and a layer has at most ``1 + log_RATIO(d)`` blocks per kind (4 when
``d`` is 128 or 192). One bucket per distinct rank would need no padding but costs a few kernel calls per rank,
and the trained gates give values dozens of distinct ranks per layer (SmolLM2-135M's keys: one to five in most layers).
"""

from __future__ import annotations

import torch

from kvbench.layers import LAST_UPDATE
from kvbench.methods.dynakv.kernel import pad_rows
from kvbench.methods.lowrank.codec import LatentLayer
from kvbench.methods.lowrank.latent_attention import LatentBlock, latent_attention

RATIO = 4
KINDS = ("key", "value")


def prefix_mask(ranks: torch.Tensor, dim: int) -> torch.Tensor:
    """``[tokens, dim]``: True for each token's first ``rank`` coefficients."""
    return torch.arange(dim, device=ranks.device) < ranks[:, None]


def dense(flat: torch.Tensor, ranks: torch.Tensor, width: int) -> torch.Tensor:
    """``[tokens, width]``: each token's prefix in place, zeros beyond (``width`` >= every rank); compiled where it
    can be (``kernel.py``: decoding pads on every step)."""
    padded = pad_rows(flat, ranks, width)
    if padded is not None:
        return padded
    return flat.new_zeros(ranks.shape[0], width).masked_scatter_(prefix_mask(ranks, width), flat)


def rank_class(rank: int) -> int:
    """The class of ``rank``: ``k`` with ``RATIO^k <= rank < RATIO^(k+1)`` (rank 0 with rank 1)."""
    index = 0
    while rank >= RATIO ** (index + 1):
        index += 1
    return index


def rank_classes(ranks: torch.Tensor) -> torch.Tensor:
    edges = RATIO ** torch.arange(1, 16, device=ranks.device)
    return torch.bucketize(ranks, edges, right=True)


def block(flat: torch.Tensor, ranks: torch.Tensor, columns: torch.Tensor | None = None) -> LatentBlock:
    """One block: a view when every token keeps the same rank, else zero-padded to the largest."""
    low, high = (int(r) for r in ranks.aminmax())
    latents = flat.view(ranks.shape[0], high) if low == high else dense(flat, ranks, high)
    return LatentBlock(latents[None], columns)


class RaggedLayer(LatentLayer):
    """A ``LatentLayer`` whose latents are ragged prefixes, bucketed by rank class (module docstring).

    Subclasses gate new tokens in ``store`` and ``append`` their kept coefficients; ``row_ranks(kind, b)`` gives
    one batch row's ranks, ``[held]``, in held order. Attention reads each row's blocks (``row_blocks``), one row
    at a time when the rows of a batch keep different ranks.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.buckets: dict[str, list[dict[int, torch.Tensor]]] = {kind: [] for kind in KINDS}  # per row: class ->

    def row_ranks(self, kind: str, row: int) -> torch.Tensor:
        raise NotImplementedError

    def store(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Gate and append new tokens (post-RoPE ``keys``, ``values`` ``[batch, kv_heads, new, head_dim]``)."""
        raise NotImplementedError

    def append(self, kind: str, row: int, kept: torch.Tensor, ranks: torch.Tensor) -> None:
        """Append new tokens' kept coefficients (``kept``: flat, token order) with their ``ranks`` to their buckets."""
        while len(self.buckets[kind]) <= row:
            self.buckets[kind].append({})
        ranks = ranks.long()
        low, high = (int(r) for r in ranks.aminmax())
        if rank_class(low) == rank_class(high):
            parts = {rank_class(low): kept}
        else:
            classes = rank_classes(ranks)
            owner = classes.repeat_interleave(ranks)  # each coefficient's class
            parts = {index: kept[owner == index] for index in classes.unique().tolist()}
        buckets = self.buckets[kind][row]
        for index, part in parts.items():
            buckets[index] = self.appends.append((kind, row, index), buckets.get(index), part, 0)

    def stored_buckets(self) -> list[torch.Tensor]:
        return [t for kind in KINDS for row in self.buckets[kind] for t in row.values()]

    def class_columns(self, kind: str, row: int) -> tuple[torch.Tensor, dict[int, torch.Tensor | None]]:
        """The row's ranks (long) and, per bucket, its tokens' held columns (None: the only bucket, every token)."""
        ranks = self.row_ranks(kind, row).long()
        buckets = self.buckets[kind][row]
        if len(buckets) == 1:
            return ranks, dict.fromkeys(buckets)
        classes = rank_classes(ranks)
        return ranks, {index: (classes == index).nonzero().squeeze(1) for index in buckets}

    def row_blocks(self, row: int) -> tuple[list[LatentBlock], list[LatentBlock]]:
        blocks: list[list[LatentBlock]] = []
        for kind in KINDS:
            ranks, columns = self.class_columns(kind, row)
            buckets = self.buckets[kind][row]
            blocks.append([block(buckets[i], ranks if c is None else ranks[c], c) for i, c in columns.items()])
        return blocks[0], blocks[1]

    def row_latents(self, kind: str, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One row's coefficients in held order (flat) and ranks: the reference form, built on demand."""
        ranks, columns = self.class_columns(kind, row)
        buckets = self.buckets[kind][row]
        if len(buckets) == 1:
            return next(iter(buckets.values())), ranks
        width = int(ranks.max())
        padded = buckets[next(iter(buckets))].new_zeros(ranks.shape[0], width)
        for index, where in columns.items():
            kept = ranks[where]
            padded[where, :int(kept.max())] = dense(buckets[index], kept, int(kept.max()))
        return padded[prefix_mask(ranks, width)], ranks

    def latent_blocks(self) -> tuple[list[LatentBlock], list[LatentBlock]]:
        if self.positions.shape[0] != 1:
            raise ValueError("blocks of a batch of rows with different ranks: attend row by row (attend does)")
        return self.row_blocks(0)

    def held_latents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The dense reference: every held token's latents zero-padded to ``d``, ``[batch, held, d]``, and positions."""
        width = self.codec.key_basis.shape[-1]
        keys, values = (torch.stack([dense(*self.row_latents(kind, b), width) for b in range(self.positions.shape[0])])
                        for kind in KINDS)
        return keys, values, self.positions

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Gate and store the new tokens; attention then reads the layer (``attend``), as ``LatentLayer.update``."""
        if not self.is_latent:
            return super().update(key_states, value_states, *args, **kwargs)
        batch, _, new, _ = key_states.shape
        positions = torch.arange(self.seen_tokens, self.seen_tokens + new, device=key_states.device)
        self.store(key_states, value_states, positions.expand(batch, new))
        self.seen_tokens += new
        keys, values = key_states[..., :0, :], value_states[..., :0, :]
        LAST_UPDATE.set((self, keys))
        return keys, values

    def attend(self, query: torch.Tensor, scaling: float, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        if not self.is_latent:
            return None
        rows = [latent_attention(self.codec, query[b:b + 1], scaling, *self.row_blocks(b), self.positions[b:b + 1],
                                 self.seen_tokens, self.first_position) for b in range(query.shape[0])]
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def gapless(self, positions: torch.Tensor) -> int | None:
        """``first_position`` for a layer that now holds ``positions`` ``[batch, held]`` (None: not gapless)."""
        batch, held = positions.shape
        first = int(positions[0, 0])
        expected = torch.arange(first, first + held, device=positions.device).expand(batch, held)
        return first if first + held == self.seen_tokens and torch.equal(positions.long(), expected) else None

    def reset(self) -> None:
        super().reset()
        self.buckets = {kind: [] for kind in KINDS}
