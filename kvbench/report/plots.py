"""Report figures (matplotlib + seaborn), returned as PNG bytes.

Figures are drawn on ``matplotlib.figure.Figure`` objects (no pyplot state, no display needed) and
saved without a timestamp or version stamp, so the same results give byte-identical PNGs and a
regenerated report only changes where the numbers changed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import pandas as pd
import seaborn as sns
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from kvbench.report.vocabulary import REFERENCE

PANEL_COLUMNS = 4
STYLE = {"axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 8}


@dataclass(frozen=True)
class Axis:
    """How one sample_meta key reads on a heatmap: its label and the format of its tick values."""

    label: str
    tick: str  # a str.format pattern, e.g. "{:.0%}"


def palette(methods: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per method, the same in every figure of a report."""
    names = sorted(set(methods) - {REFERENCE})
    return dict(zip(names, sns.color_palette("tab10" if len(names) <= 10 else "husl", len(names)), strict=True))


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _budget_axis(ax, budgets: Sequence[float]) -> None:
    ax.set_xscale("log")
    ticks = sorted(set(budgets))
    ax.set_xticks(ticks, [f"{b:g}" for b in ticks])
    ax.minorticks_off()


def score_curves(scores: pd.DataFrame, lower_is_better: set[str], colours: dict, title: str) -> bytes:
    """Score vs budget, one panel per task (``average`` last), one line per method with its 95 % interval
    shaded, ``full`` dashed. ``scores`` has columns method, budget, task, score, low, high."""
    tasks = list(dict.fromkeys(scores["task"]))
    columns = min(PANEL_COLUMNS, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    with sns.axes_style("whitegrid"), matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(3.4 * columns, 2.7 * rows + 0.6), layout="constrained")
        axes = fig.subplots(rows, columns, squeeze=False).ravel()
        for ax, task in zip(axes, tasks, strict=False):
            panel = scores[scores["task"] == task]
            budgets = sorted(set(panel.loc[panel["method"] != REFERENCE, "budget"]))
            for method, line in panel[panel["method"] != REFERENCE].groupby("method", sort=True):
                line = line.sort_values("budget")
                ax.plot(line["budget"], line["score"], marker="o", markersize=4, label=method,
                        color=colours.get(method))
                ax.fill_between(line["budget"], line["low"], line["high"], color=colours.get(method), alpha=0.15,
                                linewidth=0)
            for score in panel.loc[panel["method"] == REFERENCE, "score"].dropna():
                ax.axhline(score, linestyle="--", color="0.25", linewidth=1.2, label=f"{REFERENCE} (reference)")
            if budgets:
                _budget_axis(ax, [*budgets, 1.0])
            shown = panel[["score", "low", "high"]]
            if task not in lower_is_better and shown.min().min() >= 0 and shown.max().max() <= 100:
                ax.set_ylim(-4, 104)
            ax.set_title(task + (" (lower is better)" if task in lower_is_better else ""))
            ax.set_xlabel("budget (log scale)")
            ax.set_ylabel("score")
        for ax in axes[len(tasks):]:
            ax.set_axis_off()
        handles: dict[str, object] = {}
        for ax in axes[: len(tasks)]:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, handle)
        if handles:
            fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=min(6, len(handles)))
        fig.suptitle(title)
        return _png(fig)


