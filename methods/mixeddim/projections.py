"""Per-head projections and what each candidate dimension loses (MixedDimKV stage 1's ingredients).

A head's basis is the eigenvectors of its uncentred second moment ``XᵀX/N`` (keys post-RoPE, values as they are),
by decreasing eigenvalue. Truncations are nested: the basis of ``r`` dimensions is the first ``r`` columns of the
basis of any larger ``r``, so one matrix (the largest rank used) serves every smaller rank. Because the basis is
orthonormal, a token's error at every rank follows from one projection: the energy left outside the first ``r``
coefficients.
"""

from __future__ import annotations

import torch


def head_bases(states: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, dim, dim]`` eigenvectors (columns, largest eigenvalue first) of each head's ``XᵀX/N``, signs
    fixed (largest-magnitude entry of each column positive) so a basis is reproducible."""
    flat = states.double()
    moment = flat.transpose(-1, -2) @ flat / max(1, states.shape[-2])
    return moment_bases(moment).to(states.dtype)


def moment_bases(moment: torch.Tensor) -> torch.Tensor:
    """Eigenvector bases of second-moment matrices ``[..., dim, dim]`` (float64 in, float64 out)."""
    _, vectors = torch.linalg.eigh(moment.double())
    vectors = vectors.flip(-1)
    signs = torch.sign(vectors.gather(-2, vectors.abs().argmax(-2, keepdim=True)))
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def residual_energy(states: torch.Tensor, bases: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """``[batch, heads, tokens, len(dims)]``: each token's squared error ``‖x - P_r P_rᵀ x‖²`` at every rank r."""
    coefficients = (states.float() @ bases.float()).pow(2)  # [batch, heads, tokens, dim]
    total = states.float().pow(2).sum(dim=-1, keepdim=True)
    captured = torch.cat([torch.zeros_like(total), coefficients.cumsum(dim=-1)], dim=-1)  # rank 0 .. dim
    return (total - captured[..., dims]).clamp_min(0)


def token_errors(states: torch.Tensor, bases: torch.Tensor, dims: list[int], loss: str) -> torch.Tensor:
    """Per-token error at each rank in ``dims``: ``relative`` (``‖x - x̂‖² / ‖x‖²``, 1 when the token is dropped) or
    ``absolute`` (``‖x - x̂‖²`` over the head's mean ``‖x‖²``, so large vectors cost more to lose)."""
    residual = residual_energy(states, bases, dims)
    norms = states.float().pow(2).sum(dim=-1, keepdim=True)
    scale = norms if loss == "relative" else norms.mean(dim=-2, keepdim=True)
    return residual / scale.clamp_min(1e-30)
