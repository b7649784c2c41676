"""The results store: ``results/<run-id>/results.jsonl`` (one row per cell, appended and flushed as each cell ends),
``run.json`` (how the run was made, written once) and ``invocations.jsonl`` (one line per command that wrote to it).

Rows are only ever appended, and each results file has one writer at a time: an OS lock (``flock`` on
``<file>.lock``, released by the kernel when the process dies, even by SIGKILL) refuses a second writer with one
line naming the holder. A shard of a sharded run writes its own file, ``results-<shard>.jsonl``, with its own
lock; readers take every results file of the folder as one run.

Reading never fails on a file's content: a line that is not a well-formed row (torn by a killed run, not UTF-8,
not a JSON object, missing a key field) is skipped with one counted warning per file, and its cell runs again on
resume; the next append starts on a fresh line, so at most the cell in flight is lost.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

ROW_FIELDS = (
    "run_id", "model", "method", "budget", "achieved_budget", "task", "sample_id", "query_aware",
    "context_tokens", "prediction", "score", "metric", "kv_bytes", "full_kv_bytes", "peak_mem_bytes",
    "prefill_s", "decode_s", "decode_tokens", "status", "error", "seed",
)
CELL_KEY = ("model", "method", "budget", "task", "sample_id", "query_aware")
_KEY_TYPES = {"model": str, "method": str, "budget": (int, float), "task": str, "sample_id": str,
              "query_aware": bool}
# What must be the same for every row of a run: a resume with other values would mix incomparable rows.
SETTINGS = ("seed", "dtype", "device_type", "attn_implementation", "max_prompt_tokens")
RESULTS = "results.jsonl"


class StoreError(ValueError):
    """A run folder that cannot be written as asked (busy, incompatible, unreadable); the message is one line."""


def cell_key(row: dict[str, Any]) -> tuple:
    return tuple(row[k] for k in CELL_KEY)


def result_files(run_dir: str | Path) -> list[Path]:
    """Every results file of a run folder: ``results.jsonl`` and the shards' ``results-*.jsonl``, sorted."""
    run_dir = Path(run_dir)
    return sorted(p for p in run_dir.glob("results*.jsonl") if p.is_file()) if run_dir.is_dir() else []


def is_row(value: Any) -> bool:
    """A well-formed result row: an object with every cell-key field of the right type (a bool is no budget)."""
    return isinstance(value, dict) and all(
        isinstance(value.get(k), kind) and (k == "query_aware" or not isinstance(value.get(k), bool))
        for k, kind in _KEY_TYPES.items())


def read_rows(path: Path, warn: bool = True) -> Iterator[dict[str, Any]]:
    """The well-formed rows of one results file; malformed lines are skipped and counted in one warning."""
    if not path.is_file():
        return
    skipped: list[int] = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                row = None
            if is_row(row):
                yield row
            else:
                skipped.append(number)
    if skipped and warn:
        shown = ", ".join(map(str, skipped[:10])) + (" …" if len(skipped) > 10 else "")
        print(f"kvbench: warning: skipped {len(skipped)} line(s) of {path} that are not result rows "
              f"(line {shown}); their cells run again on resume", file=sys.stderr, flush=True)


def load_results(*run_dirs: str | Path) -> Any:
    """All rows of one or more run folders (shards and several runs) as one pandas DataFrame."""
    import pandas as pd

    rows = [row for d in run_dirs for path in result_files(d) for row in read_rows(path)]
    return pd.DataFrame(rows, columns=list(dict.fromkeys([*ROW_FIELDS, *(k for r in rows for k in r)])))


def read_run_meta(run_dir: Path) -> dict[str, Any] | None:
    """``run.json`` as a dict; None when absent. Raises StoreError when it is there but unreadable."""
    path = run_dir / "run.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise StoreError(f"{path} is not a kvbench run description (a JSON object); fix or move it, or use "
                         "another --run-id")
    return meta


