"""The quality sections of the report, as blocks: the headline table with its intervals, score-vs-budget curves,
heatmaps for tasks whose samples lie on a 2-D grid, and paired comparisons between methods."""

from __future__ import annotations

from typing import Any

import pandas as pd

from kvbench.report import formatting as fmt
from kvbench.report import plots
from kvbench.report.paired import MIN_PAIRS
from kvbench.report.render import Block, Figure, Heading, SideBySide, Table, Text, slug
from kvbench.report.stats import RESAMPLES
from kvbench.report.tables import Grid, ReportTables
from kvbench.report.vocabulary import AVERAGE, reading_order

FIGURE_PREFIX = "fig-"
MASKED = "masked (no memory saved)"
AXES = {"depth": plots.Axis("depth (0 = start of the context)", "{:.0%}"),
        "length": plots.Axis("context length (tokens)", "{:g}")}


def mode_blocks(per_mode: dict[str, list[Block]], level: int = 3) -> list[Block]:
    """Query-aware and query-agnostic next to each other where both ran."""
    if len(per_mode) > 1:
        return [SideBySide([[Heading(level, mode), *blocks] for mode, blocks in per_mode.items()])]
    return [block for mode, blocks in per_mode.items() for block in (Heading(level, mode), *blocks)]


def method_label(method: str, masked: bool) -> str:
    return f"{method} [{MASKED}]" if masked else method


def task_label(task: str, tables: ReportTables) -> str:
    return f"{task} ↓" if task in tables.lower_is_better else task


def headline_section(tables: ReportTables) -> list[Block]:
    parts: list[Block] = [Heading(2, "Headline: score by method and budget")]
    cells = tables.cells
    if cells.empty:
        return [*parts, Text("No cells in these results yet.")]
    if not tables.headline:
        return [*parts, Text(f"No cell finished successfully ({len(cells)} failed); see Failed cells below.")]
    note = ("Rows are method @ budget (budgets descending). A cell is the mean score over the ok samples, its "
            "share of `full`'s score in parentheses, its 95 % confidence interval in brackets (percentile "
            f"bootstrap over samples, {RESAMPLES} resamples; none below 2 samples) and n, the number of samples "
            "scored. The average is the mean of the task means; its interval resamples every task. **Bold**: the "
            "highest mean among the compression methods at that budget (left plain when all tie); whether it is "
            "distinguishable from the runner-up is shown under Paired comparisons. The achieved budget is "
            "measured.")
    if tables.lower_is_better:
        note += (" Tasks marked ↓ are lower-is-better (e.g. perplexity): their parenthesis is the ratio to "
                 "full's (×1.20 = 20 % worse), they are best when lowest and are left out of the average.")
    parts.append(Text(note))
    masked = set(map(tuple, cells.loc[cells["masked"], ["model", "method"]].drop_duplicates().to_numpy()))
    several_models = cells["model"].nunique() > 1
    per_mode = {}
    for mode, long in tables.headline.items():
        tasks = sorted(set(long["task"]), key=lambda t: (t == AVERAGE, t))
        achieved = tables.achieved[mode].set_index(["model", "method", "budget"])["achieved_budget"]
        header = [*(["model"] if several_models else []), "method", "budget", "achieved",
                  *(task_label(t, tables) for t in tasks)]
        by_cell = {(c.model, c.method, c.budget, c.task): c for c in long.itertuples(index=False)}
        rows = []
        for model, method, budget in dict.fromkeys(zip(long["model"], long["method"], long["budget"], strict=True)):
            values = []
            for task in tasks:
                c = by_cell.get((model, method, budget, task))
                values.append(fmt.MISSING if c is None else fmt.score(
                    c.score, c.low, c.high, c.n, c.of_full, bool(c.best), task in tables.lower_is_better))
            rows.append([*([model] if several_models else []), method_label(method, (model, method) in masked),
                         f"{budget:.3f}", fmt.fixed(achieved.get((model, method, budget)), 3), *values])
        per_mode[mode] = [Table(header, rows, {"model", "method"})]
    return [*parts, *mode_blocks(per_mode)]


def curves_section(tables: ReportTables) -> list[Block]:
    if not tables.headline:
        return []
    colours = plots.palette(list(tables.cells["method"]))
    per_mode: dict[str, list[Block]] = {}
    for mode, long in tables.headline.items():
        for model, scores in long.groupby("model", sort=False):
            name = f"{FIGURE_PREFIX}curves-{slug(model)}-{slug(mode)}.png"
            png = plots.score_curves(scores, tables.lower_is_better, colours, f"{model}, {mode}")
            per_mode.setdefault(mode, []).append(Figure(
                name, png, f"Score vs budget, {model}, {mode}: one line per method with its 95 % interval shaded, "
                           "full dashed."))
    return [Heading(2, "Score vs budget"), *mode_blocks(per_mode)]


