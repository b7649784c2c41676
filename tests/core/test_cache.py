"""The compressed cache physically shrinks, keeps GQA, and keeps positions right."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from transformers import GenerationConfig

from kvbench.cache import CompressedCache
from kvbench.layers import CompressedLayer, causal_mask
from kvbench.methods import TokenMethod
from kvbench.methods.base import Full
from kvbench.methods.knorm import KNorm
from kvbench.registry import METHODS
from kvbench.testing import compress

TOKEN_METHODS = [cls for cls in METHODS.all().values() if issubclass(cls, TokenMethod)]
# pyramidkv and adakv keep different counts per layer / per head: tests/test_methods_more.py checks their shapes.
UNIFORM_TOKEN_METHODS = [cls for cls in TOKEN_METHODS if cls.uniform]
GREEDY = GenerationConfig(do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=None)


def prefill(model, prompt, method, budget, seed=0) -> tuple[CompressedCache, torch.Tensor]:
    compressed = compress(model, method, budget, prompt, seed)
    return compressed.cache, compressed.logits[:, -1].argmax(-1, keepdim=True)


def continue_generation(model, prompt, cache, first) -> list[int]:
    """The first token and the 8 greedy tokens decoded after it."""
    with torch.inference_mode():
        out = model.generate(torch.cat([prompt, first], 1), past_key_values=cache, generation_config=GREEDY)
    return out[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("method_cls", UNIFORM_TOKEN_METHODS, ids=lambda c: c.name)
@pytest.mark.parametrize("budget", [0.5, 0.1])
def test_cache_shrinks_per_kv_head(model, prompt, method_cls, budget):
    cache, first = prefill(model, prompt, method_cls(), budget)
    config = model.config
    n_keep = math.floor(budget * prompt.shape[1])
    head_dim = config.hidden_size // config.num_attention_heads
    for layer in cache.layers:
        # GQA layout kept: one entry per KV head, never one per query head.
        assert layer.keys.shape == (1, config.num_key_value_heads, n_keep, head_dim)
        assert layer.values.shape == layer.keys.shape
        assert layer.keys.is_contiguous()
    assert cache.full_nbytes() == 2 * config.num_hidden_layers * config.num_key_value_heads * 96 * head_dim * 4
    assert cache.nbytes() == cache.full_nbytes() * n_keep // 96
    assert abs(cache.nbytes() / cache.full_nbytes() - budget) <= 1 / 96  # within one token per head
    assert cache.get_seq_length() == 96
    generated = continue_generation(model, prompt, cache, first)
    assert len(generated) == 9
    assert cache.get_seq_length() == 96 + 8  # logical length: tokens seen
    assert cache.held_tokens() == [n_keep + 8] * config.num_hidden_layers


@pytest.mark.parametrize("method_cls", [Full, *TOKEN_METHODS], ids=lambda c: c.name)
def test_keeping_every_token_matches_full(model, prompt, method_cls):
    cache, first = prefill(model, prompt, method_cls(), 1.0)
    assert cache.nbytes() == cache.full_nbytes()
    with torch.inference_mode():
        reference = model.generate(prompt, generation_config=GenerationConfig(
            do_sample=False, max_new_tokens=9, pad_token_id=0, eos_token_id=None))
    assert continue_generation(model, prompt, cache, first) == reference[0, 96:].tolist()


def test_positions_after_eviction_are_true_positions(llama, prompt):
    """generate() on an evicted cache equals a manual loop with explicit position ids."""
    from kvbench.methods.snapkv import SnapKV

    cache, first = prefill(llama, prompt, SnapKV(window=8), 0.25)
    generated = continue_generation(llama, prompt, cache, first)
    manual_cache, token = prefill(llama, prompt, SnapKV(window=8), 0.25)
    manual = [token.item()]
    with torch.inference_mode():
        for step in range(8):
            position = torch.tensor([[96 + step]])
            logits = llama(token, past_key_values=manual_cache, position_ids=position).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            manual.append(token.item())
    assert generated == manual


def test_question_chunk_after_eviction_is_causal(llama, prompt):
    """A multi-token chunk after eviction (query-agnostic question) sees no future token."""
    from kvbench.methods.knorm import KNorm

    chunked, _ = prefill(llama, prompt[:, :80], KNorm(), 0.25)
    stepped, _ = prefill(llama, prompt[:, :80], KNorm(), 0.25)
    with torch.inference_mode():
        together = llama(prompt[:, 80:], past_key_values=chunked).logits[0]
        one_by_one = torch.cat([llama(prompt[:, i:i + 1], past_key_values=stepped).logits[0] for i in range(80, 96)])
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-4)


def test_compression_without_kvbench_attention_is_refused(prompt):
    from transformers import LlamaConfig, LlamaForCausalLM

    plain = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    cache = CompressedCache(Full(), 1.0)
    with pytest.raises(RuntimeError, match="not compressed"), torch.inference_mode(), cache.compressing():
        plain(prompt, past_key_values=cache)


class SelfAttendingLayer(CompressedLayer):
    """Computes attention itself (after compression), as latent or grouped layouts do."""

    calls = 0

    def attend(self, query, scaling, attention_mask):
        if self.full_nbytes is None:
            return None  # the exact prefill runs the model's kernel
        SelfAttendingLayer.calls += 1
        keys = self.keys.repeat_interleave(query.shape[1] // self.keys.shape[1], dim=1)
        values = self.values.repeat_interleave(query.shape[1] // self.keys.shape[1], dim=1)
        mask = causal_mask(query.shape[2], keys.shape[2], keys.device)
        out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)
        return out.transpose(1, 2).contiguous()


@dataclass
class SelfAttending(KNorm):
    name: ClassVar[str] = "self-attending"
    layout: ClassVar[str] = f"{__name__}:SelfAttendingLayer"


def test_a_layer_that_attends_itself_decodes_exactly_like_the_kernel(llama, prompt):
    reference, first = prefill(llama, prompt, KNorm(), 0.25)
    own, own_first = prefill(llama, prompt, SelfAttending(), 0.25)
    assert continue_generation(llama, prompt, own, own_first) == continue_generation(llama, prompt, reference, first)
    assert SelfAttendingLayer.calls > 0


class GlobalEviction(KNorm):
    """Evicts after the whole forward (``finish``): every layer keeps layer 0's count, here half of it."""

    name: ClassVar[str] = "global-eviction"

    def compress(self, layer, inputs, budget):
        layer.scores = self.score(inputs)

    def finish(self, cache):
        for layer in cache.layers:
            keep = layer.scores.topk(layer.keys.shape[2] // 4, dim=-1).indices.sort(dim=-1).values
            layer.scores = None
            layer.keep(keep)


def test_finish_runs_after_every_layer_and_before_the_bytes_are_counted(llama, prompt):
    cache, _ = prefill(llama, prompt, GlobalEviction(), 0.25)
    assert cache.held_tokens() == [24, 24, 24] and cache.nbytes() == cache.full_nbytes() // 4
