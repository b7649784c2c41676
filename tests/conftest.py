"""Shared fixtures: tiny random models built in-process (Llama and Qwen2 style, with GQA), never downloaded."""

from __future__ import annotations

import pytest
import torch

from kvbench.testing import random_prompt, tiny_model


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def model(request) -> torch.nn.Module:
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def llama() -> torch.nn.Module:
    return tiny_model("llama")


@pytest.fixture
def prompt() -> torch.Tensor:
    return random_prompt(96, seed=1)
