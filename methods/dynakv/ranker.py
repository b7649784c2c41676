"""DynaKV's rank gates: how many latent dimensions each token keeps, learned with the base model frozen.

A token's key (pre-RoPE) and value, heads concatenated, are projected on the layer's principal bases (shared
with Palu); the coefficients are ordered by variance, so a token that keeps rank ``r`` keeps the first ``r``
(a nested prefix). Per layer a small MLP (the *gate*) reads the token's whitened K and V coefficients and
its residual energy at every rank level, and outputs two scores (K, V). A score becomes a rank through a
threshold ``tau``: ``rank = nearest_level(dim * sigmoid(score + tau))``; ``tau`` is calibrated on the actual
prompt so that the layer's kept coefficients fill its byte budget (``allocate``); tokens arriving afterwards get
the layer's mean rank (``arrival_levels``). Only the gate's ranking of tokens is learned; the budget is met by
construction.

Training (``train_gates``) mirrors what a compressed cache does at inference: a calibration chunk runs through
the frozen model uncompressed (the exact prefill), its prefix K/V are compressed with the gates' ranks, and the
chunk's last ``window`` tokens attend to that compressed prefix. Two objectives: ``kl``, the KL divergence of
the window's next-token distributions from the uncompressed ones (a pass through the whole frozen network per
step), and ``attention`` (default), each layer's relative attention-output error for the window's real queries
(the same distillation, layer-local: no pass through the network, so a step costs a fraction; the per-layer
byte shares are fixed by the allocation, so a gate only decides *within* its layer, which is what the local
error measures). Forward uses the hard ranks; gradients reach the gates through a straight-through soft mask
and an implicitly differentiated ``tau``. A budget is drawn per step (log-uniform), so one set of gates
serves every budget.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from kvbench.rope import apply_rope, cos_sin, rotary_module, undo_rope

MAX_LEVELS = 255  # a token's level is stored as uint8
FEATURE_STEPS = 32  # the gate reads a token's residual energy at 32 evenly spaced ranks


def rank_levels(dim: int, steps: int = MAX_LEVELS) -> torch.Tensor:
    """The nested ranks a token may keep: 0 and ``min(steps, dim)`` evenly spaced ranks up to ``dim`` (int64);
    every rank when ``dim <= steps`` (SmolLM2: 0..192; an 8B model with 8 KV heads x 128: steps of about 4)."""
    steps = min(steps, dim)
    return torch.unique(torch.round(torch.linspace(0, dim, steps + 1, dtype=torch.float64)).long())


@dataclass(frozen=True)
class LayerBasis:
    """One layer's principal bases (columns, by decreasing variance) and their variances, for K and V."""

    key: torch.Tensor  # [dim, dim]
    value: torch.Tensor
    key_var: torch.Tensor  # [dim]
    value_var: torch.Tensor


