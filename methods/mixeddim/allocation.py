"""MixedDimKV stage 2: choose one option (a dimension, or eviction) per token to minimise the total loss within a
head's budget.

The problem is a multiple-choice knapsack: token t takes option o at loss ``L[t, o]`` and cost ``c[o]`` (numbers
stored per token). kvbench solves its Lagrangian relaxation: for a multiplier λ every token takes
``argmin_o L[t, o] + λ c[o]``; the total cost falls as λ grows, and λ is bisected to the smallest value whose choice
fits the budget (the paper does not name its optimiser); what that leaves unspent is filled greedily. A head that
stores tokens below full dimension must also store its projection (``d x r_max`` numbers for K and for V, ``r_max``
the largest reduced rank it uses), so each head tries every possible largest rank (and none: pure eviction), charges
that fixed cost, and keeps the plan with the least loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BISECTIONS = 48


@dataclass(frozen=True)
class Plan:
    """A head's choice: option per token (``[tokens]``), the projection ranks it needs, and its total loss."""

    choice: torch.Tensor
    key_rank: int  # columns of the key projection stored (0: none)
    value_rank: int
    loss: float


def lagrange(loss: torch.Tensor, cost: torch.Tensor, capacity: float) -> torch.Tensor | None:
    """``[tokens]`` option per token minimising ``Σ loss`` with ``Σ cost <= capacity``; None if nothing fits.

    Options are ordered by increasing cost, so ties go to the cheaper one.
    """
    if loss.shape[0] == 0:
        return loss.new_zeros(0, dtype=torch.long)
    if float(cost.min()) * loss.shape[0] > capacity:
        return None
    free = loss.argmin(dim=-1)
    if float(cost[free].sum()) <= capacity:
        return free

    def choose(multiplier: float) -> torch.Tensor:
        return (loss + multiplier * cost).argmin(dim=-1)

    low, high = 0.0, 1.0
    while float(cost[choose(high)].sum()) > capacity:
        low, high = high, high * 4
    for _ in range(BISECTIONS):
        middle = (low + high) / 2
        if float(cost[choose(middle)].sum()) > capacity:
            low = middle
        else:
            high = middle
    return fill(loss, cost, choose(high), capacity)


def fill(loss: torch.Tensor, cost: torch.Tensor, choice: torch.Tensor, capacity: float) -> torch.Tensor:
    """Spend what the Lagrangian choice leaves (tokens that tie switch together): upgrade, one token at a time, the
    option change with the largest loss saved per extra number that still fits."""
    choice = choice.clone()
    rows = torch.arange(loss.shape[0])
    spare = capacity - float(cost[choice].sum())
    while spare > 0:
        extra = cost[None, :] - cost[choice][:, None]  # [tokens, options]
        saved = loss[rows, choice][:, None] - loss
        gain = torch.where((extra > 0) & (extra <= spare) & (saved > 0), saved / extra.clamp_min(1e-30), -1.0)
        best = int(gain.argmax())
        token, option = divmod(best, loss.shape[1])
        if float(gain[token, option]) <= 0:
            break
        spare -= float(extra[token, option])
        choice[token] = option
    return choice


def plan_head(loss: torch.Tensor, key_dims: torch.Tensor, value_dims: torch.Tensor, head_dim: int,
              capacity: float) -> Plan:
    """The least-loss plan of one head: ``loss`` ``[tokens, options]``, each option's key and value dimensions
    (0 and 0: eviction), ``capacity`` in numbers for these tokens and the projection together."""
    cost = (key_dims + value_dims).to(loss.dtype)
    order = cost.argsort(stable=True)
    loss, key_dims, value_dims, cost = loss[:, order], key_dims[order], value_dims[order], cost[order]
    reduced = sorted({int(r) for r in torch.cat([key_dims, value_dims]) if 0 < r < head_dim})
    best: Plan | None = None
    for largest in [0, *reduced]:
        allowed = (((key_dims <= largest) | (key_dims == head_dim))
                   & ((value_dims <= largest) | (value_dims == head_dim)))
        key_rank = max([int(r) for r in key_dims[allowed] if r < head_dim], default=0)
        value_rank = max([int(r) for r in value_dims[allowed] if r < head_dim], default=0)
        fixed = head_dim * (key_rank + value_rank)
        choice = lagrange(loss[:, allowed], cost[allowed], capacity - fixed)
        if choice is None:
            continue
        total = float(loss[:, allowed].gather(1, choice[:, None]).sum())
        if best is None or total < best.loss:
            picked = allowed.nonzero().flatten()[choice]
            used_keys, used_values = key_dims[picked], value_dims[picked]
            key_rank = int(used_keys[used_keys < head_dim].max()) if bool((used_keys < head_dim).any()) else 0
            value_rank = int(used_values[used_values < head_dim].max()) if bool((used_values < head_dim).any()) else 0
            best = Plan(order[picked], key_rank, value_rank, total)
    if best is None:
        raise ValueError("the budget is too small for this head")
    return best