def heatmaps_section(tables: ReportTables) -> list[Block]:
    if not tables.grids:
        return []
    parts: list[Block] = [
        Heading(2, "Score heatmaps"),
        Text("Tasks whose samples lie on a grid of two metadata values: the mean score in every cell of the grid, "
             "one panel per method and budget, green = better. The tables below give the means along each axis "
             "alone (the mean of the grid cells' means)."),
    ]
    for grid in tables.grids:
        parts.append(Heading(3, grid.task))
        per_mode: dict[str, list[Block]] = {}
        rows_axis, columns_axis = _axis(grid.rows), _axis(grid.columns)
        for (model, mode), frame in grid.scores.groupby(["model", "mode"], sort=False):
            name = f"{FIGURE_PREFIX}heatmap-{slug(grid.task)}-{slug(model)}-{slug(mode)}.png"
            png = plots.heatmaps(frame, rows_axis, columns_axis, grid.lower_is_better, f"{grid.task}, {model}, {mode}")
            per_mode.setdefault(mode, []).append(Figure(
                name, png, f"{grid.task}, {model}, {mode}: rows {rows_axis.label}, columns {columns_axis.label}."))
        parts += mode_blocks(per_mode, level=4)
        parts += _axis_tables(grid, "column", columns_axis) + _axis_tables(grid, "row", rows_axis)
    return parts


def _axis(key: str) -> plots.Axis:
    return AXES.get(key, plots.Axis(key, "{:g}"))


def _axis_tables(grid: Grid, column: str, axis: plots.Axis) -> list[Block]:
    """Mean score by one axis of the grid, a row per (query mode, method @ budget)."""
    several_models = grid.scores["model"].nunique() > 1
    table = grid.scores.pivot_table(index=["model", "mode", "method", "budget"], columns=column, values="score",
                                    aggfunc="mean")
    table = table.reindex(pd.MultiIndex.from_frame(reading_order(table.index.to_frame(index=False))))
    header = [*(["model"] if several_models else []), "query mode", "method @ budget",
              *(axis.tick.format(v) for v in table.columns)]
    places = fmt.digits(grid.lower_is_better)
    rows = [[*([model] if several_models else []), mode, f"{method} @ {budget:.3f}",
             *(fmt.fixed(v, places) for v in values)] for (model, mode, method, budget), values in table.iterrows()]
    return [Heading(4, f"{grid.task} score by {axis.label}"), Table(header, rows, {"model", "query mode",
                                                                                   "method @ budget"})]


def paired_section(tables: ReportTables) -> list[Block]:
    frames = {mode: frame for mode, frame in tables.paired.items() if not frame.empty}
    if not frames:
        return []
    parts: list[Block] = [
        Heading(2, "Paired comparisons"),
        Text("Methods compared on the same samples (same model, query mode, task and sample). The difference is "
             "the method's score minus the other's, averaged over the paired samples, with its 95 % interval "
             f"from a paired bootstrap ({RESAMPLES} resamples; the average resamples each task separately). Wins "
             "/ ties / losses count the samples on which the method did better, the same or worse (↓ tasks: "
             "lower is better). A verdict names the better method only where the interval excludes 0, on at least "
             f"{MIN_PAIRS} pairs; otherwise the two are not distinguishable on these samples, whatever the "
             "headline's bold says."),
    ]
    several_models = any(frame["model"].nunique() > 1 for frame in frames.values())
    for mode, frame in frames.items():
        for model, rows in frame.groupby("model", sort=False):
            parts.append(Heading(3, f"{model}, {mode}" if several_models else mode))
            for baseline, title in ((True, "against full"), (False, "against the best other method at the budget")):
                chosen = rows[rows["baseline"] == baseline]
                if chosen.empty:
                    continue
                header = ["budget", "method", *([] if baseline else ["vs"]), "task", "difference [95 % CI]", "pairs",
                          "wins / ties / losses", "verdict"]
                body = [[f"{r.budget:.3f}", r.method, *([] if baseline else [r.other]), task_label(r.task, tables),
                         _difference(r, r.task in tables.lower_is_better), str(r.n),
                         f"{r.wins} / {r.ties} / {r.losses}", _verdict(r)] for r in chosen.itertuples(index=False)]
                parts += [Heading(4, title), Table(header, body, {"method", "vs", "task", "verdict"})]
    return parts


def _difference(r: Any, lower_is_better: bool) -> str:
    places = fmt.digits(lower_is_better)
    return f"{fmt.signed(r.difference, places)} {fmt.interval(r.low, r.high, places)}".rstrip()


def _verdict(r: Any) -> str:
    if isinstance(r.better, str):
        return f"{r.better} better"
    if fmt.missing(r.low):
        return "too few pairs for an interval"
    return "too few pairs for a verdict" if r.n < MIN_PAIRS else "not distinguishable"
