"""``dynakv:gate=ranker``: kvbench's own DynaKV variant (not the paper's method), kept for comparison.

Keys (pre-RoPE, re-rotated after reconstruction) and values of each layer are projected on one fixed principal
basis over all KV heads (Palu's bases with one group of all heads); a token keeps the first ``r_t``
coefficients, ``r_t`` from a nested set of levels (every rank up to 255 dims, else 255 evenly spaced ones). A
small MLP gate per layer (``ranker.py``) scores each token from its K/V coefficients; it is trained with the base
model frozen, by distillation (``objective``: layer-local attention-output error, or next-token KL through the
model) on calibration text, for ``ranker_steps`` steps, with a budget drawn per step so that one gate serves every
budget. At inference a threshold calibrated on the prompt makes the kept coefficients fill each layer's share of
the budget: the per-layer and K/V shares are Palu's measured allocation (greedy on held-out error curves), so the
comparison with ``palu`` isolates the token-wise ranking. The budget counts every stored byte: the ragged
coefficients, each token's level (uint8, K and V) and position (int32).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from kvbench import artifacts, calibration
from kvbench.artifacts import TensorSpec
from kvbench.methods.base import LayerInputs
from kvbench.methods.dynakv.ranker import Allocation, GateTraining, LayerBasis, RankGates, rank_levels, train_gates
from kvbench.methods.lowrank.allocation import POSITION_DTYPE, allocate_ranks

if TYPE_CHECKING:
    from kvbench.methods.dynakv.method import DynaKV
    from kvbench.methods.dynakv.storage import VariableRankLayer

LEVEL_DTYPE = torch.uint8  # each token's rank level, for K and for V
LAYOUT = "kvbench.methods.dynakv.storage:VariableRankLayer"


class RankerVariant:
    """The state and hooks of ``gate=ranker`` for one ``DynaKV`` instance (its options and shared statistics)."""

    def __init__(self, method: DynaKV) -> None:
        self.method = method
        self.gates: RankGates | None = None
        self.layer_bases: list[LayerBasis] = []
        self.gate_meta: dict[str, Any] = {}
        self._shares: dict[tuple[float, int], list[tuple[float, float]]] = {}

    def settings(self) -> GateTraining:
        m = self.method
        return GateTraining(steps=m.ranker_steps, objective=m.objective, window=m.window, lr=m.ranker_lr,
                            hidden=m.hidden, level_steps=m.level_steps, seed=m.calibration_seed)

    def prepare(self, model: torch.nn.Module, tokenizer: Any, force: bool = False) -> None:
        """Bases from the shared statistics (loaded by the method), then the gates: loaded, or trained and saved."""
        m = self.method
        stats = m._require_stats()
        self.layer_bases = []
        for layer in range(stats.key_fit.shape[0]):
            pair = []
            for kind in ("key", "value"):
                basis = m.group_bases(layer, kind, stats.kv_heads)[0]
                moment = getattr(stats, f"{kind}_fit")[layer]
                pair.append((basis.float(), torch.einsum("dr,de,er->r", basis, moment, basis).clamp_min(0).float()))
            self.layer_bases.append(LayerBasis(pair[0][0], pair[1][0], pair[0][1], pair[1][1]))
        self._shares = {}
        dim = stats.kv_heads * stats.head_dim
        if not m.adaptive:
            self.gates = None
            return
        settings = self.settings()
        data = calibration.calibration_data(tokenizer, m.calibration_tokens, m.calibration_seed, m.data or None,
                                            chunk_tokens=m.calibration_chunk_tokens)
        key = {"gate_training": vars(settings), "calibration_tokens": m.calibration_tokens,
               "multiple": m.multiple, "data": data.source, "kv_fingerprint": m.calibration_meta.get(
                   "data_fingerprint")}
        element_size = torch.empty((), dtype=next(model.parameters()).dtype).element_size()

        def build() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
            # Held-out chunks (every 8th, as the statistics hold them out) never train the gates.
            chunks = [c for i, c in enumerate(data.chunks) if i % 8 != 7] or data.chunks
            gates, curve = train_gates(model, chunks, self.layer_bases, self.training_allocation(element_size),
                                       settings)
            return {"loss_curve": curve, "train_chunks": len(chunks), "dim": dim}, gates.state_dict()

        template = RankGates(len(self.layer_bases), dim, rank_levels(dim, m.level_steps), m.hidden)
        specs = {name: TensorSpec(tuple(t.shape), t.is_floating_point()) for name, t in template.state_dict().items()}
        artifact, m.artifact = artifacts.load_or_build(model, "dynakv-gates", key, data.fingerprint, build,
                                                       lambda meta: specs, force=force)
        self.gate_meta = artifact["meta"]
        template.load_state_dict(artifact["tensors"])
        self.gates = template.to(next(model.parameters()).device).eval()

    def training_allocation(self, element_size: int) -> Allocation:
        """Budget -> per-layer K and V fractions, as ``shares`` gives them at inference (clamped to feasible)."""
        dim = self.layer_bases[0].key.shape[0]
        overhead = (POSITION_DTYPE.itemsize + 2 * LEVEL_DTYPE.itemsize) / element_size
        smallest = (2 + overhead) / (2 * dim)  # one coefficient each for K and V after the metadata

        def fractions(budget: float) -> tuple[list[float], list[float]]:
            shares = self.shares(round(max(budget, smallest + 1e-3), 3), element_size)
            return [k / dim for k, _ in shares], [v / dim for _, v in shares]

        return fractions

    def shares(self, budget: float, element_size: int) -> list[tuple[float, float]]:
        """Per layer, the mean (key, value) coefficients per token that fill ``budget`` of the full bytes.

        Palu's measured allocation (greedy on held-out error curves, ranks in ``multiple``) decides each layer's
        and K/V's share; it is then scaled to use the budget exactly, after the positions (int32) and rank levels
        (two uint8) every token stores.
        """
        key = (budget, element_size)
        if key not in self._shares:
            m = self.method
            stats = m._require_stats()
            layers, dim = stats.key_fit.shape[0], stats.kv_heads * stats.head_dim
            overhead = (POSITION_DTYPE.itemsize + 2 * LEVEL_DTYPE.itemsize) / element_size
            capacity = budget * 2 * dim - overhead  # numbers per token per layer
            if capacity < 2:
                raise ValueError(f"budget {budget:g} leaves less than one coefficient each for K and V per token "
                                 f"after dynakv's metadata ({overhead:.2g} numbers per token and layer)")
            curves = [m.error_curve(i, kind, stats.kv_heads) for i in range(layers) for kind in ("key", "value")]
            multiple = m.multiple
            while multiple > 1 and 2 * layers * multiple > capacity * layers:
                multiple //= 2  # tiny budgets: start every matrix lower than Palu's rounding allows
            ranks = allocate_ranks(curves, [1] * len(curves), math.floor(capacity * layers), multiple)
            scale = capacity * layers / sum(ranks)
            self._shares[key] = [(min(dim, ranks[2 * i] * scale), min(dim, ranks[2 * i + 1] * scale))
                                 for i in range(layers)]
        return self._shares[key]

    def compress_kept(self, layer: VariableRankLayer, inputs: LayerInputs, budget: float,
                      positions: torch.Tensor | None) -> None:
        from kvbench.methods.dynakv.storage import TokenRanker

        m = self.method
        if m.adaptive and self.gates is None:
            raise RuntimeError("dynakv is not calibrated: call prepare(model, tokenizer) first")
        stats = m._require_stats()
        dim = stats.kv_heads * stats.head_dim
        key_mean, value_mean = self.shares(budget, layer.keys.element_size())[inputs.layer_idx]
        levels = rank_levels(dim, m.level_steps)
        layer.ranker = TokenRanker(self.gates, inputs.layer_idx, self.layer_bases[inputs.layer_idx], levels,
                                   key_mean, value_mean)
        codec = m.codec(inputs.layer_idx, stats.kv_heads, dim, dim, layer.keys.device, layer.keys.dtype)
        layer.to_latent(codec, positions)
