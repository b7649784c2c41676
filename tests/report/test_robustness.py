"""Whatever a results folder holds, ``report`` makes a report: missing fields, NaN and odd values, an empty run,
an unreadable run.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from report_data import cell, needles, table, write_run

from kvbench.report import write_report


def test_nan_and_odd_values_are_missing_not_fatal(tmp_path: Path) -> None:
    rows = [*needles("full", 1.0, {0, 1, 2}, 4), *needles("snapkv", 0.5, {0, 1}, 4)]
    rows[0]["score"] = None  # an ok row without a score
    rows[5] |= {"score": "high", "kv_bytes": "lots", "sample_meta": [1, 2], "masked": "yes", "peak_mem_kind": 3,
                "higher_is_better": None, "error": {"nested": True}, "quality_meaningful": "maybe"}
    rows.append(cell("r", "knorm", 0.5, "n00", None, error=None) | {"score": float("nan"), "prefill_s": None})
    rows.append(cell("r", "h2o", 0.0, "n00", 50.0))  # no budget to report it under: left out and counted
    run = write_run(tmp_path / "r", rows)
    text = (run / "results.jsonl").read_text().replace("NaN", "Infinity", 1)  # Python's json reads both
    (run / "results.jsonl").write_text(text)
    report = write_report([run], tmp_path / "out").read_text()
    headline = table(report, "### query-aware")
    assert headline[1][3] == "66.7 (100%) [0.0, 100.0] n=3"  # the null score is not a zero
    assert headline[2][0] == "knorm" and headline[2][3] == "–"  # an infinite score is no score
    assert headline[3][3].endswith("n=3")  # snapkv: "high" is no score either
    assert "1 result row(s) had no model, method, task or positive budget" in report


def test_rows_with_only_the_key_fields_give_a_report(tmp_path: Path) -> None:
    keys = {"model": "tiny", "task": "qa", "query_aware": False, "status": "ok"}
    rows = [keys | {"method": method, "budget": budget, "sample_id": f"s{i}", "score": score + i}
            for method, budget, score in (("full", 1.0, 50.0), ("snapkv", 0.25, 40.0)) for i in range(3)]
    run = tmp_path / "r"
    run.mkdir()
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report([run], tmp_path / "out").read_text()
    assert table(report, "### query-agnostic")[2] == ["snapkv", "0.250", "–", "41.0 (80%) [40.0, 42.0] n=3"]
    assert ["0.250", "snapkv", "qa", "-10.0 [-10.0, -10.0]", "3", "0 / 0 / 3", "too few pairs for a verdict"] in table(
        report, "#### against full")
    assert "## Memory" not in report and "## Speed" not in report and "## Score heatmaps" not in report
    assert f"### `{run}`\n\nno run.json" in report


@pytest.mark.parametrize("meta", ["[1, 2]", '"a string"', "{not json", "\xff\xfe"], ids=["list", "string", "torn",
                                                                                      "binary"])
def test_a_run_json_that_is_not_an_object_is_shown_as_unreadable(tmp_path: Path, meta: str) -> None:
    run = write_run(tmp_path / "r", needles("full", 1.0, {0}, 2))
    (run / "run.json").write_bytes(meta.encode("latin-1"))
    report = write_report([run], tmp_path / "out").read_text()
    assert "run.json is unreadable (not a JSON object)" in report
    assert report.startswith("# kvbench report: r\n") and "## Headline" in report


def test_odd_run_json_fields_are_shown_as_recorded(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", needles("full", 1.0, {0}, 2), run_id=7, command=["python", "-m", "kvbench"],
                    versions=["torch 2.5"], query_modes="query-aware", task_config="default", model={"id": "x"})
    report = write_report([run], tmp_path / "out").read_text()
    assert report.startswith("# kvbench report: 7\n")
    rows = table(report, next(line for line in report.splitlines() if line.startswith("### 7 (")))
    assert ["versions", '`["torch 2.5"]`'] in rows and ["query modes", "query-aware"] in rows
    assert ["task config", "default"] in rows and ['model', '{"id": "x"} (embedded)'] in rows
    assert '```\n["python", "-m", "kvbench"]\n```' in report


def test_an_empty_run_folder_gives_a_report(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    report = write_report([tmp_path / "r"], tmp_path / "out").read_text()
    assert "No cells in these results yet." in report and "no run.json" in report
    assert (tmp_path / "out" / "report.html").is_file()
