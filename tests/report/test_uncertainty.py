"""Confidence intervals on the headline and paired comparisons between methods: small-sample differences must
not read as wins, consistent ones must."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from report_data import cell, needles, table, write_run

from kvbench.report import build_tables, load_cells, write_report
from kvbench.report.stats import bootstrap_mean


def test_all_equal_scores_give_a_zero_width_interval() -> None:
    estimate = bootstrap_mean([[40.0] * 15])
    assert (estimate.mean, estimate.low, estimate.high, estimate.n) == (40.0, 40.0, 40.0, 15)


def test_interval_is_seeded_ignores_order_and_needs_two_samples() -> None:
    scores = [0.0, 100.0, 100.0, 0.0, 100.0, 0.0, 0.0, 100.0, 100.0, 100.0]
    first = bootstrap_mean([scores])
    assert first == bootstrap_mean([scores[::-1]])
    assert first.low < first.mean == 60.0 < first.high
    alone = bootstrap_mean([[70.0]])
    assert alone.mean == 70.0 and alone.n == 1 and math.isnan(alone.low) and math.isnan(alone.high)
    assert bootstrap_mean([[]]).n == 0 and math.isnan(bootstrap_mean([[]]).mean)


def test_average_interval_weighs_every_task_equally() -> None:
    estimate = bootstrap_mean([[100.0] * 2, [0.0] * 8])  # 50 (task means), not 20 (pooled samples)
    assert (estimate.mean, estimate.low, estimate.high, estimate.n) == (50.0, 50.0, 50.0, 10)


def test_headline_cells_show_interval_and_n(tmp_path: Path) -> None:
    rows = [*needles("full", 1.0, set(range(15)), 15), *needles("snapkv", 0.5, {0, 1, 2, 3}, 15),
            *needles("knorm", 0.5, set(range(12)), 15)]
    report = write_report([write_run(tmp_path / "r", rows)], tmp_path / "out").read_text()
    headline = table(report, "### query-aware")
    assert headline[1] == ["full", "1.000", "1.000", "100.0 (100%) [100.0, 100.0] n=15"]
    knorm = headline[2][3]
    assert knorm.startswith("**80.0** (80%) [") and knorm.endswith("] n=15")
    low, high = map(float, knorm.split("[")[1].split("]")[0].split(", "))
    assert 50 < low < 80 < high <= 100


def test_row_order_does_not_change_the_report(tmp_path: Path) -> None:
    rows = [*needles("full", 1.0, set(range(10)), 10), *needles("snapkv", 0.5, {1, 4, 5, 8}, 10),
            *needles("knorm", 0.5, {0, 1, 2, 3, 9}, 10)]
    reports = [write_report([write_run(tmp_path / name, order)], tmp_path / "out").read_text()
               for name, order in (("r", rows), ("r-reversed", rows[::-1]))]
    assert reports[0].replace("r-reversed", "r") == reports[1].replace("r-reversed", "r")


def paired(tmp_path: Path, rows: list[dict]) -> tuple[dict, str]:
    """The paired comparisons of the query-aware mode by (method, other, task), and the report's Markdown."""
    run = write_run(tmp_path / "r", rows)
    frame = build_tables(load_cells([run])).paired["query-aware"]
    by_pair = {(r.method, r.other, r.task): r for r in frame.itertuples(index=False)}
    return by_pair, write_report([run], tmp_path / "out").read_text()


