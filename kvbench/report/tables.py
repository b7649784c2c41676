"""The report's numbers: results rows loaded into DataFrames and every table computed from them, unformatted,
for the sections here or any other consumer.

Rows are read defensively, since a report must come out of whatever a run left behind: unknown fields are
ignored, missing ones read as empty, numbers that are not finite numbers as missing, and labels as text; rows
without a model, method, task or positive budget are left out and counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvbench.report.paired import paired_comparisons
from kvbench.report.stats import bootstrap_mean
from kvbench.report.vocabulary import AVERAGE, MODES, REFERENCE, reading_order
from kvbench.results import load_results

BENCH = "bench"  # the ``kind`` of rows written by ``python -m kvbench bench``
LOWER_IS_BETTER_METRICS = frozenset({"perplexity", "ppl", "loss", "nll"})
NUMERIC = ("budget", "score", "achieved_budget", "kv_bytes", "full_kv_bytes", "peak_mem_bytes", "prefill_s",
           "decode_s", "decode_tokens", "context_tokens", "prefill_peak_mem_bytes", "decode_peak_mem_bytes",
           "weights_bytes")
TEXT = ("run_id", "model", "method", "task", "sample_id", "status", "error", "metric", "peak_mem_kind", "kind")
OTHER = ("query_aware", "sample_meta", "quality_meaningful", "masked", "higher_is_better", "repeat")
CELL = ("model", "method", "budget", "task", "sample_id", "mode")
# sample_meta keys that lay a task's samples out on a 2-D grid: (heatmap rows, heatmap columns).
GRIDS = (("depth", "length"),)


@dataclass
class Grid:
    """One task's mean scores over a 2-D grid of its samples' metadata."""

    task: str
    rows: str  # the sample_meta key along the heatmap's rows
    columns: str  # and along its columns
    lower_is_better: bool
    scores: pd.DataFrame  # model, mode, method, budget, row, column, score (mean)


@dataclass
class ReportTables:
    """The report's numbers, unformatted."""

    cells: pd.DataFrame  # quality cells: one row per cell, the last row of a retried cell
    # mode -> model, method, budget, task, score (mean), low, high (95 % bootstrap interval), n, of_full, best
    headline: dict[str, pd.DataFrame]
    achieved: dict[str, pd.DataFrame]  # mode -> model, method, budget, achieved_budget
    paired: dict[str, pd.DataFrame]  # mode -> paired comparisons (see kvbench.report.paired)
    lower_is_better: set[str]  # tasks whose score is better when lower (perplexity)
    configs: pd.DataFrame  # per (model, method, budget, mode): memory, speed, their ratios to full, counts
    grids: list[Grid]
    failures: pd.DataFrame  # cells and bench measurements whose last row is an error
    bench: pd.DataFrame  # per (model, method, budget, length): medians over repeats and ratios to full
    skipped: int = 0  # rows left out for lacking a model, method, task or positive budget


# ---- loading ------------------------------------------------------------------------------------


def load_rows(run_dirs: Sequence[str | Path]) -> tuple[pd.DataFrame, int]:
    """Every usable row of the run dirs with every column the report reads, and how many rows were left out."""
    rows = load_results(*run_dirs).reset_index(drop=True)
    for column in TEXT:
        rows[column] = rows[column].map(_text).astype(object) if column in rows else None
    for column in OTHER:
        if column not in rows:
            rows[column] = None
    for column in NUMERIC:
        values = (pd.to_numeric(rows[column], errors="coerce") if column in rows
                  else pd.Series(np.nan, index=rows.index, dtype=float))
        rows[column] = values.where(np.isfinite(values))
    usable = rows["model"].notna() & rows["method"].notna() & rows["task"].notna() & (rows["budget"] > 0)
    rows = rows[usable].reset_index(drop=True)
    rows["status"] = rows["status"].fillna("error")
    rows["query_aware"] = rows["query_aware"].map(lambda aware: aware is not False)
    rows["mode"] = rows["query_aware"].map(MODES)
    rows["masked"] = rows["masked"].map(lambda m: m is True)
    return rows, int((~usable).sum())


def _text(value: Any) -> str | None:
    """A label as text (a number or a list where a name belongs must not break grouping); missing as None."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value if isinstance(value, str) else str(value)


def split_rows(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Quality cells (a retried cell counts by its last row) and the rows of ``python -m kvbench bench``."""
    bench = rows["kind"] == BENCH
    cells = rows[~bench].drop_duplicates(subset=list(CELL), keep="last").reset_index(drop=True)
    return cells, rows[bench].reset_index(drop=True)


