"""HeadKV (Fu et al., ICLR 2025): head-level KV budgets from retrieval-reasoning head scores.

``method``: the method; ``allocation``: head scores (profiled or from HeadKV's JSON) and per-head budgets, shared
with MixedDimKV-H; ``profile``: the offline retrieval-reasoning head profiling.
"""

from kvbench.methods.headkv.method import HeadKV

__all__ = ["HeadKV"]
