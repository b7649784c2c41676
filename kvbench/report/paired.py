"""Paired comparisons: two methods scored on the same samples (same model, query mode, task and sample id), so
that what the samples share (an easy or a hard sample) drops out of the difference and small-sample noise is
not read as a win."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from kvbench.report.stats import Estimate, bootstrap_mean
from kvbench.report.vocabulary import AVERAGE, REFERENCE

COLUMNS = ("model", "budget", "method", "other", "baseline", "task", "difference", "low", "high", "n", "wins",
           "ties", "losses", "better")
TIE = 1e-9
# Fewer pairs give no verdict: on few samples the percentile bootstrap's interval is too narrow (on 2 pairs it is
# their range, so two pairs that happen to agree, as a fair coin's two tosses do half the time, would make a win).
MIN_PAIRS = 10


def paired_comparisons(ok: pd.DataFrame, headline: pd.DataFrame, directions: dict[str, bool]) -> pd.DataFrame:
    """For one query mode, per task and on the average: each method at each budget against ``full``
    (``baseline`` True) and against the best other method at that budget by mean score (the best one against
    the runner-up). ``difference`` is the method's score minus the other's, the mean over paired samples with
    a 95 % paired-bootstrap interval; wins, ties and losses count samples, a win being a better score in the
    task's direction; ``better`` names the better method only where the interval excludes 0 and there are at
    least ``MIN_PAIRS`` pairs."""
    scored = ok.dropna(subset=["score", "sample_id"])
    samples: dict[tuple, dict[str, pd.Series]] = {}
    for (model, method, budget, task), rows in scored.groupby(["model", "method", "budget", "task"], sort=True):
        samples.setdefault((model, method, budget), {})[task] = rows.set_index("sample_id")["score"]
    averaged = [t for t in sorted(set(headline["task"]) - {AVERAGE}) if directions.get(t, True)]
    means = headline.dropna(subset=["score"])
    records = []
    for (model, method, budget), tasks in samples.items():
        if method == REFERENCE:
            continue
        full = [config for config in samples if config[:2] == (model, REFERENCE)]
        rivals = means[(means["model"] == model) & (means["budget"] == budget)
                       & ~means["method"].isin([method, REFERENCE])]
        for task in [*sorted(tasks), *([AVERAGE] if len(averaged) > 1 else [])]:
            strata = averaged if task == AVERAGE else [task]
            higher = directions.get(task, True)
            others = [(max(full, key=lambda config: config[2]), True)] if full else []
            best = _best(rivals[rivals["task"] == task], higher)
            if best is not None:
                others.append(((model, best, budget), False))
            for other, baseline in others:
                compared = _compare(tasks, samples.get(other, {}), strata, higher)
                if compared is not None:
                    estimate, counts = compared
                    better = _better(method, other[1], estimate, higher) if estimate.n >= MIN_PAIRS else None
                    records.append((model, budget, method, other[1], baseline, task, estimate.mean, estimate.low,
                                    estimate.high, estimate.n, *counts, better))
    return pd.DataFrame(records, columns=list(COLUMNS))


def _best(rivals: pd.DataFrame, higher: bool) -> str | None:
    """The method with the best mean score; a tie goes to the first name A-Z."""
    if rivals.empty:
        return None
    ranked = rivals.sort_values(["score", "method"], ascending=[not higher, True], kind="stable")
    return str(ranked["method"].iloc[0])


def _compare(mine: dict[str, pd.Series], theirs: dict[str, pd.Series], tasks: Sequence[str],
             higher: bool) -> tuple[Estimate, tuple[int, int, int]] | None:
    """The mean paired difference with its interval, and (wins, ties, losses), over the samples both have, task
    by task; None where some task has no pair (an average must cover every task)."""
    strata = []
    for task in tasks:
        if task not in mine or task not in theirs:
            return None
        differences = mine[task].sub(theirs[task]).dropna().to_numpy()
        if not len(differences):
            return None
        strata.append(differences)
    signed = np.concatenate(strata) * (1 if higher else -1)
    counts = int((signed > TIE).sum()), int((np.abs(signed) <= TIE).sum()), int((signed < -TIE).sum())
    return bootstrap_mean(strata), counts


def _better(method: str, other: str, estimate: Estimate, higher: bool) -> str | None:
    if estimate.low > 0:
        return method if higher else other
    if estimate.high < 0:
        return other if higher else method
    return None