def _tail_log_energy(latent: torch.Tensor, variance: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """log of each token's residual energy beyond each rank in ``cut``, relative to the average residual there."""
    tail = latent.square().flip(-1).cumsum(-1).flip(-1)  # [..., dim]: energy in coefficients d..dim-1
    expected = variance.flip(-1).cumsum(-1).flip(-1)
    return torch.log((tail[..., cut] + 1e-6 * expected[0]) / (expected[cut] + 1e-6 * expected[0]))


class RankGates(nn.Module):
    """One small MLP per layer: token features -> (key score, value score)."""

    def __init__(self, n_layers: int, dim: int, levels: torch.Tensor, hidden: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.register_buffer("levels", levels.clone())
        self.register_buffer("cuts", rank_levels(dim, min(dim, FEATURE_STEPS))[:-1])  # where tail energy is read
        features = 2 * dim + 2 * len(self.cuts)
        generator = torch.Generator().manual_seed(seed)
        self.nets = nn.ModuleList(nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, 2))
                                  for _ in range(n_layers))
        with torch.no_grad():  # seeded init, independent of the global RNG: same seed -> same gates
            for net in self.nets:
                for lin in (net[0], net[2]):
                    bound = 1 / math.sqrt(lin.in_features)
                    lin.weight.copy_(torch.empty_like(lin.weight).uniform_(-bound, bound, generator=generator))
                    lin.bias.zero_()

    def features(self, key_latent: torch.Tensor, value_latent: torch.Tensor, basis: LayerBasis) -> torch.Tensor:
        key_var, value_var = basis.key_var.to(key_latent), basis.value_var.to(key_latent)
        floor = 1e-6 * max(float(key_var[0]), float(value_var[0]), 1e-12)
        return torch.cat([
            key_latent / (key_var + floor).sqrt(), value_latent / (value_var + floor).sqrt(),
            _tail_log_energy(key_latent, key_var, self.cuts), _tail_log_energy(value_latent, value_var, self.cuts),
        ], dim=-1)

    def scores(self, layer: int, key_latent: torch.Tensor, value_latent: torch.Tensor,
               basis: LayerBasis) -> tuple[torch.Tensor, torch.Tensor]:
        """``[tokens]`` key and value scores of a layer's tokens (latents ``[tokens, dim]``)."""
        net = self.nets[layer]
        out = net(self.features(key_latent, value_latent, basis).to(net[0].weight.dtype))
        return out[..., 0].float(), out[..., 1].float()


def _nearest_levels(scores: torch.Tensor, tau: float, levels: torch.Tensor) -> torch.Tensor:
    """Level index of each token: the level nearest to ``dim * sigmoid(score + tau)``."""
    wanted = levels[-1] * torch.sigmoid(scores + tau)
    edges = (levels[:-1] + levels[1:]).to(wanted.device, torch.float32) / 2
    return torch.searchsorted(edges, wanted.float(), right=True)


def allocate(scores: torch.Tensor, levels: torch.Tensor, target: float) -> tuple[torch.Tensor, float]:
    """Level index per token (``[tokens]``, int64) whose ranks sum to at most ``target``, as close as the levels allow.

    ``tau`` is found by bisection on the ranks (each the level nearest to ``dim * sigmoid(score + tau)``); the
    budget left over is then handed, one level step each, to the tokens nearest to their next level (largest
    remainder), so ties (e.g. an untrained gate) still fill the budget. Returns the levels and ``tau``.
    """
    levels = levels.to(scores.device)
    scores = scores.detach().float()
    total = float(levels[-1]) * scores.numel()
    if target >= total:
        return torch.full_like(scores, len(levels) - 1, dtype=torch.long), math.inf
    low, high = -40.0 - float(scores.max()), 40.0 - float(scores.min())
    for _ in range(32):
        mid = (low + high) / 2
        if float(levels[_nearest_levels(scores, mid, levels)].sum()) <= target:
            low = mid
        else:
            high = mid
    index = _nearest_levels(scores, low, levels)
    left = target - float(levels[index].sum())
    can_rise = index < len(levels) - 1
    step = torch.where(can_rise, levels[(index + 1).clamp(max=len(levels) - 1)] - levels[index], 0)
    wanted = levels[-1] * torch.sigmoid(scores + low)
    nearness = torch.where(can_rise, (wanted - levels[index]) / step.clamp(min=1), -math.inf)
    order = nearness.argsort(descending=True, stable=True)
    rise = torch.zeros_like(can_rise)
    rise[order] = (step[order].cumsum(0) <= left) & can_rise[order]
    return index + rise.long(), low


