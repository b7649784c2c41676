"""Every registered method (built-ins and installed plugins) keeps kvbench's method contract."""

from __future__ import annotations

import pytest

from kvbench.registry import METHODS
from kvbench.testing import check_method


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
