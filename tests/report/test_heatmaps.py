"""Heatmaps for any task whose samples lie on a 2-D grid of their metadata, and for no other."""

from __future__ import annotations

from pathlib import Path

from report_data import cell, needles, table, write_run

from kvbench.report import build_tables, load_cells, write_report


def ruler_rows(method: str, budget: float) -> list[dict]:
    """RULER-style rows: a length and a list of needle depths in sample_meta, no scalar depth."""
    return [cell("r", method, budget, f"niah_single_1-L{length}-{i:03d}", 100.0 * (i % 2), task="ruler/niah_single_1",
                 metric="string_match_all", sample_meta={"subtask": "niah_single_1", "length": length, "index": i,
                                                         "needle_depths": [0.25]})
            for length in (1000, 2000) for i in range(2)]


def qa_rows(method: str, budget: float) -> list[dict]:
    return [cell("r", method, budget, f"qa-{i}", 50.0, task="qa", sample_meta={"dataset": "qa"}) for i in range(2)]


def test_only_tasks_with_a_grid_get_a_heatmap(tmp_path: Path) -> None:
    rows = [*needles("full", 1.0, set(range(6)), 6), *needles("snapkv", 0.5, {0, 1, 2}, 6)]
    rows += [*ruler_rows("full", 1.0), *ruler_rows("snapkv", 0.5), *qa_rows("full", 1.0), *qa_rows("snapkv", 0.5)]
    run = write_run(tmp_path / "r", rows)
    grids = build_tables(load_cells([run])).grids
    assert [(g.task, g.rows, g.columns) for g in grids] == [("niah", "depth", "length")]
    out = tmp_path / "out"
    report = write_report([run], out).read_text()
    assert sorted(p.name for p in out.glob("fig-heatmap-*.png")) == ["fig-heatmap-niah-tiny-query-aware.png"]
    heatmaps = report.split("## Score heatmaps", 1)[1].split("\n## ", 1)[0]
    assert "### niah" in heatmaps and "ruler" not in heatmaps and "qa" not in heatmaps
    assert table(report, "#### niah score by depth (0 = start of the context)")[0] == [
        "query mode", "method @ budget", "0%", "50%", "100%"]
    assert table(report, "#### niah score by context length (tokens)")[2] == [
        "query-aware", "snapkv @ 0.500", "100.0", "0.0"]


def test_tasks_without_a_grid_print_no_depth(tmp_path: Path) -> None:
    rows = [*ruler_rows("full", 1.0), *ruler_rows("snapkv", 0.5), *qa_rows("full", 1.0), *qa_rows("snapkv", 0.5)]
    out = tmp_path / "out"
    report = write_report([write_run(tmp_path / "r", rows)], out).read_text()
    assert "depth" not in report.lower() and "heatmap" not in report.lower()
    assert not list(out.glob("fig-heatmap-*.png"))
    assert "ruler/niah_single_1" in table(report, "### query-aware")[0]


def test_any_task_with_depth_and_length_gets_a_heatmap(tmp_path: Path) -> None:
    rows = [cell("r", "full", 1.0, f"p{i}", 100.0, task="passkey", metric="perplexity",
                 sample_meta={"length": 500 * (1 + i % 2), "depth": i // 2 / 2}) for i in range(6)]
    run = write_run(tmp_path / "r", rows)
    (grid,) = build_tables(load_cells([run])).grids
    assert (grid.task, grid.lower_is_better, len(grid.scores)) == ("passkey", True, 6)
    out = tmp_path / "out"
    report = write_report([run], out).read_text()
    assert (out / "fig-heatmap-passkey-tiny-query-aware.png").read_bytes().startswith(b"\x89PNG")
    assert table(report, "#### passkey score by context length (tokens)")[1] == [
        "query-aware", "full @ 1.000", "100.00", "100.00"]
