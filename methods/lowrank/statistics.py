"""K/V statistics of a model on calibration text: what every low-rank basis and error curve derives from.

Per layer, the uncentered second moment ``X^T X / n`` of the *pre-RoPE* keys and of the values, ``X`` being
``[tokens, kv_heads * head_dim]`` (heads concatenated head-major), once on fitting tokens and once on held-out
tokens. Every basis (one per group of heads: the sub-block of the moment) and every measured error-vs-rank curve
derives from them, so Palu and DynaKV share one statistics artifact per model and data. The principal basis of
the second moment is Palu's whitened SVD of ``W_k`` / ``W_v``: the latent of a token is ``x A`` with
``A = U_r^T W``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kvbench.artifacts import TensorSpec, load_or_build
from kvbench.calibration import CalibrationData, CalibrationDataError, calibration_data
from kvbench.rope import cos_sin, rotary_module, undo_rope

MOMENTS = ("key_fit", "value_fit", "key_heldout", "value_heldout")


@dataclass
class KVStatistics:
    """Per-layer second moments ``[layers, dim, dim]`` (float64) of pre-RoPE keys and values, fit and held out."""

    key_fit: torch.Tensor
    value_fit: torch.Tensor
    key_heldout: torch.Tensor
    value_heldout: torch.Tensor
    kv_heads: int
    head_dim: int

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in MOMENTS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], kv_heads: int, head_dim: int) -> KVStatistics:
        return cls(**{k: tensors[k].double() for k in MOMENTS},
                   kv_heads=kv_heads, head_dim=head_dim)


def collect_kv_statistics(model: torch.nn.Module, data: CalibrationData, heldout_every: int = 8,
                          progress: bool = True) -> KVStatistics:
    """Run the frozen model on the chunks; accumulate per layer the second moments of pre-RoPE K and of V.

    Every ``heldout_every``-th chunk (at least one) is held out: it measures the error curves, never fits.
    Keys are taken from the cache (what a compressed cache sees) and un-rotated with the model's own tables.
    """
    from transformers import DynamicCache

    from kvbench.prefill import cache_arguments

    rotary = rotary_module(model)
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    counts = {"fit": 0, "heldout": 0}
    kv_heads = head_dim = 0
    chunks = data.chunks
    if len(chunks) < 2:
        raise CalibrationDataError("calibration needs at least two chunks of text (one is held out)")
    heldout = {i for i in range(len(chunks)) if i % heldout_every == heldout_every - 1} or {len(chunks) - 1}
    with torch.inference_mode():
        for index, chunk in enumerate(tqdm(chunks, desc="kvbench: calibration (K/V statistics)", unit="chunk",
                                           disable=not progress, dynamic_ncols=True)):
            part = "heldout" if index in heldout else "fit"
            cache = DynamicCache(config=model.config)
            model(chunk.to(device), **cache_arguments(model, cache), use_cache=True, logits_to_keep=1)
            n = chunk.shape[1]
            cos, sin = cos_sin(rotary, torch.arange(n, device=device), cache.layers[0].keys.dtype)
            for layer_idx, layer in enumerate(cache.layers):
                keys = undo_rope(layer.keys.float(), cos.float(), sin.float())
                _, kv_heads, _, head_dim = keys.shape
                for kind, states in (("key", keys), ("value", layer.values.float())):
                    flat = states[0].transpose(0, 1).reshape(n, -1).double()
                    name = f"{kind}_{part}"
                    moment = flat.T @ flat
                    if name not in sums:
                        sums[name] = torch.zeros(len(cache.layers), *moment.shape, dtype=torch.float64,
                                                 device=device)
                    sums[name][layer_idx] += moment
            counts[part] += n
    tensors = {name: (total / counts[name.split("_")[1]]).cpu() for name, total in sums.items()}
    return KVStatistics.from_tensors(tensors, kv_heads, head_dim)


def principal_basis(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal eigenvectors ``[dim, dim]`` (columns, by decreasing eigenvalue) and the eigenvalues.

    Signs are fixed (largest-magnitude entry of each column positive) so the basis is reproducible.
    """
    values, vectors = torch.linalg.eigh(moment.double())
    values, vectors = values.flip(0), vectors.flip(1)
    signs = torch.sign(vectors.gather(0, vectors.abs().argmax(0, keepdim=True)))
    return vectors * signs, values.clamp_min(0)


def group_slices(kv_heads: int, head_dim: int, group_size: int) -> list[slice]:
    """Column ranges of each group of KV heads in the head-major concatenation."""
    size = min(group_size, kv_heads)
    if kv_heads % size:
        raise ValueError(f"group_size {group_size} does not divide the model's {kv_heads} KV heads")
    return [slice(g * size * head_dim, (g + 1) * size * head_dim) for g in range(kv_heads // size)]


def heldout_error_curve(basis: torch.Tensor, heldout: torch.Tensor) -> torch.Tensor:
    """Relative squared reconstruction error of held-out states at every rank 0..dim (``[dim + 1]``)."""
    captured = torch.einsum("dr,de,er->r", basis, heldout, basis).cumsum(0)
    total = heldout.trace().clamp_min(1e-30)
    return torch.cat([torch.ones(1, dtype=captured.dtype), (1 - captured / total).clamp_min(0)])


def kv_statistics(model: torch.nn.Module, tokenizer: Any, n_tokens: int, seed: int = 0,
                  source: str | Path | None = None, chunk_tokens: int = 512, force: bool = False,
                  progress: bool = True) -> tuple[KVStatistics, dict[str, Any], Path]:
    """The shared K/V statistics artifact of this model and data: loaded, or collected and saved on first use."""
    data = calibration_data(tokenizer, n_tokens, seed, source, chunk_tokens)
    settings = {"n_tokens": n_tokens, "seed": seed, "chunk_tokens": chunk_tokens, "source": data.source,
                "data_fingerprint": data.fingerprint}

    def build() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        stats = collect_kv_statistics(model, data, progress=progress)
        return {"kv_heads": stats.kv_heads, "head_dim": stats.head_dim, "source": data.source}, stats.tensors()

    config = model.config.get_text_config()
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = kv_heads * head_dim

    def specs(meta: dict[str, Any]) -> dict[str, TensorSpec]:
        if (meta["kv_heads"], meta["head_dim"]) != (kv_heads, head_dim):
            raise ValueError("the artifact's head layout is not the model's")
        return {name: TensorSpec((config.num_hidden_layers, dim, dim)) for name in MOMENTS}

    artifact, path = load_or_build(model, "kv", settings, data.fingerprint, build, specs, force)
    meta = artifact["meta"]
    return KVStatistics.from_tensors(artifact["tensors"], meta["kv_heads"], meta["head_dim"]), meta, path
