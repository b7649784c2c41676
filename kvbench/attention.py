"""kvbench's attention function: the model's own attention, then the cache's compression hook.

Registered through transformers' ``AttentionInterface`` under ``kvbench_<base>``; it sees
each layer's post-RoPE queries, which is what query-aware scores (SnapKV) need without a
second projection pass.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvbench.cache import ACTIVE_CACHE

SUPPORTED_BASES = ("sdpa",)


def register(base: str) -> str:
    """Register ``kvbench_<base>`` (idempotent) and return its name."""
    if base not in SUPPORTED_BASES:
        raise ValueError(f"attention implementation {base!r} is not supported; valid: {', '.join(SUPPORTED_BASES)}")
    name = f"kvbench_{base}"
    base_attention = ALL_ATTENTION_FUNCTIONS[base]

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs):
        output = base_attention(module, query, key, value, attention_mask, **kwargs)
        cache = ACTIVE_CACHE.get()
        if cache is not None:
            cache.after_attention(module.layer_idx, query, kwargs.get("scaling") or module.scaling)
        return output

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name
