"""``python -m kvbench bench``: prefill latency, decode speed, KV bytes and peak memory per method
and budget at several context lengths, measured side by side with ``full`` in one process.

The prompt is random token ids (seeded, special tokens left out), the same for every method at a
length: speed and memory do not depend on what the tokens say, and random ids need no data, so
the benchmark also runs on random-weight models of real shapes without downloading weights.

Each repeat measures every (method, budget) once, in turn, after warm-up, so slow drifts of a
shared machine hit every method alike; the report takes medians over repeats. Rows go to
``results/<run-id>/results.jsonl`` with ``kind="bench"``, one per (method, budget, length, repeat),
flushed as they are measured, and ``python -m kvbench report`` renders them.

After each length, bench prints the medians and, for decoding, how close each method comes to the
memory-bound limit: a decoding step reads the weights (``W`` bytes) and the cache, so shrinking the
full cache (``KV`` bytes) to a fraction ``b`` can speed a step up by at most ``(W + KV) / (W + b KV)``.
Presses of kvpress (``kvpress:<Press>``) run through the same prefill (their hooks are entered around
the compressing forward), so kvbench's methods and kvpress's are timed side by side.
"""

from __future__ import annotations

import platform
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from statistics import median
from typing import Any

import torch
from tqdm.auto import tqdm

from kvbench.measure import PeakMemory, timed
from kvbench.models import ModelRef
from kvbench.prefill import cache_arguments, prefill
from kvbench.provenance import device_name, git_commit, package_version
from kvbench.results import ResultsStore
from kvbench.runner import budgets_for, load_prepared
from kvbench.spec import MethodSpec

KIND = "bench"
PROMPT = "random token ids (seeded, special tokens excluded), identical for every method at a length"


@dataclass
class BenchConfig:
    run_id: str
    results_dir: Path
    model: ModelRef
    methods: Sequence[MethodSpec]  # ``full`` first: the reference every ratio is taken against
    budgets: Sequence[float]
    lengths: Sequence[int]
    decode_tokens: int = 128
    repeats: int = 3
    warmup: int = 1
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    attn_implementation: str = "sdpa"
    seed: int = 0
    argv: Sequence[str] = field(default_factory=lambda: sys.argv)

    @property
    def run_dir(self) -> Path:
        return self.results_dir / self.run_id

    def configs(self) -> list[tuple[MethodSpec, float]]:
        return [(spec, budget) for spec in self.methods for budget in budgets_for(spec, self.budgets)]


def random_prompt(vocab_size: int, special_ids: Sequence[int], length: int, seed: int) -> torch.Tensor:
    """``[1, length]`` token ids drawn uniformly from the vocabulary without special tokens."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[[i for i in special_ids if 0 <= i < vocab_size]] = False
    choices = allowed.nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + length)
    return choices[torch.randint(len(choices), (1, length), generator=generator)]


def measure(model: Any, spec: MethodSpec, budget: float, prompt: torch.Tensor, decode_tokens: int,
            seed: int) -> dict[str, Any]:
    """One prefill (with compression) and ``decode_tokens`` greedy steps; times and memory measured.

    Peak memory is taken twice. ``prefill_peak_mem_bytes``: the peak during prefill over the memory held
    before the prompt. ``decode_peak_mem_bytes``: the peak while
    decoding over the same start, so it includes the cache; it works because the inner ``PeakMemory``
    of decoding resets the peak counter (CUDA peak stats or Linux VmHWM) and the outer one then reads
    the peak since that reset.
    """
    device = model.device
    prompt = prompt.to(device)
    times: dict[str, float] = {}
    with torch.inference_mode(), PeakMemory(device) as decoding:
        with PeakMemory(device) as prefill_peak:
            compressed = prefill(model, spec.method, budget, prompt, seed)
        cache, times["prefill_s"] = compressed.cache, compressed.seconds
        token = compressed.logits[:, -1:].argmax(dim=-1)
        with PeakMemory(device), timed(device, times, "decode_s"):
            for _ in range(decode_tokens):
                logits = model(token, **cache_arguments(model, cache), logits_to_keep=1).logits
                token = logits[:, -1:].argmax(dim=-1)
    return {
        "context_tokens": prompt.shape[1],
        "kv_bytes": compressed.kv_bytes,
        "full_kv_bytes": compressed.full_kv_bytes,
        "achieved_budget": compressed.achieved_budget,
        "final_kv_bytes": cache.nbytes(),
        "prefill_peak_mem_bytes": prefill_peak.peak_bytes,
        "decode_peak_mem_bytes": decoding.peak_bytes,
        "peak_mem_bytes": max(prefill_peak.peak_bytes, decoding.peak_bytes),
        "peak_mem_kind": decoding.kind,
        "decode_tokens": decode_tokens,
        **times,
        **compressed.fields,
    }


def weights_nbytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one decoding step reads: every parameter once (tied ones once), the input embedding
    table only when it is also the output layer (otherwise a step reads one row of it)."""
    seen: dict[int, int] = {}
    for param in model.parameters():
        seen[param.data_ptr()] = param.numel() * param.element_size()
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    if embedding is not None and (output is None or output.weight.data_ptr() != embedding.weight.data_ptr()):
        seen.pop(embedding.weight.data_ptr(), None)
    return sum(seen.values())


