"""Test utilities for kvbench and for plugin authors: tiny GQA models, and the contract every method must keep.

``check_method(cls)`` runs a method class through what kvbench promises of every method, on tiny random Llama
and Qwen2 models with grouped-query attention (fewer KV heads than query heads), built in-process:

- its spec string round-trips (name, family, summary, options with defaults);
- after prefill at budgets 0.5 and 0.25 the cache holds at most the budget (plus 1 % of the full size), and the
  bytes it reports are exactly the bytes of the tensors it stores;
- every dense tensor it stores keeps the GQA layout: one entry per KV head, never repeated per query head;
- ``generate`` on the compressed cache yields exactly the tokens of a manual decoding loop with explicit
  positions (so positions stay true after compression), and the cache still holds at most the budget plus the
  decoded tokens;
- optionally, at budget 1.0 the method keeps everything and decodes exactly like the uncompressed model.

Dimension methods are calibrated on a few hundred bytes of generated text (the tiny models read bytes).
"""

from __future__ import annotations

import random
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kvbench.methods.base import Method
from kvbench.models import enable_compression
from kvbench.prefill import Prefill, cache_arguments, prefill, prepare

VOCAB = 256  # byte-level, so ByteTokenizer's ids fit
PROMPT_TOKENS = 96
CALIBRATION_TOKENS = 384  # for dimension methods: tiny, so checks stay fast
WORDS = ("river", "valley", "lighthouse", "keeper", "lamp", "clockwork", "weather", "library", "harbour", "market",
         "bridge", "garden", "orchard", "mill", "baker", "letter", "station", "morning", "evening", "winter", "summer",
         "music", "teacher", "village", "road")


class ByteTokenizer:
    """Maps text to its UTF-8 bytes, which fit the tiny models' 256-token vocabulary."""

    def __call__(self, text: str, add_special_tokens: bool = False, **_: Any) -> types.SimpleNamespace:
        return types.SimpleNamespace(input_ids=list(text.encode()))


def tiny_model(kind: str = "llama", layers: int = 3) -> torch.nn.Module:
    """A random GQA model, compressible by kvbench: Llama (4 heads / 2 KV heads) or Qwen2 (6 / 2)."""
    torch.manual_seed(0)
    shared = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  max_position_embeddings=2048)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **shared))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_attention_heads=6, num_key_value_heads=2, **shared))
    else:
        raise ValueError(f"tiny model kind must be llama or qwen2, got {kind!r}")
    enable_compression(model)
    return model.eval()


def random_prompt(tokens: int = PROMPT_TOKENS, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(seed))


def calibration_file(directory: Path | None = None, paragraphs: int = 40, seed: int = 0) -> Path:
    """A text file of generated paragraphs, enough for ``CALIBRATION_TOKENS`` bytes of calibration."""
    rng = random.Random(seed)
    text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) + "." for _ in range(paragraphs))
    folder = Path(directory or tempfile.mkdtemp(prefix="kvbench-calibration-"))
    path = folder / "calibration.txt"
    path.write_text(text)
    return path


def tiny_options(cls: type[Method], directory: Path | None = None) -> dict[str, Any]:
    """Options that let a method calibrate on a tiny model: little text, from a generated file."""
    options = cls.options()
    found = {}
    if "calibration_tokens" in options:
        found["calibration_tokens"] = CALIBRATION_TOKENS
    if "data" in options:
        found["data"] = str(calibration_file(directory))
    return found


def compress(model: torch.nn.Module, method: Method, budget: float, prompt: torch.Tensor, seed: int = 0,
             tokenizer: Any = None, logits_to_keep: int = 1) -> Prefill:
    """Prepare the method (byte tokenizer by default) and prefill ``prompt`` with compression (``logits_to_keep=0``:
    the logits of every prompt position)."""
    prepare(method, model, tokenizer or ByteTokenizer())
    return prefill(model, method, budget, prompt, seed, logits_to_keep)


def greedy(model: torch.nn.Module, prompt: torch.Tensor, compressed: Prefill, steps: int = 8) -> list[int]:
    """The first token after the prompt and ``steps`` more, decoded by ``generate`` on the compressed cache."""
    first = compressed.logits[:, -1:].argmax(-1)
    config = GenerationConfig(do_sample=False, max_new_tokens=steps, pad_token_id=0)
    with torch.inference_mode():
        out = model.generate(torch.cat([prompt, first], 1), **cache_arguments(model, compressed.cache),
                             generation_config=config)
    return out[0, prompt.shape[1]:].tolist()


