"""Per-head second moments of post-RoPE keys and of values on calibration text (``projections=calibration``).

The same uncentred ``XᵀX/N`` as the prompt's own projections, accumulated per (layer, KV head) over the calibration
chunks (SQuAD's calibration articles, or ``data``), cached as an artifact with the model's and the data's
fingerprints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kvbench.artifacts import TensorSpec, load_or_build
from kvbench.calibration import calibration_data


def head_moments(model: torch.nn.Module, tokenizer: Any, n_tokens: int, seed: int, source: str | None,
                 force: bool = False) -> tuple[dict[str, torch.Tensor], Path]:
    """``{"key": [layers, kv_heads, d, d], "value": ...}`` float64 second moments, loaded or measured and saved."""
    from transformers import DynamicCache

    from kvbench.prefill import cache_arguments

    data = calibration_data(tokenizer, n_tokens, seed, source, chunk_tokens=min(512, max(16, n_tokens // 4)))
    config = model.config.get_text_config()
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    device = next(model.parameters()).device

    def build() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        sums = {kind: torch.zeros(config.num_hidden_layers, kv_heads, head_dim, head_dim, dtype=torch.float64,
                                  device=device) for kind in ("key", "value")}
        count = 0
        with torch.inference_mode():
            for chunk in tqdm(data.chunks, desc="kvbench: mixeddimkv calibration", unit="chunk", dynamic_ncols=True):
                cache = DynamicCache(config=model.config)
                model(chunk.to(device), **cache_arguments(model, cache), logits_to_keep=1)
                for index, layer in enumerate(cache.layers):
                    for kind, states in (("key", layer.keys), ("value", layer.values)):
                        flat = states[0].double()  # [kv_heads, tokens, head_dim]
                        sums[kind][index] += flat.transpose(-1, -2) @ flat
                count += chunk.shape[1]
        return {"source": data.source}, {kind: (total / count).cpu() for kind, total in sums.items()}

    def specs(meta: dict[str, Any]) -> dict[str, TensorSpec]:
        shape = (config.num_hidden_layers, kv_heads, head_dim, head_dim)
        return {"key": TensorSpec(shape), "value": TensorSpec(shape)}

    settings = {"n_tokens": n_tokens, "seed": seed, "source": data.source, "keys": "post-rope, per head"}
    artifact, path = load_or_build(model, "mixeddim", settings, data.fingerprint, build, specs, force)
    return {kind: artifact["tensors"][kind].double() for kind in ("key", "value")}, path
