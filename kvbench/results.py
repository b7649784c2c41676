"""The results store: ``results/<run-id>/results.jsonl`` (one row per cell, appended and
flushed as each cell ends) and ``run.json`` (how the run was made, written once).

Rows are only ever appended. A killed run can leave a torn last line; readers skip it and
the next append starts on a fresh line, so at most the cell in flight is lost.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

ROW_FIELDS = (
    "run_id", "model", "method", "budget", "achieved_budget", "task", "sample_id", "query_aware",
    "context_tokens", "prediction", "score", "metric", "kv_bytes", "full_kv_bytes", "peak_mem_bytes",
    "prefill_s", "decode_s", "decode_tokens", "status", "error", "seed",
)
CELL_KEY = ("model", "method", "budget", "task", "sample_id", "query_aware")


def cell_key(row: dict[str, Any]) -> tuple:
    return tuple(row[k] for k in CELL_KEY)


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a results.jsonl, skipping a torn (partially written) line."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def load_results(*run_dirs: str | Path) -> pd.DataFrame:
    """All rows of one or more run directories (shards or several runs) as one DataFrame."""
    rows = [row for d in run_dirs for row in read_rows(Path(d) / "results.jsonl")]
    return pd.DataFrame(rows, columns=list(dict.fromkeys([*ROW_FIELDS, *(k for r in rows for k in r)])))


class ResultsStore:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.results_path = run_dir / "results.jsonl"
        self.meta_path = run_dir / "run.json"

    def run_meta(self) -> dict[str, Any] | None:
        return json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else None

    def open(self, meta: dict[str, Any]) -> None:
        """Create the run, or check that a resumed run is compatible; record this invocation."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        previous = self.run_meta()
        if previous is None:
            _write_new(self.meta_path, json.dumps(meta, indent=2) + "\n")
        elif previous.get("seed") != meta["seed"]:
            raise ValueError(
                f"run {self.run_dir.name!r} was made with seed {previous.get('seed')}, not {meta['seed']}; "
                "use another --run-id or the same --seed"
            )
        with (self.run_dir / "invocations.jsonl").open("a", encoding="utf-8") as log:
            log.write(json.dumps(meta) + "\n")

    def done_keys(self, include_errors: bool = True) -> set[tuple]:
        return {cell_key(r) for r in read_rows(self.results_path) if include_errors or r.get("status") == "ok"}

    def append(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self.results_path.open("a+b") as out:
            if out.tell() > 0:
                out.seek(-1, os.SEEK_END)
                if out.read(1) != b"\n":  # a killed run left a torn line: start a fresh one
                    out.write(b"\n")
            out.write(line.encode("utf-8"))
            out.flush()
            os.fsync(out.fileno())


def _write_new(path: Path, text: str) -> None:
    with path.open("x", encoding="utf-8") as out:
        out.write(text)