def load_cells(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """Quality cells across all run dirs (shards or several runs)."""
    return split_rows(load_rows(run_dirs)[0])[0]


def load_bench(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """Rows of ``python -m kvbench bench``: one per (method, budget, length, repeat)."""
    return split_rows(load_rows(run_dirs)[0])[1]


# ---- tables -------------------------------------------------------------------------------------


def task_directions(cells: pd.DataFrame) -> dict[str, bool]:
    """Task -> whether a higher score is better: a row's ``higher_is_better`` when recorded, else lower only for
    loss-like metrics (perplexity)."""
    directions = {}
    for task, rows in cells.groupby("task", sort=True):
        recorded = rows["higher_is_better"].dropna()
        if not recorded.empty:
            directions[task] = bool(recorded.iloc[-1])
        else:
            metrics = {str(m).lower() for m in rows["metric"].dropna()}
            directions[task] = not (metrics & LOWER_IS_BETTER_METRICS)
    return directions


def build_tables(cells: pd.DataFrame, bench_rows: pd.DataFrame | None = None, skipped: int = 0) -> ReportTables:
    """All report tables; means are over ok cells with a score, counts over all."""
    ok = cells[cells["status"] == "ok"]
    directions = task_directions(ok)
    headline, achieved, paired = {}, {}, {}
    for mode in (m for m in MODES.values() if m in set(ok["mode"])):
        in_mode = ok[ok["mode"] == mode]
        headline[mode], achieved[mode] = _headline(in_mode, directions)
        paired[mode] = reading_order(paired_comparisons(in_mode, headline[mode], directions)).reset_index(drop=True)
    bench_rows = bench_rows if bench_rows is not None else cells.iloc[:0]
    failures = pd.concat([cells[cells["status"] != "ok"], bench_rows[bench_rows["status"] != "ok"]])
    return ReportTables(
        cells=cells, headline=headline, achieved=achieved, paired=paired,
        lower_is_better={t for t, higher in directions.items() if not higher},
        configs=_configs(cells), grids=_grids(ok, directions),
        failures=reading_order(failures)[["model", "method", "budget", "task", "sample_id", "mode", "error"]],
        bench=_bench(bench_rows), skipped=skipped,
    )


def _headline(ok: pd.DataFrame, directions: dict[str, bool]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean score by (model, method, budget, task) for one query mode with its bootstrap interval and sample
    count, its ratio to full's, and the best method per budget. The average covers higher-is-better tasks only
    (a perplexity is never averaged with accuracies) and is given only where a method has all of them; its
    interval resamples each task's samples separately, so every task keeps its weight."""
    keys = ["model", "method", "budget"]
    scores = {key: rows["score"].dropna().to_numpy() for key, rows in ok.groupby([*keys, "task"], sort=True)}
    estimates = {key: bootstrap_mean([values]) for key, values in scores.items()}
    averaged = [t for t in sorted({key[3] for key in scores}) if directions.get(t, True)]
    if len(averaged) > 1:
        for config in dict.fromkeys(key[:3] for key in scores):
            strata = [scores.get((*config, task), ()) for task in averaged]
            if all(len(s) for s in strata):
                estimates[(*config, AVERAGE)] = bootstrap_mean(strata)
    long = pd.DataFrame([(*key, e.mean, e.low, e.high, e.n) for key, e in estimates.items()],
                        columns=[*keys, "task", "score", "low", "high", "n"])
    reference = long[long["method"] == REFERENCE].groupby(["model", "task"])["score"].mean()
    long = long.join(reference.rename("reference"), on=["model", "task"])
    long["of_full"] = long["score"] / long["reference"].where(long["reference"] != 0)
    lower = long["task"].map(lambda t: not directions.get(t, True))
    # Compared as shown (one decimal, two for lower-is-better), so a bold cell never ties a plain one.
    rounded = long["score"].round(1).where(~lower, -long["score"].round(2))
    contender = long["method"] != REFERENCE
    groups = [long["model"], long["budget"], long["task"]]
    top = rounded.where(contender).groupby(groups).transform("max")
    at_top = contender & (rounded == top)
    # Best only where it separates methods: not a lone contender, not a tie of all of them.
    separates = at_top.groupby(groups).transform("sum") < contender.groupby(groups).transform("sum")
    long["best"] = at_top & separates
    achieved = ok.groupby(keys)["achieved_budget"].mean().reset_index()
    return (reading_order(long.drop(columns="reference")).reset_index(drop=True),
            reading_order(achieved).reset_index(drop=True))


def _configs(cells: pd.DataFrame) -> pd.DataFrame:
    """Memory and speed per (model, method, budget, mode) over every task, with ratios to full's. Decode speed
    is total tokens over total time, over cells that decoded at all."""
    keys = ["model", "method", "budget", "mode"]
    if cells.empty:
        return pd.DataFrame(columns=keys)
    counts = cells.groupby(keys)["status"].agg(n_ok=lambda s: int((s == "ok").sum()),
                                               n_error=lambda s: int((s != "ok").sum()))
    ok = cells[cells["status"] == "ok"]
    decoded = ok["decode_s"] > 0
    ok = ok.assign(decode_tokens=ok["decode_tokens"].where(decoded), decode_s=ok["decode_s"].where(decoded))
    stats = ok.groupby(keys).agg(
        achieved_budget=("achieved_budget", "mean"), kv_bytes=("kv_bytes", "mean"),
        full_kv_bytes=("full_kv_bytes", "mean"), peak_mem_bytes=("peak_mem_bytes", "max"),
        peak_mem_kind=("peak_mem_kind", _kinds), prefill_s=("prefill_s", "mean"),
        decode_tokens=("decode_tokens", "sum"), decode_s=("decode_s", "sum"), masked=("masked", "any"),
    )
    stats["decode_tok_s"] = stats["decode_tokens"] / stats["decode_s"].where(stats["decode_s"] > 0)
    configs = counts.join(stats.drop(columns=["decode_tokens", "decode_s"])).reset_index()
    return _with_ratios(configs, ["model", "mode"], ("kv_bytes", "peak_mem_bytes", "prefill_s", "decode_tok_s"))


def _kinds(kinds: pd.Series) -> str:
    return ", ".join(sorted(set(kinds.dropna())))


def _with_ratios(frame: pd.DataFrame, group: list[str], fields: Sequence[str]) -> pd.DataFrame:
    """Add ``<field>_x``: the value over full's in the same group."""
    reference = frame[frame["method"] == REFERENCE].groupby(group)[list(fields)].mean().reset_index()
    joined = frame.merge(reference, on=group, how="left", suffixes=("", "_full"))
    for name in fields:
        frame[f"{name}_x"] = (joined[name] / joined[f"{name}_full"].where(joined[f"{name}_full"] > 0)).to_numpy()
    return reading_order(frame).reset_index(drop=True)


def _grids(ok: pd.DataFrame, directions: dict[str, bool]) -> list[Grid]:
    """A grid for every task whose samples carry numbers for both keys of one of ``GRIDS`` in their metadata
    (NIAH's depth and length); tasks with one such key or none get no heatmap."""
    meta = ok["sample_meta"].map(lambda m: m if isinstance(m, dict) else {})
    grids = []
    for task, rows in ok.groupby("task", sort=True):
        for rows_key, columns_key in GRIDS:
            cells = rows.assign(row=_meta_number(meta[rows.index], rows_key),
                                column=_meta_number(meta[rows.index], columns_key))
            cells = cells.dropna(subset=["row", "column", "score"])
            if not cells.empty:
                keys = ["model", "mode", "method", "budget", "row", "column"]
                scores = reading_order(cells.groupby(keys)["score"].mean().reset_index()).reset_index(drop=True)
                grids.append(Grid(task, rows_key, columns_key, not directions.get(task, True), scores))
                break
    return grids


def _meta_number(meta: pd.Series, key: str) -> pd.Series:
    values = pd.to_numeric(meta.map(lambda m: m.get(key)), errors="coerce").astype(float)
    return values.where(np.isfinite(values))


def _bench(rows: pd.DataFrame) -> pd.DataFrame:
    """Medians over repeats per (model, method, budget, context length), spreads, ratios to full's."""
    keys = ["model", "method", "budget", "length"]
    ok = rows[rows["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame(columns=keys)
    ok = ok.assign(length=ok["context_tokens"],
                   decode_tok_s=ok["decode_tokens"] / ok["decode_s"].where(ok["decode_s"] > 0),
                   sample_s=ok["prefill_s"] + ok["decode_s"])

    def spread(values: pd.Series) -> float:
        """(max - min) / median: how much the repeats disagree."""
        return (values.max() - values.min()) / values.median() if values.median() else math.nan

    bench = ok.groupby(keys).agg(
        repeats=("prefill_s", "size"), prefill_s=("prefill_s", "median"), prefill_spread=("prefill_s", spread),
        decode_tok_s=("decode_tok_s", "median"), decode_spread=("decode_tok_s", spread),
        kv_bytes=("kv_bytes", "median"), full_kv_bytes=("full_kv_bytes", "median"),
        achieved_budget=("achieved_budget", "median"),
        prefill_peak_mem_bytes=("prefill_peak_mem_bytes", "median"),
        decode_peak_mem_bytes=("decode_peak_mem_bytes", "median"),
        peak_mem_kind=("peak_mem_kind", _kinds), masked=("masked", "any"),
        sample_s=("sample_s", "median"), weights_bytes=("weights_bytes", "median"),
    ).reset_index()
    bench = _with_ratios(bench, ["model", "length"],
                         ("prefill_s", "decode_tok_s", "kv_bytes", "prefill_peak_mem_bytes", "decode_peak_mem_bytes"))
    limit = bandwidth_limit(bench["weights_bytes"], bench["full_kv_bytes"], bench["achieved_budget"])
    return bench.assign(decode_limit=limit, of_limit=bench["decode_tok_s_x"] / limit)


def bandwidth_limit(weights_bytes: float | pd.Series, full_kv_bytes: float | pd.Series,
                    budget: float | pd.Series) -> float | pd.Series:
    """The most a decoding step can speed up when the cache shrinks to ``budget`` of ``full_kv_bytes`` and the
    step is bound by reading memory: ``(W + KV) / (W + b KV)``. Numbers or pandas Series."""
    return (weights_bytes + full_kv_bytes) / (weights_bytes + budget * full_kv_bytes)
