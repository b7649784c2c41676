"""Prefill with compression: the one place where a method compresses a prompt's KV cache.

Every caller (the runner's generation and perplexity cells, ``bench``, the lm-eval bridge, training code that
needs an exact teacher pass, and the tests) goes through ``prefill``, so the sequence is written once: the
method must have been prepared for this model, its external hooks (``prefill_context``, e.g. a kvpress press)
are entered, the cache compresses each layer right after that layer's attention, and the bytes held before
and after compression are measured from the tensors.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from kvbench.cache import CompressedCache
from kvbench.measure import timed
from kvbench.methods.base import Method

_PREPARED = "_kvbench_prepared_for"


def prepare(method: Method, model: torch.nn.Module, tokenizer: Any) -> None:
    """Run the method's ``prepare`` for ``model`` (calibration, per-model settings) and record that it ran."""
    method.prepare(model, tokenizer)
    method.__dict__[_PREPARED] = weakref.ref(model)


def is_prepared(method: Method, model: torch.nn.Module) -> bool:
    prepared = method.__dict__.get(_PREPARED)
    return prepared is not None and prepared() is model


def cache_arguments(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The cache as the model's ``forward``/``generate`` take it: ``cache=`` where transformers has renamed it,
    ``past_key_values=`` on the older versions kvbench supports (so no deprecation warning either way)."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


@dataclass
class Prefill:
    """A compressed prompt: the cache (ready for decoding), the prompt's last logits, and what was measured."""

    cache: CompressedCache
    logits: torch.Tensor  # [batch, logits_to_keep, vocab]
    kv_bytes: int  # held right after compression
    full_kv_bytes: int  # held before compression (the uncompressed cache of the same prompt)
    seconds: float
    fields: dict[str, Any]  # the method's own row fields, e.g. ``masked``

    @property
    def achieved_budget(self) -> float:
        return self.kv_bytes / self.full_kv_bytes


def prefill(model: torch.nn.Module, method: Method, budget: float, input_ids: torch.Tensor, seed: int = 0,
            logits_to_keep: int = 1) -> Prefill:
    """Run ``input_ids`` through ``model`` once, compressing every layer's cache to ``budget`` with ``method``."""
    if not is_prepared(method, model):
        raise RuntimeError(f"{method.name} was not prepared for this model: call kvbench.prefill.prepare(method, "
                           "model, tokenizer) once after loading it")
    cache = CompressedCache(method, budget, seed)
    times: dict[str, float] = {}
    with torch.no_grad(), timed(input_ids.device, times, "prefill_s"), method.prefill_context(model, budget), \
            cache.compressing():
        logits = model(input_ids, **cache_arguments(model, cache), logits_to_keep=logits_to_keep).logits
    return Prefill(cache, logits, cache.nbytes(), cache.full_nbytes(), times["prefill_s"], method.row_fields(model))
