"""DynaKV's trained gates, one calibration artifact per (model, α), and the search for the α that meets a budget.

The paper trains one model per compression rate: α sets the rate and τ = 0.1 is fixed (§3.3, §3.2). kvbench is
asked for a budget instead, so it searches α: short training runs (``Training``) on calibration chunks, each
measured on held-out chunks (every 8th, never trained on) as the mean hard rank the gates give, per layer and
for K and V, at τ. α lives on a grid, ``2^(k/4)`` for integer ``k`` (quarter octaves), so that the artifacts of
every search are shared and their keys are deterministic. The search (``search_index``) expands by two octaves
from α = 1 until the target is bracketed, then interpolates inside the bracket, and stops at the first α whose
held-out rate is within 1 % below or 3 % above the target (of the full size), or when the bracket is one grid
step wide. The α used (``choose``) keeps the paper's rule whenever a rate within 1 % below the target was
found; otherwise it is the nearest α above the target, and the method's budget guard (``DynaKV.finish``) raises
the threshold of each prompt just enough. Each probe costs one training run, so a search costs a few. A search's
outcome (every probe's α and held-out rate, and the α chosen) is an artifact of its own (``dynakv-alpha``, a few
hundred bytes), so a later run, or a package shipping artifacts, needs only that record and the chosen α's gates.

The covariance basis that initialises ``U`` is an artifact of its own, shared by every α and needed only to train.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvbench import artifacts, calibration
from kvbench.artifacts import TensorSpec
from kvbench.methods.dynakv.spectral import SpectralGates, Training, rank_dtype
from kvbench.methods.lowrank.allocation import POSITION_DTYPE

STEPS_PER_OCTAVE = 4
MIN_INDEX, MAX_INDEX = -40, 48  # α from 2^-10 to 2^12
START_INDEX = 0
BELOW, ABOVE = 0.01, 0.03  # a held-out rate this close to the target (of the full size) ends the search
HELDOUT_EVERY = 8


def alpha_at(index: int) -> float:
    return 2.0 ** (index / STEPS_PER_OCTAVE)


def search_index(rate: Callable[[int], float], target: float) -> int:
    """The grid index whose held-out ``rate`` (non-increasing in α) is nearest the ``target``, as described above."""
    tried: dict[int, float] = {}

    def probe(index: int) -> bool:
        tried[index] = rate(index)
        return target - BELOW <= tried[index] <= target + ABOVE

    index, above, below = START_INDEX, None, None  # above: rate > target (α too small); below: rate <= target
    while not probe(index):
        if tried[index] > target:
            above = index
        else:
            below = index
        if above is not None and below is not None:
            break
        index += 2 * STEPS_PER_OCTAVE if below is None else -2 * STEPS_PER_OCTAVE
        if not MIN_INDEX <= index <= MAX_INDEX:
            break
    else:
        above = below = None  # the last probe is within the window
    while above is not None and below is not None and below - above > 1:
        high, low = tried[above], tried[below]
        guess = above + (high - target) / max(high - low, 1e-9) * (below - above)
        index = min(max(round(guess), above + 1), below - 1)
        if probe(index):
            break
        if tried[index] > target:
            above = index
        else:
            below = index
    return choose(tried, target)


def choose(tried: dict[int, float], target: float) -> int:
    """The probe to use: the largest rate within ``BELOW`` under the target (no guard needed on held-out text),
    else the smallest rate above it (the budget guard trims what exceeds), else the largest rate under it."""
    near = [i for i, r in tried.items() if target - BELOW <= r <= target]
    over = [i for i, r in tried.items() if r > target]
    if near:
        return max(near, key=lambda i: tried[i])
    if over:
        return min(over, key=lambda i: (tried[i], -i))
    return max(tried, key=lambda i: (tried[i], -i))


@dataclass
class Trained:
    """Gates trained at one α, and what they keep on held-out text at ``tau``."""

    gates: SpectralGates
    alpha: float
    ranks: torch.Tensor  # [layers, 2]: mean hard rank of K and V on held-out chunks, in dimensions
    meta: dict[str, Any]
    path: Path

    @property
    def fraction(self) -> float:
        """The held-out rate the paper reports: the mean fraction of dimensions kept (no metadata)."""
        return float(self.ranks.mean()) / self.gates.dim


class GateLibrary:
    """Per model: the covariance basis, and gates trained at any α, loaded or built (and saved) on first use."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, settings: Training, tau: float,
                 calibration_tokens: int, seed: int, data: str, chunk_tokens: int, basis: str = "centred") -> None:
        self.model, self.settings, self.tau = model, settings, tau
        self.data = calibration.calibration_data(tokenizer, calibration_tokens, seed, data or None, chunk_tokens)
        chunks = self.data.chunks
        if len(chunks) < 2:
            raise calibration.CalibrationDataError("DynaKV needs at least two calibration chunks (one is held out)")
        held = {i for i in range(len(chunks)) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1} or {len(chunks) - 1}
        self.heldout = [c for i, c in enumerate(chunks) if i in held]
        self.fit = [c for i, c in enumerate(chunks) if i not in held]
        config = model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.layers, self.dim = config.num_hidden_layers, config.num_key_value_heads * head_dim
        self.data_key = {"calibration_tokens": calibration_tokens, "seed": seed, "chunk_tokens": chunk_tokens,
                         "source": self.data.source} | ({} if basis == "centred" else {"basis": basis})
        self.centred = basis == "centred"
        self._basis: torch.Tensor | None = None
        self._trained: dict[float, Trained] = {}
        self.basis_path: Path | None = None
        self._searches: dict[float, dict[str, Any]] = {}
        self.search: dict[str, Any] = {}  # the record of the last α search (``for_fraction``)

    def basis(self) -> torch.Tensor:
        """``[layers, 2, d, d]``: the PCA eigenvectors of the K and V covariance on the training chunks."""
        if self._basis is None:
            def build() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
                from kvbench.methods.dynakv.training import pca_basis

                vectors, values = pca_basis(self.model, self.fit, centred=self.centred)
                return {"chunks": len(self.fit)}, {"basis": vectors, "eigenvalues": values}

            shape = (self.layers, 2, self.dim)
            specs = {"basis": TensorSpec((*shape, self.dim)), "eigenvalues": TensorSpec(shape)}
            artifact, self.basis_path = artifacts.load_or_build(self.model, "dynakv-basis", self.data_key,
                                                                self.data.fingerprint, build, lambda meta: specs)
            self._basis = artifact["tensors"]["basis"]
        return self._basis

    def at(self, alpha: float, force: bool = False) -> Trained:
        """Gates trained at ``alpha`` (loaded, or trained and saved), with their held-out ranks at ``tau``."""
        alpha = float(f"{alpha:.6g}")
        if alpha in self._trained and not force:
            return self._trained[alpha]
        key = {"alpha": alpha, "training": self.settings.key(), **self.data_key}
        device = next(self.model.parameters()).device

        def build() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
            from kvbench.methods.dynakv.training import heldout_ranks, train

            gates = SpectralGates(self.layers, self.dim).to(device)
            with torch.no_grad():
                gates.basis.copy_(self.basis())  # the covariance basis is needed to train, not to load
            curve = train(self.model, gates, self.fit, alpha, self.settings)
            ranks = heldout_ranks(self.model, gates, self.heldout, self.tau)
            tokens = sum(self.fit[i % len(self.fit)].shape[1] for i in range(self.settings.steps))
            meta = {"loss_curve": curve, "train_steps": self.settings.steps, "train_tokens": tokens,
                    "heldout_tokens": sum(c.shape[1] for c in self.heldout),
                    "heldout_ranks": {str(self.tau): ranks.tolist()}}
            return meta, {name: t.detach().cpu() for name, t in gates.named_parameters()}

        shape = (self.layers, 2, self.dim)
        specs = {"basis": TensorSpec((*shape, self.dim)), "weight": TensorSpec((*shape, self.dim)),
                 "bias": TensorSpec(shape)}
        artifact, path = artifacts.load_or_build(self.model, "dynakv-paper", key, self.data.fingerprint, build,
                                                 lambda meta: specs, force=force)
        gates = SpectralGates(self.layers, self.dim)
        gates.load_state_dict(artifact["tensors"])
        gates = gates.to(device).freeze()
        meta = artifact["meta"]
        measured = meta.get("heldout_ranks", {}).get(str(self.tau))
        if measured is None:  # another tau than the artifact was measured at: measure now (not saved)
            from kvbench.methods.dynakv.training import heldout_ranks

            ranks = heldout_ranks(self.model, gates, self.heldout, self.tau)
        else:
            ranks = torch.tensor(measured)
        self._trained[alpha] = Trained(gates, alpha, ranks, meta, path)
        return self._trained[alpha]

    def for_fraction(self, fraction: float) -> Trained:
        """Gates whose held-out rate (fraction of dimensions kept) meets ``fraction`` (``search_index``)."""
        if fraction * self.dim < 1:
            raise ValueError(f"DynaKV keeps at least one coefficient per token: a rate of {fraction:.3g} of "
                             f"{self.dim} dimensions is below it")
        key = {"target": round(fraction, 6), "tau": self.tau, "training": self.settings.key(), **self.data_key}
        if key["target"] in self._searches:
            self.search = self._searches[key["target"]]
            return self.at(self.search["alpha"])

        def build() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
            probes: dict[int, float] = {}

            def rate(index: int) -> float:
                probes[index] = self.at(alpha_at(index)).fraction
                return probes[index]

            chosen = alpha_at(search_index(rate, key["target"]))
            table = torch.tensor([[alpha_at(i), r] for i, r in sorted(probes.items())], dtype=torch.float64)
            seconds = sum(self.at(alpha_at(i)).meta.get("calibration_s", 0.0) for i in probes)
            return {"alpha": float(f"{chosen:.6g}"), "probes": table.tolist(), "search_s": round(seconds, 1)}, {
                "probes": table}

        record, _ = artifacts.load_or_build(self.model, "dynakv-alpha", key, self.data.fingerprint, build,
                                            lambda meta: {"probes": TensorSpec((None, 2))})
        self.search = self._searches[key["target"]] = record["meta"]
        in_use = {search["alpha"] for search in self._searches.values()}
        self._trained = {alpha: trained for alpha, trained in self._trained.items() if alpha in in_use}  # probes go
        return self.at(self.search["alpha"])


def metadata_fraction(dim: int, element_size: int) -> float:
    """The share of a full token's bytes (K and V, ``2 d`` numbers) that DynaKV's per-token metadata takes:
    its position (int32) and its K and V ranks."""
    return (POSITION_DTYPE.itemsize + 2 * rank_dtype(dim).itemsize) / (2 * dim * element_size)


def dims_for_budget(budget: float, dim: int, element_size: int) -> float:
    """The fraction of dimensions a token may keep on average within ``budget`` of the full bytes."""
    return min(1.0, budget - metadata_fraction(dim, element_size))
