"""``dynakv:gate=ranker``'s gates: rank allocation on budget, decoding within budget, gradients, seeded init,
training helps."""

from __future__ import annotations

import pytest
import torch
from dynakv_helpers import one_thread  # noqa: F401 - autouse fixture
from lowrank_helpers import ByteTokenizer

from kvbench.calibration import calibration_data
from kvbench.methods.dynakv import DynaKV
from kvbench.methods.dynakv.ranker import (
    GateTraining,
    LayerBasis,
    RankGates,
    _Teacher,
    allocate,
    arrival_levels,
    compressed_window_loss,
    rank_levels,
    straight_through_mask,
    train_gates,
)
from kvbench.prefill import prepare
from kvbench.testing import tiny_model


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))


def test_rank_levels_are_nested_and_end_at_full_rank():
    assert rank_levels(192).tolist() == list(range(193))  # every rank fits a uint8 level
    levels = rank_levels(192, 32)
    assert levels[0] == 0 and levels[-1] == 192 and len(levels) == 33 and (levels.diff() == 6).all()
    assert len(rank_levels(1024)) == 256 and rank_levels(1024)[-1] == 1024


@pytest.mark.parametrize("mean", [0.4, 3.0, 11.5, 48.0, 150.0])
def test_allocate_fills_the_target_without_exceeding_it(mean):
    levels = rank_levels(192, 32)
    scores = torch.randn(500, generator=torch.Generator().manual_seed(0))
    index, tau = allocate(scores, levels, mean * 500)
    used = float(levels[index].sum())
    assert used <= mean * 500 and used >= mean * 500 - 6  # within one level step of the target
    ranks = levels[index]
    # The allocation is monotone in the score up to one level (the largest-remainder rounding).
    order = scores.argsort()
    assert (ranks[order].diff() >= -6).all()
    assert (allocate(torch.zeros(500), levels, mean * 500)[0].max() - allocate(torch.zeros(500), levels,
                                                                                mean * 500)[0].min()) <= 1


def test_allocate_keeps_everything_when_the_target_allows_it():
    levels = rank_levels(64)
    index, tau = allocate(torch.randn(10), levels, 64 * 10)
    assert (index == len(levels) - 1).all() and tau == float("inf")


def test_arriving_tokens_keep_the_mean_rank_within_their_allowance():
    levels = rank_levels(192, 32)  # steps of 6
    index, carry = arrival_levels(3, 15.0, levels, allowance=5000.0)
    assert levels[index].tolist() == [12, 18, 12] and carry == pytest.approx(3.0)  # error diffusion around 15
    index, _ = arrival_levels(3, 15.0, levels, allowance=20.0)
    assert levels[index].tolist() == [12, 6, 0]  # never beyond what the budget has left
    carry, total = 0.0, 0
    for _ in range(100):  # one decoded token at a time: the mean is kept, not rounded down each time
        index, carry = arrival_levels(1, 15.0, levels, allowance=1e9, carry=carry)
        total += int(levels[index].sum())
    assert abs(total / 100 - 15) < 0.1


def test_straight_through_mask_is_hard_forward_and_redistributes_gradient():
    levels = rank_levels(32)
    scores = torch.randn(20, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    index, tau = allocate(scores, levels, 8.0 * 20)
    mask = straight_through_mask(scores, index, tau, levels, temperature=1.0)
    torch.testing.assert_close(mask.detach(), (torch.arange(32) < levels[index][:, None]).float())
    mask.sum().backward()  # more kept coefficients everywhere: tau's implicit gradient cancels the sum
    assert scores.grad.abs().sum() > 0 and abs(float(scores.grad.sum())) < 1e-3 * float(scores.grad.abs().sum())


def test_same_seed_gives_the_same_gates():
    levels = rank_levels(32)
    first, second, other = (RankGates(3, 32, levels, seed=s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def peaked_tiny_llama() -> torch.nn.Module:
    """A tiny GQA Llama whose random weights are scaled so that it behaves like a trained model in the ways that
    matter here: peaked next-token distributions, sharp attention, and a few outlier tokens (space, newline,
    full stop) with large states, which a token-uniform rank reconstructs badly."""
    model = tiny_model("llama")
    with torch.no_grad():
        for token in b" \n.":
            model.model.embed_tokens.weight[token] *= 8
        model.lm_head.weight *= 10
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 3
    return model


def test_trained_gates_lose_less_than_untrained_ones_at_the_same_budget():
    """Training reduces the held-out next-token KL against the uncompressed model, by a clear margin, and beats
    token-uniform ranks under the same per-layer allocation (deterministic: seeded init, budgets and data)."""
    model = peaked_tiny_llama()
    method = DynaKV(gate="ranker", calibration_tokens=1536, adaptive=False)
    prepare(method, model, ByteTokenizer())  # the shared statistics and bases only
    bases: list[LayerBasis] = method.ranker.layer_bases
    data = calibration_data(ByteTokenizer(), 4096, seed=0, chunk_tokens=128)
    settings = GateTraining(steps=150, window=32, steps_per_chunk=2, lr=3e-3, seed=0)
    allocation = method.ranker.training_allocation(4)
    trained, curve = train_gates(model, data.chunks[:-4], bases, allocation, settings, progress=False)
    untrained = RankGates(len(bases), 32, rank_levels(32), settings.hidden, seed=0)
    assert len(curve) == settings.steps and all(point["loss"] >= 0 for point in curve)
    key_frac, value_frac = allocation(0.1)
    teachers = [_Teacher(model, chunk, 32) for chunk in data.chunks[-4:]]  # held out: never trained on
    with torch.no_grad():
        losses = {name: sum(float(compressed_window_loss(model, teacher, gates, bases, key_frac, value_frac))
                            for teacher in teachers)
                  for name, gates in (("trained", trained), ("untrained", untrained), ("uniform", None))}
    assert losses["trained"] < 0.85 * losses["untrained"], losses
    assert losses["trained"] < 0.9 * losses["uniform"], losses


def test_kl_objective_trains_through_the_frozen_model(llama):
    method = DynaKV(gate="ranker", calibration_tokens=384, adaptive=False)
    prepare(method, llama, ByteTokenizer())
    data = calibration_data(ByteTokenizer(), 384, seed=0, chunk_tokens=128)
    settings = GateTraining(steps=2, objective="kl", window=32, steps_per_chunk=1, seed=0)
    before = RankGates(len(method.ranker.layer_bases), 32, rank_levels(32), settings.hidden, seed=0).state_dict()
    gates, curve = train_gates(llama, data.chunks, method.ranker.layer_bases, method.ranker.training_allocation(4),
                               settings,
                               progress=False)
    assert [point["step"] for point in curve] == [0, 1] and all(point["loss"] >= 0 for point in curve)
    assert not all(torch.equal(before[k], v) for k, v in gates.state_dict().items())
    assert all(p.requires_grad for p in llama.parameters())  # the model's flags are restored after training
