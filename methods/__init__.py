"""Built-in compression methods, one module each."""

from kvbench.methods.adakv import AdaKV
from kvbench.methods.base import Full, LayerInputs, Method, TokenMethod
from kvbench.methods.dynakv import DynaKV
from kvbench.methods.expected_attention import ExpectedAttention
from kvbench.methods.h2o import H2O
from kvbench.methods.keydiff import KeyDiff
from kvbench.methods.knorm import KNorm
from kvbench.methods.palu import Palu
from kvbench.methods.pyramidkv import PyramidKV
from kvbench.methods.random import RandomEviction
from kvbench.methods.snapkv import SnapKV
from kvbench.methods.streamingllm import StreamingLLM
from kvbench.methods.tova import TOVA

BUILTIN_METHODS: tuple[type[Method], ...] = (Full, RandomEviction, StreamingLLM, SnapKV, KNorm, Palu, DynaKV,
                                              H2O, TOVA, PyramidKV, AdaKV, KeyDiff, ExpectedAttention)

__all__ = ["BUILTIN_METHODS", "LayerInputs", "Method", "TokenMethod"]
