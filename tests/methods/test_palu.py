"""Palu's options: head groups, rank allocation, rounding."""

from __future__ import annotations

import pytest
import torch
from lowrank_helpers import TINY, ByteTokenizer, prefill

from kvbench.methods.lowrank.statistics import group_slices
from kvbench.methods.palu import Palu
from kvbench.prefill import prepare
from kvbench.spec import SpecError, parse_spec


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))


def test_one_latent_block_per_head_group(llama, prompt):
    method = Palu(**TINY, group_size=1, rank=4)
    prepare(method, llama, ByteTokenizer())
    cache, _ = prefill(llama, prompt, method, 0.5)
    layer = cache.layers[1]
    assert layer.codec.key_basis.shape == (2, 16, 4)  # 2 KV heads of 16 dims, one group each
    assert layer.key_latents.shape == (1, 96, 8)
    basis = layer.codec.key_basis[0]
    torch.testing.assert_close(basis.T @ basis, torch.eye(4), atol=1e-5, rtol=1e-5)


def test_ranks_are_rounded_to_the_multiple_and_the_uniform_allocation_is_uniform(llama):
    greedy = Palu(**TINY, multiple=4)
    prepare(greedy, llama, ByteTokenizer())
    ranks = greedy.ranks(0.5, 4)
    assert all(r % 4 == 0 for pair in ranks for r in pair)
    assert len(set(ranks)) > 1  # the measured curves differ per layer and between K and V
    uniform = Palu(**TINY, multiple=4, allocation="uniform")
    prepare(uniform, llama, ByteTokenizer())
    # 0.5 of 2 x 32 numbers per token and layer is 96 over 3 layers, less the positions (1 number per layer): 93
    assert uniform.ranks(0.5, 4) == [(16, 16), (16, 16), (16, 12)]  # 12 each, then 5 more steps of 4


def test_bad_options_and_groups_that_do_not_divide_the_heads(llama):
    with pytest.raises(SpecError, match="allocation must be"):
        parse_spec("palu:allocation=fisher")
    assert len(group_slices(2, 16, 4)) == 1  # fewer heads than the group size: one group of all heads
    with pytest.raises(ValueError, match="group_size 2 does not divide the model's 3 KV heads"):
        group_slices(3, 16, 2)
