"""Storage layouts a compressed cache's layers can have.

``CompressedLayer`` holds dense ``[batch, kv_heads, held_tokens, head_dim]`` tensors (the GQA
layout, one entry per KV head) and the *logical* length. Positions stay true after eviction:
``get_seq_length`` reports the logical length (tokens seen, which places new tokens and their
RoPE), ``get_mask_sizes`` the *physical* length (tokens held) with an offset of
``logical - physical``, so causality among new tokens stays right.

Other layouts (latent, per-head variable length) subclass it and keep the same contract: ``nbytes``
counts every tensor the layer stores, and ``full_nbytes`` records what it held before compression.

transformers builds one attention mask per forward, from layer 0's ``get_mask_sizes``. Layers that
hold a different number of tokens than layer 0 (PyramidKV) or a different number per head (AdaKV)
therefore build their own mask at attention time (``attention_mask``), which kvbench's attention
function passes to sdpa instead. ``update`` records which layer produced the keys attention is
about to see (``LAST_UPDATE``), so the attention function can find the layer without the cache.
"""

from __future__ import annotations

import math
import weakref
from contextvars import ContextVar

import torch
from transformers.cache_utils import DynamicLayer

from kvbench.appending import AppendBuffers

# (layer, keys returned by its last update): lets kvbench's attention function find the layer whose keys it sees.
LAST_UPDATE: ContextVar[tuple[CompressedLayer, torch.Tensor] | None] = ContextVar("kvbench_last_update", default=None)
LENGTH_DTYPE = torch.long  # how ``PerHeadLayer`` stores each KV head's length
LOGIT_BYTES = 2**26  # float32 logits of one slice of queries in ``PerHeadLayer.attend`` (long query chunks)


def lengths_reserve(token_heads: int, budget: float, tokens: int, heads: int, token_bytes: int) -> int:
    """Token-heads to give up so that ``token_heads`` tokens (``token_bytes`` each, per KV head) and the lengths of
    ``heads`` packed KV heads fit in ``budget`` of those heads' ``tokens`` (one batch row): the budget counts the
    lengths, so they are paid in tokens."""
    over = token_heads * token_bytes + heads * LENGTH_DTYPE.itemsize - budget * tokens * heads * token_bytes
    return max(0, math.ceil(over / token_bytes - 1e-9))


