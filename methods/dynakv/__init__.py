"""DynaKV: token-wise adaptive low-rank KV latents (gates, training, ragged storage)."""

from kvbench.methods.dynakv.method import DynaKV

__all__ = ["DynaKV"]
