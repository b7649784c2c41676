"""MixedDimKV's storage: per (batch row, KV head), the tokens of equal dimensions packed into contiguous tensors.

A head holds, for each (key rank, value rank) it uses, one key latent ``[tokens, key_rank]`` and one value latent
``[tokens, value_rank]`` (full rank: the post-RoPE keys and the values themselves), plus its projections (the
columns of the largest rank it uses; smaller ranks are slices). Tokens arriving after compression (the question of a
query-agnostic cell, generated tokens) are kept whole in the dense GQA ``keys``/``values`` tail, in order.

Attention runs per group and merges the groups exactly: each group's logits are ``(q P_k) · latentᵀ`` (the query is
projected once per group, keys are never rebuilt), its partial output ``softmax-weights · latent_v`` is lifted by
``P_vᵀ``, and the partials are combined with their log-sum-exp, which equals dense attention over the reconstructed
keys and values. Positions need no storing: keys carry their RoPE, and only the tail needs a causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvbench.layers import CompressedLayer


@dataclass
class HeadStore:
    """One (batch row, KV head): groups ``(key latent [m, rk], value latent [m, rv])`` and its projections."""

    groups: list[tuple[torch.Tensor, torch.Tensor]]
    key_basis: torch.Tensor | None  # [head_dim, largest reduced key rank], or None
    value_basis: torch.Tensor | None
    counted: list[torch.Tensor] = field(default_factory=list)  # what nbytes counts (bases shared by a method: not)

    def tokens(self) -> int:
        return sum(k.shape[0] for k, _ in self.groups)

    def reconstruct(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([tokens, head_dim] keys, values)`` rebuilt from the latents (group by group)."""
        keys = [k if self.key_basis is None or k.shape[-1] == self.key_basis.shape[0] else
                k @ self.key_basis[:, :k.shape[-1]].T for k, _ in self.groups]
        values = [v if self.value_basis is None or v.shape[-1] == self.value_basis.shape[0] else
                  v @ self.value_basis[:, :v.shape[-1]].T for _, v in self.groups]
        return torch.cat(keys), torch.cat(values)


class MixedDimLayer(CompressedLayer):
    """Dense while the prompt's attention runs; after ``store``, per-head groups of equal dimension plus a tail."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.heads: list[HeadStore] | None = None  # (batch, kv_head) order

    @property
    def grouped(self) -> bool:
        return self.heads is not None

    def store(self, heads: list[HeadStore]) -> None:
        """Replace the held prompt tokens by ``heads`` (one per (batch, KV head)); later tokens go to the tail."""
        self.heads = heads
        self.keys = self.keys[:, :, :0].contiguous()
        self.values = self.values[:, :, :0].contiguous()
        self.scores = None

    def held_tokens(self) -> int:
        if not self.grouped:
            return super().held_tokens()
        return max(h.tokens() for h in self.heads) + self.keys.shape[-2]

    def tokens_per_head(self) -> float:
        if not self.grouped:
            return super().tokens_per_head()
        return sum(h.tokens() for h in self.heads) / len(self.heads) + self.keys.shape[-2]

    def tensors(self) -> list[torch.Tensor]:
        if not self.grouped:
            return super().tensors()
        return super().tensors() + [t for h in self.heads for t in (*(x for g in h.groups for x in g), *h.counted)]

    def crop(self, tokens_to_remove: int) -> None:
        if self.grouped:
            raise NotImplementedError("a mixed-dimension cache cannot be cropped")
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        self.heads = None

    def attend(self, query: torch.Tensor, scaling: float, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Grouped attention ``[batch, q_len, heads, head_dim]``; the tail is causal (unpadded rows, as kvbench
        runs them)."""
        if not self.grouped:
            return None
        batch, heads, q_len, head_dim = query.shape
        kv_heads = self.keys.shape[1]
        group = heads // kv_heads
        tail = self.keys.shape[-2]
        future = torch.ones(q_len, tail, dtype=torch.bool, device=query.device).tril(tail - q_len).logical_not()
        out = query.new_empty(batch, q_len, heads, head_dim)
        for row, store in enumerate(self.heads):
            b, h = divmod(row, kv_heads)
            q = query[b, h * group:(h + 1) * group].float()  # [group, q_len, head_dim]
            parts = []
            if tail:
                logits = (q @ self.keys[b, h].float().T * scaling).masked_fill(future, float("-inf"))
                parts.append([logits, self.values[b, h].float(), None])
            for keys, values in store.groups:
                rank, value_rank = keys.shape[-1], values.shape[-1]
                projected = q if rank == head_dim else q @ store.key_basis[:, :rank].float()
                lift = None if value_rank == head_dim else store.value_basis[:, :value_rank].float()
                parts.append([projected @ keys.float().T * scaling, values.float(), lift])
            out[b, :, h * group:(h + 1) * group] = merge(parts).transpose(0, 1).to(query.dtype)
        return out


def merge(parts: list[list]) -> torch.Tensor:
    """Softmax attention over the union of the parts' keys, from each part's logits ``[g, q, m]``, values ``[m, r]``
    and lift ``[head_dim, r]`` (None: values are full width): the partial sums are rescaled by their maxima."""
    peak = torch.stack([logits.amax(dim=-1) for logits, _, _ in parts]).amax(dim=0)  # [g, q]
    numerator, denominator = 0.0, 0.0
    for logits, values, lift in parts:
        weights = (logits - peak[..., None]).exp()
        partial = weights @ values
        numerator = numerator + (partial if lift is None else partial @ lift.T)
        denominator = denominator + weights.sum(dim=-1, keepdim=True)
    return numerator / denominator
