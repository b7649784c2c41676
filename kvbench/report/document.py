"""The whole report: its sections in reading order, the run-level ones (warnings, failed cells, run metadata),
and writing ``report.md``, its figures and ``report.html``."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvbench.report.costs import bench_section, memory_section, speed_section
from kvbench.report.formatting import MISSING
from kvbench.report.render import Alert, Block, Code, Heading, Table, Text, figures, to_html, to_markdown
from kvbench.report.sections import (
    FIGURE_PREFIX,
    curves_section,
    headline_section,
    heatmaps_section,
    paired_section,
)
from kvbench.report.tables import ReportTables, build_tables, load_rows, split_rows
from kvbench.results import ResultsStore

HOW_TO_READ = (
    "How to read: each cell of the grid is one (model, method, budget, task, sample, query mode) "
    "evaluation. The **budget** is the fraction of the full KV-cache bytes a method is asked to keep; "
    "the **achieved budget** is measured from the cache tensors after prefill compression (KV bytes / "
    "full KV bytes), so it shows what a method really kept. Scores are means over the samples that ran "
    "without error, with 95 % confidence intervals from a bootstrap over samples; `full` is the uncompressed "
    "reference, run once at budget 1.000. Query-aware compresses the prompt with the question in it; "
    "query-agnostic compresses the context before the question is seen."
)
META_FIELDS = ("git_commit", "versions", "device", "seed", "started", "model", "model_kind", "dtype",
               "attn_implementation", "methods", "budgets", "tasks", "query_modes", "task_config")
RunMeta = dict[str, Any] | str  # run.json's object, or why there is none
UNREADABLE = "run.json is unreadable (not a JSON object)"


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write ``report.md``, its figures and ``report.html`` into ``out_dir`` for one run or several merged
    (shards, reruns, a bench run); returns the path of report.md."""
    run_dirs, out_dir = [Path(d) for d in run_dirs], Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title, blocks = build_document(run_dirs, out_dir)
    for stale in out_dir.glob(f"{FIGURE_PREFIX}*.png"):  # figures of an earlier version of this report
        stale.unlink()
    for figure in figures(blocks):
        (out_dir / figure.name).write_bytes(figure.png)
    path = out_dir / "report.md"
    path.write_text(to_markdown(title, blocks), encoding="utf-8")
    (out_dir / "report.html").write_text(to_html(title, blocks), encoding="utf-8")
    return path


def render_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> str:
    """The Markdown of ``write_report`` (without writing anything)."""
    return to_markdown(*build_document([Path(d) for d in run_dirs], Path(out_dir)))


def build_document(run_dirs: Sequence[Path], out_dir: Path) -> tuple[str, list[Block]]:
    """The title and blocks both renderings are made from; ``out_dir`` only goes into the regenerate command."""
    rows, skipped = load_rows(run_dirs)
    cells, bench_rows = split_rows(rows)
    tables = build_tables(cells, bench_rows, skipped)
    metas = [(d, read_run_meta(d)) for d in run_dirs]
    run_ids = dict.fromkeys(_shown(meta.get("run_id")) or d.name if isinstance(meta, dict) else d.name
                            for d, meta in metas)
    blocks: list[Block] = [] if tables.cells.empty and not tables.bench.empty else [Text(HOW_TO_READ)]
    random_models = sorted(set(rows.loc[rows["quality_meaningful"].eq(False), "model"]))
    if random_models:
        blocks.append(Alert(f"Random weights ({', '.join(random_models)}): the scores are not meaningful; "
                            "memory and speed numbers still are."))
    if not tables.cells.empty or tables.bench.empty:
        for section in (headline_section, paired_section, curves_section, heatmaps_section, memory_section,
                        speed_section):
            blocks += section(tables)
    blocks += bench_section(tables)
    blocks += _failures_section(tables)
    blocks += _metadata_section(metas)
    command = shlex.join(["python", "-m", "kvbench", "report", *map(str, run_dirs), "--out", str(out_dir)])
    blocks.append(Text(f"Regenerate this report with `{command}`."))
    return f"kvbench report: {', '.join(run_ids)}", blocks


