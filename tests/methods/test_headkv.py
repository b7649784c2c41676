"""HeadKV: head scores (HeadKV's JSON format, the offline profile), HeadKV's allocation, packed per-head storage."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from kvbench.layers import PerHeadLayer
from kvbench.methods.headkv import HeadKV
from kvbench.methods.headkv import profile as profiling
from kvbench.methods.headkv.allocation import (
    head_capacities,
    kv_head_shares,
    read_head_scores,
    write_head_scores,
)
from kvbench.methods.snapkv import SnapKV
from kvbench.spec import SpecError, parse_spec
from kvbench.testing import ByteTokenizer, calibration_file, compress, random_prompt, stored_bytes


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))


def score_file(path, layers: int, heads: int, seed: int = 0):
    """A head-score JSON in HeadKV's published format, with uneven scores."""
    scores = torch.rand(3, layers, heads, generator=torch.Generator().manual_seed(seed)) ** 4
    write_head_scores(path, scores)
    return path, scores.mean(dim=0).double()


def test_head_score_json_round_trips_and_bad_files_are_one_line_errors(tmp_path):
    path, means = score_file(tmp_path / "scores.json", 3, 4)
    raw = json.loads(path.read_text())
    assert list(raw)[:2] == ["0-0", "0-1"] and len(raw) == 12 and len(raw["2-3"]) == 3
    assert torch.allclose(read_head_scores(path, 3, 4), means)
    with pytest.raises(ValueError, match="not a head of this model"):
        read_head_scores(path, 2, 4)
    with pytest.raises(ValueError, match="have no score"):
        read_head_scores(path, 3, 5)
    (tmp_path / "bad.json").write_text('{"0-0": []}')
    with pytest.raises(ValueError, match="non-empty list"):
        read_head_scores(tmp_path / "bad.json", 1, 1)


def test_shares_fold_query_heads_into_their_kv_head():
    scores = torch.tensor([[1.0, 3.0, 0.0, 4.0], [2.0, 0.0, 0.0, 0.0]])
    shares = kv_head_shares(scores, kv_heads=2)
    assert torch.allclose(shares, torch.tensor([[0.4, 0.4], [0.2, 0.0]], dtype=torch.float64))
    sharper = kv_head_shares(scores, kv_heads=2, temp=2.0)
    assert float(sharper.sum()) == pytest.approx(1.0) and sharper[0, 1] > shares[0, 1]
    assert torch.allclose(kv_head_shares(torch.zeros(2, 4), 2), torch.full((2, 2), 0.25, dtype=torch.float64))


def test_capacities_follow_headkv_and_keep_the_exact_total():
    shares = torch.tensor([[0.5, 0.1], [0.3, 0.1]], dtype=torch.float64)
    caps = head_capacities(shares, average=40, window=8, beta=1.2, n_tokens=1000)
    base = 40 - 8
    pooled = math.floor(base / 1.2)
    assert int(caps.sum()) == 4 * 40  # the budget exactly, after largest-remainder rounding
    assert int(caps.min()) >= base - pooled + 8  # every head keeps its floor and the window
    assert caps[0, 0] == max(caps.flatten()) and caps[0, 0] > caps[1, 0] > caps[0, 1]
    uniform = head_capacities(shares, average=40, window=8, beta=1e9, n_tokens=1000)
    assert uniform.tolist() == [[40, 40], [40, 40]]  # beta -> infinity: no pool
    assert int(head_capacities(shares, 40, 8, 1.005, n_tokens=50).max()) == 50  # capped at the prompt


