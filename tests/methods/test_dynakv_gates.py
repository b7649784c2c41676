"""The paper's DynaKV gate: soft and hard masks on hand-made inputs, training lowers Eq. 9's loss, α moves the
held-out rate monotonically, U stays invertible, and the α search lands on its target."""

from __future__ import annotations

import math

import pytest
import torch
from dynakv_helpers import one_thread  # noqa: F401 - autouse fixture

from kvbench.calibration import calibration_data
from kvbench.methods.dynakv.library import ABOVE, BELOW, alpha_at, search_index
from kvbench.methods.dynakv.spectral import SpectralGates, Training, hard_ranks, soft_mask
from kvbench.methods.dynakv.training import heldout_ranks, pca_basis, pre_rope_states, train, training_loss
from kvbench.testing import ByteTokenizer, calibration_file, tiny_model


def test_soft_mask_is_the_reverse_cumulative_sum_of_the_cut_off_distribution():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.25, 0.04, 0.01]])
    mask = soft_mask(p.log())
    torch.testing.assert_close(mask, torch.tensor([[1.0, 0.9, 0.7, 0.4], [1.0, 0.3, 0.05, 0.01]]))
    assert hard_ranks(mask, 0.1).tolist() == [4, 2]
    assert hard_ranks(mask, 0.5).tolist() == [3, 1]


def test_a_peaked_cut_off_keeps_exactly_the_prefix_up_to_it():
    logits = torch.full((3, 8), -30.0)
    logits[0, 2] = logits[1, 0] = logits[2, 7] = 30.0  # cut-off at index 2, 0 and 7
    mask = soft_mask(logits)
    assert hard_ranks(mask, 0.1).tolist() == [3, 1, 8]
    assert mask[0, :3].min() > 0.99 and mask[0, 3:].max() < 0.01
    assert (mask.diff(dim=-1) <= 1e-7).all()  # non-increasing, m_0 = 1
    torch.testing.assert_close(mask[:, 0], torch.ones(3))


def test_the_first_coefficient_always_stays():
    mask = soft_mask(torch.zeros(2, 5))  # uniform p: m = 1, .8, .6, .4, .2
    assert hard_ranks(mask, 0.999).tolist() == [1, 1]


def test_gates_start_from_the_uncompressed_model():
    gates = SpectralGates(2, 16)
    mask = gates.mask(torch.randn(7, 16), 0, 1)
    assert float(mask.detach().min()) >= 0.99 - 1e-6 and gates.weight.abs().sum() == 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny llama, its covariance basis and calibration chunks (train / held out)."""
    model = tiny_model("llama")
    path = calibration_file(tmp_path_factory.mktemp("text"), paragraphs=60)
    chunks = calibration_data(ByteTokenizer(), 1536, 0, path, chunk_tokens=192).chunks
    basis, eigenvalues = pca_basis(model, chunks[:-2], progress=False)
    return model, basis, eigenvalues, chunks[:-2], chunks[-2:]


def fresh(basis: torch.Tensor) -> SpectralGates:
    gates = SpectralGates(basis.shape[0], basis.shape[-1])
    with torch.no_grad():
        gates.basis.copy_(basis)
    return gates


def test_pca_basis_is_orthonormal_and_sorted_by_descending_variance(setup):
    _, basis, eigenvalues, _, _ = setup
    eye = torch.eye(basis.shape[-1]).expand_as(basis)
    torch.testing.assert_close(basis.transpose(-1, -2) @ basis, eye, atol=1e-4, rtol=0)
    assert (eigenvalues.diff(dim=-1) <= 1e-6).all() and eigenvalues[..., 0].min() > 0


def test_uncentred_basis_adds_the_states_mean_to_the_covariance(setup):
    """``basis=uncentred`` (kvbench's option): the eigenpairs of the second moments = covariance + mean meanᵀ."""
    model, basis, eigenvalues, fit, _ = setup
    moments_basis, moments_values = pca_basis(model, fit, progress=False, centred=False)
    states = [torch.stack([torch.stack(pair) for pair in pre_rope_states(model, chunk)]).double() for chunk in fit]
    mean = torch.cat(states, dim=2).mean(dim=2)  # [layers, 2, d]

    def rebuilt(vectors, values):
        return (vectors.double() * values.double()[..., None, :]) @ vectors.double().transpose(-1, -2)

    difference = rebuilt(moments_basis, moments_values) - rebuilt(basis, eigenvalues)
    torch.testing.assert_close(difference, mean[..., :, None] * mean[..., None, :], atol=1e-3, rtol=1e-3)


SETTINGS = Training(steps=10, lr=0.5, basis_lr=1e-3)  # a tiny random model needs a large step to move


def test_training_lowers_the_loss_and_keeps_u_invertible(setup):
    model, basis, _, fit, heldout = setup
    gates = fresh(basis)
    alpha = 2.0
    with torch.no_grad():
        before = [training_loss(model, gates, chunk, alpha)[0].item() for chunk in heldout]
    curve = train(model, gates, fit, alpha, SETTINGS, progress=False)
    with torch.no_grad():
        after = [training_loss(model, gates, chunk, alpha)[0].item() for chunk in heldout]
    assert len(curve) == SETTINGS.steps and all(a < b for a, b in zip(after, before, strict=True))
    assert sum(after) < 0.97 * sum(before), (before, after)
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert all(p.requires_grad for p in model.parameters())  # the model's flags are restored after training
    assert not torch.equal(gates.basis.detach(), basis)  # U learns
    assert 1 <= curve[-1]["condition"] < 10
    frozen = gates.freeze()
    eye = torch.eye(basis.shape[-1]).expand_as(basis)
    torch.testing.assert_close(frozen.basis @ frozen._inverse, eye, atol=1e-4, rtol=0)


def test_a_larger_alpha_keeps_fewer_dimensions(setup):
    model, basis, _, fit, heldout = setup
    rates = []
    for alpha in (0.003, 0.03, 0.3, 3.0):
        gates = fresh(basis)
        train(model, gates, fit, alpha, SETTINGS, progress=False)
        rates.append(float(heldout_ranks(model, gates, heldout, 0.1).mean()) / basis.shape[-1])
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False)) and rates[0] - rates[-1] > 0.15, rates


