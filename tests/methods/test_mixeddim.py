"""MixedDimKV(-H): nested per-head projections, the loss-minimising allocation, grouped storage and exact grouped
attention."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from kvbench.methods.headkv.allocation import write_head_scores
from kvbench.methods.mixeddim import MixedDimKV, MixedDimKVH
from kvbench.methods.mixeddim.allocation import lagrange, plan_head
from kvbench.methods.mixeddim.projections import head_bases, residual_energy
from kvbench.methods.mixeddim.storage import MixedDimLayer
from kvbench.prefill import cache_arguments
from kvbench.spec import SpecError, parse_spec
from kvbench.testing import calibration_file, compress, greedy, random_prompt, stored_bytes


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))


def test_bases_are_nested_eigenvectors_and_errors_follow_from_one_projection():
    torch.manual_seed(0)
    states = torch.randn(1, 2, 50, 8) * torch.tensor([4.0, 3, 2, 1, 0.5, 0.4, 0.3, 0.2])
    bases = head_bases(states)
    assert torch.allclose(bases[0, 0].T @ bases[0, 0], torch.eye(8), atol=1e-5)
    moment = states[0, 0].T @ states[0, 0] / 50
    eigenvalues = torch.diagonal(bases[0, 0].T @ moment @ bases[0, 0])
    assert bool((eigenvalues[:-1] >= eigenvalues[1:] - 1e-4).all())  # largest first: truncation keeps the most
    errors = residual_energy(states, bases, [0, 2, 8])
    x = states[0, 1]
    rebuilt = x @ bases[0, 1, :, :2] @ bases[0, 1, :, :2].T
    assert torch.allclose(errors[0, 1, :, 1], (x - rebuilt).pow(2).sum(-1), atol=1e-4)
    assert torch.allclose(errors[..., 0], states.pow(2).sum(-1)) and float(errors[..., 2].abs().max()) < 1e-4


def test_lagrange_choice_is_within_one_token_of_the_optimum():
    generator = torch.Generator().manual_seed(1)
    cost = torch.tensor([0.0, 2.0, 5.0])
    exact = 0
    for _ in range(20):
        loss = torch.rand(5, 3, generator=generator)
        loss[:, 0] += 1.0  # eviction loses most
        capacity = float(torch.randint(0, 26, (1,), generator=generator))
        choice = lagrange(loss, cost, capacity)
        assert float(cost[choice].sum()) <= capacity
        best = min(sum(float(loss[t, o]) for t, o in enumerate(plan))
                   for plan in itertools.product(range(3), repeat=5) if float(cost[list(plan)].sum()) <= capacity)
        found = float(loss.gather(1, choice[:, None]).sum())
        gap = float((loss.max(dim=1).values - loss.min(dim=1).values).max())
        assert best - 1e-6 <= found <= best + gap  # the Lagrangian's bound: one token's loss range
        exact += found == pytest.approx(best, abs=1e-6)
    assert exact >= 15


def test_a_projection_is_bought_only_when_the_budget_carries_it():
    loss = torch.tensor([[2.0, 0.3, 0.0]] * 10)
    keys, values = torch.tensor([0, 2, 16]), torch.tensor([0, 2, 16])
    tight = plan_head(loss, keys, values, 16, capacity=2 * 32.0)  # a projection (2 x 16 x 2) leaves nothing
    assert (tight.key_rank, tight.value_rank) == (0, 0) and tight.choice.tolist().count(2) == 2
    roomy = plan_head(loss, keys, values, 16, capacity=64.0 + 10 * 4)
    assert (roomy.key_rank, roomy.value_rank) == (2, 2) and roomy.choice.tolist() == [1] * 10


def test_groups_are_packed_and_counted_within_the_budget(model):
    prompt = random_prompt(120, seed=2)
    compressed = compress(model, MixedDimKV(window=8), 0.25, prompt)  # short prompts: a short window
    assert compressed.kv_bytes == stored_bytes(compressed) and compressed.achieved_budget <= 0.25
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    for layer in compressed.cache.layers:
        assert type(layer) is MixedDimLayer and layer.grouped
        assert len(layer.heads) == config.num_key_value_heads  # one store per KV head, never per query head
        for store in layer.heads:
            ranks = [(k.shape[1], v.shape[1]) for k, v in store.groups]
            assert len(set(ranks)) == len(ranks) and len(ranks) > 1  # one contiguous group per dimension
            assert all(k.is_contiguous() and k.shape[0] == v.shape[0] for k, v in store.groups)
            assert (head_dim, head_dim) in ranks  # the observation window stays whole
            largest = max(k.shape[1] for k, _ in store.groups if k.shape[1] < head_dim)
            assert store.key_basis.shape == (head_dim, largest)  # only the largest projection is stored
            assert sum(t.numel() for t in store.counted) == head_dim * sum(
                b.shape[1] for b in (store.key_basis, store.value_basis))
            assert 8 <= store.tokens() < 120


def test_grouped_attention_equals_dense_attention_on_the_reconstruction(model):
    prompt = random_prompt(100, seed=6)
    cache = compress(model, MixedDimKV(kv_ratio="independent", window=8), 0.3, prompt).cache
    layer = cache.layers[1]
    torch.manual_seed(0)
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = layer.heads[0].groups[-1][0].shape[-1]
    new = 5  # a question chunk: causal among itself
    layer.update(torch.randn(1, kv_heads, new, head_dim), torch.randn(1, kv_heads, new, head_dim))
    query = torch.randn(1, heads, new, head_dim)
    grouped = layer.attend(query, 0.3, None)  # [batch, q, heads, dim]
    group = heads // kv_heads
    for h, store in enumerate(layer.heads):
        keys, values = store.reconstruct()
        keys = torch.cat([keys, layer.keys[0, h]])
        values = torch.cat([values, layer.values[0, h]])
        mask = torch.ones(new, keys.shape[0], dtype=torch.bool).tril(keys.shape[0] - new)
        dense = F.scaled_dot_product_attention(query[0, h * group:(h + 1) * group], keys, values,
                                               attn_mask=mask, scale=0.3)
        assert torch.allclose(grouped[0, :, h * group:(h + 1) * group].transpose(0, 1), dense, atol=1e-5)
    assert any(k.shape[1] != v.shape[1] for s in layer.heads for k, v in s.groups)  # K and V ranks differ


def test_budget_one_keeps_the_dense_layer(llama, prompt):
    compressed = compress(llama, MixedDimKV(), 1.0, prompt)
    assert compressed.achieved_budget == 1.0 and not compressed.cache.layers[0].grouped


def test_a_budget_that_holds_every_token_whole_decodes_like_full(model, prompt, monkeypatch):
    """Grouped storage and grouped attention with nothing lost: the same logits and tokens as the dense cache."""
    n_tokens = prompt.shape[1]
    monkeypatch.setattr(MixedDimKV, "head_capacity",
                        lambda self, layer_idx, n, budget, head_dim: torch.tensor([2.0 * n_tokens * head_dim]))
    compressed = compress(model, MixedDimKV(window=8), 0.5, prompt)
    reference = compress(model, parse_spec("full").method, 1.0, prompt)
    assert all(layer.grouped and all(s.tokens() == n_tokens and s.key_basis is None for s in layer.heads)
               for layer in compressed.cache.layers)
    assert compressed.kv_bytes == reference.kv_bytes
    assert greedy(model, prompt, compressed) == greedy(model, prompt, reference)
    step = prompt[:, -1:]
    with torch.inference_mode():
        position = torch.tensor([[n_tokens]])
        ours = model(step, **cache_arguments(model, compress(model, MixedDimKV(window=8), 0.5, prompt).cache),
                     position_ids=position).logits
        dense = model(step, **cache_arguments(model, compress(model, parse_spec("full").method, 1.0, prompt).cache),
                      position_ids=position).logits
    assert torch.allclose(ours, dense, atol=1e-5)


def test_tiny_budgets_fall_back_to_eviction(llama):
    prompt = random_prompt(200, seed=7)
    compressed = compress(llama, MixedDimKV(window=8), 0.05, prompt)  # 10 tokens a head, 8 for the window
    assert 0.04 < compressed.achieved_budget <= 0.05  # the rest (2 tokens) would only pay for a projection
    for layer in compressed.cache.layers:
        for store in layer.heads:
            assert store.key_basis is None and store.counted == []


def test_calibrated_projections_are_shared_and_not_counted(llama, prompt):
    method = MixedDimKV(projections="calibration", calibration_tokens=256, data=str(calibration_file()), window=8)
    compressed = compress(llama, method, 0.3, prompt)
    assert compressed.kv_bytes == stored_bytes(compressed) and compressed.achieved_budget <= 0.3
    stores = [s for layer in compressed.cache.layers for s in layer.heads]
    assert all(s.counted == [] for s in stores) and any(s.key_basis is not None for s in stores)


def test_mixeddimkv_h_allocates_inside_headkv_budgets(llama, tmp_path):
    config = llama.config
    scores = torch.rand(2, config.num_hidden_layers, config.num_attention_heads,
                        generator=torch.Generator().manual_seed(3)) ** 4
    write_head_scores(tmp_path / "scores.json", scores)
    method = MixedDimKVH(scores=str(tmp_path / "scores.json"), window=8)
    prompt = random_prompt(150, seed=8)
    compressed = compress(llama, method, 0.25, prompt)
    assert compressed.achieved_budget <= 0.25
    head_dim = config.hidden_size // config.num_attention_heads
    for index, layer in enumerate(compressed.cache.layers):
        capacity = method.head_capacity(index, 150, 0.25, head_dim)
        used = [sum(t.numel() for g in s.groups for t in g) + sum(t.numel() for t in s.counted) for s in layer.heads]
        assert all(u <= c for u, c in zip(used, capacity.tolist(), strict=True))
    spread = [method.head_capacity(i, 150, 0.25, head_dim) for i in range(config.num_hidden_layers)]
    assert len({float(c) for caps in spread for c in caps}) > 1  # budgets differ per head


@pytest.mark.parametrize("spec", ["mixeddimkv:candidates=0.5;1", "mixeddimkv:candidates=0;0.5",
                                  "mixeddimkv:candidates=0;x;1", "mixeddimkv:loss=mse", "mixeddimkv:kv_ratio=k",
                                  "mixeddimkv:projections=svd", "mixeddimkv-h:beta=0"])
def test_bad_options_are_one_line_spec_errors(spec):
    with pytest.raises(SpecError, match="mixeddimkv"):
        parse_spec(spec)


def test_candidate_ratios_set_the_dimensions():
    method = parse_spec("mixeddimkv:candidates=0;0.25;1,kv_ratio=independent").method
    keys, values = method.options_per_token(64)
    assert list(zip(keys.tolist(), values.tolist(), strict=True)) == [(0, 0), (16, 16), (16, 64), (64, 16), (64, 64)]
