"""HeadKV's head-level budgets (Eq. 4 as its code runs) and where the head scores come from.

Scores are per *query head* ``[layers, heads]``: measured on the model (``profile``, cached as a calibration
artifact) or read from a JSON file in the format HeadKV publishes (``{"<layer>-<head>": [score per test, ...]}``,
a head's score being the mean of its list). They are L1-normalised over all heads, then sharpened as
``S^temp / Σ S^temp`` (temp 1 leaves them as they are).

GQA: HeadKV repeats K/V per query head and gives every query head its own budget; kvbench stores one entry per KV
head, so a KV head's share is the *sum* of its query heads' normalised scores (the shares still sum to 1, so the
pool is split as HeadKV splits it among the same query heads, grouped), and its tokens are selected once for the
group (SnapKV votes averaged over the group's query heads). The budget counts what is stored.

Allocation (HeadKV's ``ReasonSnapKVCluster``): with ``average`` kept tokens per head (``floor(budget x tokens)``,
the window included) and ``window`` the observation window, ``base = average - window``; each head gets ``base -
floor(base / beta)`` tokens, and a pool of ``floor(base / beta) x heads`` tokens is split by the shares; every head
also keeps the window. HeadKV rounds each share; kvbench splits the pool by largest remainders, so the total is
exactly ``average x heads``, then pays for the per-head lengths its packed layout stores with a token off the
largest heads where ``average x heads`` leaves no room for them: the budget is met. A head whose capacity exceeds
the prompt keeps the whole prompt and the surplus is not redistributed, as in HeadKV.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from kvbench.artifacts import TensorSpec, load_or_build


def read_head_scores(path: str | Path, layers: int, heads: int) -> torch.Tensor:
    """``[layers, heads]`` mean scores from a HeadKV head-score JSON; ValueError (one line) when it does not fit."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"head scores {path}: unreadable ({type(error).__name__})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"head scores {path}: expected an object of \"<layer>-<head>\": [scores] entries")
    scores = torch.full((layers, heads), float("nan"), dtype=torch.float64)
    for key, values in raw.items():
        layer, _, head = str(key).partition("-")
        if not (layer.isdigit() and head.isdigit() and int(layer) < layers and int(head) < heads):
            raise ValueError(f"head scores {path}: entry {str(key)[:20]!r} is not a head of this model "
                             f"({layers} layers x {heads} query heads)")
        listed = values if isinstance(values, list) else [values]
        if not listed or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in listed):
            raise ValueError(f"head scores {path}: entry {key!r} needs a non-empty list of finite numbers")
        scores[int(layer), int(head)] = sum(listed) / len(listed)
    if scores.isnan().any():
        raise ValueError(f"head scores {path}: {int(scores.isnan().sum())} of the model's {layers * heads} heads "
                         "have no score")
    return scores


def write_head_scores(path: Path, per_test: torch.Tensor) -> None:
    """HeadKV's published format: one line, ``"<layer>-<head>": [score of each counted test]``."""
    tests, layers, heads = per_test.shape
    path.write_text(json.dumps({f"{layer}-{head}": per_test[:, layer, head].tolist()
                                for layer in range(layers) for head in range(heads)}))


def kv_head_shares(scores: torch.Tensor, kv_heads: int, temp: float = 1.0) -> torch.Tensor:
    """``[layers, kv_heads]`` shares summing to 1: normalised query-head scores, sharpened, summed per KV head."""
    scores = scores.double().clamp_min(0)
    if float(scores.sum()) <= 0:
        scores = torch.ones_like(scores)  # no head ever looked at an answer: uniform shares
    shares = scores / scores.sum()
    shares = shares.pow(temp)
    shares = shares / shares.sum()
    layers, heads = shares.shape
    return shares.reshape(layers, kv_heads, heads // kv_heads).sum(dim=-1)


def head_capacities(shares: torch.Tensor, average: int, window: int, beta: float, n_tokens: int,
                    reserve: int = 0) -> torch.Tensor:
    """``[layers, kv_heads]`` tokens each head keeps, window included (HeadKV's allocation, exact total); then
    ``reserve`` tokens come off the largest capacities, one each (the first of equal ones first), to pay for what the
    layout stores beside the tokens."""
    window = min(window, average)
    base = average - window
    pooled = math.floor(base / beta)
    quota = shares.flatten() * pooled * shares.numel()
    given = quota.floor()
    short = int(round(pooled * shares.numel() - float(given.sum())))
    if short > 0:
        given[(quota - given).topk(short).indices] += 1
    capacities = (given.reshape(shares.shape).long() + (base - pooled) + window).clamp(max=n_tokens)
    flat = capacities.view(-1)
    for _ in range(reserve):
        flat[flat.argmax()] -= 1
    return capacities


def profiled_scores(model: torch.nn.Module, tokenizer: Any, max_tokens: int, seed: int, data: str | None,
                    lengths: int, depths: int, force: bool = False) -> tuple[torch.Tensor, dict[str, Any], Path]:
    """The model's retrieval-reasoning head scores ``[layers, heads]``: the cached artifact, or profiled now (and
    saved, with a head-score JSON in HeadKV's format beside it)."""
    from kvbench.methods.headkv.profile import F1_THRESHOLD, haystack_text, profile, text_fingerprint

    text, source = haystack_text(data)
    config = model.config.get_text_config()
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    settings = {"max_tokens": max_tokens, "seed": seed, "lengths": lengths, "depths": depths, "haystack": source,
                "procedure": "headkv-r2"}

    def build() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return profile(model, tokenizer, max_tokens, seed, data, lengths, depths)

    def specs(meta: dict[str, Any]) -> dict[str, TensorSpec]:
        return {"scores": TensorSpec((layers, heads)), "per_test": TensorSpec((meta["tests"], layers, heads)),
                "f1": TensorSpec((meta["tests"],))}

    artifact, path = load_or_build(model, "headkv", settings, text_fingerprint(text), build, specs, force)
    json_path = path.parent / "head_scores.json"
    if force or not json_path.is_file():
        tensors = artifact["tensors"]
        counted = tensors["f1"] > F1_THRESHOLD
        write_head_scores(json_path, tensors["per_test"][counted] if counted.any() else tensors["per_test"])
    return artifact["tensors"]["scores"].double(), artifact["meta"], path
