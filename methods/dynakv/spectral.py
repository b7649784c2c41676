"""DynaKV as its paper defines it (Lu et al. 2026, arXiv 2603.04411 v1, §3): a learnable spectral basis, a linear
cut-off gate per token, a soft mask for training and a hard mask for inference.

Per layer, and separately for keys and values, a token's state ``x`` (pre-RoPE key or value, all KV heads
concatenated head-major, ``x ∈ R^d`` with ``d = kv_heads * head_dim``) is projected on a learnable basis
``U ∈ R^{d×d}``: ``x̃ = x U`` (Eq. 1). A linear gate gives a distribution over cut-off indices,
``p = Softmax(x̃ W + b)`` (Eq. 5), and the soft mask is ``m_i = Σ_{j≥i} p_j`` (Eq. 6, the paper's
``Flip(cumsum(p))`` read as its prose describes it: ≈ 1 before the cut-off, ≈ 0 after). Training reconstructs
``(x̃ ⊙ m) U⁻¹`` (Eq. 7 then Eq. 3); inference keeps the prefix where ``m > τ`` (Eq. 8), i.e. rank
``r = #{i : m_i > τ}`` (at least 1, since ``m_0 = 1``), and reconstructs ``x̃[:r] U⁻¹[:r, :]``.

``U`` starts from the eigenvectors of the states' covariance on calibration text, by descending eigenvalue
(footnote 2: *covariance*, i.e. centred), and is applied to the raw, uncentred states, as Eq. 1 and Eq. 3 write
it (no mean is subtracted or added back). The paper does not say how ``U⁻¹`` is kept: here it is recomputed
exactly (``torch.linalg.inv``) at every training step and once, in float64, for inference; training records
the worst condition number of ``U`` in the loss curve. The paper gives no initialisation for the gate:
``W`` starts at zero and ``b`` puts 0.99 of ``p`` on the last cut-off, so training starts from the uncompressed
model (every ``m_i >= 0.99``) and the ``α R²`` term pulls the rate down. (A uniform ``p``, ``m_i = (d - i) / d``,
was measured to start SmolLM2-135M at a cross-entropy of 9.1 instead of about 3, which 32 steps did not undo.)

The objective (Eq. 9) is next-token cross-entropy plus ``α R²``, ``R`` the mean soft mask over dimensions,
tokens, layers, K and V, and batch. The base model's weights are frozen (the paper does not say; it calls the
method post-training): only ``U``, ``W`` and ``b`` learn. Training and the held-out measurements are in
``training.py`` (which loads transformers); this module holds the definitions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

KINDS = ("key", "value")  # index 0 and 1 of the stacked parameters


def soft_mask(logits: torch.Tensor) -> torch.Tensor:
    """Eqs. 5-6: ``p = softmax(logits)``, ``m_i = Σ_{j≥i} p_j`` (non-increasing, ``m_0 = 1``)."""
    return logits.softmax(-1).flip(-1).cumsum(-1).flip(-1)


def hard_ranks(mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 8: the kept prefix length ``#{i : m_i > τ}`` of each token, at least 1 (``m_0 = 1`` up to rounding)."""
    return (mask > tau).sum(-1).clamp_min(1)


def rank_dtype(dim: int) -> torch.dtype:
    """How a token's rank (1..d) is stored: one byte while it fits."""
    return torch.uint8 if dim <= 255 else torch.int16


def merge_heads(states: torch.Tensor) -> torch.Tensor:
    """``[batch, kv_heads, tokens, head_dim]`` -> ``[batch, tokens, kv_heads * head_dim]`` (head-major)."""
    return states.transpose(1, 2).flatten(2)


def split_heads(flat: torch.Tensor, kv_heads: int) -> torch.Tensor:
    return flat.unflatten(-1, (kv_heads, -1)).transpose(1, 2)


class SpectralGates(nn.Module):
    """Every layer's ``U``, ``W`` (``[layers, 2, d, d]``) and ``b`` (``[layers, 2, d]``); index 1: 0 keys, 1 values."""

    def __init__(self, layers: int, dim: int) -> None:
        super().__init__()
        self.basis = nn.Parameter(torch.eye(dim).repeat(layers, 2, 1, 1))
        self.weight = nn.Parameter(torch.zeros(layers, 2, dim, dim))
        bias = torch.zeros(layers, 2, dim)
        bias[..., -1] = math.log(99 * max(dim - 1, 1))  # p puts 0.99 on the last cut-off: every m_i >= 0.99
        self.bias = nn.Parameter(bias)
        self._inverse: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return self.basis.shape[-1]

    def mask(self, coefficients: torch.Tensor, layer: int, kind: int) -> torch.Tensor:
        """The soft mask ``[..., d]`` of coefficients ``x̃`` ``[..., d]``."""
        return soft_mask(coefficients @ self.weight[layer, kind] + self.bias[layer, kind])

    def layer_masks(self, coefficients: torch.Tensor, layer: int) -> torch.Tensor:
        """Both kinds at once: the soft masks ``[2, ..., d]`` of coefficients ``[2, ..., d]`` (K, then V)."""
        extra = coefficients.dim() - 2
        weight = self.weight[layer].reshape(2, *([1] * (extra - 1)), self.dim, self.dim)
        return soft_mask(coefficients @ weight + self.bias[layer].reshape(2, *([1] * extra), self.dim))

    def freeze(self) -> SpectralGates:
        """For inference: no gradients, and ``U⁻¹`` computed once (float64). One matrix at a time: after
        ``torch.set_num_threads(2)``, the batched LU of torch 2.13's CPU build (oneMKL) fails ("DLASWP") and never
        returns."""
        self.requires_grad_(False)
        matrices = self.basis.detach().double().flatten(0, 1)
        inverse = torch.stack([torch.linalg.inv(matrix) for matrix in matrices]).view_as(self.basis)
        self._inverse = inverse.to(self.basis.dtype)
        return self.eval()

    def inverse(self, layer: int, kind: int) -> torch.Tensor:
        if self._inverse is None:
            raise RuntimeError("call freeze() before using the gates for inference")
        return self._inverse[layer, kind]

    def worst_condition(self) -> float:
        return float(torch.linalg.cond(self.basis.detach().double()).max())


@dataclass(frozen=True)
class Training:
    """Settings of ``train`` (part of the artifact's key). The paper gives none but the data size (128M tokens);
    these defaults fit a laptop CPU: 32 steps of one 512-token chunk (16K tokens), a few seconds a step for
    SmolLM2-135M. Adam; the gate's step is large because training is short (at 0.02 SmolLM2's soft rate falls
    from 0.995 to 0.65 in 3 steps at α = 1), the basis's small so that ``U`` stays well conditioned."""

    steps: int = 32
    lr: float = 0.02  # gate W and b (Adam)
    basis_lr: float = 1e-4  # U (Adam): slower, so that U stays well conditioned
    seed: int = 0

    def key(self) -> dict[str, float | int]:
        return asdict(self)
