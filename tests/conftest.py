"""Shared fixtures: tiny random models built in-process (Llama and Qwen2 style, with GQA), never downloaded."""

from __future__ import annotations

import pytest
import torch

from kvbench.testing import random_prompt, tiny_model


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` need CUDA; without it they are skipped (scripts/gpu-check.sh runs them on a GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def model(request) -> torch.nn.Module:
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def llama() -> torch.nn.Module:
    return tiny_model("llama")


@pytest.fixture
def prompt() -> torch.Tensor:
    return random_prompt(96, seed=1)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """A private KVBENCH_CACHE per test module: its calibration artifacts are built once and shared by its tests."""
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("kvbench-cache")
        patch.setenv("KVBENCH_CACHE", str(root))
        yield root
