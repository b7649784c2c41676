"""Attention over a latent cache without rebuilding the history at full width (``LatentLayer.attend``).

- Values: the projection is absorbed, ``softmax(QK^T) (Z_v B_v^T) = (softmax(QK^T) Z_v) B_v^T``: the probabilities
  meet the latents and the result is projected once per query.
- Keys: RoPE depends on each token's position, so no projection can be absorbed into the query (scoring in latent
  space would cost ``heads / kv_heads`` times the rebuild). Keys are rebuilt chunk by chunk (``CHUNK_BYTES``), each
  chunk rotated at its positions and scored at once, so the only full-width keys are one transient chunk.

RoPE as a complex product: the per-head key basis has its columns interleaved (``i, i + d/2``), so a rebuilt chunk
read as complex numbers is rotated by one multiplication with ``scaling * e^{i p theta}``; the query is permuted the
same way, which leaves every score unchanged. That table is built from the rotary module's ``inv_freq`` and
``attention_scaling`` exactly as transformers' default RoPE computes cos/sin (``RopeTable``); it is model-level
(one per rotary module, shared by every layer and cache, like transformers' former ``cos_cached``), holds
``positions x head_dim / 2`` complex numbers (2 MiB at 8K tokens for head_dim 64), is not part of any cache's
``nbytes``, and is rebuilt when ``inv_freq`` changes (dynamic RoPE).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

# Bytes of the transient full-width key chunk: small enough to stay in a CPU's cache; on a GPU, where every chunk
# costs kernel launches and memory is plentiful, one chunk covers all but the longest histories.
CHUNK_BYTES = {"cpu": 2**22, "cuda": 2**28}
SCORE_BYTES = {"cpu": 2**25, "cuda": 2**30}  # float32 scores of one slice of queries (long query chunks)
TABLE_STEP = 1024  # the RoPE table grows by whole multiples of this many positions


@dataclass(frozen=True)
class LatentBlock:
    """Latents ``[batch, tokens, groups * r']`` of some held tokens, all of one width (``r'`` a prefix of the
    basis), and where those tokens sit among the layer's held tokens: ``columns`` ``[tokens]`` (long), or None
    for all held tokens in order. A layer's key blocks cover every held token once, and so do its value blocks; a
    block of width 0 (rank-0 tokens: key scores 0, no value) is allowed, leaving tokens out is not."""

    latents: torch.Tensor
    columns: torch.Tensor | None = None


def interleaved(heads: torch.Tensor) -> torch.Tensor:
    """Per-head rows ``[kv_heads, rank, head_dim]`` with columns reordered ``0, d/2, 1, d/2 + 1, ...`` (RoPE pairs
    adjacent, so a rebuilt key reads as ``head_dim / 2`` complex numbers)."""
    return heads.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2).contiguous()


class RopeTable:
    """``attention_scaling * e^{i p inv_freq}`` for positions ``[0, n)``, complex64 ``[n, head_dim / 2]``, grown in
    steps of ``TABLE_STEP`` and rebuilt when ``inv_freq`` changes in place (dynamic RoPE updates it)."""

    _tables: weakref.WeakKeyDictionary[torch.nn.Module, RopeTable] = weakref.WeakKeyDictionary()

    def __init__(self, rotary: torch.nn.Module) -> None:
        self.rotary = weakref.ref(rotary)
        self.table: torch.Tensor | None = None
        self.key: tuple[int, int, float] | None = None

    @classmethod
    def of(cls, rotary: torch.nn.Module) -> RopeTable:
        if rotary not in cls._tables:
            cls._tables[rotary] = cls(rotary)
        return cls._tables[rotary]

    def get(self, length: int, device: torch.device) -> torch.Tensor:
        """The table for at least positions ``[0, length)``."""
        rotary = self.rotary()
        inv_freq = rotary.inv_freq
        key = (inv_freq.data_ptr(), inv_freq._version, float(getattr(rotary, "attention_scaling", 1.0)))
        if self.table is None or key != self.key or self.table.shape[0] < length or self.table.device != device:
            size = -(-length // TABLE_STEP) * TABLE_STEP
            positions = torch.arange(size, device=device, dtype=torch.float32)
            angles = positions[:, None] * inv_freq.to(device=device, dtype=torch.float32)  # as transformers does
            self.table = torch.complex(angles.cos() * key[2], angles.sin() * key[2])
            self.key = key
        return self.table


def pre_rope(keys: torch.Tensor, positions: torch.Tensor, rotary: torch.nn.Module) -> torch.Tensor:
    """Post-RoPE ``keys`` ``[batch, kv_heads, new, head_dim]`` at ``positions`` ``[batch, new]``, un-rotated (float32):
    each (i, i + head_dim/2) pair divided by the rotation the attention applies (``RopeTable``, scaling included).
    One complex division against the shared table, where the rotary module would rebuild cos/sin for each call."""
    half = keys.shape[-1] // 2
    table = RopeTable.of(rotary).get(int(positions.max()) + 1, keys.device)
    pairs = torch.complex(keys[..., :half].float(), keys[..., half:].float()) / table[positions.long()][:, None]
    return torch.cat([pairs.real, pairs.imag], dim=-1)


def latent_attention(codec, query: torch.Tensor, scaling: float, keys: list[LatentBlock], values: list[LatentBlock],
                     positions: torch.Tensor, end: int, first_position: int | None, newest: int | None = None
                     ) -> torch.Tensor:
    """Attention output ``[batch, q_len, heads, head_dim]`` of post-RoPE ``query`` ``[batch, heads, q_len, d]``
    over the latent blocks of one layer (``codec``: its ``LowRankCodec``).

    ``positions`` ``[batch, held]`` are the held tokens' absolute positions (``first_position + column`` for every
    row when ``first_position`` is given: gapless); the queries are at the ``q_len`` positions before ``end``; a
    query sees the held tokens at or before its position (causal; rows are unpadded, as kvbench runs them), and no
    held token is later than ``newest`` (default ``end - 1``: the queries are the newest tokens). Query head ``h``
    uses KV head ``h // (heads / kv_heads)``, as transformers' ``repeat_kv`` does.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, held = codec.kv_heads, positions.shape[-1]
    device = "cuda" if query.device.type == "cuda" else "cpu"
    rows = max(1, SCORE_BYTES[device] // (batch * heads * held * 4))
    if q_len > rows:  # a long chunk of queries (perplexity, a long question): bounded scores, keys rebuilt per slice
        return torch.cat([latent_attention(codec, query[:, :, start:start + rows], scaling, keys, values, positions,
                                           end - max(0, q_len - start - rows), first_position, end - 1)
                          for start in range(0, q_len, rows)], dim=1)
    per_kv = heads // kv_heads * q_len
    # RoPE pairs (i, i + d/2) side by side, as the rebuilt keys have them; the scaling applied to the few queries
    grouped = query.reshape(batch, kv_heads, per_kv, 2, head_dim // 2).transpose(-1, -2)
    grouped = grouped.reshape(batch, kv_heads, per_kv, head_dim) * scaling
    table = RopeTable.of(codec.rotary).get(end, query.device)
    step = max(1, CHUNK_BYTES[device] // (kv_heads * head_dim * 4))
    whole = len(keys) == 1 and keys[0].columns is None and held <= step  # one chunk: its scores are the scores
    scores = None if whole else query.new_empty(batch, kv_heads, per_kv, held, dtype=torch.float32)
    for block in keys:
        tokens = block.latents.shape[1]
        for start in range(0, tokens, step):
            part = slice(start, min(tokens, start + step))
            where = part if block.columns is None else block.columns[part]
            if first_position is not None and block.columns is None:
                rotation = table[first_position + part.start:first_position + part.stop].unsqueeze(1)
            else:
                rotation = table[positions[:, where].long()].unsqueeze(2)
            rotated = _rotated(codec, block.latents[:, part], rotation, query.dtype)
            chunk = torch.matmul(grouped, rotated.permute(0, 2, 3, 1))
            if whole:
                scores = chunk.float()
            elif block.columns is None:
                scores[..., where] = chunk
            else:
                scores.index_copy_(-1, where, chunk.float())
    scores = scores.view(batch, kv_heads, heads // kv_heads, q_len, held)
    if q_len > 1 or (newest is not None and newest >= end):  # the newest token alone sees every held one
        query_positions = torch.arange(end - q_len, end, device=query.device)[:, None]
        hidden = positions[:, None, None, None, :] > query_positions  # [batch, 1, 1, q_len, held]
        scores.masked_fill_(hidden, float("-inf"))
    probabilities = scores.softmax(-1).view(batch, kv_heads, per_kv, held)
    mixed = _mix(codec, probabilities, values)
    return mixed.view(batch, heads, q_len, head_dim).transpose(1, 2).contiguous().to(query.dtype)


def _rotated(codec, latents: torch.Tensor, rotation: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Post-RoPE keys ``[batch, tokens, kv_heads, head_dim]`` (columns interleaved) of ``latents``: one product per
    head group, whose output rows are every head of the group side by side, then rotated in place."""
    groups, kv_heads = codec.groups, codec.kv_heads
    width = latents.shape[-1] // groups
    rows = codec.key_rows_interleaved.to(latents.dtype)
    parts = [torch.matmul(latents[..., g * width:(g + 1) * width], rows[g, :width]) for g in range(groups)]
    keys = (parts[0] if groups == 1 else torch.cat(parts, -1)).float()
    batch, tokens, _ = keys.shape
    torch.view_as_complex(keys.view(batch, tokens, kv_heads, -1, 2)).mul_(rotation)
    return keys.view(batch, tokens, kv_heads, -1).to(dtype)


def _mix(codec, probabilities: torch.Tensor, values: list[LatentBlock]) -> torch.Tensor:
    """``probabilities`` ``[batch, kv_heads, rows, held]`` times the held values, projected once: ``(P Z) B^T``.
    Each block's ``P Z`` is added into the first columns of one sum per head group (a block of width ``r'`` holds
    the prefix ``r'`` of the basis), so blocks of several widths cost one projection. Blocks that hold some of the
    tokens select their probabilities from one token-major copy (a row per token: whole rows are gathered, several
    times faster than gathering along the last dimension)."""
    groups = codec.groups
    batch, kv_heads, rows, held = probabilities.shape
    span = kv_heads // groups * rows  # rows of one head group
    flat = probabilities.reshape(batch, kv_heads * rows, held)
    by_token: torch.Tensor | None = None
    sums: list[torch.Tensor | None] = [None] * groups
    for block in sorted(values, key=lambda b: -b.latents.shape[-1]):  # the widest first: it sets the sum's width
        width = block.latents.shape[-1] // groups
        if block.columns is None:
            weights = flat
        else:
            if by_token is None:
                by_token = flat.transpose(1, 2).contiguous()
            weights = by_token.index_select(1, block.columns).transpose(1, 2)
        weights = weights.to(block.latents.dtype)
        for g in range(groups):
            part = torch.matmul(weights[:, g * span:(g + 1) * span], block.latents[..., g * width:(g + 1) * width])
            if sums[g] is None:
                sums[g] = part
            else:
                sums[g][..., :width] += part
    heads = codec.value_heads.to(sums[0].dtype)
    per_group = kv_heads // groups
    out = [torch.matmul(total.view(batch, per_group, rows, -1),
                        heads[g * per_group:(g + 1) * per_group, :total.shape[-1]]) for g, total in enumerate(sums)]
    return out[0] if groups == 1 else torch.cat(out, 1)