def manual_loop(model: torch.nn.Module, prompt: torch.Tensor, compressed: Prefill, steps: int = 8) -> list[int]:
    """The same tokens as ``greedy``, one forward per token with explicit position ids (and, like ``generate``,
    stopping after the model's end-of-sequence token)."""
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else eos or [])
    token, tokens = compressed.logits[:, -1:].argmax(-1), []
    with torch.inference_mode():
        for step in range(steps + 1):
            tokens.append(token.item())
            if step == steps or tokens[-1] in eos:
                break
            position = torch.tensor([[prompt.shape[1] + step]])
            logits = model(token, **cache_arguments(model, compressed.cache), position_ids=position).logits
            token = logits[:, -1:].argmax(-1)
    return tokens


def stored_bytes(compressed: Prefill) -> int:
    """Bytes of every tensor the cache's layers list as stored, counted here rather than by the cache."""
    return sum(t.numel() * t.element_size() for layer in compressed.cache.layers for t in layer.tensors())


def check_method(cls: type[Method], options: dict[str, Any] | None = None, exact_at_full_budget: bool = False,
                 kinds: tuple[str, ...] = ("llama", "qwen2")) -> None:
    """Raise AssertionError naming the broken promise when ``cls`` does not keep kvbench's method contract."""
    from kvbench.spec import parse_spec

    for attribute in ("name", "family", "summary"):
        assert isinstance(getattr(cls, attribute, None), str), f"{cls.__name__}.{attribute} must be a string"
    assert cls.family in ("reference", "token", "dimension", "kvpress"), f"{cls.name}: unknown family {cls.family}"
    with tempfile.TemporaryDirectory() as scratch:
        settings = tiny_options(cls, Path(scratch)) | (options or {})
        spec = parse_spec(cls.name + (":" + ",".join(f"{k}={v}" for k, v in settings.items()) if settings else ""))
        assert parse_spec(spec.canonical).canonical == spec.canonical, f"{cls.name}: spec does not round-trip"
        for kind in kinds:
            model = tiny_model(kind)
            _check_on(model, kind, spec.method, exact_at_full_budget)


def _check_on(model: torch.nn.Module, kind: str, method: Method, exact_at_full_budget: bool) -> None:
    config = model.config
    kv_heads, heads = config.num_key_value_heads, config.num_attention_heads
    prompt = random_prompt()
    where = f"{method.name} on tiny {kind}"
    budgets = (1.0,) if method.family == "reference" else (0.5, 0.25)
    for budget in budgets:
        compressed = compress(model, method, budget, prompt)
        assert compressed.kv_bytes == stored_bytes(compressed), f"{where}: nbytes() is not the stored tensors' bytes"
        assert compressed.achieved_budget <= budget + 0.01, (
            f"{where}: achieved budget {compressed.achieved_budget:.4f} exceeds the requested {budget}")
        for index, layer in enumerate(compressed.cache.layers):
            for tensor in (layer.keys, layer.values):
                if tensor is not None and tensor.dim() == 4:
                    assert tensor.shape[1] == kv_heads != heads, (
                        f"{where}: layer {index} stores {tensor.shape[1]} heads, not the {kv_heads} KV heads")
        generated = greedy(model, prompt, compressed)
        manual = manual_loop(model, prompt, compress(model, method, budget, prompt))
        assert generated == manual, f"{where}: generate() differs from a loop with explicit positions"
        held = compressed.cache.nbytes() / compressed.full_kv_bytes
        decoded = 9 / prompt.shape[1]
        assert held <= (budget + 0.01) * (1 + decoded) + decoded, f"{where}: the cache grew beyond the budget"
    if exact_at_full_budget:
        compressed = compress(model, method, 1.0, prompt)
        reference = compress(model, parse_full(), 1.0, prompt)
        assert greedy(model, prompt, compressed) == greedy(model, prompt, reference), (
            f"{where}: at budget 1.0 it does not decode like the uncompressed model")


def parse_full() -> Method:
    from kvbench.methods.base import Full

    return Full()
