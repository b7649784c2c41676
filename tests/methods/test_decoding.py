"""Decoding-phase compression: any token method keeps the cache under budget while generating."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GenerationConfig

from kvbench.methods.adakv import AdaKV
from kvbench.methods.base import LayerInputs
from kvbench.methods.h2o import H2O
from kvbench.methods.keydiff import KeyDiff
from kvbench.methods.knorm import KNorm
from kvbench.methods.pyramidkv import PyramidKV
from kvbench.methods.snapkv import SnapKV
from kvbench.methods.streamingllm import StreamingLLM
from kvbench.methods.tova import TOVA
from kvbench.spec import SpecError, parse_spec
from kvbench.testing import VOCAB, compress

PROMPT, STEPS, BUDGET, INTERVAL = 64, 24, 0.25, 4


def prefill(model, prompt, method):
    compressed = compress(model, method, BUDGET, prompt, logits_to_keep=0)
    cache, logits = compressed.cache, compressed.logits
    return cache, logits[:, -1:].argmax(-1)


def manual_loop(model, prompt, method, check=None) -> list[int]:
    cache, token = prefill(model, prompt, method)
    tokens = []
    with torch.inference_mode():
        for step in range(STEPS):
            tokens.append(token.item())
            position = torch.tensor([[PROMPT + step]])
            token = model(token, past_key_values=cache, position_ids=position).logits[:, -1:].argmax(-1)
            if check:
                check(cache)
    return tokens


METHODS = [StreamingLLM, KNorm, KeyDiff, SnapKV, TOVA, H2O, AdaKV, PyramidKV]


def make_method(cls, **options):
    if cls is PyramidKV:  # a pyramid that fits 64 tokens at budget 0.25: layers keep different counts
        options |= dict(window=2, beta=2)
    return cls(**options)


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.name)
def test_held_tokens_never_exceed_budget_plus_interval(llama, cls):
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    method = make_method(cls, decoding=True, interval=INTERVAL)
    sizes: dict[int, set[float]] = {}

    def check(cache):
        seen = cache.get_seq_length()
        for layer_idx, layer in enumerate(cache.layers):
            probe = LayerInputs(layer.keys, layer.values, layer.keys, layer_idx, 1.0, 0, seen)
            target = method.keep_count(probe, BUDGET)  # floor(budget x seen); per layer for pyramidkv
            assert layer.tokens_per_head() <= target + INTERVAL, (layer_idx, seen, layer.tokens_per_head())
            sizes.setdefault(layer_idx, set()).add(layer.tokens_per_head())

    manual_loop(llama, prompt, method, check)
    assert all(len(s) > 3 for s in sizes.values())  # the cache was cut back and grew again
    grown = prefill(llama, prompt, make_method(cls))[0]  # without decoding compression a layer would reach
    for layer_idx, layer in enumerate(grown.layers):  # what it kept of the prompt + STEPS
        assert max(sizes[layer_idx]) < layer.tokens_per_head() + STEPS


@pytest.mark.parametrize("make", [H2O, SnapKV, AdaKV], ids=lambda m: m.name)
def test_generate_equals_the_manual_loop_while_compressing(llama, make):
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    manual = manual_loop(llama, prompt, make(decoding=True, interval=INTERVAL))
    cache, first = prefill(llama, prompt, make(decoding=True, interval=INTERVAL))
    config = GenerationConfig(do_sample=False, max_new_tokens=STEPS - 1, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        out = llama.generate(torch.cat([prompt, first], 1), past_key_values=cache, generation_config=config)
    assert out[0, PROMPT:].tolist() == manual
    assert cache.get_seq_length() == PROMPT + STEPS - 1
    assert max(cache.held_tokens()) <= math.floor(BUDGET * (PROMPT + STEPS)) + INTERVAL


def test_without_decoding_the_cache_grows_by_one_token_per_step(llama):
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    held = []
    manual_loop(llama, prompt, SnapKV(), lambda cache: held.append(cache.held_tokens()[0]))
    assert held == list(range(16 + 1, 16 + STEPS + 1))


def test_h2o_decoding_keeps_running_scores_and_counts_them(llama):
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    cache, _ = prefill(llama, prompt, H2O(decoding=True, interval=1))
    layer = cache.layers[0]
    assert layer.scores.shape == layer.keys.shape[:3]
    tensors = layer.keys.nbytes + layer.values.nbytes + layer.scores.nbytes
    assert layer.nbytes() == tensors  # the running sums are part of what the method stores
    assert BUDGET - 0.01 < cache.nbytes() / cache.full_nbytes() <= BUDGET  # ... and paid for with fewer tokens
    # Every prompt query's attention sums to one per query head: the sums hold all of it, before eviction.
    total = H2O().score(_layer_inputs(llama, prompt)).sum()
    assert math.isclose(float(total), PROMPT * llama.config.num_attention_heads, rel_tol=1e-4)
    manual_loop(llama, prompt, H2O(decoding=True, interval=1),
                lambda c: [_assert_le(lay.held_tokens(), math.floor(BUDGET * c.get_seq_length()) + 1)
                           for lay in c.layers])


def _assert_le(a, b):
    assert a <= b


def _layer_inputs(model, prompt):
    """Layer 0's full keys and queries of a prompt, captured through a reference method."""
    captured = {}

    class Capture(H2O):
        def compress(self, layer, inputs, budget):
            captured.setdefault(inputs.layer_idx, inputs)

    compress(model, Capture(), 1.0, prompt)
    return captured[0]


def test_decoding_options_are_validated():
    assert parse_spec("snapkv:decoding=true,interval=8").canonical == "snapkv:decoding=True,interval=8"
    with pytest.raises(SpecError, match="interval"):
        parse_spec("knorm:interval=0")