def test_training_is_deterministic(setup):
    model, basis, _, fit, _ = setup
    first, second = fresh(basis), fresh(basis)
    settings = Training(steps=2, lr=0.05)
    train(model, first, fit, 1.0, settings, progress=False)
    train(model, second, fit, 1.0, settings, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))


def rate_curve(index: int) -> float:
    """A monotone held-out rate against the α grid index, as training gives it."""
    return 1 / (1 + math.exp((index - 6) / 5))


@pytest.mark.parametrize("target", [0.9, 0.5, 0.3, 0.2, 0.06])
def test_alpha_search_stops_near_the_target(target):
    probes = []

    def rate(index: int) -> float:
        probes.append(index)
        return rate_curve(index)

    index = search_index(rate, target)
    assert target - BELOW <= rate_curve(index) <= target + ABOVE
    assert len(probes) <= 6 and len(set(probes)) == len(probes)


def test_alpha_search_prefers_the_papers_rule_then_the_nearest_rate_above():
    def steep(index: int) -> float:
        return 0.8 if index < 3 else 0.1  # a jump over the target between grid points 2 and 3

    assert search_index(steep, 0.5) == 2  # nearest above: the budget guard trims each prompt
    assert search_index(lambda i: 0.9, 0.5) == 48  # never reached: the largest α tried
    assert search_index(lambda i: 0.1, 0.5) == -40  # always below: the smallest α tried
    assert search_index(lambda i: 0.52 if i < 4 else 0.495, 0.5) == 0  # 0.52 is within the window: first probe
    assert search_index(lambda i: 0.6 if i < 4 else 0.495, 0.5) == 8
    assert alpha_at(4) == 2.0 and alpha_at(-8) == 0.25


def test_both_kinds_gated_at_once_equal_each_kind_alone():
    gates = SpectralGates(3, 8)
    with torch.no_grad():
        gates.weight.normal_()
        gates.bias.normal_()
    coefficients = torch.randn(2, 2, 5, 8)
    both = gates.layer_masks(coefficients, 1)
    for kind in (0, 1):
        torch.testing.assert_close(both[kind], gates.mask(coefficients[kind], 1, kind))


def test_keys_are_unrotated_with_the_models_own_rotation():
    from kvbench.methods.lowrank.latent_attention import pre_rope
    from kvbench.rope import apply_rope, cos_sin, rotary_module

    rotary = rotary_module(tiny_model("llama"))
    positions = torch.tensor([[0, 3, 700], [5, 6, 1500]])
    keys = torch.randn(2, 2, 3, 16)
    cos, sin = cos_sin(rotary, positions.reshape(-1), torch.float32)
    rotated = apply_rope(keys, cos.reshape(2, 1, 3, 16), sin.reshape(2, 1, 3, 16))
    torch.testing.assert_close(pre_rope(rotated, positions, rotary), keys, atol=1e-5, rtol=1e-5)


def test_freezing_inverts_every_basis_with_two_threads_set():
    """``U⁻¹`` for inference, in a fresh process after ``torch.set_num_threads(2)`` (batched LU hangs there in
    torch 2.13's CPU build): it returns, and ``U U⁻¹ = I`` for every layer and kind."""
    import subprocess
    import sys

    code = ("import torch\nfrom kvbench.methods.dynakv.spectral import SpectralGates\n"
            "torch.set_num_threads(2)\ngates = SpectralGates(2, 192)\n"
            "with torch.no_grad():\n    gates.basis.add_(0.05 * torch.randn(gates.basis.shape))\n"
            "gates.freeze()\nproduct = gates.basis.double() @ gates._inverse.double()\n"
            "print(float((product - torch.eye(192, dtype=torch.float64)).abs().max()))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-4
