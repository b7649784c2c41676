"""Built-in compression methods, one module each."""

from kvbench.methods.base import Full, LayerInputs, Method, TokenMethod
from kvbench.methods.knorm import KNorm
from kvbench.methods.random import RandomEviction
from kvbench.methods.snapkv import SnapKV
from kvbench.methods.streamingllm import StreamingLLM

BUILTIN_METHODS: tuple[type[Method], ...] = (Full, RandomEviction, StreamingLLM, SnapKV, KNorm)

__all__ = ["BUILTIN_METHODS", "LayerInputs", "Method", "TokenMethod"]