def heatmaps(scores: pd.DataFrame, rows: Axis, columns: Axis, lower_is_better: bool, title: str) -> bytes:
    """Mean score over a task's 2-D sample grid (e.g. needle depth x context length): one panel per method
    (rows) and budget (columns), green = better. ``scores`` has method, budget, row, column, score."""
    methods = list(dict.fromkeys(scores["method"]))
    budgets = sorted(set(scores["budget"]), reverse=True)
    row_values = sorted(set(scores["row"]))
    column_values = sorted(set(scores["column"]))
    low, high = scores["score"].min(), scores["score"].max()
    percent_scale = low >= 0 and high <= 100
    norm = Normalize(0, 100) if percent_scale else Normalize(low, high if high > low else low + 1)
    cmap = "RdYlGn_r" if lower_is_better else "RdYlGn"
    with sns.axes_style("white"), matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(0.45 * len(column_values) * len(budgets) + 1.6 * len(budgets) + 1,
                              0.3 * len(row_values) * len(methods) + 1.0 * len(methods) + 0.6),
                     layout="constrained")
        axes = fig.subplots(len(methods), len(budgets), squeeze=False)
        for i, method in enumerate(methods):
            for j, budget in enumerate(budgets):
                ax = axes[i, j]
                panel = scores[(scores["method"] == method) & (scores["budget"] == budget)]
                if panel.empty:
                    ax.set_axis_off()
                    continue
                grid = panel.pivot_table(index="row", columns="column", values="score", aggfunc="mean")
                grid = grid.reindex(index=row_values, columns=column_values)
                sns.heatmap(grid, ax=ax, cmap=cmap, norm=norm, annot=True, fmt=".0f" if percent_scale else ".3g",
                            cbar=False, linewidths=0.5, linecolor="white", annot_kws={"fontsize": 7},
                            xticklabels=[columns.tick.format(v) for v in column_values],
                            yticklabels=[rows.tick.format(v) for v in row_values])
                ax.set_title(f"{method} @ {budget:g}")
                ax.set_xlabel(columns.label if i == len(methods) - 1 else "")
                ax.set_ylabel(rows.label if j == 0 else "")
                ax.tick_params(axis="y", rotation=0)
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.6,
                     label="score" + (" (lower is better)" if lower_is_better else ""))
        fig.suptitle(title)
        return _png(fig)


def bench_speed(bench: pd.DataFrame, colours: dict, title: str) -> bytes:
    """Prefill time and decode tokens/s relative to ``full`` vs context length, one line per
    method @ budget. ``bench`` has method, budget, length, prefill_x, decode_x."""
    with sns.axes_style("whitegrid"), matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(8.4, 3.2), layout="constrained")
        axes = fig.subplots(1, 2)
        lengths = sorted(set(bench["length"]))
        for ax, field, label in ((axes[0], "prefill_x", "prefill time ÷ full (lower = faster)"),
                                 (axes[1], "decode_x", "decode tok/s ÷ full (higher = faster)")):
            for (method, budget), line in bench.groupby(["method", "budget"], sort=False):
                if method == REFERENCE:
                    continue
                line = line.sort_values("length")
                ax.plot(line["length"], line[field], marker="o", markersize=4, color=colours.get(method),
                        alpha=0.4 + 0.6 * (1 - budget), label=f"{method} @ {budget:g}")
            ax.axhline(1.0, linestyle="--", color="0.25", linewidth=1.2, label="full (reference)")
            ax.set_xscale("log")
            ax.set_xticks(lengths, [f"{n:g}" for n in lengths])
            ax.minorticks_off()
            ax.set_xlabel("context tokens (log scale)")
            ax.set_ylabel(label)
        handles, labels = axes[1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center")
        fig.suptitle(title)
        return _png(fig)


def bench_memory(bench: pd.DataFrame, colours: dict, title: str) -> bytes:
    """Measured peak memory during decoding and KV bytes vs budget, one line per method and
    context length. ``bench`` has method, budget, length, decode_peak_mib, kv_mib."""
    with sns.axes_style("whitegrid"), matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(8.4, 3.2), layout="constrained")
        axes = fig.subplots(1, 2)
        budgets = sorted(set(bench["budget"]))
        markers = dict(zip(sorted(set(bench["length"])), "os^Dvp*", strict=False))
        for ax, field, label in ((axes[0], "decode_peak_mib", "peak memory while decoding (MiB)"),
                                 (axes[1], "kv_mib", "KV cache held after prefill (MiB)")):
            for (method, length), line in bench.groupby(["method", "length"], sort=False):
                if method == REFERENCE:
                    continue
                full = bench[(bench["method"] == REFERENCE) & (bench["length"] == length)]
                line = pd.concat([full, line]).sort_values("budget")
                ax.plot(line["budget"], line[field], marker=markers.get(length, "o"), markersize=4,
                        color=colours.get(method), label=f"{method}, {length:g} tokens")
            _budget_axis(ax, budgets)
            ax.set_xlabel("budget (log scale; 1 = full)")
            ax.set_ylabel(label)
            ax.set_ylim(bottom=0)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center")
        fig.suptitle(title)
        return _png(fig)