class ResultsStore:
    """One writer's view of a run folder: its own results file (``shard`` names it), the run's metadata."""

    def __init__(self, run_dir: Path, shard: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.results_path = self.run_dir / (f"results-{shard}.jsonl" if shard else RESULTS)
        self.meta_path = self.run_dir / "run.json"
        self._lock: IO[str] | None = None

    def run_meta(self) -> dict[str, Any] | None:
        return read_run_meta(self.run_dir)

    def open(self, meta: dict[str, Any], grid: dict[str, Sequence[Any]] | None = None) -> None:
        """Take the writer's lock, create the run or check that a resumed run is compatible, record the invocation.

        ``meta["settings"]`` must match the run's (``SETTINGS``); ``grid`` (methods, budgets, tasks, ...) may grow,
        and what this invocation adds is recorded in ``invocations.jsonl``.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._acquire()
        previous = self.run_meta()
        if previous is None and not _write_new(self.meta_path, json.dumps(meta, indent=2) + "\n"):
            previous = self.run_meta()  # another shard created the run a moment ago
        if previous is not None:
            _check_compatible(self.run_dir, previous.get("settings", {"seed": previous.get("seed")}),
                              meta.get("settings", {}))
        invocation = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "command": meta.get("command"), "git_commit": meta.get("git_commit"),
                      "writer": self.results_path.name, "grid": grid or {}}
        if grid:
            invocation["added"] = _added(self._invocations(), grid, previous)
        with (self.run_dir / "invocations.jsonl").open("a", encoding="utf-8") as log:
            log.write(json.dumps(invocation, default=str) + "\n")

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the flock
            self._lock = None

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def done_keys(self, include_errors: bool = True) -> set[tuple]:
        """Cells already stored by any writer of this run (every results file of the folder)."""
        return {cell_key(r) for path in result_files(self.run_dir) for r in read_rows(path)
                if include_errors or r.get("status") == "ok"}

    def append(self, row: dict[str, Any]) -> None:
        if self._lock is None:
            raise RuntimeError("open() the store before appending: rows are written under the writer's lock")
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self.results_path.open("a+b") as out:
            if out.tell() > 0:
                out.seek(-1, os.SEEK_END)
                if out.read(1) != b"\n":  # a killed run left a torn line: start a fresh one
                    out.write(b"\n")
            out.write(line.encode("utf-8"))
            out.flush()
            os.fsync(out.fileno())

    def _acquire(self) -> None:
        lock_path = self.results_path.with_name(self.results_path.name + ".lock")
        handle = lock_path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StoreError(f"{self.results_path} is being written by {holder}; wait for it to finish or use "
                             "another --run-id (or --shard)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"kvbench pid {os.getpid()} on {socket.gethostname()} since "
                     f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")
        handle.flush()
        self._lock = handle

    def _invocations(self) -> list[dict[str, Any]]:
        path = self.run_dir / "invocations.jsonl"
        found = []
        if path.is_file():
            for raw in path.read_bytes().splitlines():
                try:
                    entry = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    continue
                if isinstance(entry, dict):
                    found.append(entry)
        return found


def _check_compatible(run_dir: Path, stored: Any, wanted: dict[str, Any]) -> None:
    stored = stored if isinstance(stored, dict) else {}
    for key in SETTINGS:
        if key in stored and key in wanted and stored[key] != wanted[key]:
            flag = "--" + key.replace("_type", "").replace("_", "-")
            raise StoreError(f"run {run_dir.name!r} was made with {key} {stored[key]!r}, not {wanted[key]!r}: its "
                             f"rows would not be comparable; use another --run-id or the same {flag}")
    versions, wanted_versions = stored.get("task_versions", {}), wanted.get("task_versions", {})
    for task, version in wanted_versions.items():
        if task in versions and versions[task] != version:
            raise StoreError(f"run {run_dir.name!r} has {task} rows of task version {versions[task]!r}; this kvbench "
                             f"builds version {version!r} (its prompts changed): use another --run-id")


def _added(invocations: list[dict[str, Any]], grid: dict[str, Sequence[Any]],
           first: dict[str, Any] | None) -> dict[str, list[Any]]:
    """The grid values this invocation adds to what earlier invocations (or the first run.json) asked for."""
    seen: dict[str, set[str]] = {}
    for entry in invocations:
        for key, values in (entry.get("grid") or {}).items():
            seen.setdefault(key, set()).update(map(str, values))
    for key in grid:
        if first is not None and isinstance(first.get(key), list):
            seen.setdefault(key, set()).update(map(str, first[key]))
    return {key: [v for v in values if str(v) not in seen.get(key, set())] for key, values in grid.items()
            if any(str(v) not in seen.get(key, set()) for v in values)}


def _write_new(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it exists (False then). The file appears whole (written aside, then
    hard-linked, which fails if the name is taken), so shards starting together never read it half written."""
    aside = path.with_name(f".{path.name}.{os.getpid()}.{socket.gethostname()}.tmp")
    try:
        aside.write_text(text, encoding="utf-8")
        os.link(aside, path)
    except FileExistsError:
        return False
    finally:
        aside.unlink(missing_ok=True)
    return True
