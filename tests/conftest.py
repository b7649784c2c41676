"""Tiny random models built in-process (Llama and Qwen2 style, with GQA): no downloads."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kvbench.models import enable_compression

VOCAB = 256


def tiny_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    shared = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  max_position_embeddings=2048)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **shared))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(num_attention_heads=6, num_key_value_heads=2, **shared))
    enable_compression(model)
    return model.eval()


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def model(request) -> torch.nn.Module:
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def llama() -> torch.nn.Module:
    return tiny_model("llama")


@pytest.fixture
def prompt() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, 96), generator=torch.Generator().manual_seed(1))
