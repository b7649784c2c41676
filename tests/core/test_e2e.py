"""End to end on the real embedded model (SmolLM2-135M-Instruct, offline, CPU)."""

from __future__ import annotations

import pytest

from kvbench import cli
from kvbench.results import CELL_KEY, ROW_FIELDS, read_rows

pytestmark = pytest.mark.e2e


def test_cli_on_embedded_model_finds_needle_measures_and_resumes(tmp_path, capsys):
    args = ["run", "--methods", "full,snapkv,streamingllm", "--budget", "0.5", "--tasks", "niah",
            "--lengths", "1000", "--depths", "0.25,0.75", "--query-aware", "--query-agnostic",
            "--results-dir", str(tmp_path / "results"), "--reports-dir", str(tmp_path / "reports"),
            "--run-id", "e2e"]
    assert cli.main(args) == 0
    rows = list(read_rows(tmp_path / "results" / "e2e" / "results.jsonl"))
    assert len(rows) == 2 * 2 * 3  # samples x modes x methods
    for row in rows:
        assert set(ROW_FIELDS) <= set(row) and row["status"] == "ok", row.get("error")
        assert row["model"] == "smollm2-135m" and 1000 <= row["context_tokens"] <= 1100
    full = [r for r in rows if r["method"] == "full"]
    assert [r["score"] for r in full] == [100.0] * 4, [r["prediction"] for r in full]
    # SmolLM2: 30 layers x 3 KV heads x 64 dims x (K and V) x fp32 = 46,080 bytes per token.
    for row in rows:
        held = row["kv_bytes"] / 46_080
        assert held == int(held)
        if row["method"] != "full":
            assert held == int(0.5 * row["full_kv_bytes"] / 46_080)  # floor(budget x tokens) per KV head
    report = (tmp_path / "reports" / "e2e" / "report.md").read_text()
    assert "query-aware" in report and "query-agnostic" in report and "snapkv" in report
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "12 cells, 12 already done, 0 to run" in capsys.readouterr().out
    keys = [tuple(r[k] for k in CELL_KEY) for r in read_rows(tmp_path / "results" / "e2e" / "results.jsonl")]
    assert len(keys) == len(set(keys)) == 12