def arrival_levels(count: int, mean: float, levels: torch.Tensor, allowance: float,
                   carry: float = 0.0) -> tuple[torch.Tensor, float]:
    """Levels of ``count`` tokens arriving after compression (a question chunk, scored text, decoded tokens).

    Each gets the layer's mean rank: the largest level within ``mean`` plus the ``carry`` (what earlier tokens
    were owed: error diffusion, so the mean is kept instead of rounded down every time), and never more than
    ``allowance``, the budget left to the layer, so the cache stays within budget while decoding. Returns the
    levels and the new carry. Arriving tokens are not gated: the gates are trained to rank a compressed prompt
    for the queries that follow it, and ranking a long arriving chunk with them was measured to hurt
    (held-out KL 1.02 vs 0.85 at budget 0.25 with 256 arriving tokens).
    """
    ladder = levels.tolist()
    index = []
    for _ in range(count):
        level = max(bisect.bisect_right(ladder, min(mean + carry, allowance)) - 1, 0)
        carry += mean - ladder[level]
        allowance -= ladder[level]
        index.append(level)
    return torch.tensor(index, dtype=torch.long, device=levels.device), carry


def straight_through_mask(scores: torch.Tensor, index: torch.Tensor, tau: float, levels: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """``[tokens, dim]`` prefix masks: the hard ranks forward, a soft sigmoid mask's gradient backward.

    ``tau`` is differentiated implicitly (it keeps the mean soft rank fixed), so raising one token's score takes
    rank from the others instead of inflating the budget.
    """
    dim = int(levels[-1])
    fixed = torch.sigmoid(scores + tau)
    slope = (fixed * (1 - fixed)).detach().sum().clamp_min(1e-12)
    tau_eff = tau - (fixed - fixed.detach()).sum() / slope
    soft_rank = dim * torch.sigmoid(scores + tau_eff)
    positions = torch.arange(dim, device=scores.device, dtype=torch.float32)
    soft = torch.sigmoid((soft_rank[:, None] - positions - 0.5) / temperature)
    hard = (positions < levels.to(scores.device)[index][:, None]).float()
    return hard + soft - soft.detach()


# ------------------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class GateTraining:
    """Settings of ``train_gates`` (they are part of the artifact's key)."""

    steps: int = 128
    objective: str = "attention"  # "attention": layer-local attention-output error; "kl": next-token KL
    window: int = 64  # trailing tokens of a chunk that attend to its compressed prefix (the loss positions)
    steps_per_chunk: int = 4  # budgets drawn per teacher forward (amortises the uncompressed pass)
    lr: float = 3e-3
    min_budget: float = 0.04
    max_budget: float = 0.6
    hidden: int = 32
    level_steps: int = MAX_LEVELS
    seed: int = 0


# A budget -> (per-layer key fractions, per-layer value fractions) map: the allocation Palu uses.
Allocation = Callable[[float], tuple[Sequence[float], Sequence[float]]]


def _split_heads(states: torch.Tensor) -> torch.Tensor:
    """``[1, kv_heads, tokens, head_dim]`` -> ``[tokens, kv_heads * head_dim]`` (heads concatenated, head-major)."""
    return states[0].transpose(0, 1).reshape(states.shape[2], -1)


def _merge_heads(flat: torch.Tensor, kv_heads: int) -> torch.Tensor:
    return flat.reshape(flat.shape[0], kv_heads, -1).transpose(0, 1).unsqueeze(0)


class _Teacher:
    """One uncompressed pass over a chunk: per layer the pre-RoPE keys and the values of the prefix, the window's
    queries and exact K/V, and the window's next-token log-probabilities.

    The pass is a prefill whose method only records what kvbench's attention hook hands it (the post-RoPE
    queries), so it works for every model kvbench can compress.
    """

    def __init__(self, model: torch.nn.Module, chunk: torch.Tensor, window: int) -> None:
        from kvbench.methods.base import Method
        from kvbench.prefill import prefill, prepare

        queries: dict[int, tuple[torch.Tensor, float]] = {}

        class Recorder(Method):
            name, family, summary = "dynakv-teacher", "reference", "records the window's queries"

            def compress(self, layer, inputs, budget) -> None:  # noqa: ANN001 - the Method hook
                queries[inputs.layer_idx] = (inputs.queries[:, :, -window:].float(), inputs.scaling)

        device = next(model.parameters()).device
        self.prefix, self.window_ids = chunk[:, :-window].to(device), chunk[:, -window:].to(device)
        recorder = Recorder()
        prepare(recorder, model, None)
        teacher = prefill(model, recorder, 1.0, chunk.to(device), logits_to_keep=window)
        cache = teacher.cache
        self.log_probs = teacher.logits.float().log_softmax(-1)
        n = self.prefix.shape[1]
        self.cos, self.sin = cos_sin(rotary_module(model), torch.arange(n, device=device), torch.float32)
        self.kv_heads = cache.layers[0].keys.shape[1]
        self.keys = [_split_heads(undo_rope(layer.keys[:, :, :n].float(), self.cos, self.sin))
                     for layer in cache.layers]
        self.values = [_split_heads(layer.values[:, :, :n].float()) for layer in cache.layers]
        self.prefix_keys = [layer.keys[:, :, :n].float() for layer in cache.layers]
        self.prefix_values = [layer.values[:, :, :n].float() for layer in cache.layers]
        self.window_keys = [layer.keys[:, :, n:].float() for layer in cache.layers]
        self.window_values = [layer.values[:, :, n:].float() for layer in cache.layers]
        self.queries = [queries[i] for i in range(len(cache.layers))]


def compressed_prefix(teacher: _Teacher, gates: RankGates | None, basis: LayerBasis, layer: int, key_frac: float,
                      value_frac: float, temperature: float = 1.0, train: bool = False,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's prefix K (post-RoPE) and V as the gates' ranks leave them, ``[1, kv_heads, prefix, head_dim]``.

    ``gates=None`` gives every token the same rank (split between two adjacent levels): Palu's token-uniform
    ranks under the same per-layer allocation, the reference a gate must beat.
    """
    n = teacher.prefix.shape[1]
    key_latent = teacher.keys[layer] @ basis.key.to(teacher.keys[layer])
    value_latent = teacher.values[layer] @ basis.value.to(teacher.values[layer])
    if gates is None:
        key_scores = value_scores = torch.zeros(n, device=key_latent.device)
    else:
        key_scores, value_scores = gates.scores(layer, key_latent, value_latent, basis)
    states = []
    for latent, scores, frac, base in ((key_latent, key_scores, key_frac, basis.key),
                                       (value_latent, value_scores, value_frac, basis.value)):
        levels = (rank_levels(base.shape[0]) if gates is None else gates.levels).to(latent.device)
        index, tau = allocate(scores, levels, frac * base.shape[0] * n)
        if train and math.isfinite(tau):
            mask = straight_through_mask(scores, index, tau, levels, temperature)
        else:
            mask = torch.arange(base.shape[0], device=latent.device) < levels[index][:, None]
        states.append((latent * mask) @ base.to(latent).T)
    keys = apply_rope(_merge_heads(states[0], teacher.kv_heads), teacher.cos, teacher.sin)
    return keys, _merge_heads(states[1], teacher.kv_heads)


def compressed_window_loss(model: torch.nn.Module, teacher: _Teacher, gates: RankGates | None,
                           bases: Sequence[LayerBasis], key_frac: Sequence[float], value_frac: Sequence[float],
                           temperature: float = 1.0, train: bool = False) -> torch.Tensor:
    """KL(uncompressed || compressed) of the window's next-token distributions, prefix at the given fractions."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    dtype = next(model.parameters()).dtype
    for layer, basis in enumerate(bases):
        keys, values = compressed_prefix(teacher, gates, basis, layer, key_frac[layer], value_frac[layer],
                                         temperature, train)
        cache.update(keys.to(dtype), values.to(dtype), layer)
    from kvbench.prefill import cache_arguments

    logits = model(teacher.window_ids, **cache_arguments(model, cache), use_cache=True).logits.float()
    return F.kl_div(logits.log_softmax(-1)[0], teacher.log_probs[0], log_target=True, reduction="batchmean")


def attention_output_loss(teacher: _Teacher, gates: RankGates | None, bases: Sequence[LayerBasis],
                          key_frac: Sequence[float], value_frac: Sequence[float], temperature: float = 1.0,
                          train: bool = False) -> torch.Tensor:
    """Mean over layers of the window's relative attention-output error with the compressed prefix.

    The layer-local form of the distillation: each layer's real queries attend to its compressed prefix (and
    the window's exact K/V, causally) and are compared with the uncompressed attention. It needs no pass
    through the network, so a step costs a fraction of the KL objective's.
    """
    from kvbench.layers import causal_mask

    losses = []
    for layer, basis in enumerate(bases):
        keys, values = compressed_prefix(teacher, gates, basis, layer, key_frac[layer], value_frac[layer],
                                         temperature, train)
        query, scaling = teacher.queries[layer]
        window = query.shape[2]
        mask = causal_mask(window, keys.shape[2] + window, query.device)
        outputs = [F.scaled_dot_product_attention(query, torch.cat([k, teacher.window_keys[layer]], 2),
                                                  torch.cat([v, teacher.window_values[layer]], 2), attn_mask=mask,
                                                  scale=scaling, enable_gqa=True)
                   for k, v in ((keys, values), (teacher.prefix_keys[layer], teacher.prefix_values[layer]))]
        losses.append((outputs[0] - outputs[1]).square().sum() / outputs[1].square().sum().clamp_min(1e-12))
    return torch.stack(losses).mean()


def sample_budget(generator: torch.Generator, settings: GateTraining) -> float:
    low, high = math.log(settings.min_budget), math.log(settings.max_budget)
    return math.exp(low + (high - low) * float(torch.rand((), generator=generator)))


def train_gates(model: torch.nn.Module, chunks: Sequence[torch.Tensor], bases: Sequence[LayerBasis],
                allocation: Allocation, settings: GateTraining, progress: bool = True,
                ) -> tuple[RankGates, list[dict[str, float]]]:
    """Train a fresh set of gates on ``chunks`` with the base model frozen; returns them and the loss curve."""
    if not chunks or min(c.shape[1] for c in chunks) <= settings.window + 16:
        raise ValueError(f"gate training needs calibration chunks longer than window + 16 = {settings.window + 16}")
    dim = bases[0].key.shape[0]
    device = next(model.parameters()).device
    gates = RankGates(len(bases), dim, rank_levels(dim, settings.level_steps), settings.hidden, settings.seed)
    gates.to(device)
    optimizer = torch.optim.Adam(gates.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    temperature = dim / FEATURE_STEPS  # the soft mask's width: gradients see the neighbouring ranks
    curve: list[dict[str, float]] = []
    start = time.perf_counter()
    try:
        teacher = None
        bar = tqdm(range(settings.steps), desc="kvbench: DynaKV gate training", unit="step",
                   disable=not progress, dynamic_ncols=True)
        for step in bar:
            if step % settings.steps_per_chunk == 0:
                teacher = _Teacher(model, chunks[(step // settings.steps_per_chunk) % len(chunks)], settings.window)
            budget = sample_budget(generator, settings)
            key_frac, value_frac = allocation(budget)
            with torch.enable_grad():
                if settings.objective == "kl":
                    loss = compressed_window_loss(model, teacher, gates, bases, key_frac, value_frac, temperature,
                                                  train=True)
                else:
                    loss = attention_output_loss(teacher, gates, bases, key_frac, value_frac, temperature, train=True)
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
            kl = loss.item()
            curve.append({"step": step, "budget": round(budget, 4), "loss": kl,
                          "seconds": round(time.perf_counter() - start, 2)})
            bar.set_postfix_str(f"{settings.objective} loss {kl:.4f} @ budget {budget:.2f}")
    finally:
        for p, flag in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(flag)
    return gates.eval(), curve
