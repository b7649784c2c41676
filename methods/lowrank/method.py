"""Base of dimension (low-rank) methods: calibration options, the shared K/V statistics, bases, error curves.

Subclasses implement ``compress_kept``: store a layer's held tokens as latents within a byte budget. The
statistics artifact (``statistics.kv_statistics``) is shared by every dimension method of a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvbench.methods.base import LayerInputs, Method
from kvbench.methods.lowrank.statistics import (
    KVStatistics,
    group_slices,
    heldout_error_curve,
    kv_statistics,
    principal_basis,
)
from kvbench.rope import rotary_module

if TYPE_CHECKING:
    from kvbench.layers import CompressedLayer
    from kvbench.methods.lowrank.codec import LowRankCodec


@dataclass
class LowRankMethod(Method):
    """Base of dimension methods: calibration options and the K/V statistics they fit their bases on.

    ``calibration_tokens`` of SQuAD's calibration articles (or ``data``, a text/jsonl file) are run through the
    model once per model and data; the statistics artifact is shared by every dimension method.
    """

    family: ClassVar[str] = "dimension"
    layout: ClassVar[str] = "kvbench.methods.lowrank.codec:LatentLayer"

    calibration_tokens: int = 16384
    calibration_seed: int = 0
    data: str = ""

    def __post_init__(self) -> None:
        if self.calibration_tokens < 64:
            raise ValueError("calibration_tokens must be at least 64")
        # Calibration state, not options (so not dataclass fields): set by prepare().
        self.stats: KVStatistics | None = None
        self.rotary: torch.nn.Module | None = None
        self.calibration_meta: dict[str, Any] = {}
        self.artifact: Path | None = None
        self._bases: dict[tuple[int, str, int], torch.Tensor] = {}

    @property
    def calibration_chunk_tokens(self) -> int:
        """Tokens per calibration chunk: 512, or less for tiny calibrations (at least 4 chunks)."""
        return min(512, self.calibration_tokens // 4)

    def prepare(self, model: torch.nn.Module, tokenizer: Any, force: bool = False) -> None:
        """Load the K/V statistics artifact, or calibrate (progress bar) and save it on first use."""
        self.stats, self.calibration_meta, self.artifact = kv_statistics(
            model, tokenizer, self.calibration_tokens, self.calibration_seed, self.data or None,
            chunk_tokens=self.calibration_chunk_tokens, force=force)
        self.rotary = rotary_module(model)
        self._bases = {}

    def calibrate(self, model: torch.nn.Module, tokenizer: Any, force: bool = False) -> Path:
        """``python -m kvbench calibrate``: build (or check) the method's artifacts; returns the main one's path."""
        self.prepare(model, tokenizer, force=force)
        return self.artifact

    def _require_stats(self) -> KVStatistics:
        if self.stats is None:
            raise RuntimeError(f"{self.name} is not calibrated: call prepare(model, tokenizer) first")
        return self.stats

    def group_bases(self, layer_idx: int, kind: str, group_size: int) -> torch.Tensor:
        """``[groups, group_dim, group_dim]`` principal bases of one layer's ``kind`` ("key"/"value") per group."""
        key = (layer_idx, kind, group_size)
        if key not in self._bases:
            stats = self._require_stats()
            moment = getattr(stats, f"{kind}_fit")[layer_idx]
            slices = group_slices(stats.kv_heads, stats.head_dim, group_size)
            self._bases[key] = torch.stack([principal_basis(moment[s, s])[0] for s in slices])
        return self._bases[key]

    def error_curve(self, layer_idx: int, kind: str, group_size: int) -> torch.Tensor:
        """Held-out relative error of one layer's ``kind`` at every per-group rank, over all its groups."""
        stats = self._require_stats()
        heldout = getattr(stats, f"{kind}_heldout")[layer_idx]
        slices = group_slices(stats.kv_heads, stats.head_dim, group_size)
        bases = self.group_bases(layer_idx, kind, group_size)
        residual = sum(heldout_error_curve(b, heldout[s, s]) * heldout[s, s].trace()
                       for b, s in zip(bases, slices, strict=True))
        return residual / heldout.trace().clamp_min(1e-30)

    def codec(self, layer_idx: int, group_size: int, key_rank: int, value_rank: int, device: torch.device,
              dtype: torch.dtype) -> LowRankCodec:
        from kvbench.methods.lowrank.codec import LowRankCodec

        stats = self._require_stats()
        keys = self.group_bases(layer_idx, "key", group_size)[..., :key_rank]
        values = self.group_bases(layer_idx, "value", group_size)[..., :value_rank]
        return LowRankCodec(keys.to(device, dtype), values.to(device, dtype), stats.kv_heads, stats.head_dim,
                            self.rotary)

    def compress(self, layer: CompressedLayer, inputs: LayerInputs, budget: float) -> None:
        self.compress_kept(layer, inputs, budget, None)

    def compress_kept(self, layer: CompressedLayer, inputs: LayerInputs, budget: float,
                      positions: torch.Tensor | None) -> None:
        """Store the layer's held tokens (at ``positions``, default: all prompt tokens) in ``budget`` of their bytes."""
        raise NotImplementedError
