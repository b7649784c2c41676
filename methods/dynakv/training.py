"""DynaKV training (the paper's Eq. 9) and the measurements around it: the covariance basis that initialises ``U``,
and the hard ranks the gates give on held-out text. See ``spectral.py`` for the definitions.

Training runs the frozen model on calibration chunks through a transformers cache whose layers replace each
layer's keys and values by their gated reconstruction (``_GatedLayer``): pre-RoPE states (RoPE undone with
the model's own tables), ``x̃ = x U``, ``x̂ = x̃ ⊙ m``, ``x̂ U⁻¹``, heads split, RoPE applied to keys. Any model
kvbench compresses trains this way, whatever its attention code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from kvbench.methods.dynakv.spectral import SpectralGates, Training, hard_ranks, merge_heads, split_heads
from kvbench.prefill import cache_arguments
from kvbench.rope import apply_rope, cos_sin, rotary_module, undo_rope


def pre_rope_states(model: torch.nn.Module, chunk: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the uncompressed model's pre-RoPE keys and values of ``chunk`` ``[1, n]``, each ``[n, d]`` (float32).

    What a compressed cache sees at prefill: kvbench compresses a layer after its attention ran on exact states.
    """
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(chunk.to(device), **cache_arguments(model, cache), use_cache=True, logits_to_keep=1)
    n = chunk.shape[1]
    cos, sin = cos_sin(rotary_module(model), torch.arange(n, device=device), torch.float32)
    return [(merge_heads(undo_rope(layer.keys.float(), cos, sin))[0], merge_heads(layer.values.float())[0])
            for layer in cache.layers]


