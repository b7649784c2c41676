"""Low-rank (dimension) KV caches: latents stored, attention computed from them.

``LatentLayer`` holds the usual dense layout while the prompt's attention runs (so prefill is exact), and
``to_latent`` then replaces it by per-token latents of the *pre-RoPE* keys and of the values (keys are
un-rotated, projected, and re-rotated at their absolute positions when attention needs them, as Palu does: the
pre-RoPE basis loses about half as much on SmolLM2-135M, see docs/methods/lowrank.md), plus the tokens'
positions. New tokens (question chunk, decoding) are projected as they arrive, so the cache stays compressed.

Attention never rebuilds the whole history at full width (``LatentLayer.attend``, ``latent_attention.py``):
values are mixed as latents and projected once per query, keys are rebuilt one bounded chunk at a time. The
cache holds only the latents and the positions.

``LowRankCodec`` is one layer's bases, one block per group of KV heads (Palu's groups; DynaKV uses one group
of all heads). ``LowRankMethod`` (``method.py``), the base of dimension methods, fits them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvbench.layers import LAST_UPDATE, CompressedLayer
from kvbench.methods.lowrank.allocation import POSITION_DTYPE
from kvbench.methods.lowrank.latent_attention import LatentBlock, interleaved, latent_attention, pre_rope
from kvbench.rope import apply_rope, cos_sin


@dataclass
class LowRankCodec:
    """One layer's maps between states ``[batch, kv_heads, tokens, head_dim]`` and latents ``[batch, tokens, r]``.

    ``key_basis``/``value_basis`` are ``[groups, group_dim, rank]`` with orthonormal columns; a latent is the
    concatenation of the groups' coefficients (``groups * rank`` numbers per token).
    """

    key_basis: torch.Tensor
    value_basis: torch.Tensor
    kv_heads: int
    head_dim: int
    rotary: torch.nn.Module
    # The forms attention uses: per KV head, the rows of its group's basis, transposed, ``[kv_heads, rank,
    # head_dim]`` (values); for keys, per group, its heads' rows side by side, ``[groups, rank, group_dim]``, with
    # RoPE pairs interleaved within each head (see ``latent_attention``).
    key_rows_interleaved: torch.Tensor = field(init=False, repr=False)
    value_heads: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        keys = interleaved(self._per_head(self.key_basis))
        groups, rank = self.key_basis.shape[0], self.key_basis.shape[2]
        per_group = keys.reshape(groups, self.kv_heads // groups, rank, self.head_dim).transpose(1, 2)
        self.key_rows_interleaved = per_group.reshape(groups, rank, -1).contiguous()
        self.value_heads = self._per_head(self.value_basis)

    def _per_head(self, basis: torch.Tensor) -> torch.Tensor:
        groups, _, rank = basis.shape
        per_group = basis.reshape(groups, self.kv_heads // groups, self.head_dim, rank)
        return per_group.transpose(-1, -2).reshape(self.kv_heads, rank, self.head_dim).contiguous()

    @property
    def groups(self) -> int:
        return self.key_basis.shape[0]

    @property
    def key_rank(self) -> int:
        return self.key_basis.shape[0] * self.key_basis.shape[2]

    @property
    def value_rank(self) -> int:
        return self.value_basis.shape[0] * self.value_basis.shape[2]

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[batch, 1, tokens, head_dim]`` at absolute positions ``[batch, tokens]``."""
        cos, sin = cos_sin(self.rotary, positions.reshape(-1).long(), dtype)
        shape = (*positions.shape, cos.shape[-1])
        return cos.reshape(shape).unsqueeze(1), sin.reshape(shape).unsqueeze(1)

    def project(self, states: torch.Tensor, basis: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """States ``[batch, kv_heads, tokens, head_dim]`` -> latents ``[batch, tokens, groups * rank]`` in ``dtype``
        (one product per group; decoding encodes a token per layer and step, so no einsum dispatch)."""
        batch, _, tokens, _ = states.shape
        groups = basis.shape[0]
        flat = states.transpose(1, 2).reshape(batch, tokens, groups, -1).to(dtype)
        basis = basis.to(dtype)
        parts = [torch.matmul(flat[:, :, g], basis[g]) for g in range(groups)]
        return parts[0] if groups == 1 else torch.cat(parts, -1)

    def lift(self, latents: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """Latents ``[batch, tokens, groups * r']`` with ``r' <= rank`` (a prefix: DynaKV zero-pads) to states."""
        batch, tokens, width = latents.shape
        groups = basis.shape[0]
        per_group = width // groups
        coefficients = latents.reshape(batch, tokens, groups, per_group)
        flat = torch.einsum("btgr,gdr->btgd", coefficients, basis[..., :per_group].to(latents.dtype))
        return flat.reshape(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)

    def encode(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE keys and values at ``positions`` ``[batch, tokens]`` -> key and value latents."""
        pre = pre_rope(keys, positions, self.rotary)
        return self.project(pre, self.key_basis, keys.dtype), self.project(values, self.value_basis, values.dtype)

    def decode(self, key_latents: torch.Tensor, value_latents: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents -> post-RoPE keys (RoPE re-applied at ``positions``) and values, GQA layout, at full width."""
        keys = self.lift(key_latents, self.key_basis)
        cos, sin = self.tables(positions, keys.dtype)
        return apply_rope(keys, cos, sin), self.lift(value_latents, self.value_basis)


class LatentLayer(CompressedLayer):
    """A layer that stores latents after ``to_latent``; dense (``CompressedLayer``) before.

    Storage hooks for subclasses (DynaKV's variable-rank buckets): ``store_latents`` appends new tokens'
    full-width latents; ``latent_blocks`` gives attention the held latents as blocks of one width each (default:
    one block per kind, from ``held_latents``); ``held_latents`` returns every held token's latents (zero-padded
    to a common width) and positions, the dense form; ``tensors`` lists what is stored. ``self.positions``
    (``[batch, held]``, increasing) must stay up to date: attention re-applies RoPE and masks with it. New tokens
    arrive at the next positions, so a gapless layer (``first_position``) stays gapless.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.codec: LowRankCodec | None = None
        self.key_latents: torch.Tensor | None = None
        self.value_latents: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # [batch, held] int32
        self.first_position: int | None = None  # set when every row holds positions first, first + 1, ... (no gaps)

    @property
    def is_latent(self) -> bool:
        return self.codec is not None

    def to_latent(self, codec: LowRankCodec, positions: torch.Tensor | None = None) -> None:
        """Replace the dense tensors by latents; ``positions`` ``[batch, held]`` default to the last held ones."""
        batch, _, held, _ = self.keys.shape
        if positions is None:
            positions = torch.arange(self.seen_tokens - held, self.seen_tokens, device=self.keys.device)
            positions = positions.expand(batch, held)
        keys, values = self.keys, self.values
        self.codec = codec
        self.keys = self.values = None
        first = int(positions[0, 0])
        gapless = torch.arange(first, first + held, device=positions.device).expand(batch, held)
        self.first_position = first if first + held == self.seen_tokens and torch.equal(positions, gapless) else None
        self.store_latents(*codec.encode(keys, values, positions), positions)

    def store_latents(self, key_latents: torch.Tensor, value_latents: torch.Tensor, positions: torch.Tensor) -> None:
        appends = self.appends
        self.key_latents = appends.append("key", self.key_latents, key_latents, 1)
        self.value_latents = appends.append("value", self.value_latents, value_latents, 1)
        self.positions = appends.append("positions", self.positions, positions.to(POSITION_DTYPE), 1)

    def held_latents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.key_latents, self.value_latents, self.positions

    def latent_blocks(self) -> tuple[list[LatentBlock], list[LatentBlock]]:
        """Key blocks and value blocks covering every held token (``LatentBlock``)."""
        keys, values, _ = self.held_latents()
        return [LatentBlock(keys)], [LatentBlock(values)]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new tokens as latents. Returns empty K/V: ``attend`` computes attention from the latents (an
        attention function that ignored it would fail loudly on zero keys rather than attend to a wrong set)."""
        if not self.is_latent:
            return super().update(key_states, value_states, *args, **kwargs)
        batch, _, new, _ = key_states.shape
        positions = torch.arange(self.seen_tokens, self.seen_tokens + new, device=key_states.device)
        positions = positions.expand(batch, new)
        self.store_latents(*self.codec.encode(key_states, value_states, positions), positions)
        self.seen_tokens += new
        keys, values = key_states[..., :0, :], value_states[..., :0, :]
        LAST_UPDATE.set((self, keys))  # kvbench's attention finds the layer, and calls attend, through this
        return keys, values

    def attend(self, query: torch.Tensor, scaling: float, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        if not self.is_latent:
            return None
        keys, values = self.latent_blocks()
        return latent_attention(self.codec, query, scaling, keys, values, self.positions, self.seen_tokens,
                                self.first_position)

    def held_tokens(self) -> int:
        if not self.is_latent:
            return super().held_tokens()
        return 0 if self.positions is None else self.positions.shape[-1]

    def tensors(self) -> list[torch.Tensor]:
        if not self.is_latent:
            return super().tensors()
        stored = (self.key_latents, self.value_latents, self.positions, self.scores, self.recent_queries)
        return [t for t in stored if t is not None]

    def crop(self, tokens_to_remove: int) -> None:
        if not self.is_latent:
            return super().crop(tokens_to_remove)
        raise NotImplementedError("a latent cache cannot be cropped")

    def reset(self) -> None:
        super().reset()
        self.codec = None
        self.key_latents = self.value_latents = self.positions = self.first_position = None
