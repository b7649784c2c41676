"""kvbench: head-to-head benchmark of KV-cache compression methods with real memory savings."""

__version__ = "0.1.0"