def _query_length(query: int | torch.Tensor) -> int:
    """transformers < 5.3 passes ``cache_position`` to ``get_mask_sizes``, later versions the query length."""
    return query if isinstance(query, int) else int(query.shape[0])


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """``[q_len, kv_len]`` boolean mask for queries that are the last ``q_len`` of ``kv_len`` keys."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


class CompressedLayer(DynamicLayer):
    """One layer's cache: tensors ``[batch, kv_heads, held_tokens, head_dim]`` plus the logical length.

    Two optional tensors serve decoding-phase compression and count in ``nbytes`` while they exist:
    ``scores`` (``[batch, kv_heads, held]``, e.g. H2O's accumulated attention) and ``recent_queries``
    (the queries of the tokens added since the last compression, which query-aware scores need).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen_tokens = 0
        self.full_nbytes: int | None = None  # bytes the layer held before compression, measured
        self.scores: torch.Tensor | None = None
        self.recent_queries: torch.Tensor | None = None
        self.owner: weakref.ref | None = None  # the cache whose method compresses this layer while decoding
        self.appends = AppendBuffers()  # new tokens are written in place, not by copying the cache (appending.py)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """``DynamicLayer.update`` (append along the tokens, return everything held) without its per-step copy."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = self.appends.append("keys", self.keys, key_states, -2)
        self.values = self.appends.append("values", self.values, value_states, -2)
        self.seen_tokens += key_states.shape[-2]
        if self.scores is not None:
            zeros = self.scores.new_zeros(*self.scores.shape[:2], key_states.shape[-2])
            self.scores = self.appends.append("scores", self.scores, zeros, -1)
        LAST_UPDATE.set((self, self.keys))
        return self.keys, self.values

    def held_tokens(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def tokens_per_head(self) -> float:
        """Tokens a KV head holds on average: what a budget in tokens is compared with."""
        return self.held_tokens()

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        held = self.held_tokens()
        return held + _query_length(query_length), self.seen_tokens - held

    def attention_mask(self, query: torch.Tensor, keys: torch.Tensor,
                       given: torch.Tensor | None) -> torch.Tensor | None:
        """The mask attention should use for ``query`` on ``keys`` (what ``update`` returned).

        transformers' mask fits layer 0's length; a layer holding another length gets a causal mask of
        its own (new tokens are the last ``q_len`` keys). Assumes unpadded rows, as kvbench runs them.
        """
        q_len, kv_len = query.shape[-2], keys.shape[-2]
        if given is not None and given.shape[-1] == kv_len:
            return given
        if q_len == 1 or (given is None and q_len == kv_len):
            return None  # every held key is visible (one query), or plain causal prefill
        return causal_mask(q_len, kv_len, keys.device)[None, None]

    def attend(self, query: torch.Tensor, scaling: float, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Attention output ``[batch, q_len, heads, head_dim]`` computed by the layer itself, or None for the
        model's own kernel on what ``update`` returned.

        A layout whose stored form is not plain keys and values (latents, groups of different widths) overrides it
        to attend without rebuilding full-width K/V: e.g. scores in latent space and values projected once.
        ``attention_mask`` is transformers' mask (None or boolean/additive ``[batch, 1, q_len, kv_len]``).
        """
        return None

    def crop(self, tokens_to_remove: int) -> None:
        held = self.held_tokens()
        super().crop(tokens_to_remove)
        self.seen_tokens -= held - self.held_tokens()

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
        self.full_nbytes = None
        self.scores = self.recent_queries = None
        self.appends.clear()

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer stores; what ``nbytes`` counts."""
        return [t for t in (self.keys, self.values, self.scores, self.recent_queries) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def keep(self, indices: torch.Tensor) -> None:
        """Replace the held tensors by new, smaller ones holding only ``indices`` per KV head."""
        gather = indices.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, gather).contiguous()
        self.values = self.values.gather(2, gather.expand(-1, -1, -1, self.values.shape[-1])).contiguous()
        if self.scores is not None:
            self.scores = self.scores.gather(2, indices).contiguous()


class PerHeadLayer(CompressedLayer):
    """Per-head variable length, stored packed: no padding, no masking, no KV repeated per query head.

    Before compression the layer is dense like ``CompressedLayer``. ``keep_per_head`` packs it: ``packed_keys`` and
    ``packed_values`` are ``[sum of held tokens over (batch, kv_head), head_dim]`` in (batch, head, position) order,
    and ``lengths`` (``[batch, kv_heads]``) says how many of them each head holds. Tokens that arrive later reach
    every head, so they go to a dense tail, ``keys``/``values`` ``[batch, kv_heads, new, head_dim]``, appended in
    place like any layer's: a head holds its packed tokens, then the tail. Attention reads views of both
    (``attend``), so no decoding step copies or pads the cache.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lengths: torch.Tensor | None = None
        self.packed_keys: torch.Tensor | None = None
        self.packed_values: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.lengths is not None

    def tail_tokens(self) -> int:
        return self.keys.shape[-2]

    def held_tokens(self) -> int:
        """Tokens per head that attention sees at most: the longest head's length."""
        return int(self.lengths.max()) + self.tail_tokens() if self.packed else super().held_tokens()

    def tokens_per_head(self) -> float:
        return float(self.lengths.float().mean()) + self.tail_tokens() if self.packed else super().tokens_per_head()

    def head_lengths(self) -> torch.Tensor:
        """``[batch, kv_heads]`` tokens held per head."""
        if self.packed:
            return self.lengths + self.tail_tokens()
        return torch.full(self.keys.shape[:2], self.held_tokens(), dtype=torch.long, device=self.keys.device)

    def tensors(self) -> list[torch.Tensor]:
        packed = [self.packed_keys, self.packed_values, self.lengths] if self.packed else []
        return super().tensors() + packed

    def reset(self) -> None:
        super().reset()
        self.lengths = self.packed_keys = self.packed_values = None

    def crop(self, tokens_to_remove: int) -> None:
        if self.packed:
            raise NotImplementedError("a per-head variable-length cache cannot be cropped")
        super().crop(tokens_to_remove)

    def heads(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(keys, values)`` of every (batch, kv_head), each ``[held, head_dim]``, in (batch, head) order (copies
        when a packed head has a tail)."""
        tails = list(zip(self.keys.flatten(0, 1).unbind(0), self.values.flatten(0, 1).unbind(0), strict=True))
        if not self.packed:
            return tails
        sizes = self.lengths.flatten().tolist()
        packed = zip(self.packed_keys.split(sizes), self.packed_values.split(sizes), strict=True)
        if not self.tail_tokens():
            return list(packed)
        return [(torch.cat([k, tk]), torch.cat([v, tv])) for (k, v), (tk, tv) in zip(packed, tails, strict=True)]

    def packed_heads(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every head's tokens, tail included, packed in (batch, head, position) order, and their ``[batch, kv_heads]``
        lengths: flash-attn's variable-length layout (a copy when the tail holds tokens)."""
        if not self.tail_tokens():
            return self.packed_keys, self.packed_values, self.lengths
        heads = self.heads()
        return torch.cat([k for k, _ in heads]), torch.cat([v for _, v in heads]), self.head_lengths()

    def keep_per_head(self, indices: list[torch.Tensor]) -> None:
        """Keep, per (batch, kv_head) in that order, the sorted token ``indices`` of that head (the tail's tokens
        count after the packed ones); packs the layer, with an empty tail."""
        batch, kv_heads, _, head_dim = self.keys.shape
        kept = [(k[i], v[i]) for (k, v), i in zip(self.heads(), indices, strict=True)]
        self.packed_keys = torch.cat([k for k, _ in kept]).contiguous()
        self.packed_values = torch.cat([v for _, v in kept]).contiguous()
        lengths = torch.tensor([len(i) for i in indices], dtype=LENGTH_DTYPE, device=self.packed_keys.device)
        self.lengths = lengths.reshape(batch, kv_heads)
        self.keys = self.keys.new_empty(batch, kv_heads, 0, head_dim)
        self.values = self.values.new_empty(batch, kv_heads, 0, self.values.shape[-1])
        self.scores = None

    def attend(self, query: torch.Tensor, scaling: float, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Attention output ``[batch, q_len, heads, head_dim]`` of a packed layer: the softmax over each head's packed
        tokens and the tail together, exactly (``_attend``). The queries are the tail's last ``q_len`` tokens
        (causal; unpadded rows, as kvbench runs them); a long chunk of them (perplexity's continuation) is taken in
        slices whose logits stay within ``LOGIT_BYTES``."""
        if not self.packed:
            return None
        batch, heads, q_len, _ = query.shape
        tail = self.tail_tokens()
        sizes = self.lengths.flatten().tolist()  # per (batch, KV head), read once for every slice
        rows = max(1, LOGIT_BYTES // (batch * heads * (max(sizes) + tail) * 4))
        parts = [self._attend(query[:, :, start:start + rows], scaling, sizes, tail - max(0, q_len - start - rows))
                 for start in range(0, q_len, rows)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _attend(self, query: torch.Tensor, scaling: float, sizes: list[int], tail: int) -> torch.Tensor:
        """``query``: the last ``q_len`` of the tail's first ``tail`` tokens; ``sizes``: the packed heads' lengths.
        Every head's logits go side by side into one transient ``[batch, kv_heads, group * q_len, longest + tail]``
        tensor (-inf beyond a head's own tokens) and are normalised at once: only the logits are padded, never keys
        or values."""
        batch, heads, q_len, head_dim = query.shape
        kv_heads = self.lengths.shape[1]
        rows = heads // kv_heads * q_len
        longest = max(sizes)
        tail_keys, tail_values = self.keys[..., :tail, :], self.values[..., :tail, :]
        grouped = query.reshape(batch, kv_heads, rows, head_dim) * scaling
        logits = grouped.new_full((batch, kv_heads, rows, longest + tail), float("-inf"))
        for row, (held, size) in enumerate(zip(self.packed_keys.split(sizes), sizes, strict=True)):
            b, h = divmod(row, kv_heads)
            torch.matmul(grouped[b, h], held.T, out=logits[b, h, :, :size])
        torch.matmul(grouped, tail_keys.transpose(-1, -2), out=logits[..., longest:])
        if q_len > 1:
            future = causal_mask(q_len, tail, query.device).logical_not()
            logits[..., longest:].view(batch, kv_heads, -1, q_len, tail).masked_fill_(future, float("-inf"))
        weights = logits.softmax(-1, dtype=torch.float32).to(self.packed_values.dtype)
        out = weights[..., longest:] @ tail_values
        for row, (held, size) in enumerate(zip(self.packed_values.split(sizes), sizes, strict=True)):
            b, h = divmod(row, kv_heads)
            out[b, h].addmm_(weights[b, h, :, :size], held)
        out = out.view(batch, kv_heads, -1, q_len, out.shape[-1]).reshape(batch, heads, q_len, -1)
        return out.transpose(1, 2).contiguous().to(query.dtype)