def pca_basis(model: torch.nn.Module, chunks: Sequence[torch.Tensor], progress: bool = True, centred: bool = True,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors (columns, descending eigenvalue) of each layer's K and V covariance, ``[layers, 2, d, d]``, and
    the eigenvalues ``[layers, 2, d]``. Signs are fixed (largest entry of each column positive): reproducible.
    ``centred=False`` takes the uncentred second moments instead, whose leading vectors include the states' mean."""
    sums = moments = None
    count = 0
    for chunk in tqdm(chunks, desc="kvbench: DynaKV basis (covariance)", unit="chunk", disable=not progress,
                      dynamic_ncols=True):
        states = pre_rope_states(model, chunk)
        stacked = torch.stack([torch.stack(pair) for pair in states]).double()  # [layers, 2, n, d]
        chunk_sums, chunk_moments = stacked.sum(2), stacked.transpose(-1, -2) @ stacked
        sums = chunk_sums if sums is None else sums + chunk_sums
        moments = chunk_moments if moments is None else moments + chunk_moments
        count += stacked.shape[2]
    mean = sums / count
    covariance = moments / count - (mean[..., :, None] * mean[..., None, :] if centred else 0)
    values, vectors = torch.linalg.eigh(covariance)
    values, vectors = values.flip(-1), vectors.flip(-1)
    signs = torch.sign(vectors.gather(-2, vectors.abs().argmax(-2, keepdim=True)))
    return (vectors * signs).float().cpu(), values.clamp_min(0).float().cpu()


class _GatedLayer(DynamicLayer):
    """A cache layer for training: what attention receives is the chunk's states, gated and reconstructed."""

    def __init__(self, transform: Callable, index: int) -> None:
        super().__init__()
        self.transform, self.index = transform, index

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = self.transform(self.index, key_states, value_states)
        return super().update(keys, values, *args, **kwargs)


def _gated_cache(model: torch.nn.Module, gates: SpectralGates, n: int, rates: list[torch.Tensor]):
    """A transformers cache whose layers apply Eq. 7 (soft mask) and Eq. 3 (``U⁻¹``) to a chunk at positions 0..n-1."""
    device = next(model.parameters()).device
    cos, sin = cos_sin(rotary_module(model), torch.arange(n, device=device), torch.float32)

    def transform(layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv_heads, dtype = keys.shape[1], keys.dtype
        out = []
        for kind, states in enumerate((merge_heads(undo_rope(keys.float(), cos, sin)), merge_heads(values.float()))):
            basis = gates.basis[layer, kind]
            coefficients = states @ basis
            mask = gates.mask(coefficients, layer, kind)
            rates.append(mask.mean())
            out.append(split_heads((coefficients * mask) @ torch.linalg.inv(basis), kv_heads))
        return apply_rope(out[0], cos, sin).to(dtype), out[1].to(dtype)

    layers = model.config.get_text_config().num_hidden_layers
    return Cache(layers=[_GatedLayer(transform, i) for i in range(layers)])


def training_loss(model: torch.nn.Module, gates: SpectralGates, chunk: torch.Tensor, alpha: float,
                  ) -> tuple[torch.Tensor, float, float]:
    """Eq. 9 on one chunk ``[1, n]``: next-token CE + ``α R²``; returns the loss, the CE and R (the soft rate)."""
    rates: list[torch.Tensor] = []
    chunk = chunk.to(next(model.parameters()).device)
    cache = _gated_cache(model, gates, chunk.shape[1], rates)
    logits = model(chunk, **cache_arguments(model, cache), use_cache=True).logits.float()
    ce = F.cross_entropy(logits[0, :-1], chunk[0, 1:])
    rate = torch.stack(rates).mean()
    return ce + alpha * rate.square(), float(ce.detach()), float(rate.detach())


def train(model: torch.nn.Module, gates: SpectralGates, chunks: Sequence[torch.Tensor], alpha: float,
          settings: Training, progress: bool = True) -> list[dict[str, float]]:
    """Train ``U``, ``W``, ``b`` with the base model frozen; returns the loss curve (one point per step)."""
    if not chunks:
        raise ValueError("DynaKV training needs calibration chunks")
    optimizer = torch.optim.Adam([{"params": [gates.weight, gates.bias], "lr": settings.lr},
                                  {"params": [gates.basis], "lr": settings.basis_lr}])
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(settings.seed)).tolist()
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    gates.requires_grad_(True)
    curve: list[dict[str, float]] = []
    start = time.perf_counter()
    try:
        bar = tqdm(range(settings.steps), desc=f"kvbench: DynaKV training (alpha {alpha:g})", unit="step",
                   disable=not progress, dynamic_ncols=True)
        for step in bar:
            chunk = chunks[order[step % len(order)]]
            with torch.inference_mode(False), torch.enable_grad():
                loss, ce, rate = training_loss(model, gates, chunk.clone(), alpha)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            point = {"step": step, "loss": float(loss.detach()), "ce": ce, "soft_rate": rate,
                     "seconds": round(time.perf_counter() - start, 2)}
            if step % 16 == 15 or step == settings.steps - 1:
                point["condition"] = gates.worst_condition()
                if not math.isfinite(point["condition"]):
                    raise FloatingPointError("DynaKV training made a basis U singular; lower basis_lr")
            curve.append(point)
            bar.set_postfix_str(f"CE {ce:.3f} R {rate:.3f}")
    finally:
        for p, flag in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(flag)
    return curve


def heldout_ranks(model: torch.nn.Module, gates: SpectralGates, chunks: Sequence[torch.Tensor],
                  tau: float) -> torch.Tensor:
    """Mean hard rank per layer for K and V (``[layers, 2]``, in dimensions) on held-out chunks, as at prefill."""
    totals, count = None, 0
    with torch.no_grad():
        for chunk in chunks:
            ranks = []
            for layer, pair in enumerate(pre_rope_states(model, chunk)):
                for kind, states in enumerate(pair):
                    mask = gates.mask(states @ gates.basis[layer, kind].float(), layer, kind)
                    ranks.append(hard_ranks(mask, tau).double().sum())
            chunk_totals = torch.stack(ranks).reshape(-1, 2).cpu()
            totals = chunk_totals if totals is None else totals + chunk_totals
            count += chunk.shape[1]
    return (totals / count).float()
