"""DynaKV: token-wise adaptive low-rank KV states. ``gate=paper`` (default) is the paper's method (``spectral``,
``training``, ``library``, ``prefix``); ``gate=ranker`` is kvbench's variant (``ranker``, ``ranker_variant``,
``storage``). ``method`` holds the options and hooks of both."""

from kvbench.methods.dynakv.method import DynaKV

__all__ = ["DynaKV"]
