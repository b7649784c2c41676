"""H2O, TOVA, KeyDiff, Expected Attention keep what their papers say; PyramidKV and AdaKV store
per-layer / per-head lengths for real, and attention on them equals a masked full-cache reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_methods import inputs
from transformers import AttentionInterface, DynamicCache, GenerationConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvbench.layers import PerHeadLayer, causal_mask
from kvbench.methods.adakv import AdaKV
from kvbench.methods.expected_attention import ExpectedAttention
from kvbench.methods.h2o import H2O
from kvbench.methods.keydiff import KeyDiff
from kvbench.methods.pyramidkv import PyramidKV
from kvbench.methods.tova import TOVA
from kvbench.prefill import prepare
from kvbench.rope import apply_rope, cos_sin, rotary_module
from kvbench.testing import VOCAB, compress, tiny_model

N = 160  # prompt tokens for the model-level tests


def dense_attention(layer) -> torch.Tensor:
    """Softmax attention of every query on every key, ``[batch, heads, q, t]`` (test reference)."""
    q = layer.queries.shape[2]
    keys = layer.keys.repeat_interleave(layer.group_size, dim=1)
    logits = layer.queries @ keys.transpose(-1, -2) * layer.scaling
    return logits.masked_fill(~causal_mask(q, layer.keys.shape[2], keys.device), float("-inf")).softmax(-1)


# ---------------------------------------------------------------- scores


def test_h2o_chunked_scores_equal_the_full_attention_matrix():
    layer = inputs(n_tokens=50)
    expected = dense_attention(layer).sum(2).reshape(1, 2, 3, 50).sum(2)
    for chunk in (1, 7, 50, 512):
        torch.testing.assert_close(H2O(chunk=chunk).score(layer), expected)
    late = inputs(n_tokens=50, queries=torch.randn(1, 6, 13, 8, generator=torch.Generator().manual_seed(1)))
    expected = dense_attention(late).sum(2).reshape(1, 2, 3, 50).sum(2)  # the last 13 tokens' queries only
    for chunk in (1, 5, 13):
        torch.testing.assert_close(H2O(chunk=chunk).score(late), expected)


def test_h2o_keeps_recent_half_and_heavy_hitters():
    layer = inputs(n_tokens=40)
    kept = H2O().keep_indices(layer, budget=0.25)  # 10 tokens: 5 recent + 5 heaviest of the rest
    heavy = H2O().score(layer)[..., :35].topk(5).indices.sort().values
    for head in range(2):
        assert kept[0, head, -5:].tolist() == list(range(35, 40))
        assert kept[0, head, :5].tolist() == heavy[0, head].tolist()


def test_tova_uses_the_last_query_averaged_over_all_heads():
    layer = inputs(n_tokens=40)
    scores = TOVA().score(layer)
    last = dense_attention(layer)[:, :, -1]  # [1, 6, 40]
    torch.testing.assert_close(scores[0, 0, :-1], last.mean(1)[0, :-1])
    assert torch.equal(scores[:, 0], scores[:, 1])  # one selection shared by the KV heads
    assert 39 in TOVA().keep_indices(layer, 0.1)[0, 0].tolist()  # the last token is kept


def test_keydiff_keeps_keys_least_similar_to_the_mean_key():
    keys = torch.ones(1, 2, 40, 8) + 0.01 * torch.randn(1, 2, 40, 8, generator=torch.Generator().manual_seed(0))
    odd = [3, 11, 27, 30]
    keys[:, :, odd] = -torch.linspace(1, 2, 8)
    kept = KeyDiff().keep_indices(inputs(keys=keys), budget=0.1)
    assert kept[0, 0].tolist() == odd and kept[0, 1].tolist() == odd
    anchor = F.normalize(keys, dim=-1).mean(2, keepdim=True)
    torch.testing.assert_close(KeyDiff().score(inputs(keys=keys)), -F.cosine_similarity(keys, anchor, dim=-1))


def test_expected_attention_is_the_attention_of_the_rotated_mean_query(llama):
    """One query repeated at every position: mean = that query, covariance 0, so the score is the softmax
    attention of that query at the averaged future RoPE, times the value norm; sinks are kept."""
    rotary = rotary_module(llama)
    n, future = 48, 1
    gen = torch.Generator().manual_seed(2)
    pre = torch.randn(1, 4, 1, 16, generator=gen).expand(1, 4, n, 16)
    cos, sin = cos_sin(rotary, torch.arange(n), torch.float32)
    queries = apply_rope(pre, cos, sin)
    keys, values = torch.randn(1, 2, n, 16, generator=gen), torch.randn(1, 2, n, 16, generator=gen)
    method = ExpectedAttention(n_future_positions=future)
    with pytest.raises(RuntimeError, match="prepare"):
        method.score(inputs(keys=keys, queries=queries))
    prepare(method, llama, None)
    from kvbench.methods.base import LayerInputs

    layer = LayerInputs(keys, values, queries, 0, 0.25, 0)
    scores = method.score(layer)
    cos_t, sin_t = cos_sin(rotary, torch.tensor([n]), torch.float32)
    future_q = apply_rope(pre[:, :, :1], cos_t, sin_t).reshape(1, 2, 2, 16)  # the query at position n
    attention = (torch.einsum("bhgd,bhtd->bhgt", future_q, keys[:, :, 4:]) * 0.25).softmax(-1).mean(2)
    torch.testing.assert_close(scores[..., 4:], attention * values[:, :, 4:].norm(dim=-1), rtol=1e-4, atol=1e-6)
    assert (scores[..., :4] > scores[..., 4:].max()).all()


# ---------------------------------------------------------------- per-layer and per-head lengths


def prefill(model, prompt, method, budget):
    compressed = compress(model, method, budget, prompt, logits_to_keep=0)
    return compressed.cache, compressed.logits


def test_pyramidkv_keeps_fewer_tokens_in_deeper_layers_with_the_same_total(llama):
    prompt = torch.randint(0, VOCAB, (1, N), generator=torch.Generator().manual_seed(3))
    cache, _ = prefill(llama, prompt, PyramidKV(window=4, beta=4), 0.25)  # 40 per layer on average
    held = cache.held_tokens()
    assert held == sorted(held, reverse=True) and held[0] > held[-1]
    assert abs(sum(held) - 3 * 40) <= 1  # rounding of the per-layer counts
    assert held[-1] == round(40 / 4)  # the top layer keeps 1/beta of the average
    assert cache.nbytes() == sum(held) * 2 * 2 * 16 * 4  # measured from the tensors
    # The pyramid does not fit (budget x tokens < beta x window): every layer keeps SnapKV's count.
    cache, _ = prefill(llama, prompt, PyramidKV(), 0.25)
    assert cache.held_tokens() == [40, 40, 40]
    with pytest.raises(RuntimeError, match="prepare"):
        PyramidKV().keep_count(inputs(), 0.5)


def test_adakv_stores_variable_lengths_per_head_packed(model):
    prompt = torch.randint(0, VOCAB, (1, N), generator=torch.Generator().manual_seed(4))
    budget = 0.2
    cache, _ = prefill(model, prompt, AdaKV(window=8), budget)
    n_keep = math.floor(budget * N)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    kv_heads = model.config.num_key_value_heads
    varied = False
    total_bytes = 0
    for layer in cache.layers:
        assert isinstance(layer, PerHeadLayer) and layer.packed
        lengths = layer.lengths[0]
        varied |= len(set(lengths.tolist())) > 1
        pool = n_keep * kv_heads - 1  # the uniform total, less a token for the lengths (16 bytes)
        assert int(lengths.sum()) == pool
        assert int(lengths.min()) >= max(1, math.floor(0.2 * n_keep))  # alpha floor
        # Packed: no padding, not repeated per query head.
        assert layer.packed_keys.shape == layer.packed_values.shape == (pool, head_dim)
        assert layer.keys.shape == (1, kv_heads, 0, head_dim)  # the tail of later tokens, empty
        total_bytes += 2 * pool * head_dim * 4 + layer.lengths.numel() * 8
    assert varied, "the heads should keep different counts on a random model"
    assert cache.nbytes() == total_bytes
    assert budget - 0.01 < cache.nbytes() / cache.full_nbytes() <= budget


def test_adakv_alpha_one_is_uniform_snapkv():
    layer = inputs(n_tokens=40)
    from kvbench.methods.snapkv import SnapKV

    uniform = SnapKV(window=8).keep_indices(layer, 0.25)
    pooled = AdaKV(window=8, alpha=1.0).allocate(list(SnapKV(window=8).score(layer)[0]), 10)
    assert [p.tolist() for p in pooled] == uniform[0].tolist()


def test_packed_update_appends_to_every_head():
    layer = PerHeadLayer()
    keys = torch.arange(1 * 2 * 6 * 2, dtype=torch.float32).reshape(1, 2, 6, 2)
    layer.update(keys, keys + 100)
    layer.keep_per_head([torch.tensor([0, 4]), torch.tensor([1, 2, 5])])
    new = torch.full((1, 2, 2, 2), -1.0)
    new[:, 1] = -2.0
    layer.update(new, new)
    assert layer.lengths.tolist() == [[2, 3]] and layer.head_lengths().tolist() == [[4, 5]]
    assert layer.seen_tokens == 8 and layer.held_tokens() == 5 and layer.tokens_per_head() == 4.5
    assert layer.packed_keys.shape == (5, 2) and layer.keys.shape == (1, 2, 2, 2)  # packed, then a dense tail
    (head0, _), (head1, _) = layer.heads()
    assert head0[:, 0].tolist() == [0.0, 8.0, -1.0, -1.0]
    assert head1[:, 0].tolist() == [14.0, 16.0, 22.0, -2.0, -2.0]
    assert layer.nbytes() == (5 + 2 * 2) * 2 * 4 * 2 + 2 * 8  # packed + tail, keys and values, and the lengths
    packed_keys, _, lengths = layer.packed_heads()
    assert lengths.tolist() == [[4, 5]] and packed_keys[:, 0].tolist() == head0[:, 0].tolist() + head1[:, 0].tolist()


@pytest.mark.parametrize(("q_len", "logit_bytes"), [(1, 2**26), (3, 2**26), (5, 6 * 16 * 4)])
def test_packed_attention_is_attention_over_each_heads_tokens(q_len, logit_bytes, monkeypatch):
    """Per head: softmax over its packed tokens and the tail (causal among the newest), as sdpa computes it; also
    when a chunk of queries is taken in slices (here one query per slice)."""
    import kvbench.layers

    monkeypatch.setattr(kvbench.layers, "LOGIT_BYTES", logit_bytes)
    torch.manual_seed(0)
    layer = PerHeadLayer()
    layer.update(torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8))
    layer.keep_per_head([torch.tensor([0, 4, 7]), torch.tensor([1, 2, 3, 5, 6, 8])])
    layer.update(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))  # an earlier decoded chunk, in the tail
    layer.update(torch.randn(1, 2, q_len, 8), torch.randn(1, 2, q_len, 8))
    query = torch.randn(1, 6, q_len, 8)  # three query heads per KV head
    got = layer.attend(query, 0.3, None)
    for h, (keys, values) in enumerate(layer.heads()):
        visible = torch.ones(q_len, keys.shape[0], dtype=torch.bool).tril(keys.shape[0] - q_len)
        want = torch.nn.functional.scaled_dot_product_attention(query[:, 3 * h:3 * h + 3], keys[None, None],
                                                                values[None, None], attn_mask=visible, scale=0.3)
        torch.testing.assert_close(got[:, :, 3 * h:3 * h + 3], want.transpose(1, 2))


_KEEP: dict[int, torch.Tensor] = {}  # layer -> [batch, kv_heads, prompt tokens] kept, for the reference


def _masked_reference(module, query, key, value, attention_mask, **kwargs):
    """Full-cache attention that hides, per layer and head, the prompt tokens the method evicted."""
    keep = _KEEP.get(module.layer_idx)
    if keep is not None and query.shape[2] < key.shape[2]:
        visible = torch.ones(*key.shape[:3], dtype=torch.bool)
        visible[..., : keep.shape[-1]] = keep
        mask = causal_mask(query.shape[2], key.shape[2], key.device)[None, None] & visible[:, :, None]
        attention_mask = mask.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def kept_mask(layer, full_keys: torch.Tensor) -> torch.Tensor:
    """Which prompt tokens each head of a compressed layer kept, found by matching its keys."""
    batch, kv_heads, n, _ = full_keys.shape
    keep = torch.zeros(batch, kv_heads, n, dtype=torch.bool)
    heads = layer.heads() if isinstance(layer, PerHeadLayer) else list(layer.keys.flatten(0, 1))
    for row, head in enumerate(heads):
        head_keys = head[0] if isinstance(head, tuple) else head
        b, h = divmod(row, kv_heads)
        match = torch.cdist(head_keys, full_keys[b, h]).argmin(dim=-1)
        assert torch.equal(full_keys[b, h, match], head_keys)
        keep[b, h, match] = True
    return keep


@pytest.mark.parametrize("method", [PyramidKV(window=4, beta=4), AdaKV(window=8)], ids=["pyramidkv", "adakv"])
def test_attention_on_uneven_layers_equals_a_masked_full_cache(method):
    """A question chunk and decode steps on the compressed cache give the logits of full attention
    with the evicted tokens masked, per layer and per head."""
    prompt = torch.randint(0, VOCAB, (1, N), generator=torch.Generator().manual_seed(5))
    follow = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(6))
    compressed = tiny_model("qwen2")
    cache, _ = prefill(compressed, prompt, method, 0.25)
    reference = tiny_model("qwen2")
    AttentionInterface.register("kvbench_test_masked", _masked_reference)
    reference.set_attn_implementation("kvbench_test_masked")
    full = DynamicCache(config=reference.config)
    with torch.inference_mode():
        reference(prompt, past_key_values=full)
    _KEEP.clear()
    _KEEP.update({i: kept_mask(layer, full.layers[i].keys) for i, layer in enumerate(cache.layers)})
    assert len({int(k.sum(-1).max()) for k in _KEEP.values()} | {int(k.sum(-1).min()) for k in _KEEP.values()}) > 1
    steps = [follow[:, :5]] + [follow[:, i:i + 1] for i in range(5, 9)]  # a 5-token chunk, then single tokens
    position = N
    with torch.inference_mode():
        for ids in steps:
            positions = torch.arange(position, position + ids.shape[1])[None]
            got = compressed(ids, past_key_values=cache, position_ids=positions).logits
            want = reference(ids, past_key_values=full, position_ids=positions).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
            position += ids.shape[1]
    _KEEP.clear()


@pytest.mark.parametrize("method", [PyramidKV(window=4, beta=4), AdaKV(window=8)], ids=["pyramidkv", "adakv"])
def test_generate_equals_a_manual_loop(llama, method):
    prompt = torch.randint(0, VOCAB, (1, N), generator=torch.Generator().manual_seed(7))
    cache, logits = prefill(llama, prompt, method, 0.25)
    first = logits[:, -1:].argmax(-1)
    config = GenerationConfig(do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        generated = llama.generate(torch.cat([prompt, first], 1), past_key_values=cache, generation_config=config)
    manual_cache, logits = prefill(llama, prompt, method, 0.25)
    token, manual = logits[:, -1:].argmax(-1), []
    with torch.inference_mode():
        for step in range(9):
            manual.append(token.item())
            logits = llama(token, past_key_values=manual_cache, position_ids=torch.tensor([[N + step]])).logits
            token = logits[:, -1:].argmax(-1)
    assert generated[0, N:].tolist() == manual
