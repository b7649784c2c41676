"""Every registered method (built-ins and installed plugins) keeps kvbench's method contract."""

from __future__ import annotations

import pytest

from kvbench.registry import METHODS
from kvbench.spec import parse_spec
from kvbench.testing import check_method, compress, random_prompt, stored_bytes, tiny_model, tiny_options


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))


# Dimension methods train or fit on a few hundred bytes here; their options keep that to seconds.
FAST = {"dynakv": {"alpha": 1.0, "steps": 2}, "palu": {"multiple": 4},
        # head profiling: one length and depth (2 decoded tests) instead of HeadKV's 5 x 10 (100)
        "headkv": {"profile_lengths": 1, "profile_depths": 1},
        "mixeddimkv-h": {"profile_lengths": 1, "profile_depths": 1}}


@pytest.mark.parametrize("name", METHODS.names())
def test_method_keeps_the_contract(name):
    cls = METHODS.get(name)
    exact = cls.family in ("reference", "token")
    check_method(cls, FAST.get(name), exact_at_full_budget=exact)


BUILT_IN = [name for name in METHODS.names() if METHODS.get(name).family in ("token", "dimension")
            and METHODS.get(name).__module__.startswith("kvbench.methods.")]


@pytest.mark.parametrize("spec", [*BUILT_IN, "kvcompose:structured=false"])
def test_built_in_methods_hold_the_budget_exactly(spec, tmp_path):
    """kvbench's own methods keep within the requested bytes, not just within the contract's 1 % of full: at 100
    tokens and 0.25 every head's ``floor(budget x tokens)`` fills the budget exactly, so whatever a layout stores
    beside the tokens (per-head lengths, ranks, positions) must be paid for; at 0.01 (3 tokens for 3 layers) a layer
    may win no token of a global allocation. A method may refuse a budget it cannot meet (one ValueError), never
    exceed it."""
    name, _, given = spec.partition(":")
    model, prompt = tiny_model("llama"), random_prompt(100)
    settings = tiny_options(METHODS.get(name), tmp_path) | FAST.get(name, {})
    options = [f"{k}={v}" for k, v in settings.items()] + ([given] if given else [])
    method = parse_spec(name + (":" + ",".join(options) if options else "")).method
    for budget in (0.25, 0.01):
        try:
            compressed = compress(model, method, budget, prompt)
        except ValueError:
            continue
        assert compressed.kv_bytes == stored_bytes(compressed)
        assert compressed.kv_bytes <= budget * compressed.full_kv_bytes + 1e-6, (
            f"{spec} @ {budget}: {compressed.kv_bytes} bytes, over {budget} x {compressed.full_kv_bytes}")
