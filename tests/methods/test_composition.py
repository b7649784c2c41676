"""Compositions a+b: parsing, one token selection shared by all KV heads, achieved budget = product."""

from __future__ import annotations

import math

import pytest
import torch
from lowrank_helpers import TINY, ByteTokenizer, generate, prefill

from kvbench.cli import main
from kvbench.methods.base import LayerInputs
from kvbench.methods.composition import Composition, default_token_fraction
from kvbench.methods.palu import Palu
from kvbench.methods.snapkv import SnapKV
from kvbench.prefill import prepare
from kvbench.spec import SpecError, parse_spec


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))


def test_either_order_parses_to_the_canonical_dimension_first_spec():
    spec = parse_spec("snapkv:window=16+palu:group_size=2,tokens=0.3")
    assert spec.canonical == "palu:group_size=2+snapkv:window=16,tokens=0.3"
    assert parse_spec(spec.canonical).canonical == spec.canonical
    assert isinstance(spec.method, Composition) and spec.method.tokens == 0.3 and spec.method.token.window == 16
    assert parse_spec("palu+snapkv").canonical == "palu+snapkv" == parse_spec("snapkv+palu").canonical
    assert spec.options["token"]["window"] == 16 and spec.options["dimension"]["group_size"] == 2


@pytest.mark.parametrize(("text", "message"), [
    ("snapkv+knorm", "compositions need a dimension method ("),
    ("palu+palu", "compositions need a dimension method"),
    ("palu+snapkv+knorm", "one of each"),
    ("palu+snapkx", "unknown method 'snapkx'"),
    ("palu+snapkv:tokens=1.5", "tokens must be in"),
    ("palu+snapkv:decoding=true", "decoding-phase eviction is not supported"),
])
def test_bad_compositions_are_one_line_errors(text, message, capsys):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace("+", r"\+")):
        parse_spec(text)
    assert main(["run", "--methods", text]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_default_rule_keeps_a_quarter_more_tokens_than_the_budget():
    assert default_token_fraction(0.06) == pytest.approx(0.075)
    assert default_token_fraction(0.9) == 1.0


@pytest.mark.parametrize(("budget", "tokens"), [(0.25, 0.5), (0.1, 0.0), (0.06, 0.0)])
def test_achieved_budget_is_the_product_and_lands_on_the_request(model, prompt, budget, tokens):
    dimension = Palu(**TINY, multiple=1)
    method = Composition(dimension, SnapKV(window=8), tokens=tokens)
    prepare(method, model, ByteTokenizer())
    cache, logits = prefill(model, prompt, method, budget)
    n_keep = math.floor((tokens or 1.25 * budget) * 96)
    assert cache.held_tokens() == [n_keep] * model.config.num_hidden_layers
    assert budget - 0.01 <= cache.nbytes() / cache.full_nbytes() <= budget
    generated = generate(model, prompt, cache, logits[:, -1].argmax(-1, keepdim=True), steps=4)
    assert len(generated) == 5 and cache.held_tokens() == [n_keep + 4] * model.config.num_hidden_layers


def test_one_selection_for_every_kv_head_from_head_averaged_scores(llama, prompt):
    snapkv = SnapKV(window=8)
    method = Composition(Palu(**TINY, multiple=1), snapkv, tokens=0.25)
    prepare(method, llama, ByteTokenizer())
    captured = {}
    original = snapkv.score

    def spy(inputs: LayerInputs) -> torch.Tensor:
        scores = original(inputs)
        captured.setdefault(inputs.layer_idx, scores)
        return scores

    snapkv.score = spy
    cache, _ = prefill(llama, prompt, method, 0.1)  # 24 of 96 tokens at 40 % of their bytes
    for layer_idx, layer in enumerate(cache.layers):
        scores = captured[layer_idx]
        assert scores.shape[1] == llama.config.num_key_value_heads
        expected = scores.float().mean(dim=1).topk(24, dim=-1).indices.sort(dim=-1).values
        assert layer.positions.shape == (1, 24)  # one position list: the latent is shared by all heads
        assert layer.positions[0].tolist() == expected[0].tolist()
        assert set(range(88, 96)) <= set(layer.positions[0].tolist())  # SnapKV's window is kept
