"""flash-attn under kvbench's attention hook (``--attn-implementation flash_attention_2``, GPU, fp16/bf16).

kvbench calls flash-attn itself rather than transformers' flash wrapper, which picks its kernel by the model's
attention name (kvbench's is ``kvbench_flash_attention_2``, unknown to it). Two cases:

- Dense layers (every KV head holds the same tokens; a layer may hold another number than layer 0, as in
  PyramidKV): ``flash_attn_func`` with ``causal`` when several queries come at once. flash-attn aligns a causal
  mask to the bottom right when there are more keys than queries, which is exactly "the new tokens are the last
  ``q_len`` of the held keys", so no mask is needed whatever the layer holds. GQA is native (no repeated KV heads).
- Packed per-head layers (``kvbench.layers.PerHeadLayer``: AdaKV, HeadKV, KVCompose, ... where each KV head holds
  its own number of tokens): ``flash_attn_varlen_func`` with one sequence per (batch, KV head). The keys and values
  are the layer's packed storage (no padding, no dense view), with the tail of later tokens joined behind each
  head (``PerHeadLayer.packed_heads``: a copy once the tail holds tokens); each sequence's queries are the query
  heads of its KV-head group, so a sequence has ``group`` heads against one KV head.

Batches with padding are not supported (kvbench runs one unpadded prompt at a time); padded input is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kvbench.layers import CompressedLayer


def kernels() -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """``(flash_attn_func, flash_attn_varlen_func)`` from the flash-attn package (``pip install 'kvbench[gpu]'``)."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    return flash_attn_func, flash_attn_varlen_func


def attend(layer: CompressedLayer | None, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, scaling: float, sliding_window: int | None = None,
           softcap: float | None = None) -> torch.Tensor:
    """Attention output ``[batch, q_len, heads, head_dim]`` for ``query`` ``[batch, heads, q_len, head_dim]`` on
    what the layer's ``update`` returned (``key``/``value``, ``[batch, kv_heads, held, head_dim]``), with the
    model's sliding window and logit soft-cap when it has them."""
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise NotImplementedError("padded batches are not supported with flash_attention_2; use sdpa")
    options: dict[str, Any] = {}
    if sliding_window:
        options["window_size"] = (sliding_window - 1, sliding_window - 1)  # causal bounds the right reach
    if softcap:
        options["softcap"] = softcap
    dense, varlen = kernels()
    causal = query.shape[2] > 1
    if layer is not None and getattr(layer, "packed", False):
        return _per_head(layer, query, scaling, causal, varlen, options)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    return dense(q, k, v, softmax_scale=scaling, causal=causal, **options)


def _per_head(layer: Any, query: torch.Tensor, scaling: float, causal: bool, varlen: Callable[..., torch.Tensor],
              options: dict[str, Any]) -> torch.Tensor:
    """One varlen sequence per (batch, KV head): its ``group`` query heads against that head's packed keys."""
    batch, heads, q_len, head_dim = query.shape
    keys, values, lengths = layer.packed_heads()
    kv_heads = lengths.shape[1]
    group = heads // kv_heads
    lengths = lengths.flatten()  # (batch, head) order: the order of the packed keys and values
    sequences = lengths.numel()
    # [batch, kv_heads, group, q_len, dim] -> [batch, kv_heads, q_len, group, dim] -> [sequences * q_len, group, dim]
    q = query.reshape(batch, kv_heads, group, q_len, head_dim).transpose(2, 3).reshape(-1, group, head_dim)
    cu_q = torch.arange(0, (sequences + 1) * q_len, q_len, dtype=torch.int32, device=query.device)
    cu_k = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    out = varlen(q.contiguous(), keys[:, None], values[:, None], cu_q, cu_k, q_len, int(lengths.max()),
                 softmax_scale=scaling, causal=causal, **options)
    out = out.reshape(batch, kv_heads, q_len, group, -1).permute(0, 2, 1, 3, 4)
    return out.reshape(batch, q_len, heads, out.shape[-1])
