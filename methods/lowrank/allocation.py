"""Rank allocation for low-rank caches: how many latent dimensions each layer's K and V get within a budget."""

from __future__ import annotations

import heapq
import math

import torch

POSITION_DTYPE = torch.int32  # absolute positions of held tokens, needed to re-apply RoPE; counted in nbytes

def allocate_ranks(curves: list[torch.Tensor], costs: list[int], capacity: int, multiple: int) -> list[int]:
    """Greedy rank allocation: repeatedly add ``multiple`` to the rank whose error falls most per stored number.

    ``curves[i]`` is matrix i's measured error at every rank (``[dim + 1]``), ``costs[i]`` the numbers stored per
    token per unit of rank (its number of groups), ``capacity`` the numbers per token the budget allows. Every
    matrix starts at rank ``multiple`` (zero keys or values break attention). Raises when even that exceeds it.
    """
    ranks = [min(multiple, len(c) - 1) for c in curves]
    used = sum(r * c for r, c in zip(ranks, costs, strict=True))
    if used > capacity:
        raise ValueError("the budget is too small for the smallest rank of every layer")
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        step = min(multiple, len(curves[i]) - 1 - ranks[i])
        if step > 0:
            gain = float(curves[i][ranks[i]] - curves[i][ranks[i] + step]) / (step * costs[i])
            heapq.heappush(heap, (-gain, ranks[i], i))

    for i in range(len(curves)):
        push(i)
    while heap:
        *_, i = heapq.heappop(heap)
        step = min(multiple, len(curves[i]) - 1 - ranks[i])
        if used + step * costs[i] > capacity:
            continue  # another matrix may still fit a smaller step
        ranks[i] += step
        used += step * costs[i]
        push(i)
    return ranks


def latent_capacity(budget: float, layers: int, dim: int, element_size: int) -> int:
    """Numbers per token (summed over layers, K and V) that fit ``budget`` of the full ``2 * dim`` per layer,
    after the positions every layer stores."""
    position_numbers = POSITION_DTYPE.itemsize / element_size
    return math.floor(budget * layers * 2 * dim - layers * position_numbers + 1e-9)


def uniform_ranks(matrices: int, groups: int, group_dim: int, capacity: int, multiple: int) -> list[int]:
    """The same rank (a multiple of ``multiple``) for every matrix; what is left goes, one ``multiple`` each, to the
    first matrices, so the budget is used up to less than one step."""
    step = multiple * groups
    base = min(group_dim, capacity // (matrices * step) * multiple)
    if base < 1:
        raise ValueError("the budget is too small for the smallest rank of every layer")
    ranks = [base] * matrices
    left = capacity - base * groups * matrices
    for i in range(matrices):
        if left < step or ranks[i] + multiple > group_dim:
            break
        ranks[i] += multiple
        left -= step
    return ranks
