"""Every registered method (built-ins and installed plugins) keeps kvbench's method contract."""

from __future__ import annotations

import pytest

from kvbench.registry import METHODS
from kvbench.testing import check_method


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))


# Dimension methods train or fit on a few hundred bytes here; their options keep that to seconds.
FAST = {"dynakv": {"steps": 4, "window": 16}, "palu": {"multiple": 4}}


@pytest.mark.parametrize("name", METHODS.names())
def test_method_keeps_the_contract(name):
    cls = METHODS.get(name)
    exact = cls.family in ("reference", "token")
    check_method(cls, FAST.get(name), exact_at_full_budget=exact)
