"""Low-rank (dimension) machinery shared by dimension methods.

``codec``: latent codec and latent layer storage; ``statistics``: K/V statistics on calibration text;
``allocation``: ranks within a byte budget; ``method``: the ``LowRankMethod`` base. Import the module you need:
the storage modules load transformers, the method modules do not.
"""