def summary(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Lines printed after a length: medians per (method, budget), ratios to full, and the bandwidth limit."""
    from kvbench.report.tables import bandwidth_limit

    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "ok":
            groups.setdefault((row["method"], row["budget"]), []).append(row)
    if ("full", 1.0) not in groups:
        return []
    stats = {key: {"prefill": median([r["prefill_s"] for r in group]),
                   "tok_s": median([r["decode_tokens"] / r["decode_s"] for r in group]),
                   "sample": median([r["prefill_s"] + r["decode_s"] for r in group]),
                   "budget": median([r["achieved_budget"] for r in group]), "row": group[0]}
             for key, group in groups.items()}
    full = stats["full", 1.0]
    lines = [f"{'method':<40} {'budget':>6} {'prefill s':>9} {'x full':>6} {'decode tok/s':>12} {'x full':>6} "
             f"{'limit':>5} {'of limit':>8} {'sample s':>8}"]
    for (method, budget), values in stats.items():
        speedup = values["tok_s"] / full["tok_s"]
        limit = bandwidth_limit(values["row"]["weights_bytes"], values["row"]["full_kv_bytes"], values["budget"])
        lines.append(f"{method[:40]:<40} {budget:>6.3f} {values['prefill']:>9.3g} "
                     f"{values['prefill'] / full['prefill']:>6.2f} {values['tok_s']:>12.3g} {speedup:>6.2f} "
                     f"{limit:>5.2f} {speedup / limit:>8.2f} {values['sample']:>8.3g}")
    return lines


def metadata(config: BenchConfig) -> dict[str, Any]:
    return {
        "run_id": config.run_id,
        "kind": KIND,
        "command": shlex.join(["python", "-m", "kvbench", *config.argv[1:]]),
        "git_commit": git_commit(),
        "versions": {name: package_version(name) for name in ("kvbench", "torch", "transformers")}
        | {"python": platform.python_version()},
        "device": device_name(config.device),
        "seed": config.seed,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": config.model.name,
        "model_kind": config.model.kind,
        "dtype": str(config.dtype).removeprefix("torch."),
        "attn_implementation": config.attn_implementation,
        "methods": [spec.canonical for spec in config.methods],
        "budgets": list(config.budgets),
        "lengths": list(config.lengths),
        "decode_tokens": config.decode_tokens,
        "repeats": config.repeats,
        "warmup": config.warmup,
        "prompt": PROMPT,
    }


def run_bench(config: BenchConfig) -> Path:
    """Measure every (method, budget) at every length; returns the run directory."""
    with ResultsStore(config.run_dir) as store:
        store.open(metadata(config))
        _measure_all(config, store)
    return config.run_dir


def _measure_all(config: BenchConfig, store: ResultsStore) -> None:
    model, tokenizer = load_prepared(config.model, config.device, config.dtype, config.attn_implementation,
                                     config.methods)
    configs = config.configs()
    weights = weights_nbytes(model)
    total = len(config.lengths) * len(configs) * (config.warmup + config.repeats)
    with tqdm(total=total, unit="measurement", desc="kvbench bench", dynamic_ncols=True) as progress:
        for length in config.lengths:
            prompt = random_prompt(model.config.vocab_size, tokenizer.all_special_ids, length, config.seed)
            failed: set[tuple[str, float]] = set()
            measured: list[dict[str, Any]] = []
            for repeat in range(-config.warmup, config.repeats):  # negative repeats are warm-up, not stored
                for spec, budget in configs:
                    progress.set_postfix_str(f"{length} tokens, {spec.canonical} @ {budget:g}")
                    if (spec.canonical, budget) in failed:
                        progress.update(1)
                        continue
                    row = _row(config, spec, budget, length, repeat) | {"weights_bytes": weights}
                    try:
                        row |= measure(model, spec, budget, prompt, config.decode_tokens, config.seed)
                        row |= {"status": "ok", "error": None}
                    except Exception as error:  # noqa: BLE001 - an OOM at one length must not end the sweep
                        failed.add((spec.canonical, budget))
                        row |= {"status": "error", "error": f"{type(error).__name__}: {error}"}
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                    if repeat >= 0 or row["status"] == "error":
                        store.append(row)
                        measured.append(row)
                    progress.update(1)
            lines = summary(measured)
            if lines:
                tqdm.write(f"kvbench bench: {length} tokens, medians of {config.repeats} repeat(s); decoding's "
                           "bandwidth limit (W + KV) / (W + b KV)")
                for line in lines:
                    tqdm.write("  " + line)


def _row(config: BenchConfig, spec: MethodSpec, budget: float, length: int, repeat: int) -> dict[str, Any]:
    return {
        "run_id": config.run_id,
        "kind": KIND,
        "model": config.model.name,
        "method": spec.canonical,
        "method_options": spec.options,
        "budget": budget,
        "task": KIND,
        "sample_id": f"{length}/{'warmup' if repeat < 0 else repeat}",
        "context_tokens": length,
        "repeat": repeat,
        "query_aware": True,
        "seed": config.seed,
        "quality_meaningful": config.model.meaningful_quality,
        "attn_implementation": config.attn_implementation,
        "dtype": str(config.dtype).removeprefix("torch."),
    }
