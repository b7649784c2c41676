"""The report of two merged runs (run-a and run-b of report_data), written once for the tests that read it."""

from __future__ import annotations

from pathlib import Path

import pytest
from report_data import run_a, run_b

from kvbench.report import write_report


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    (root / "out").mkdir()
    (root / "out" / "fig-left-over-from-before.png").write_bytes(b"old")
    path = write_report([run_a(root), run_b(root)], root / "out")
    assert path == root / "out" / "report.md"
    return root


@pytest.fixture(scope="module")
def report(written: Path) -> str:
    return (written / "out" / "report.md").read_text()
