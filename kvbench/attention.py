"""kvbench's attention function: the model's own attention, then the cache's compression hook.

Registered through transformers' ``AttentionInterface`` under ``kvbench_<base>`` (``kvbench_fa2`` for
flash_attention_2); it sees
each layer's post-RoPE queries, which is what query-aware scores (SnapKV) need without a
second projection pass.

It also gives each compressed layer the mask that fits it: transformers builds one mask per
forward from layer 0's lengths, which is wrong for a layer holding another number of tokens
(PyramidKV) or a different number per KV head (AdaKV); see ``kvbench.layers``. After prefill, a
method with decoding-phase compression gets each layer's new queries (``decode_step``).

With ``flash_attention_2`` as base, layers attend through ``kvbench.flash`` (flash-attn's dense kernel, or its
variable-length kernel for layers whose KV heads hold different numbers of tokens), which needs no mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SUPPORTED_BASES = ("sdpa", "flash_attention_2")
_ALIASES = {"flash_attention_2": "fa2"}


def register(base: str) -> str:
    """Register kvbench's attention on ``base`` (idempotent) and return the name it is registered under."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from kvbench import flash
    from kvbench.cache import ACTIVE_CACHE
    from kvbench.layers import LAST_UPDATE

    if base not in SUPPORTED_BASES:
        raise ValueError(f"attention implementation {base!r} is not supported; valid: {', '.join(SUPPORTED_BASES)}")
    # transformers treats any implementation named "...flash..." as one of its own flash kernels (and loads one), so
    # the flash variant is registered under another name.
    name = f"kvbench_{_ALIASES.get(base, base)}"

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, *args, **kwargs):
        updated = LAST_UPDATE.get()
        layer = updated[0] if updated is not None and updated[1] is key else None
        LAST_UPDATE.set(None)  # a stale reference would keep the previous cell's whole cache alive
        scaling = kwargs.get("scaling") or module.scaling
        flash_varlen = base == "flash_attention_2" and getattr(layer, "packed", False)  # packed per-head layers
        custom = layer.attend(query, scaling, attention_mask) if layer is not None and not flash_varlen else None
        if custom is not None:
            output = (custom, None)
        elif base == "flash_attention_2":  # flash-attn called directly, packed per-head layers through varlen
            output = (flash.attend(layer, query, key, value, attention_mask, scaling, kwargs.get("sliding_window"),
                                   kwargs.get("softcap")), None)
        else:
            if layer is not None:
                attention_mask = layer.attention_mask(query, key, attention_mask)
            # Looked up per call, so that a wrapper installed later (kvpress's masking patch) applies.
            output = ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, *args, **kwargs)
        cache = ACTIVE_CACHE.get()
        owner = layer.owner() if layer is not None and layer.owner is not None else None
        if cache is not None:
            cache.after_attention(module.layer_idx, query, scaling)
        elif owner is not None and layer.full_nbytes is not None:
            decode_step = getattr(owner.method, "decode_step", None)
            if decode_step is not None and getattr(owner.method, "decoding", False):
                decode_step(layer, query, module.layer_idx, scaling, owner.budget, owner.seed)
        return output

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name