def read_run_meta(run_dir: Path) -> RunMeta:
    """run.json as recorded, or why it cannot be shown: the results deserve a report either way (a kill can cut
    run.json short, and a hand-edited one can hold anything)."""
    try:
        meta = ResultsStore(run_dir).run_meta()
    except ValueError:
        return UNREADABLE
    except OSError as error:
        return f"run.json is unreadable ({error.strerror or type(error).__name__})"
    if meta is None:
        return "no run.json"
    return meta if isinstance(meta, dict) else UNREADABLE


def _failures_section(tables: ReportTables) -> list[Block]:
    failures = tables.failures
    parts: list[Block] = [Heading(2, "Failed cells")]
    if tables.skipped:
        parts.append(Text(f"{tables.skipped} result row(s) had no model, method, task or positive budget and were "
                          "left out of this report."))
    if failures.empty:
        return [*parts, Text("none")]
    several_models = failures["model"].nunique() > 1
    header = [*(["model"] if several_models else []), "method", "budget", "task", "sample", "query mode", "error"]
    rows = [[*([f.model] if several_models else []), f.method, f"{f.budget:.3f}", str(f.task), str(f.sample_id),
             f.mode, f.error if isinstance(f.error, str) and f.error else "(no error recorded)"]
            for f in failures.itertuples(index=False)]
    return [*parts, Text(f"{len(failures)} cell(s) whose last attempt failed (rerun with `--retry-errors` to try "
                         "them again):"), Table(header, rows, set(header))]


def _metadata_section(metas: list[tuple[Path, RunMeta]]) -> list[Block]:
    parts: list[Block] = [Heading(2, "Run metadata")]
    for run_dir, meta in metas:
        if not isinstance(meta, dict):
            parts += [Heading(3, f"`{run_dir}`"), Text(meta)]
            continue
        kind = f" ({_shown(meta['model_kind'])})" if meta.get("model_kind") else ""
        header, rows = ["field", "value"], [
            ["model", f"{_shown(meta.get('model')) or MISSING}{kind}"],
            ["device", _shown(meta.get("device")) or MISSING],
            ["dtype", _shown(meta.get("dtype")) or MISSING],
            ["attention", _shown(meta.get("attn_implementation")) or MISSING],
            ["versions", _pairs(meta.get("versions"), " ")],
            ["git commit", f"`{_shown(meta.get('git_commit')) or 'unknown'}`"],
            ["seed", _shown(meta.get("seed")) or MISSING],
            ["started", _shown(meta.get("started")) or MISSING],
            ["query modes", _listed(meta.get("query_modes"))],
            ["task config", _pairs(meta.get("task_config"), "=")],
        ]
        rows = [row for row in rows if row[1] != MISSING]
        rows += [[str(name), _meta_value(value)] for name, value in meta.items()
                 if name not in META_FIELDS and name not in ("run_id", "command")]
        parts += [Heading(3, f"{_shown(meta.get('run_id')) or run_dir.name} (`{run_dir}`)"),
                  Code(_shown(meta.get("command")) or ""), Table(header, rows, set(header))]
    return parts


def _shown(value: Any) -> str | None:
    """A recorded value as text (anything but a string as JSON), so a hand-edited run.json cannot break the
    section; missing or empty as None."""
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _pairs(value: Any, joiner: str) -> str:
    """A mapping as ``key<joiner>value, ...`` (versions, task config); anything else as recorded."""
    if isinstance(value, dict):
        return ", ".join(f"{k}{joiner}{v}" for k, v in value.items()) or MISSING
    return _meta_value(value) if value else MISSING


def _listed(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or MISSING
    return _meta_value(value) if value else MISSING


def _meta_value(value: Any) -> str:
    """Any other recorded field (e.g. a task's data source or protocol deviations), shown as it is."""
    if isinstance(value, str):
        return value
    return f"`{json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)}`"