def test_one_needle_on_fifteen_samples_is_not_distinguishable(tmp_path: Path) -> None:
    found = set(range(4, 15))
    rows = [*needles("full", 1.0, set(range(15)), 15), *needles("snapkv", 0.06, found, 15),
            *needles("dynakv+snapkv", 0.06, found | {0}, 15)]
    by_pair, report = paired(tmp_path, rows)
    versus = by_pair[("snapkv", "dynakv+snapkv", "niah")]
    assert versus.n == 15 and (versus.wins, versus.ties, versus.losses) == (0, 14, 1)
    assert versus.difference == pytest.approx(-100 / 15) and versus.low < 0 <= versus.high
    assert pd.isna(versus.better)
    best = table(report, "#### against the best other method at the budget")
    assert best[0] == ["budget", "method", "vs", "task", "difference [95 % CI]", "pairs", "wins / ties / losses",
                       "verdict"]
    assert ["0.060", "snapkv", "dynakv+snapkv", "niah", "-6.7 [-20.0, 0.0]", "15", "0 / 14 / 1",
            "not distinguishable"] in best
    assert ["0.060", "dynakv+snapkv", "snapkv", "niah", "+6.7 [0.0, 20.0]", "15", "1 / 14 / 0",
            "not distinguishable"] in best
    # Both lost 4 or 5 of 15 needles against full: that much is no accident.
    against_full = table(report, "#### against full")
    assert ["0.060", "snapkv", "niah", "-26.7 [-46.7, -6.7]", "15", "0 / 11 / 4", "full better"] in against_full


def test_consistent_difference_on_thirty_samples_is_distinguishable(tmp_path: Path) -> None:
    rows = [*needles("full", 1.0, set(range(30)), 30), *needles("snapkv", 0.1, set(range(10)), 30),
            *needles("knorm", 0.1, set(range(20)), 30)]
    by_pair, report = paired(tmp_path, rows)
    versus = by_pair[("knorm", "snapkv", "niah")]
    assert (versus.wins, versus.ties, versus.losses) == (10, 20, 0)
    assert versus.difference == pytest.approx(100 / 3) and 0 < versus.low < versus.difference < versus.high
    assert versus.better == "knorm"
    assert by_pair[("snapkv", "knorm", "niah")].better == "knorm"
    assert by_pair[("snapkv", "full", "niah")].better == "full"
    assert "| knorm better " in report


def test_lower_is_better_tasks_win_when_lower_and_the_average_pairs_every_task(tmp_path: Path) -> None:
    def rows(method: str, budget: float, ppl: float, qa: float) -> list[dict]:
        return [cell("r", method, budget, f"s{i}", value + i, task=task, sample_meta={},
                     **({"metric": "perplexity"} if task == "ppl" else {}))
                for i in range(10) for task, value in (("ppl", ppl), ("qa", qa), ("niah", qa))]

    by_pair, report = paired(tmp_path, [*rows("full", 1.0, 10.0, 50.0), *rows("snapkv", 0.5, 12.0, 40.0),
                                        *rows("knorm", 0.5, 11.0, 40.0)])
    ppl = by_pair[("snapkv", "knorm", "ppl")]
    assert ppl.difference == pytest.approx(1.0) and (ppl.wins, ppl.losses) == (0, 10) and ppl.better == "knorm"
    average = by_pair[("snapkv", "full", "average")]
    assert average.n == 20 and average.difference == pytest.approx(-10.0) and average.better == "full"
    assert ("snapkv", "knorm", "average") in by_pair and "| ppl ↓ " in report
    # Ties on every sample: no winner, however many samples.
    tie = by_pair[("snapkv", "knorm", "qa")]
    assert (tie.wins, tie.ties, tie.losses) == (0, 10, 0) and pd.isna(tie.better)
    assert json.dumps(tie.difference) == "0.0"


def test_few_pairs_give_no_verdict_even_when_they_all_agree(tmp_path: Path) -> None:
    rows = [*needles("full", 1.0, set(range(9)), 9), *needles("snapkv", 0.1, set(), 9)]
    by_pair, report = paired(tmp_path, rows)
    lost = by_pair[("snapkv", "full", "niah")]
    assert (lost.difference, lost.low, lost.high, lost.losses) == (-100.0, -100.0, -100.0, 9) and pd.isna(lost.better)
    assert ["0.100", "snapkv", "niah", "-100.0 [-100.0, -100.0]", "9", "0 / 0 / 9",
            "too few pairs for a verdict"] in table(report, "#### against full")
