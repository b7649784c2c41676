"""DynaKV (Lu et al., 2026, "One Size Does Not Fit All: Token-Wise Adaptive Compression for KV Cache",
arXiv 2603.04411): low-rank KV states whose rank is chosen per token by a learned gate.

No code is public; ``gate=paper`` (the default) follows the paper's v1 text (see ``spectral.py`` for the
equations and ``docs/methods/dynakv.md``): per layer and separately for K and V, a learnable basis ``U`` over all
KV heads' pre-RoPE states, initialised from the covariance's eigenvectors; a linear gate ``p = softmax(x̃W + b)``
over cut-off indices; training with the base model frozen on next-token cross-entropy plus ``α R²``; at inference
each token keeps the prefix where the soft mask exceeds ``tau`` = 0.1, so the per-layer and per-token allocation
emerges from the gates. The rate is set by α: ``alpha=0`` (default) finds the α whose held-out rate meets the
requested budget (``library.py``: short training runs on a grid of α, one cached artifact per model and α).

What kvbench adds, because it is asked for a byte budget rather than a rate: the budget counts every stored
byte (coefficients, each token's K and V rank, its int32 position), so the α search targets the budget minus
that metadata; and a prompt whose ranks exceed the budget anyway (text unlike the calibration text) has its
threshold raised above ``tau`` for all its layers at once until it fits (``finish``). The threshold of each row is
recorded (``dynakv_threshold``), as are α, the held-out rate and the training cost (steps, tokens, seconds of
the gates used and of the whole α search). Gates for a budget are found (on a first run: trained) when its first
prefill starts, so that row's ``prefill_s`` includes ``dynakv_setup_s``, the time this took.

``basis=uncentred`` is kvbench's option, not the paper's: ``U`` starts from the eigenvectors of the uncentred
second moments (as Palu's bases do) instead of the centred covariance (the paper's footnote 2). The paper applies
``U`` to the raw states (no mean removed), so with the centred basis a cut also drops part of the states' mean,
which is large where the K/V projections have biases (Qwen2).

``gate=ranker`` is kvbench's own earlier design, not the paper's (``ranker_variant.py``); its options are
``ranker_steps``, ``ranker_lr``, ``objective``, ``window``, ``level_steps``, ``hidden`` and ``multiple``.
``adaptive=false`` gives every token of a layer the same rank (the ablation): for ``gate=paper`` the mean K and V
ranks the trained gates give that layer on held-out text (scaled down if they exceed the budget).
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvbench.methods.base import LayerInputs
from kvbench.methods.dynakv.library import GateLibrary, Trained, dims_for_budget, metadata_fraction
from kvbench.methods.dynakv.ranker_variant import LAYOUT as RANKER_LAYOUT
from kvbench.methods.dynakv.ranker_variant import RankerVariant
from kvbench.methods.dynakv.spectral import Training
from kvbench.methods.lowrank.method import LowRankMethod
from kvbench.rope import rotary_module

if TYPE_CHECKING:
    from pathlib import Path

    from kvbench.layers import CompressedLayer

PAPER_OPTIONS = ("alpha", "tau", "steps", "lr", "basis_lr", "basis")
RANKER_OPTIONS = ("ranker_steps", "ranker_lr", "objective", "window", "level_steps", "hidden", "multiple")


@dataclass
class DynaKV(LowRankMethod):
    name: ClassVar[str] = "dynakv"
    summary: ClassVar[str] = ("token-wise adaptive rank: learnable spectral basis and linear cut-off gates trained "
                               "with CE + alpha R^2 (Lu et al. 2026)")
    layout: ClassVar[str] = "kvbench.methods.dynakv.prefix:PrefixLayer"

    gate: str = "paper"  # "paper": the paper's method; "ranker": kvbench's variant
    adaptive: bool = True
    alpha: float = 0.0  # the rate penalty; 0: the α whose held-out rate meets the budget
    tau: float = 0.1  # the hard mask's threshold (paper: "e.g., 0.1")
    steps: int = 32  # training steps per α (one 512-token chunk each)
    lr: float = 0.02  # gate W, b
    basis_lr: float = 1e-4  # basis U
    basis: str = "centred"  # U's initialisation: the centred covariance (the paper), or "uncentred" moments
    ranker_steps: int = 128
    ranker_lr: float = 3e-3
    objective: str = "attention"
    window: int = 64
    level_steps: int = 255
    hidden: int = 32
    multiple: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gate not in ("paper", "ranker"):
            raise ValueError("dynakv gate must be 'paper' or 'ranker'")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        other = RANKER_OPTIONS if self.gate == "paper" else PAPER_OPTIONS
        changed = [name for name in other if getattr(self, name) != defaults[name]]
        if changed:
            variant = "ranker" if self.gate == "paper" else "paper"
            raise ValueError(f"dynakv option {changed[0]} applies to gate={variant} only (this spec has "
                             f"gate={self.gate})")
        if self.alpha < 0 or not 0 <= self.tau < 1 or self.steps < 1 or self.lr <= 0 or self.basis_lr < 0:
            raise ValueError("dynakv needs alpha >= 0, 0 <= tau < 1, steps >= 1, lr > 0 and basis_lr >= 0")
        if self.basis not in ("centred", "uncentred"):
            raise ValueError(f"dynakv basis must be centred or uncentred, got {self.basis!r}")
        if min(self.ranker_steps, self.window, self.hidden, self.multiple) < 1 or self.ranker_lr <= 0:
            raise ValueError("dynakv needs ranker_steps, window, hidden and multiple >= 1 and ranker_lr > 0")
        if self.objective not in ("attention", "kl"):
            raise ValueError("dynakv objective must be 'attention' or 'kl'")
        if not 1 <= self.level_steps <= 255:
            raise ValueError("dynakv level_steps must be in [1, 255] (levels are stored as uint8)")
        self.ranker = RankerVariant(self) if self.gate == "ranker" else None
        if self.ranker is not None:
            self.layout = RANKER_LAYOUT  # an instance attribute: the cache reads the method's layout
        self.library: GateLibrary | None = None
        self.rotary: torch.nn.Module | None = None
        self.active: Trained | None = None  # the gates of the current prefill
        self._row: dict[str, Any] = {}

    def training(self) -> Training:
        return Training(steps=self.steps, lr=self.lr, basis_lr=self.basis_lr, seed=self.calibration_seed)

    def prepare(self, model: torch.nn.Module, tokenizer: Any, force: bool = False) -> None:
        """``gate=ranker``: the shared statistics and its gates. ``gate=paper``: the calibration text, and the gates
        of an explicit ``alpha`` (loaded or trained now); gates for a budget are found at its first prefill."""
        if self.ranker is not None:
            super().prepare(model, tokenizer, force=force)
            self.ranker.prepare(model, tokenizer, force=force)
            return
        self.rotary = rotary_module(model)
        self.library = GateLibrary(model, tokenizer, self.training(), self.tau, self.calibration_tokens,
                                   self.calibration_seed, self.data, self.calibration_chunk_tokens, self.basis)
        self.active = None
        if self.alpha:
            self.artifact = self.library.at(self.alpha, force=force).path

    def calibrate(self, model: torch.nn.Module, tokenizer: Any, force: bool = False) -> Path:
        self.prepare(model, tokenizer, force=force)
        if self.library is not None and not self.alpha:
            self.library.basis()
            return self.library.basis_path
        return self.artifact

    def gates_for(self, model: torch.nn.Module, budget: float) -> Trained:
        """The trained gates a prefill at ``budget`` uses: the explicit ``alpha``'s, or the α search's."""
        if self.library is None:
            raise RuntimeError("dynakv is not calibrated: call prepare(model, tokenizer) first")
        if self.alpha:
            return self.library.at(self.alpha)
        element_size = next(model.parameters()).element_size()
        with torch.inference_mode(False), torch.enable_grad():
            return self.library.for_fraction(dims_for_budget(budget, self.library.dim, element_size))

    def prefill_context(self, model: torch.nn.Module, budget: float) -> AbstractContextManager:
        """Select (on first use: train) the gates for ``budget`` before the compressing forward starts."""
        if self.ranker is None:
            start = time.perf_counter()
            self.active = self.gates_for(model, budget)
            element_size = next(model.parameters()).element_size()
            overhead = metadata_fraction(self.library.dim, element_size)
            meta, search = self.active.meta, {} if self.alpha else self.library.search
            self._row = {"dynakv_alpha": self.active.alpha, "dynakv_target_budget": budget,
                         "dynakv_heldout_budget": round(self.active.fraction + overhead, 5),
                         "dynakv_train_steps": meta["train_steps"], "dynakv_train_tokens": meta["train_tokens"],
                         "dynakv_train_s": meta.get("calibration_s"), "dynakv_tau": self.tau,
                         "dynakv_search_probes": len(search.get("probes", [])) or None,
                         "dynakv_search_s": search.get("search_s"),
                         "dynakv_setup_s": round(time.perf_counter() - start, 3)}
        return nullcontext()

    def uniform_ranks(self, layer_idx: int, budget: float, element_size: int) -> tuple[float, float]:
        """The ablation's mean K and V ranks of a layer: the gates' held-out means, scaled into the budget."""
        target = dims_for_budget(budget, self.library.dim, element_size)
        scale = min(1.0, target / max(self.active.fraction, 1e-9))
        key, value = (float(r) * scale for r in self.active.ranks[layer_idx])
        return max(key, 1.0), max(value, 1.0)

    def compress_kept(self, layer: CompressedLayer, inputs: LayerInputs, budget: float,
                      positions: torch.Tensor | None) -> None:
        if self.ranker is not None:
            self.ranker.compress_kept(layer, inputs, budget, positions)
            return
        if self.active is None:
            raise RuntimeError("dynakv has no gates for this prefill: compress through kvbench.prefill.prefill")
        uniform = None if self.adaptive else self.uniform_ranks(inputs.layer_idx, budget, layer.keys.element_size())
        layer.compress(self.active.gates, inputs.layer_idx, self.tau, self.rotary, positions, uniform)

    def finish(self, cache: Any) -> None:
        """The budget guard: if the prompt's ranks exceed the budget, one higher threshold for every layer."""
        if self.ranker is not None:
            return
        from kvbench.methods.dynakv.prefix import FIRST, cut_threshold

        layers = [layer for layer in cache.layers if getattr(layer, "is_prefix", False)]
        masks = [m for layer in layers for m in layer.soft_masks()]
        threshold = self.tau
        if masks:
            held = sum(m.numel() for m in masks)
            transient = sum(m.numel() * m.element_size() for m in masks)
            excess = cache.nbytes() - transient - cache.budget * cache.full_nbytes()
            if excess > 0:
                element = layers[0].stored_buckets()[0].element_size()
                capacity = held - math.ceil(excess / element)
                floor = sum(int((m == FIRST).sum()) for m in masks)  # every token keeps its first coefficient
                if capacity < floor:
                    raise ValueError(f"budget {cache.budget:g} is below DynaKV's floor (one coefficient of K and of V "
                                     "per token, plus its rank and position)")
                threshold = cut_threshold(masks, held - capacity)
        for layer in layers:
            layer.truncate(threshold)
        self._row["dynakv_threshold"] = threshold

    def row_fields(self, model: torch.nn.Module) -> dict[str, Any]:
        fields: dict[str, Any] = {"masked": False, "dynakv_gate": self.gate}
        return fields | (self._row if self.ranker is None else {})
