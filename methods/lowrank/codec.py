"""Low-rank (dimension) KV caches: latents stored, K/V reconstructed for attention.

``LatentLayer`` holds the usual dense layout while the prompt's attention runs (so prefill is exact), and
``to_latent`` then replaces it by per-token latents of the *pre-RoPE* keys and of the values (keys are
un-rotated, projected, and re-rotated at their absolute positions after reconstruction, as Palu does: the
pre-RoPE basis loses about half as much on SmolLM2-135M, see docs/methods/lowrank.md), plus the tokens'
positions. New tokens (question chunk, decoding) are projected as they arrive, so the cache stays compressed;
``update`` returns reconstructed, post-RoPE K and V of every held token, which is what transformers' attention
consumes.

``LowRankCodec`` is one layer's bases, one block per group of KV heads (Palu's groups; DynaKV uses one group
of all heads). ``LowRankMethod`` (``method.py``), the base of dimension methods, fits them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.layers import LAST_UPDATE, CompressedLayer
from kvbench.methods.lowrank.allocation import POSITION_DTYPE
from kvbench.rope import apply_rope, cos_sin, undo_rope


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

    def project(self, states: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        batch, _, tokens, _ = states.shape
        groups = basis.shape[0]
        flat = states.transpose(1, 2).reshape(batch, tokens, groups, -1)
        return torch.einsum("btgd,gdr->btgr", flat, basis.to(states.dtype)).reshape(batch, tokens, -1)

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
        cos, sin = self.tables(positions, keys.dtype)
        return self.project(undo_rope(keys, cos, sin), self.key_basis), self.project(values, self.value_basis)

    def decode(self, key_latents: torch.Tensor, value_latents: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents -> post-RoPE keys (RoPE re-applied at ``positions``) and values, GQA layout."""
        keys = self.lift(key_latents, self.key_basis)
        cos, sin = self.tables(positions, keys.dtype)
        return apply_rope(keys, cos, sin), self.lift(value_latents, self.value_basis)


class LatentLayer(CompressedLayer):
    """A layer that stores latents after ``to_latent``; dense (``CompressedLayer``) before.

    Storage hooks for subclasses (DynaKV's variable-rank buckets): ``store_latents`` appends new tokens'
    full-width latents, ``held_latents`` returns every held token's latents (zero-padded to a common width)
    and positions, ``tensors`` lists what is stored. ``update`` and ``nbytes`` use only these.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.codec: LowRankCodec | None = None
        self.key_latents: torch.Tensor | None = None
        self.value_latents: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # [batch, held] int32

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
        self.store_latents(*codec.encode(keys, values, positions), positions)

    def store_latents(self, key_latents: torch.Tensor, value_latents: torch.Tensor, positions: torch.Tensor) -> None:
        positions = positions.to(POSITION_DTYPE)
        if self.key_latents is None:
            self.key_latents, self.value_latents, self.positions = (
                key_latents.contiguous(), value_latents.contiguous(), positions.contiguous())
        else:
            self.key_latents = torch.cat([self.key_latents, key_latents], dim=1)
            self.value_latents = torch.cat([self.value_latents, value_latents], dim=1)
            self.positions = torch.cat([self.positions, positions], dim=1)

    def held_latents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.key_latents, self.value_latents, self.positions

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_latent:
            return super().update(key_states, value_states, *args, **kwargs)
        batch, _, new, _ = key_states.shape
        positions = torch.arange(self.seen_tokens, self.seen_tokens + new, device=key_states.device)
        positions = positions.expand(batch, new)
        self.store_latents(*self.codec.encode(key_states, value_states, positions), positions)
        self.seen_tokens += new
        keys, values = self.codec.decode(*self.held_latents())
        LAST_UPDATE.set((self, keys))  # kvbench's attention finds the layer (and its mask) through this
        return keys, values

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
        self.key_latents = self.value_latents = self.positions = None
