"""Bootstrap confidence intervals over samples, so that a difference a handful of samples could flip is not
read as a win. Seeded and independent of row order: the same scores always give the same interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
_CHUNK_VALUES = 2_000_000  # resampled values held at once, whatever the sample count


@dataclass(frozen=True)
class Estimate:
    """A mean over samples and its percentile interval (NaN where too few samples to resample)."""

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def bootstrap_mean(strata: Sequence[Sequence[float]]) -> Estimate:
    """The mean of the strata's means, with a 95 % percentile interval from resampling each stratum's samples
    with replacement. One stratum per task keeps every task's weight fixed, as in the report's average; for
    paired comparisons the samples are the per-sample differences. The interval needs two samples in every
    stratum: a lone sample would resample to itself and look certain."""
    arrays = [np.sort(np.asarray(s, dtype=float)) for s in strata]  # sorted: the result ignores row order
    arrays = [a[np.isfinite(a)] for a in arrays]
    n = sum(len(a) for a in arrays)
    if not arrays or any(len(a) == 0 for a in arrays):
        return Estimate(math.nan, math.nan, math.nan, n)
    mean = float(np.mean([a.mean() for a in arrays]))
    if any(len(a) < 2 for a in arrays):
        return Estimate(mean, math.nan, math.nan, n)
    rng = np.random.default_rng(SEED)
    totals = np.zeros(RESAMPLES)
    for values in arrays:
        rows = max(1, _CHUNK_VALUES // len(values))
        for start in range(0, RESAMPLES, rows):
            stop = min(start + rows, RESAMPLES)
            picks = rng.integers(0, len(values), size=(stop - start, len(values)))
            totals[start:stop] += values[picks].mean(axis=1)
    totals /= len(arrays)
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(totals, [tail, 100 - tail])
    # Clamped so that the interval holds the mean even where all-equal samples differ from it in the last bit.
    return Estimate(mean, min(float(low), mean), max(float(high), mean), n)
