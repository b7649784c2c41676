"""Each token method keeps the tokens its paper says it keeps."""

from __future__ import annotations

import torch

from kvbench.methods.base import LayerInputs
from kvbench.methods.knorm import KNorm
from kvbench.methods.random import RandomEviction
from kvbench.methods.snapkv import SnapKV
from kvbench.methods.streamingllm import StreamingLLM


def inputs(n_tokens=40, kv_heads=2, group=3, head_dim=8, seed=0, layer_idx=0, queries=None, keys=None):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, kv_heads, n_tokens, head_dim, generator=g) if keys is None else keys
    values = torch.randn(1, kv_heads, n_tokens, head_dim, generator=g)
    if queries is None:
        queries = torch.randn(1, kv_heads * group, n_tokens, head_dim, generator=g)
    return LayerInputs(keys, values, queries, layer_idx, head_dim ** -0.5, seed)


def test_streamingllm_keeps_sinks_and_recent_window():
    kept = StreamingLLM().keep_indices(inputs(), budget=0.25)  # 10 of 40
    assert kept.shape == (1, 2, 10)
    assert kept[0, 0].tolist() == [0, 1, 2, 3, 34, 35, 36, 37, 38, 39]


def test_knorm_keeps_lowest_norm_keys():
    keys = torch.ones(1, 2, 40, 8)
    low = [5, 17, 22, 31]
    keys[:, :, low] = 0.1
    kept = KNorm().keep_indices(inputs(keys=keys), budget=0.1)
    assert kept[0, 0].tolist() == low and kept[0, 1].tolist() == low


def test_snapkv_keeps_window_and_the_tokens_the_window_attends_to():
    n, head_dim = 64, 8
    keys = torch.randn(1, 2, n, head_dim, generator=torch.Generator().manual_seed(3)) * 0.01
    queries = torch.zeros(1, 6, n, head_dim)
    needle = torch.zeros(head_dim)
    needle[0] = 50.0
    keys[0, 0, 20] = needle  # KV head 0: the window's queries point at token 20
    queries[0, :3, :, :] = needle / 10
    method = SnapKV(window=8, kernel=3)
    kept = method.keep_indices(inputs(queries=queries, keys=keys), budget=0.25)  # 16 tokens
    assert kept.shape == (1, 2, 16)
    assert set(range(56, 64)) <= set(kept[0, 0].tolist())  # the observation window is always kept
    assert {19, 20, 21} <= set(kept[0, 0].tolist())  # the attended token and its pooled neighbours


def test_snapkv_averages_votes_over_the_query_heads_of_a_gqa_group():
    layer = inputs(n_tokens=32, group=3)
    scores = SnapKV(window=4, kernel=1).score(layer)
    q = layer.queries[:, :, -4:].reshape(1, 2, 3, 4, 8)
    logits = torch.einsum("bhgwd,bhtd->bhgwt", q, layer.keys) * layer.scaling
    logits[..., 28:] = logits[..., 28:].masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    expected = logits.softmax(-1)[..., :28].sum(3).mean(2)
    torch.testing.assert_close(scores[..., :28], expected)


def test_random_is_seeded_and_differs_per_layer():
    method = RandomEviction()
    first = method.keep_indices(inputs(seed=1, layer_idx=0), 0.25)
    assert torch.equal(first, method.keep_indices(inputs(seed=1, layer_idx=0), 0.25))
    assert not torch.equal(first, method.keep_indices(inputs(seed=1, layer_idx=1), 0.25))


def test_budget_rounds_down_and_keeps_at_least_one_token():
    assert StreamingLLM().keep_indices(inputs(n_tokens=40), budget=0.06).shape[-1] == 2
    assert StreamingLLM().keep_indices(inputs(n_tokens=10), budget=0.01).shape[-1] == 1
    assert StreamingLLM().keep_indices(inputs(n_tokens=10), budget=1.0) is None
