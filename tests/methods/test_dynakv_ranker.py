"""``dynakv:gate=ranker`` (kvbench's variant): exact at full rank, physically variable-rank, on budget with its
metadata, positions right while decoding, composable with SnapKV, and a calibration artifact that round-trips."""

from __future__ import annotations

import json

import pytest
import torch
from dynakv_helpers import one_thread  # noqa: F401 - autouse fixture
from lowrank_helpers import ByteTokenizer, generate, prefill
from transformers import GenerationConfig

from kvbench.methods.dynakv import DynaKV
from kvbench.methods.dynakv.ragged import rank_classes
from kvbench.methods.dynakv.storage import VariableRankLayer
from kvbench.prefill import prepare
from kvbench.spec import parse_spec
from kvbench.testing import check_method

CALIBRATION_TOKENS = 768  # four chunks of 192 (one held out): the gates train on 144-token prefixes
TINY = dict(gate="ranker", calibration_tokens=CALIBRATION_TOKENS, ranker_steps=6, window=32)


@pytest.fixture(scope="module")
def calibrated(cache_root):
    """One calibrated ranker DynaKV per tiny model, shared by the tests of this module."""
    methods: dict[int, DynaKV] = {}

    def get(model) -> DynaKV:
        if id(model) not in methods:
            method = DynaKV(**TINY)
            prepare(method, model, ByteTokenizer())
            methods[id(model)] = method
        return methods[id(model)]

    return get


def dim(model) -> int:
    config = model.config
    return config.num_key_value_heads * config.hidden_size // config.num_attention_heads



def bucket_sizes(layer, kind: str) -> dict[int, int]:
    return {index: t.numel() for index, t in layer.buckets[kind][0].items() if t.dim() == 1}


def expected_sizes(ranks: torch.Tensor) -> dict[int, int]:
    """Coefficients per rank class (``ragged.py``): the ranks of the class's tokens, summed."""
    classes = rank_classes(ranks.long())
    return {index: int(ranks[classes == index].long().sum()) for index in classes.unique().tolist()}

def test_ranker_keeps_the_method_contract(cache_root):
    check_method(DynaKV, {"gate": "ranker", "ranker_steps": 4, "window": 16}, kinds=("qwen2",))


def test_full_ranks_give_exactly_the_full_cache_output(model, prompt, calibrated, monkeypatch):
    method = calibrated(model)
    full = float(dim(model))
    monkeypatch.setattr(method.ranker, "shares", lambda budget, size: [(full, full)] * model.config.num_hidden_layers)
    cache, logits = prefill(model, prompt, method, 1.0)
    assert all(isinstance(layer, VariableRankLayer) and layer.keys is None for layer in cache.layers)
    assert all(int(layer.token_levels["key"].min()) == len(layer.ranker.levels) - 1 for layer in cache.layers)
    with torch.inference_mode():
        reference_logits = model(prompt).logits
        reference = model.generate(prompt, generation_config=GenerationConfig(
            do_sample=False, max_new_tokens=9, pad_token_id=0, eos_token_id=None))
    torch.testing.assert_close(logits, reference_logits, atol=1e-4, rtol=1e-4)
    first = logits[:, -1].argmax(-1, keepdim=True)
    assert generate(model, prompt, cache, first) == reference[0, 96:].tolist()


@pytest.mark.parametrize("budget", [0.5, 0.1])
def test_variable_rank_storage_is_real_and_on_budget(model, prompt, calibrated, budget):
    method = calibrated(model)
    cache, logits = prefill(model, prompt, method, budget)
    achieved = cache.nbytes() / cache.full_nbytes()
    assert budget - 0.01 <= achieved <= budget, achieved
    levels = cache.layers[0].ranker.levels
    ranks_seen = set()
    for layer in cache.layers:
        measured = sum(t.numel() * t.element_size() for t in layer.tensors())
        assert layer.nbytes() == measured
        for kind in ("key", "value"):
            token_levels = layer.token_levels[kind]
            assert token_levels.dtype == torch.uint8 and token_levels.shape == (1, 96)
            ranks = levels[token_levels[0].long()]
            assert bucket_sizes(layer, kind) == expected_sizes(ranks)  # exactly the kept prefixes
            ranks_seen |= set(ranks.tolist())
        assert layer.positions.dtype == torch.int32 and layer.positions[0].tolist() == list(range(96))
    assert len(ranks_seen) > 2  # the gates give tokens different ranks
    # Decoding: new tokens are stored as latents too, positions continue, the cache stays within budget.
    full_per_token = cache.full_nbytes() / 96
    generated = generate(model, prompt, cache, logits[:, -1].argmax(-1, keepdim=True))
    assert len(generated) == 9 and cache.get_seq_length() == 104 and cache.held_tokens() == [104] * len(cache.layers)
    assert all(layer.positions[0].tolist() == list(range(104)) for layer in cache.layers)
    assert cache.nbytes() <= budget * full_per_token * 104


def test_non_adaptive_ablation_gives_every_token_nearly_the_same_rank(llama, prompt, cache_root):
    method = DynaKV(gate="ranker", calibration_tokens=CALIBRATION_TOKENS, adaptive=False)
    prepare(method, llama, ByteTokenizer())
    assert method.ranker.gates is None
    cache, _ = prefill(llama, prompt, method, 0.25)
    for layer in cache.layers:
        spread = layer.token_levels["key"].max() - layer.token_levels["key"].min()
        assert int(spread) <= 1


def test_composition_with_snapkv_selects_then_ranks_and_lands_on_budget(llama, prompt, calibrated):
    spec = parse_spec("dynakv:gate=ranker,calibration_tokens=768,ranker_steps=6,window=32+snapkv:window=8")
    spec.method.dimension = calibrated(llama)
    prepare(spec.method, llama, ByteTokenizer())  # loads the calibrated artifact again
    cache, _ = prefill(llama, prompt, spec.method, 0.1)
    assert 0.09 <= cache.nbytes() / cache.full_nbytes() <= 0.1
    kept = cache.layers[0].positions[0]
    assert len(kept) < 96 and kept.tolist() == sorted(kept.tolist()) and kept[-8:].tolist() == list(range(88, 96))


def test_budget_below_the_metadata_is_refused(llama, calibrated):
    with pytest.raises(ValueError, match="metadata"):
        calibrated(llama).ranker.shares(0.01, 4)


def test_artifact_round_trips_and_same_seed_gives_the_same_gates(llama, calibrated, cache_root, monkeypatch):
    trained = calibrated(llama)
    import kvbench.methods.dynakv.ranker_variant as module

    monkeypatch.setattr(module, "train_gates", lambda *a, **k: pytest.fail("a valid artifact was not reused"))
    again = DynaKV(**TINY)
    prepare(again, llama, ByteTokenizer())
    assert again.artifact == trained.artifact
    assert all(torch.equal(a, b) for a, b in zip(trained.ranker.gates.state_dict().values(),
                                                  again.ranker.gates.state_dict().values(), strict=True))
    meta = json.loads((trained.artifact.parent / "meta.json").read_text())
    assert len(meta["loss_curve"]) == TINY["ranker_steps"] and meta["settings"]["gate_training"]
    monkeypatch.undo()
    retrained = DynaKV(**TINY)
    retrained.prepare(llama, ByteTokenizer(), force=True)  # calibrating again with the same seed
    assert all(torch.equal(a, b) for a, b in zip(trained.ranker.gates.state_dict().values(),
                                                  retrained.ranker.gates.state_dict().values(), strict=True))
