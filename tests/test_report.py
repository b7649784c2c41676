"""report.md from synthetic results files: expected means are worked out by hand below."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvbench.report import build_tables, load_cells, write_report

MiB = 1024 * 1024
SAMPLES = {"s0": {"length": 1000, "depth": 0.0}, "s1": {"length": 2000, "depth": 1.0}}


def cell(run_id: str, method: str, budget: float, sample: str, score: float | None, aware: bool = True,
         task: str = "niah", error: str | None = None, meaningful: bool = True) -> dict[str, Any]:
    row = {"run_id": run_id, "model": "tiny", "method": method, "budget": budget, "task": task,
           "sample_id": sample, "sample_meta": SAMPLES[sample], "query_aware": aware, "metric": "contains",
           "seed": 0, "quality_meaningful": meaningful}
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
    """A second shard: streamingllm 27 (30%) at 0.5 and 9 (10%) at 0.25, query-aware."""
    rows = [cell("run-b", "streamingllm", b, s, score)
            for b, score in ((0.5, 27), (0.25, 9)) for s in ("s0", "s1")]
    return write_run(root / "run-b", rows)


def table(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the first table after a heading, header row first."""
    blocks = (block.strip() for block in markdown.split(heading + "\n", 1)[1].split("\n\n"))
    lines = next(block for block in blocks if block.startswith("|")).splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]


def by_label(rows: list[list[str]]) -> dict[str, list[str]]:
    return {row[0]: row[1:] for row in rows}


@pytest.fixture
def report(tmp_path: Path) -> str:
    path = write_report([run_a(tmp_path), run_b(tmp_path)], tmp_path / "out")
    assert path == tmp_path / "out" / "report.md"
    return path.read_text()


def test_headline_means_percent_of_full_and_best(report: str) -> None:
    aware = by_label(table(report, "### query-aware (task niah)"))
    assert aware["method"] == ["1.000", "0.500", "0.250"]
    assert aware["full"] == ["90.0 (100%)", "–", "–"]
    assert aware["snapkv"] == ["–", "**81.0** (90%)", "54.0 (60%)"]
    assert aware["knorm"] == ["–", "45.0 (50%)", "**63.0** (70%)"]  # 70 (the retry) and 56
    assert aware["streamingllm"] == ["–", "27.0 (30%)", "9.0 (10%)"]  # merged from run-b
    assert list(aware) == ["method", "full", "knorm", "snapkv", "streamingllm"]
    agnostic = by_label(table(report, "### query-agnostic (task niah)"))
    assert agnostic == {"method": ["1.000", "0.500"], "full": ["90.0 (100%)", "–"],
                        "snapkv": ["–", "**36.0** (40%)"]}
    assert report.index("### query-aware") < report.index("### query-agnostic")


def test_details_niah_failures_metadata(report: str, tmp_path: Path) -> None:
    details = [line for line in report.splitlines() if line.startswith("| snapkv ") and "query-agnostic" in line]
    assert [c.strip() for c in details[0].strip("|").split("|")] == [
        "snapkv", "0.500", "query-agnostic", "36.0", "0.500", "512 KiB", "1.00 MiB", "0.250", "20.0",
        "3.00 MiB", "cpu_peak_rss_delta", "1 / 1",
    ]
    by_length = table(report, "### niah score by context length (tokens)")
    assert by_length[0] == ["query mode", "method @ budget", "1000", "2000"]
    assert ["query-aware", "knorm @ 0.250", "70.0", "56.0"] in by_length
    assert by_length[-1] == ["query-agnostic", "snapkv @ 0.500", "–", "36.0"]
    by_depth = table(report, "### niah score by needle depth (0 = start of the context)")
    assert by_depth[0] == ["query mode", "method @ budget", "0.00", "1.00"]
    assert ["query-aware", "snapkv @ 0.250", "60.0", "48.0"] in by_depth
    failed = report.split("## Failed cells", 1)[1].split("## Run metadata")[0]
    assert "OutOfMemoryError: CUDA out of memory" in failed and "1 cell(s)" in failed
    assert "transient glitch" not in report
    assert "```\npython -m kvbench run --methods snapkv,knorm --run-id run-a\n```" in report
    assert "git commit: `abc1234`" in report and "versions: kvbench 0.1.0, torch 2.5.1" in report
    assert report.startswith("# kvbench report: run-a, run-b")
    assert f"python -m kvbench report {tmp_path / 'run-a'} {tmp_path / 'run-b'} --out {tmp_path / 'out'}" in report
    assert "random weights" not in report


def test_build_tables_merges_runs_and_keeps_last_row_of_a_cell(tmp_path: Path) -> None:
    tables = build_tables(load_cells([run_a(tmp_path), run_b(tmp_path)]))
    assert len(tables.cells) == 18  # 15 rows in run-a with one retried cell, 4 in run-b; torn line skipped
    headline = tables.headline["query-aware"]
    assert headline.loc[("tiny", "knorm"), (0.25, "niah")] == pytest.approx(63.0)
    assert tables.of_full["query-aware"].loc[("tiny", "snapkv"), (0.5, "niah")] == pytest.approx(90.0)
    assert list(tables.failures["sample_id"]) == ["s0"]
    assert tables.niah_by_depth.loc[("tiny", "query-aware", "knorm", 0.25), 0.0] == pytest.approx(70.0)


def test_several_tasks_get_an_average(tmp_path: Path) -> None:
    rows = [cell("r", "full", 1.0, "s0", 80), cell("r", "full", 1.0, "s0", 40, task="qa"),
            cell("r", "snapkv", 0.5, "s0", 60), cell("r", "snapkv", 0.5, "s0", 30, task="qa"),
            cell("r", "knorm", 0.5, "s0", 70)]  # no qa score: no average, it would mix task sets
    report = write_report([write_run(tmp_path / "r", rows)], tmp_path / "out").read_text()
    aware = by_label(table(report, "### query-aware"))
    assert aware["method"] == ["1.000 · niah", "1.000 · qa", "1.000 · average", "0.500 · niah", "0.500 · qa",
                               "0.500 · average"]
    assert aware["full"] == ["80.0 (100%)", "40.0 (100%)", "60.0 (100%)", "–", "–", "–"]
    assert aware["snapkv"] == ["–", "–", "–", "60.0 (75%)", "**30.0** (75%)", "**45.0** (75%)"]
    assert aware["knorm"] == ["–", "–", "–", "**70.0** (88%)", "–", "–"]


def test_random_weights_warning_only_when_quality_is_not_meaningful(tmp_path: Path) -> None:
    rows = [cell("r", "full", 1.0, "s0", 0, meaningful=False), cell("r", "snapkv", 0.5, "s0", 0, meaningful=False)]
    report = write_report([write_run(tmp_path / "r", rows, model_kind="random")], tmp_path / "out").read_text()
    assert "**Warning: random weights (tiny)" in report


@pytest.mark.parametrize("rows", [[], [cell("r", "snapkv", 0.5, "s0", None, error="ValueError: bad")]],
                         ids=["empty", "all-error"])
def test_empty_or_all_error_results_still_give_a_report(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    report = write_report([write_run(tmp_path / "r", rows, torn='{"run')], tmp_path / "out").read_text()
    if rows:
        assert "No cell finished successfully (1 failed)" in report and "ValueError: bad" in report
    else:
        assert "No cells in these results yet." in report and "## Failed cells\n\nnone" in report
    assert "## Run metadata" in report and "python -m kvbench report" in report
