"""MixedDimKV and MixedDimKV-H: a dimension per token from a candidate set, eviction being 0 or all.

``projections``: per-head nested bases and per-token errors; ``allocation``: the loss-minimising choice within a
head's budget; ``storage``: grouped storage and attention (imports transformers: loaded only with a cache);
``calibration``: calibration moments for ``projections=calibration``; ``method``: the two methods.
"""

from kvbench.methods.mixeddim.method import MixedDimKV, MixedDimKVH

__all__ = ["MixedDimKV", "MixedDimKVH"]
