"""KVCompose: composite tokens, global allocation across layers, task attention in chunks, packed unstructured heads."""

from __future__ import annotations

import math

import pytest
import torch

from kvbench.layers import CompressedLayer, PerHeadLayer
from kvbench.methods import kvcompose
from kvbench.methods.base import Full
from kvbench.methods.kvcompose import KVCompose, task_attention
from kvbench.spec import SpecError, parse_spec
from kvbench.testing import compress, random_prompt, stored_bytes


def kept_positions(layer: CompressedLayer, reference: CompressedLayer) -> list[list[int]]:
    """Per KV head, the prompt positions whose keys the layer holds (in stored order)."""
    found = []
    for head, ref in zip(layer.keys[0], reference.keys[0], strict=True):
        match = torch.cdist(head.float(), ref.float()).argmin(dim=-1)
        assert torch.equal(ref[match], head)
        found.append(match.tolist())
    return found


def test_task_attention_in_chunks_is_the_softmax_of_the_task_queries(monkeypatch):
    torch.manual_seed(0)
    queries, keys = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 30, 8)
    logits = torch.einsum("bhqd,bhtd->bhqt", queries, keys.repeat_interleave(2, dim=1)) * 0.3
    causal = torch.ones(12, 30, dtype=torch.bool).tril(30 - 12)
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)[..., :18]
    monkeypatch.setattr(kvcompose, "CHUNK_ELEMENTS", {"cpu": 4 * 30 * 5})  # 5 queries per chunk
    assert torch.allclose(task_attention(queries, keys, 0.3, 18, "max"), probs.amax(dim=2), atol=1e-6)
    assert torch.allclose(task_attention(queries, keys, 0.3, 18, "mean"), probs.mean(dim=2), atol=1e-6)


@pytest.mark.parametrize("task", ["refeed", "window"])
def test_structured_layers_are_dense_composite_tokens_within_the_global_budget(model, prompt, task):
    method = KVCompose(task=task)
    compressed = compress(model, method, 0.25, prompt)
    full = compress(model, Full(), 1.0, prompt).cache
    cache = compressed.cache
    n, layers = prompt.shape[1], len(cache.layers)
    lengths = cache.held_tokens()
    assert sum(lengths) == math.floor(0.25 * layers * n)  # the global allocation, unevenly spread
    assert lengths[0] == max(lengths)  # layer 0 takes the max over layers
    assert compressed.kv_bytes == stored_bytes(compressed) == sum(lengths) * full.layers[0].nbytes() // n
    for layer, reference in zip(cache.layers, full.layers, strict=True):
        assert type(layer) is CompressedLayer and layer.keys.shape[:2] == (1, model.config.num_key_value_heads)
        assert layer.get_seq_length() == n  # the re-fed copy is gone, later tokens take their true positions
        positions = kept_positions(layer, reference)
        assert all(p == sorted(p) for p in positions)  # positional order within each head
    assert len({tuple(p) for p in kept_positions(cache.layers[1], full.layers[1])}) > 1  # heads keep their own


def test_each_head_keeps_its_own_top_tokens(llama, prompt, monkeypatch):
    recorded = []
    original = KVCompose.head_scores

    def spy(self, cache):
        recorded.append(original(self, cache))
        return recorded[-1]

    monkeypatch.setattr(KVCompose, "head_scores", spy)
    cache = compress(llama, KVCompose(), 0.25, prompt).cache
    full = compress(llama, Full(), 1.0, prompt).cache
    for layer, reference, layer_scores in zip(cache.layers, full.layers, recorded[0], strict=True):
        expected = layer_scores[0].topk(layer.held_tokens(), dim=-1).indices.sort(dim=-1).values.tolist()
        assert kept_positions(layer, reference) == expected


def test_unstructured_heads_are_packed_with_their_own_counts(model, prompt):
    compressed = compress(model, KVCompose(structured=False), 0.25, prompt)
    n = prompt.shape[1]
    lengths = torch.stack([layer.lengths for layer in compressed.cache.layers])
    assert all(type(layer) is PerHeadLayer and layer.packed for layer in compressed.cache.layers)
    assert int(lengths.sum()) == math.floor(0.25 * lengths.numel() * n) - 1  # 6 lengths: one token's bytes
    assert lengths.min() >= 1 and len(set(lengths.flatten().tolist())) > 1
    assert compressed.kv_bytes == stored_bytes(compressed)
    for layer in compressed.cache.layers:
        assert layer.packed_keys.shape[0] == int(layer.lengths.sum()) and layer.packed_keys.dim() == 2  # no padding


def test_budget_one_keeps_everything_and_skips_the_task_pass(llama, prompt):
    compressed = compress(llama, KVCompose(), 1.0, prompt)
    assert compressed.achieved_budget == 1.0
    assert compressed.cache.held_tokens() == [prompt.shape[1]] * len(compressed.cache.layers)


def test_value_norm_and_lower_bound_change_the_selection(llama):
    prompt = random_prompt(120, seed=4)
    plain = compress(llama, KVCompose(), 0.1, prompt).cache.held_tokens()
    bounded = compress(llama, KVCompose(keep_token_lower_bound=10), 0.1, prompt).cache.held_tokens()
    assert min(bounded) >= 10 and bounded != plain and sum(bounded) == sum(plain) == 36  # floor(0.1 x 3 x 120)
    with pytest.raises(ValueError, match="keeps 36 tokens, fewer than 30 for each of 3"):  # the floor alone is over
        compress(llama, KVCompose(keep_token_lower_bound=30), 0.1, prompt)
    assert compress(llama, KVCompose(add_v_norm=True), 0.1, prompt).achieved_budget <= 0.1 + 1e-9


@pytest.mark.parametrize("spec", ["kvcompose:agg_task=sum", "kvcompose:task=question", "kvcompose:window=0",
                                  "kvcompose:keep_token_lower_bound=-1"])
def test_bad_options_are_one_line_spec_errors(spec):
    with pytest.raises(SpecError, match="kvcompose"):
        parse_spec(spec)


def test_kvcompose_cannot_be_composed():
    with pytest.raises(SpecError):
        parse_spec("palu+kvcompose")


def test_every_layers_floor_is_inside_the_global_allocation():
    """With as many tokens to keep as layers, a layer whose composite scores lose everywhere still keeps its one
    token, taken from the others' (the reference raises it afterwards and keeps one token too many); fewer tokens
    than layers (or heads) is refused."""
    scores = torch.stack([torch.full((1, 2, 10), 5.0), torch.full((1, 2, 10), 9.0), torch.full((1, 2, 10), 1.0)])
    scores = scores + torch.linspace(0, 0.5, 10)  # [layers 3, batch 1, kv_heads 2, 10 tokens]
    assert KVCompose().layer_lengths(scores, 0.1) == [1, 1, 1]  # floor(0.1 x 3 x 10) = 3 tokens
    assert KVCompose().head_lengths(scores, 0.1).flatten().tolist() == [1] * 6  # floor(0.1 x 3 x 2 x 10) = 6 heads
    assert KVCompose().head_lengths(scores, 0.2, reserve=2).sum() == 10  # 12 less what the lengths cost
    with pytest.raises(ValueError, match="fewer than 1 for each of 3 layers"):
        KVCompose().layer_lengths(scores, 0.05)
    with pytest.raises(ValueError, match="fewer than 1 for each of 6 layers or heads"):
        KVCompose().head_lengths(scores, 0.05)
