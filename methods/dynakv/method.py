"""DynaKV (Lu et al., 2026, "One Size Does Not Fit All: Token-Wise Adaptive Compression for KV Cache",
arXiv 2603.04411): low-rank KV latents whose rank is chosen per token by a learned gate.

No code is public; this follows the paper's description. Each layer's keys (pre-RoPE, re-rotated after
reconstruction) and values are projected on one principal basis over all KV heads (joint spectral
decomposition, the same bases as ``palu``: one group of all heads); a token keeps the first ``r_t``
coefficients, ``r_t`` from a nested set of levels (every rank up to 255 dims, else 255 evenly spaced ones). A small gate
per layer (``ranker.py``) scores each token from its K/V coefficients; it is trained with the base
model frozen, by distillation (KL of next-token distributions against the uncompressed model) on calibration
text, for ``steps`` steps, with a budget drawn per step so that one gate serves every budget. At inference a
threshold calibrated on the prompt makes the kept coefficients fill each layer's share of the budget: the
per-layer and K/V shares are Palu's measured allocation (greedy on held-out error curves), so the comparison
with ``palu`` isolates the token-wise adaptivity. ``adaptive=false`` gives every token the same rank (ablation).

The budget counts every stored byte: the ragged coefficients, each token's level (uint8, K and V) and position
(int32). Gates, their settings, loss curve and the data's fingerprint are saved as a calibration artifact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvbench import artifacts, calibration
from kvbench.artifacts import TensorSpec
from kvbench.methods.base import LayerInputs
from kvbench.methods.dynakv.ranker import Allocation, GateTraining, LayerBasis, RankGates, rank_levels, train_gates
from kvbench.methods.lowrank.allocation import POSITION_DTYPE, allocate_ranks
from kvbench.methods.lowrank.method import LowRankMethod

if TYPE_CHECKING:
    from kvbench.methods.dynakv.storage import VariableRankLayer

LEVEL_DTYPE = torch.uint8  # each token's rank level, for K and for V


@dataclass
class DynaKV(LowRankMethod):
    name: ClassVar[str] = "dynakv"
    summary: ClassVar[str] = ("token-wise adaptive rank of joint pre-RoPE latents, learned gates "
                               "(Lu et al. 2026)")
    layout: ClassVar[str] = "kvbench.methods.dynakv.storage:VariableRankLayer"

    steps: int = 128  # gate training steps (minutes on a laptop CPU for SmolLM2-135M)
    objective: str = "attention"  # layer-local attention-output error; "kl": next-token KL through the model
    window: int = 64  # tokens per step that attend to the compressed prefix (the loss positions)
    level_steps: int = 255  # rank levels: 0 and level_steps evenly spaced ranks (every rank when dim <= 255)
    hidden: int = 32
    lr: float = 3e-3
    adaptive: bool = True
    multiple: int = 8  # Palu's rank rounding in the per-layer allocation that DynaKV shares

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or self.window < 1 or self.hidden < 1 or self.multiple < 1:
            raise ValueError("dynakv needs steps, window, hidden and multiple >= 1")
        if self.objective not in ("attention", "kl"):
            raise ValueError("dynakv objective must be 'attention' or 'kl'")
        if not 1 <= self.level_steps <= 255:
            raise ValueError("dynakv level_steps must be in [1, 255] (levels are stored as uint8)")
        self.gates: RankGates | None = None
        self.layer_bases: list[LayerBasis] = []
        self.gate_meta: dict[str, Any] = {}
        self._shares: dict[tuple[float, int], list[tuple[float, float]]] = {}

    def training_settings(self) -> GateTraining:
        return GateTraining(steps=self.steps, objective=self.objective, window=self.window, lr=self.lr,
                            hidden=self.hidden, level_steps=self.level_steps, seed=self.calibration_seed)

    def prepare(self, model: torch.nn.Module, tokenizer: Any, force: bool = False) -> None:
        """The shared K/V statistics, then the gates: loaded, or trained (progress bar) and saved on first use."""
        super().prepare(model, tokenizer, force=force)
        stats = self._require_stats()
        self.layer_bases = []
        for layer in range(stats.key_fit.shape[0]):
            pair = []
            for kind in ("key", "value"):
                basis = self.group_bases(layer, kind, stats.kv_heads)[0]
                moment = getattr(stats, f"{kind}_fit")[layer]
                pair.append((basis.float(), torch.einsum("dr,de,er->r", basis, moment, basis).clamp_min(0).float()))
            self.layer_bases.append(LayerBasis(pair[0][0], pair[1][0], pair[0][1], pair[1][1]))
        self._shares = {}
        dim = stats.kv_heads * stats.head_dim
        if not self.adaptive:
            self.gates = None
            return
        settings = self.training_settings()
        data = calibration.calibration_data(tokenizer, self.calibration_tokens, self.calibration_seed,
                                            self.data or None, chunk_tokens=self.calibration_chunk_tokens)
        key = {"gate_training": vars(settings), "calibration_tokens": self.calibration_tokens,
               "multiple": self.multiple, "data": data.source, "kv_fingerprint": self.calibration_meta.get(
                   "data_fingerprint")}
        dtype = next(model.parameters()).dtype
        element_size = torch.empty((), dtype=dtype).element_size()

        def build() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
            # Held-out chunks (every 8th, as the statistics hold them out) never train the gates.
            chunks = [c for i, c in enumerate(data.chunks) if i % 8 != 7] or data.chunks
            gates, curve = train_gates(model, chunks, self.layer_bases, self._training_allocation(element_size),
                                       settings)
            return {"loss_curve": curve, "train_chunks": len(chunks), "dim": dim}, gates.state_dict()

        template = RankGates(len(self.layer_bases), dim, rank_levels(dim, self.level_steps), self.hidden)
        specs = {name: TensorSpec(tuple(t.shape), t.is_floating_point()) for name, t in template.state_dict().items()}
        artifact, self.artifact = artifacts.load_or_build(model, "dynakv-gates", key, data.fingerprint, build,
                                                          lambda meta: specs, force=force)
        self.gate_meta = artifact["meta"]
        gates = template
        gates.load_state_dict(artifact["tensors"])
        self.gates = gates.to(next(model.parameters()).device).eval()

    def _training_allocation(self, element_size: int) -> Allocation:
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
            stats = self._require_stats()
            layers, dim = stats.key_fit.shape[0], stats.kv_heads * stats.head_dim
            overhead = (POSITION_DTYPE.itemsize + 2 * LEVEL_DTYPE.itemsize) / element_size
            capacity = budget * 2 * dim - overhead  # numbers per token per layer
            if capacity < 2:
                raise ValueError(f"budget {budget:g} leaves less than one coefficient each for K and V per token "
                                 f"after dynakv's metadata ({overhead:.2g} numbers per token and layer)")
            curves = [self.error_curve(i, kind, stats.kv_heads) for i in range(layers) for kind in ("key", "value")]
            multiple = self.multiple
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

        if self.adaptive and self.gates is None:
            raise RuntimeError("dynakv is not calibrated: call prepare(model, tokenizer) first")
        stats = self._require_stats()
        dim = stats.kv_heads * stats.head_dim
        key_mean, value_mean = self.shares(budget, layer.keys.element_size())[inputs.layer_idx]
        levels = rank_levels(dim, self.level_steps)
        layer.ranker = TokenRanker(self.gates, inputs.layer_idx, self.layer_bases[inputs.layer_idx], levels,
                                   key_mean, value_mean)
        codec = self.codec(inputs.layer_idx, stats.kv_heads, dim, dim, layer.keys.device, layer.keys.dtype)
        layer.to_latent(codec, positions)
