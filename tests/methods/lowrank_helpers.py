"""Shared by the low-rank tests: a byte tokenizer for the tiny models and a calibrated Palu."""

from __future__ import annotations

import types
from pathlib import Path

import torch
from transformers import GenerationConfig

import kvbench.prefill

CALIBRATION_TOKENS = 384  # tiny, so the tests stay fast
CALIBRATION_FILE = str(Path(__file__).parents[1] / "fixtures" / "calibration.txt")  # no data wheel needed
TINY = {"calibration_tokens": CALIBRATION_TOKENS, "data": CALIBRATION_FILE}


class ByteTokenizer:
    """Maps text to its UTF-8 bytes, which fit the tiny models' 256-token vocabulary."""

    def __call__(self, text: str, add_special_tokens: bool = False):
        return types.SimpleNamespace(input_ids=list(text.encode()))


def prefill(model, prompt, method, budget):
    """Prefill a method prepared by the test (``prepare`` from kvbench.prefill); all prompt logits."""
    compressed = kvbench.prefill.prefill(model, method, budget, prompt, logits_to_keep=0)
    return compressed.cache, compressed.logits


def generate(model, prompt, cache, first, steps=8) -> list[int]:
    config = GenerationConfig(do_sample=False, max_new_tokens=steps, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        out = model.generate(torch.cat([prompt, first], 1), past_key_values=cache, generation_config=config)
    return out[0, prompt.shape[1]:].tolist()


def steps_in_place(model, cache, token: torch.Tensor, tensor_of, steps: int = 8, slot: str = "positions"
                   ) -> list[bool]:
    """Decode ``steps`` tokens; for each, whether ``tensor_of(layer)`` (appended every step, like ``slot``) moved.
    It must move exactly when the room behind it was used up (``AppendBuffers``)."""
    layer, moves = cache.layers[1], []
    for _ in range(steps):
        _, length, capacity = layer.appends.returned[slot]
        before = tensor_of(layer).data_ptr()
        with torch.inference_mode():
            logits = model(token, **kvbench.prefill.cache_arguments(model, cache), logits_to_keep=1).logits
        token = logits[:, -1:].argmax(-1)
        moves.append(tensor_of(layer).data_ptr() != before)
        assert moves[-1] == (length == capacity)
        assert layer.nbytes() == sum(t.numel() * t.element_size() for t in layer.tensors())  # the room is not held
    return moves