def test_heads_keep_their_capacity_and_snapkv_choice_packed(model, tmp_path):
    config = model.config
    path, _ = score_file(tmp_path / "scores.json", config.num_hidden_layers, config.num_attention_heads)
    method = HeadKV(scores=str(path))
    prompt = random_prompt(120, seed=3)
    compressed = compress(model, method, 0.25, prompt)
    assert compressed.kv_bytes == stored_bytes(compressed) and compressed.achieved_budget <= 0.25
    total = 0
    for index, layer in enumerate(compressed.cache.layers):
        assert type(layer) is PerHeadLayer and layer.packed
        expected = method.capacities(index, 30, 8, 120, reserve=1)  # 6 lengths of 8 bytes cost one token
        assert layer.lengths[0].tolist() == expected.tolist()
        total += int(layer.lengths.sum())
        for (keys, _), count in zip(layer.heads(), expected.tolist(), strict=True):
            assert keys.shape[0] == count
    assert total == 30 * config.num_hidden_layers * config.num_key_value_heads - 1
    assert len({int(n) for layer in compressed.cache.layers for n in layer.lengths.flatten()}) > 1


def test_selection_inside_a_head_is_snapkv_with_the_window_kept(llama, tmp_path):
    config = llama.config
    path, _ = score_file(tmp_path / "scores.json", config.num_hidden_layers, config.num_attention_heads, seed=1)
    prompt = random_prompt(100, seed=5)
    recorded = []
    selector = SnapKV(window=8, kernel=7)
    original = selector.score

    def spy(inputs):
        recorded.append((inputs.keys.clone(), original(inputs)))
        return recorded[-1][1]

    method = HeadKV(scores=str(path))
    method._selector = type("Spy", (), {"score": staticmethod(spy)})()
    compressed = compress(llama, method, 0.2, prompt)
    for layer, (keys, scores) in zip(compressed.cache.layers, recorded, strict=True):
        for h, ((held, _), count) in enumerate(zip(layer.heads(), layer.lengths[0].tolist(), strict=True)):
            chosen = scores[0, h].topk(count).indices.sort().values
            assert torch.equal(held, keys[0, h, chosen])
            assert set(range(92, 100)) <= set(chosen.tolist())  # the observation window is kept


def test_generated_reasoning_needles_and_answer_spans():
    tokenizer = ByteTokenizer()
    text, _ = profiling.haystack_text(str(calibration_file()))
    tests = profiling.build_tests(tokenizer, text, 300, seed=0)
    assert len(tests) == profiling.LENGTHS * profiling.DEPTHS * 2
    for test in tests:
        start, end = test.span
        assert bytes(test.ids[start:end]).decode() == " " + test.answer
        assert bytes(test.ids).decode().endswith("\nAnswer:")
    older = [t for t in tests if "older" in bytes(t.ids[-100:]).decode()]
    for test in older[:5]:
        prompt = bytes(test.ids).decode()
        ages = {name: int(age) for name, age in re.findall(r"(\w+) is (\d+) years old", prompt)}
        assert test.answer.startswith(max(ages, key=ages.get))


def test_profile_scores_are_attention_mass_on_the_answer_and_are_cached(llama, monkeypatch):
    data = str(calibration_file())
    method = HeadKV(calibration_tokens=200, data=data, profile_lengths=1, profile_depths=1)
    method.prepare(llama, ByteTokenizer())
    meta, path = method.head_meta, method.head_artifact
    assert meta["tests"] == 2 and meta["successful_tests"] == 0  # a random model answers nothing
    per_test = torch.load(path, weights_only=True)["tensors"]["per_test"]
    assert per_test.shape == (2, llama.config.num_hidden_layers, llama.config.num_attention_heads)
    assert float(per_test.min()) >= 0 and float(per_test.max()) <= 1 + 1e-6 and float(per_test.max()) > 0
    published = path.parent / "head_scores.json"
    assert torch.allclose(read_head_scores(published, 3, 4), per_test.mean(dim=0))
    monkeypatch.setattr(profiling, "profile", lambda *a, **k: pytest.fail("the artifact was not reused"))
    again = HeadKV(calibration_tokens=200, data=data, profile_lengths=1, profile_depths=1)
    again.prepare(llama, ByteTokenizer())
    assert torch.equal(again.shares, method.shares)


@pytest.mark.parametrize("spec", ["headkv:beta=0.5", "headkv:temp=0", "headkv:kernel=4",
                                  "headkv:scores=/no/such/file.json", "headkv:profile_depths=0"])
def test_bad_options_are_one_line_spec_errors(spec):
    with pytest.raises(SpecError, match="headkv"):
        parse_spec(spec)
