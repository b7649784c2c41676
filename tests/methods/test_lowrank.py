"""Latent caches: exact at full rank, physically smaller, on budget, positions right while decoding."""

from __future__ import annotations

import pytest
import torch
from lowrank_helpers import TINY, ByteTokenizer, generate, prefill
from transformers import GenerationConfig

from kvbench.methods.lowrank.allocation import allocate_ranks
from kvbench.methods.lowrank.codec import LatentLayer, LowRankCodec
from kvbench.methods.lowrank.statistics import principal_basis
from kvbench.methods.palu import Palu
from kvbench.prefill import prepare
from kvbench.rope import apply_rope, cos_sin, rotary_module


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))


def palu(model, **options) -> Palu:
    method = Palu(**TINY, multiple=1, **options)
    prepare(method, model, ByteTokenizer())
    return method


def dims(model) -> tuple[int, int, int]:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, head_dim


def test_codec_round_trip_at_full_rank_restores_post_rope_keys(llama):
    _, kv_heads, head_dim = dims(llama)
    dim = kv_heads * head_dim
    basis = principal_basis(torch.randn(dim, dim, dtype=torch.float64).cov())[0].float()[None]
    codec = LowRankCodec(basis, basis, kv_heads, head_dim, rotary_module(llama))
    positions = torch.tensor([[0, 3, 17, 40, 41]])
    pre = torch.randn(1, kv_heads, 5, head_dim)
    cos, sin = cos_sin(codec.rotary, positions[0], torch.float32)
    keys, values = apply_rope(pre, cos, sin), torch.randn(1, kv_heads, 5, head_dim)
    key_latents, value_latents = codec.encode(keys, values, positions)
    assert key_latents.shape == (1, 5, dim)
    restored_keys, restored_values = codec.decode(key_latents, value_latents, positions)
    torch.testing.assert_close(restored_keys, keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(restored_values, values, atol=1e-5, rtol=1e-5)


def test_full_rank_latent_cache_matches_full(model, prompt):
    _, kv_heads, head_dim = dims(model)
    cache, logits = prefill(model, prompt, palu(model, rank=kv_heads * head_dim), 1.0)
    assert all(isinstance(layer, LatentLayer) and layer.keys is None for layer in cache.layers)
    with torch.inference_mode():
        reference_logits = model(prompt).logits
        reference = model.generate(prompt, generation_config=GenerationConfig(
            do_sample=False, max_new_tokens=9, pad_token_id=0, eos_token_id=None))
    torch.testing.assert_close(logits, reference_logits, atol=1e-4, rtol=1e-4)
    first = logits[:, -1].argmax(-1, keepdim=True)
    assert generate(model, prompt, cache, first) == reference[0, 96:].tolist()


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.1])
def test_latents_are_physically_smaller_and_land_on_the_budget(model, prompt, budget):
    layers, kv_heads, head_dim = dims(model)
    method = palu(model)
    cache, logits = prefill(model, prompt, method, budget)
    assert cache.full_nbytes() == 2 * layers * kv_heads * head_dim * 96 * 4
    measured = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.tensors())
    assert cache.nbytes() == measured
    assert budget - 0.01 <= cache.nbytes() / cache.full_nbytes() <= budget
    for layer, (key_rank, value_rank) in zip(cache.layers, method.ranks(budget, 4), strict=True):
        assert layer.key_latents.shape == (1, 96, key_rank) and layer.value_latents.shape == (1, 96, value_rank)
        assert layer.positions.dtype == torch.int32 and layer.positions[0].tolist() == list(range(96))
    per_token = cache.nbytes() // 96
    generated = generate(model, prompt, cache, logits[:, -1].argmax(-1, keepdim=True))
    assert len(generated) == 9 and cache.held_tokens() == [104] * layers and cache.get_seq_length() == 104
    assert cache.nbytes() == per_token * 104  # decoded tokens are stored as latents too


def test_greedy_allocation_prefers_the_steeper_curve_and_fits():
    steep = torch.tensor([1.0, 0.2, 0.1, 0.05, 0.0])
    flat = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2])
    ranks = allocate_ranks([steep, flat], costs=[1, 1], capacity=4, multiple=1)
    assert sum(ranks) == 4 and ranks == [1, 3]
    assert allocate_ranks([steep, flat], costs=[2, 1], capacity=5, multiple=1) == [1, 3]
    with pytest.raises(ValueError, match="too small"):
        allocate_ranks([steep, flat], costs=[1, 1], capacity=1, multiple=1)


def test_positions_after_compression_and_decoding_are_true_positions(llama, prompt):
    """generate() on a latent cache equals a manual loop with explicit position ids."""
    method = palu(llama)
    cache, logits = prefill(llama, prompt, method, 0.5)
    generated = generate(llama, prompt, cache, logits[:, -1].argmax(-1, keepdim=True))
    manual_cache, logits = prefill(llama, prompt, method, 0.5)
    token = logits[:, -1].argmax(-1, keepdim=True)
    manual = [token.item()]
    with torch.inference_mode():
        for step in range(8):
            logits = llama(token, past_key_values=manual_cache, position_ids=torch.tensor([[96 + step]])).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            manual.append(token.item())
    assert generated == manual
    assert manual_cache.layers[0].positions[0, -8:].tolist() == list(range(96, 104))


def test_question_chunk_on_a_latent_cache_is_causal(llama, prompt):
    method = palu(llama)
    chunked, _ = prefill(llama, prompt[:, :80], method, 0.25)
    stepped, _ = prefill(llama, prompt[:, :80], method, 0.25)
    with torch.inference_mode():
        together = llama(prompt[:, 80:], past_key_values=chunked).logits[0]
        one_by_one = torch.cat([llama(prompt[:, i:i + 1], past_key_values=stepped).logits[0] for i in range(80, 96)])
    torch.testing.assert_close(together, one_by_one, atol=1e-4, rtol=1e-4)
