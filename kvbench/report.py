"""Reports from results directories: ``report.md`` (with its PNG figures beside it) and a
self-contained ``report.html`` (the same content, figures embedded as base64, no network).

The report reads results files only (never the runner, models or methods), so it can be made
anywhere, from a finished, running, killed or sharded run, and regenerated at any time; the same
results always give the same files. Rows are read defensively: unknown fields are ignored, missing
ones tolerated, and a torn last line (a killed run) is skipped.

Both outputs are rendered from one list of blocks (headings, text, tables, figures), so the
Markdown and the HTML can never disagree.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from markdown_it import MarkdownIt
from tabulate import tabulate

from kvbench import plots
from kvbench.results import CELL_KEY, ResultsStore, load_results

REFERENCE = "full"
AVERAGE = "average"
NIAH = "niah"
BENCH = "bench"  # the ``kind`` of rows written by ``python -m kvbench bench``
MODES = {True: "query-aware", False: "query-agnostic"}
MISSING = "–"
MASKED = "masked (no memory saved)"
LOWER_IS_BETTER_METRICS = frozenset({"perplexity", "ppl", "loss", "nll"})
NUMERIC = ("budget", "score", "achieved_budget", "kv_bytes", "full_kv_bytes", "peak_mem_bytes", "prefill_s",
           "decode_s", "decode_tokens", "context_tokens", "prefill_peak_mem_bytes", "decode_peak_mem_bytes")
OPTIONAL = ("run_id", "model", "method", "task", "sample_id", "query_aware", "status", "error", "metric",
            "sample_meta", "peak_mem_kind", "quality_meaningful", "masked", "higher_is_better", "kind", "repeat")
KEY_FIELDS = ("model", "method", "budget", "task")
FIGURE_PREFIX = "fig-"
HOW_TO_READ = (
    "How to read: each cell of the grid is one (model, method, budget, task, sample, query mode) "
    "evaluation. The **budget** is the fraction of the full KV-cache bytes a method is asked to keep; "
    "the **achieved budget** is measured from the cache tensors after prefill compression (KV bytes / "
    "full KV bytes), so it shows what a method really kept. Scores are means over the samples that ran "
    "without error; `full` is the uncompressed reference, run once at budget 1.000. Query-aware "
    "compresses the prompt with the question in it; query-agnostic compresses the context before the "
    "question is seen."
)
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:88em;
padding:0 1.5em;color:#1b1f24;line-height:1.45}
h1{border-bottom:2px solid #d0d7de;padding-bottom:.3em}h2{border-bottom:1px solid #d0d7de;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.88em}
th,td{border:1px solid #d0d7de;padding:.25em .6em;white-space:nowrap}th{background:#f3f5f7}
tbody tr:nth-child(even){background:#fafbfc}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td strong{color:#0a6b2c}code{background:#f3f5f7;padding:.1em .3em;border-radius:3px;font-size:.9em}
pre{background:#f3f5f7;padding:.8em;overflow-x:auto;white-space:pre-wrap}
figure{margin:.5em 0 1.5em}figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{font-size:.85em;color:#57606a}
.wide{overflow-x:auto;max-width:100%}
.side{display:flex;flex-wrap:wrap;gap:1.5em}.side>div{flex:1 1 30em;min-width:0;overflow-x:auto}
.warning{background:#fff4d6;border:1px solid #d4a72c;border-left:6px solid #d4a72c;padding:.7em 1em;
margin:1em 0;font-weight:600}
nav ul{columns:2;font-size:.9em}
"""


# ---- blocks: one document, two renderings -------------------------------------------------------


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Text:
    markdown: str  # inline Markdown: **bold**, `code`


@dataclass
class Code:
    text: str


@dataclass
class Alert:
    markdown: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]  # cells are inline Markdown
    text_columns: set[str] = field(default_factory=set)  # left-aligned; the rest are numbers


@dataclass
class Figure:
    name: str  # file name beside report.md
    png: bytes
    caption: str


@dataclass
class SideBySide:
    columns: list[list[Any]]  # lists of blocks, shown next to each other in HTML


Block = Heading | Text | Code | Alert | Table | Figure | SideBySide


# ---- data ---------------------------------------------------------------------------------------


@dataclass
class ReportTables:
    """The report's numbers, unformatted, for the renderers here or any other consumer."""

    cells: pd.DataFrame  # quality cells: one row per cell, the last row of a retried cell
    headline: dict[str, pd.DataFrame]  # mode -> model, method, budget, task, score, of_full (ratio), best
    achieved: dict[str, pd.DataFrame]  # mode -> model, method, budget, achieved_budget
    lower_is_better: set[str]  # tasks whose score is better when lower (perplexity)
    configs: pd.DataFrame  # per (model, method, budget, mode): memory, speed, their ratios to full, counts
    niah: pd.DataFrame  # model, mode, method, budget, length, depth, score (mean)
    failures: pd.DataFrame  # cells and bench measurements whose last row is an error
    bench: pd.DataFrame  # per (model, method, budget, length): medians over repeats and ratios to full


def _load_rows(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    rows = load_results(*run_dirs)
    for column in OPTIONAL:
        if column not in rows:
            rows[column] = None
    for column in NUMERIC:
        rows[column] = pd.to_numeric(rows[column], errors="coerce") if column in rows else float("nan")
    rows = rows.dropna(subset=["model", "method", "budget"]).reset_index(drop=True)
    rows["status"] = rows["status"].fillna("error")
    rows["mode"] = rows["query_aware"].map(lambda aware: MODES[aware is not False])
    rows["masked"] = rows["masked"].map(lambda m: m is True)
    return rows


def load_cells(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """Quality cells across all run dirs (shards or several runs): a retried cell counts by its last row."""
    rows = _load_rows(run_dirs)
    rows = rows[rows["kind"] != BENCH]
    return rows.drop_duplicates(subset=list(CELL_KEY), keep="last").reset_index(drop=True)


def load_bench(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """Rows of ``python -m kvbench bench``: one per (method, budget, length, repeat)."""
    rows = _load_rows(run_dirs)
    return rows[rows["kind"] == BENCH].reset_index(drop=True)


def task_directions(cells: pd.DataFrame) -> dict[str, bool]:
    """Task -> whether a higher score is better: a row's ``higher_is_better`` when recorded, else
    lower only for loss-like metrics (perplexity)."""
    directions = {}
    for task, rows in cells.groupby("task", sort=True):
        recorded = rows["higher_is_better"].dropna()
        if not recorded.empty:
            directions[task] = bool(recorded.iloc[-1])
        else:
            metrics = {str(m).lower() for m in rows["metric"].dropna()}
            directions[task] = not (metrics & LOWER_IS_BETTER_METRICS)
    return directions


def build_tables(cells: pd.DataFrame, bench_rows: pd.DataFrame | None = None) -> ReportTables:
    """All report tables; means are over ok cells, counts over all."""
    cells = cells.dropna(subset=["task"])
    ok = cells[cells["status"] == "ok"]
    directions = task_directions(ok)
    headline, achieved = {}, {}
    for mode in (m for m in MODES.values() if m in set(ok["mode"])):
        headline[mode], achieved[mode] = _headline(ok[ok["mode"] == mode], directions)
    bench_rows = bench_rows if bench_rows is not None else cells.iloc[:0]
    failures = pd.concat([cells[cells["status"] != "ok"], bench_rows[bench_rows["status"] != "ok"]])
    return ReportTables(
        cells=cells, headline=headline, achieved=achieved,
        lower_is_better={t for t, higher in directions.items() if not higher},
        configs=_configs(cells), niah=_niah(ok),
        failures=_sort(failures)[["model", "method", "budget", "task", "sample_id", "mode", "error"]],
        bench=_bench(bench_rows),
    )


def _headline(ok: pd.DataFrame, directions: dict[str, bool]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean score by (model, method, budget, task) for one query mode, its ratio to full's, and the
    best method per budget. The average covers higher-is-better tasks only (a perplexity is never
    averaged with accuracies) and is given only where a method has all of them."""
    keys = ["model", "method", "budget"]
    long = ok.groupby([*keys, "task"])["score"].mean().reset_index()
    averaged = [t for t in sorted(set(long["task"])) if directions.get(t, True)]
    if len(averaged) > 1:
        per_config = long[long["task"].isin(averaged)].groupby(keys)["score"]
        average = per_config.mean().where(per_config.count() == len(averaged)).dropna().reset_index()
        long = pd.concat([long, average.assign(task=AVERAGE)], ignore_index=True)
    reference = long[long["method"] == REFERENCE].groupby(["model", "task"])["score"].mean()
    long = long.join(reference.rename("reference"), on=["model", "task"])
    long["of_full"] = long["score"] / long["reference"].where(long["reference"] != 0)
    lower = long["task"].map(lambda t: not directions.get(t, True))
    rounded = long["score"].round(_digits(True)).where(~lower, -long["score"].round(_digits(False)))
    contender = long["method"] != REFERENCE
    groups = [long["model"], long["budget"], long["task"]]
    top = rounded.where(contender).groupby(groups).transform("max")
    at_top = contender & (rounded == top)
    # Best only where it separates methods: not a lone contender, not a tie of all of them.
    separates = at_top.groupby(groups).transform("sum") < contender.groupby(groups).transform("sum")
    long["best"] = at_top & separates
    achieved = ok.groupby(keys)["achieved_budget"].mean().reset_index()
    return (_sort(long.drop(columns="reference")).reset_index(drop=True),
            _sort(achieved).reset_index(drop=True))


def _configs(cells: pd.DataFrame) -> pd.DataFrame:
    """Memory and speed per (model, method, budget, mode) over every task, with ratios to full's.
    Decode speed is total tokens over total time, over cells that decoded at all."""
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
        peak_mem_kind=("peak_mem_kind", lambda k: ", ".join(sorted(set(k.dropna())))),
        prefill_s=("prefill_s", "mean"), decode_tokens=("decode_tokens", "sum"), decode_s=("decode_s", "sum"),
        masked=("masked", "any"),
    )
    stats["decode_tok_s"] = stats["decode_tokens"] / stats["decode_s"].where(stats["decode_s"] > 0)
    configs = counts.join(stats.drop(columns=["decode_tokens", "decode_s"])).reset_index()
    return _with_ratios(configs, ["model", "mode"], ("kv_bytes", "peak_mem_bytes", "prefill_s", "decode_tok_s"))


def _with_ratios(frame: pd.DataFrame, group: list[str], fields: Sequence[str]) -> pd.DataFrame:
    """Add ``<field>_x``: the value over full's in the same group."""
    reference = frame[frame["method"] == REFERENCE].groupby(group)[list(fields)].mean().reset_index()
    joined = frame.merge(reference, on=group, how="left", suffixes=("", "_full"))
    for name in fields:
        frame[f"{name}_x"] = (joined[name] / joined[f"{name}_full"].where(joined[f"{name}_full"] > 0)).to_numpy()
    return _sort(frame).reset_index(drop=True)


def _niah(ok: pd.DataFrame) -> pd.DataFrame:
    """Mean niah score per (model, mode, method, budget, length, depth)."""
    niah = ok[ok["task"] == NIAH]
    meta = niah["sample_meta"].map(lambda m: m if isinstance(m, dict) else {})
    niah = niah.assign(length=pd.to_numeric(meta.map(lambda m: m.get("length")), errors="coerce"),
                       depth=pd.to_numeric(meta.map(lambda m: m.get("depth")), errors="coerce"))
    niah = niah.dropna(subset=["length", "depth", "score"])
    keys = ["model", "mode", "method", "budget", "length", "depth"]
    return _sort(niah.groupby(keys)["score"].mean().reset_index()).reset_index(drop=True)


def _bench(rows: pd.DataFrame) -> pd.DataFrame:
    """Medians over repeats per (model, method, budget, context length), spreads, ratios to full's."""
    keys = ["model", "method", "budget", "length"]
    ok = rows[rows["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame(columns=keys)
    ok = ok.assign(length=ok["context_tokens"],
                   decode_tok_s=ok["decode_tokens"] / ok["decode_s"].where(ok["decode_s"] > 0))

    def spread(values: pd.Series) -> float:
        """(max - min) / median: how much the repeats disagree."""
        return (values.max() - values.min()) / values.median() if values.median() else float("nan")

    bench = ok.groupby(keys).agg(
        repeats=("prefill_s", "size"), prefill_s=("prefill_s", "median"), prefill_spread=("prefill_s", spread),
        decode_tok_s=("decode_tok_s", "median"), decode_spread=("decode_tok_s", spread),
        kv_bytes=("kv_bytes", "median"), full_kv_bytes=("full_kv_bytes", "median"),
        achieved_budget=("achieved_budget", "median"),
        prefill_peak_mem_bytes=("prefill_peak_mem_bytes", "median"),
        decode_peak_mem_bytes=("decode_peak_mem_bytes", "median"),
        peak_mem_kind=("peak_mem_kind", lambda k: ", ".join(sorted(set(k.dropna())))),
        masked=("masked", "any"),
    ).reset_index()
    return _with_ratios(bench, ["model", "length"],
                        ("prefill_s", "decode_tok_s", "kv_bytes", "prefill_peak_mem_bytes", "decode_peak_mem_bytes"))


def _sort(frame: pd.DataFrame) -> pd.DataFrame:
    """Reading order: query-aware first, budgets descending, the full reference first, then methods A-Z."""
    ranks: dict[str, Callable[[pd.Series], pd.Series]] = {
        "model": lambda s: s.map(str),
        "length": lambda s: s,
        "mode": lambda s: s.map({mode: i for i, mode in enumerate(MODES.values())}),
        "budget": lambda s: -s,
        "method": lambda s: s.map(lambda m: f"{m != REFERENCE:d}{m}"),
        "task": lambda s: s.map(lambda t: f"{t == AVERAGE:d}{t}"),
        "sample_id": lambda s: s.map(str),
    }
    keys = [k for k in ranks if k in frame]
    return frame.sort_values(keys, key=lambda s: ranks[s.name](s), kind="stable") if keys else frame


# ---- the document -------------------------------------------------------------------------------


def write_report(run_dirs: Sequence[Path], out_dir: Path) -> Path:
    """Write ``report.md``, its figures and ``report.html`` into ``out_dir`` for one run or several
    merged (shards, reruns, a bench run); returns the path of report.md."""
    run_dirs = [Path(d) for d in run_dirs]
    out_dir.mkdir(parents=True, exist_ok=True)
    title, blocks = build_document(run_dirs, out_dir)
    for stale in out_dir.glob(f"{FIGURE_PREFIX}*.png"):  # figures of an earlier version of this report
        stale.unlink()
    for figure in _figures(blocks):
        (out_dir / figure.name).write_bytes(figure.png)
    path = out_dir / "report.md"
    path.write_text(to_markdown(title, blocks), encoding="utf-8")
    (out_dir / "report.html").write_text(to_html(title, blocks), encoding="utf-8")
    return path


def render_report(run_dirs: Sequence[Path], out_dir: Path) -> str:
    """The Markdown of ``write_report`` (without writing anything)."""
    return to_markdown(*build_document([Path(d) for d in run_dirs], out_dir))


def build_document(run_dirs: Sequence[Path], out_dir: Path) -> tuple[str, list[Block]]:
    bench_rows = load_bench(run_dirs)
    tables = build_tables(load_cells(run_dirs), bench_rows)
    metas = [(d, _run_meta(d)) for d in run_dirs]
    run_ids = dict.fromkeys(str(meta.get("run_id") or d.name) if meta else d.name for d, meta in metas)
    blocks: list[Block] = [] if tables.cells.empty and not tables.bench.empty else [Text(HOW_TO_READ)]
    rows = pd.concat([tables.cells, bench_rows])
    random_models = sorted(set(rows.loc[rows["quality_meaningful"].eq(False), "model"]))
    if random_models:
        blocks.append(Alert(f"Random weights ({', '.join(random_models)}): the scores are not meaningful; "
                              "memory and speed numbers still are."))
    if not tables.cells.empty or tables.bench.empty:
        blocks += _headline_section(tables)
        blocks += _curves_section(tables)
        blocks += _niah_section(tables)
        blocks += _memory_section(tables)
        blocks += _speed_section(tables)
    blocks += _bench_section(tables)
    blocks += _failures_section(tables)
    blocks += _metadata_section(metas)
    command = shlex.join(["python", "-m", "kvbench", "report", *map(str, run_dirs), "--out", str(out_dir)])
    blocks.append(Text(f"Regenerate this report with `{command}`."))
    return f"kvbench report: {', '.join(run_ids)}", blocks


def _mode_blocks(per_mode: dict[str, list[Block]]) -> list[Block]:
    """Query-aware and query-agnostic next to each other where both ran."""
    if len(per_mode) > 1:
        return [SideBySide([[Heading(3, mode), *blocks] for mode, blocks in per_mode.items()])]
    return [block for mode, blocks in per_mode.items() for block in (Heading(3, mode), *blocks)]


def _method_label(method: str, masked: bool) -> str:
    return f"{method} [{MASKED}]" if masked else method


def _masked_methods(cells: pd.DataFrame) -> set[tuple[str, str]]:
    return set(map(tuple, cells.loc[cells["masked"], ["model", "method"]].drop_duplicates().to_numpy()))


def _headline_section(tables: ReportTables) -> list[Block]:
    parts: list[Block] = [Heading(2, "Headline: score by method and budget")]
    cells = tables.cells
    if cells.empty:
        return [*parts, Text("No cells in these results yet.")]
    if not tables.headline:
        return [*parts, Text(f"No cell finished successfully ({len(cells)} failed); see Failed cells below.")]
    note = ("Rows are method @ budget (budgets descending); a cell is the mean score over ok samples with its "
            "share of `full`'s score in parentheses. **Bold**: the best compression method at that budget "
            "(left plain when all methods tie). "
            "The achieved budget is measured.")
    if tables.lower_is_better:
        note += (" Tasks marked ↓ are lower-is-better (e.g. perplexity): their parenthesis is the ratio to "
                 "full's (×1.20 = 20 % worse), they are best when lowest and are left out of the average.")
    parts.append(Text(note))
    masked = _masked_methods(cells)
    several_models = cells["model"].nunique() > 1
    per_mode = {}
    for mode, long in tables.headline.items():
        tasks = sorted(set(long["task"]), key=lambda t: (t == AVERAGE, t))
        achieved = tables.achieved[mode].set_index(["model", "method", "budget"])["achieved_budget"]
        header = [*(["model"] if several_models else []), "method", "budget", "achieved",
                  *(f"{t} ↓" if t in tables.lower_is_better else t for t in tasks)]
        by_cell = long.set_index(["model", "method", "budget", "task"])
        rows = []
        for model, method, budget in dict.fromkeys(zip(long["model"], long["method"], long["budget"], strict=True)):
            values = []
            for task in tasks:
                key = (model, method, budget, task)
                if key not in by_cell.index:
                    values.append(MISSING)
                    continue
                c = by_cell.loc[key]
                values.append(_score(c["score"], c["of_full"], bool(c["best"]), task in tables.lower_is_better))
            rows.append([*([model] if several_models else []), _method_label(method, (model, method) in masked),
                         f"{budget:.3f}", _fixed(achieved.get((model, method, budget)), 3), *values])
        per_mode[mode] = [Table(header, rows, {"model", "method"})]
    return [*parts, *_mode_blocks(per_mode)]


def _curves_section(tables: ReportTables) -> list[Block]:
    if not tables.headline:
        return []
    colours = plots.palette(list(tables.cells["method"]))
    per_mode: dict[str, list[Block]] = {}
    for mode, long in tables.headline.items():
        for model, scores in long.groupby("model", sort=False):
            name = f"{FIGURE_PREFIX}curves-{_slug(model)}-{_slug(mode)}.png"
            png = plots.score_curves(scores, tables.lower_is_better, colours, f"{model}, {mode}")
            per_mode.setdefault(mode, []).append(
                Figure(name, png, f"Score vs budget, {model}, {mode}: one line per method, full dashed."))
    return [Heading(2, "Score vs budget"), *_mode_blocks(per_mode)]


def _niah_section(tables: ReportTables) -> list[Block]:
    niah = tables.niah
    if niah.empty:
        return []
    parts: list[Block] = [Heading(2, "Needle in a haystack"),
                          Text("Score by needle depth (rows; 0 % = start of the context) and context length "
                               "(columns), per method and budget: green = the needle was found, red = lost.")]
    per_mode: dict[str, list[Block]] = {}
    for (model, mode), frame in niah.groupby(["model", "mode"], sort=False):
        name = f"{FIGURE_PREFIX}niah-{_slug(model)}-{_slug(mode)}.png"
        per_mode.setdefault(mode, []).append(
            Figure(name, plots.niah_heatmaps(frame, f"{model}, {mode}"), f"NIAH heatmaps, {model}, {mode}."))
    parts += _mode_blocks(per_mode)
    several_models = niah["model"].nunique() > 1
    for title, column, fmt in (("context length (tokens)", "length", "{:g}"),
                               ("needle depth (0 = start of the context)", "depth", "{:.2f}")):
        table = niah.pivot_table(index=["model", "mode", "method", "budget"], columns=column, values="score",
                                 aggfunc="mean")
        table = table.reindex(pd.MultiIndex.from_frame(_sort(table.index.to_frame(index=False))))
        header = [*(["model"] if several_models else []), "query mode", "method @ budget",
                  *map(fmt.format, table.columns)]
        rows = [[*([model] if several_models else []), mode, f"{method} @ {budget:.3f}",
                 *(_fixed(v, 1) for v in values)] for (model, mode, method, budget), values in table.iterrows()]
        parts += [Heading(3, f"niah score by {title}"), Table(header, rows, {"model", "query mode", "method @ budget"})]
    return parts


def _config_columns(configs: pd.DataFrame) -> tuple[list[str], Callable[[Any], list[str]]]:
    several_models = configs["model"].nunique() > 1
    several_modes = configs["mode"].nunique() > 1
    header = [*(["model"] if several_models else []), "method", "budget", *(["query mode"] if several_modes else [])]

    def key(c: Any) -> list[str]:
        return [*([c.model] if several_models else []), _method_label(c.method, bool(c.masked)), f"{c.budget:.3f}",
                *([c.mode] if several_modes else [])]

    return header, key


def _memory_section(tables: ReportTables) -> list[Block]:
    configs = tables.configs
    if "kv_bytes" not in configs or configs["kv_bytes"].isna().all():
        return []
    header, key = _config_columns(configs)
    rows = [[*key(c), _fixed(c.achieved_budget, 3), _bytes(c.kv_bytes), _ratio(c.kv_bytes_x), _bytes(c.full_kv_bytes),
             _peak(c.peak_mem_bytes, c.peak_mem_kind), _ratio(c.peak_mem_bytes_x), _kind(c.peak_mem_kind)]
            for c in configs.itertuples(index=False)]
    return [Heading(2, "Memory"),
            Text("KV bytes are measured from the cache's tensors right after prefill compression (mean over ok "
                 "cells); × full is the ratio to the uncompressed cache of the same prompts. Peak memory is the "
                 "largest per-cell peak, of the kind named in the last column (GPU: allocator peak over the "
                 "cell's start; CPU: rise of the process's peak RSS over its RSS at the cell's start)."),
            Table([*header, "achieved budget", "KV bytes", "× full", "full KV bytes", "peak memory", "× full",
                   "peak kind"], rows, {*header, "peak kind"} - {"budget"})]


def _speed_section(tables: ReportTables) -> list[Block]:
    configs = tables.configs
    if "prefill_s" not in configs or configs["prefill_s"].isna().all():
        return []
    header, key = _config_columns(configs)
    rows = [[*key(c), _sig(c.prefill_s), _ratio(c.prefill_s_x), _sig(c.decode_tok_s), _ratio(c.decode_tok_s_x),
             f"{c.n_ok} / {c.n_error}"] for c in configs.itertuples(index=False)]
    return [Heading(2, "Speed"),
            Text("Prefill time includes compression (mean over ok cells); decode tokens/s is all decoded tokens "
                 "over all decoding time. × full: prefill below 1 is faster, decode above 1 is faster. These are "
                 "quality-run timings on short answers; `python -m kvbench bench` measures speed properly "
                 "(warm-up, repeats, medians)."),
            Table([*header, "prefill s", "× full", "decode tok/s", "× full", "ok / error"], rows,
                  set(header) - {"budget"})]


def _bench_section(tables: ReportTables) -> list[Block]:
    bench = tables.bench
    if bench.empty:
        return []
    colours = plots.palette(list(bench["method"]))
    kinds = ", ".join(sorted({k for ks in bench["peak_mem_kind"] for k in ks.split(", ") if k})) or MISSING
    parts: list[Block] = [
        Heading(2, "Speed and memory benchmark"),
        Text("Measured side by side with `full` in one process, on the same prompt, after warm-up; each value is "
             "the median over the repeats, and spread is (max − min) / median over them. Prefill includes "
             f"compression. Peak memory ({kinds}) is over the memory held before the prompt, so it includes the "
             "cache; the decoding peak is taken while tokens are generated."),
    ]
    several_models = bench["model"].nunique() > 1
    for model, frame in bench.groupby("model", sort=False):
        header = ["context tokens", "method", "budget", "prefill s", "× full", "spread", "decode tok/s", "× full",
                  "spread", "KV held", "achieved budget", "peak decoding", "× full", "peak prefill", "× full",
                  "repeats"]
        rows = [[f"{b.length:g}", _method_label(b.method, bool(b.masked)), f"{b.budget:.3f}", _sig(b.prefill_s),
                 _ratio(b.prefill_s_x), _percent(b.prefill_spread), _sig(b.decode_tok_s), _ratio(b.decode_tok_s_x),
                 _percent(b.decode_spread), _bytes(b.kv_bytes), _fixed(b.achieved_budget, 3),
                 _peak(b.decode_peak_mem_bytes, b.peak_mem_kind), _ratio(b.decode_peak_mem_bytes_x),
                 _peak(b.prefill_peak_mem_bytes, b.peak_mem_kind), _ratio(b.prefill_peak_mem_bytes_x),
                 f"{b.repeats}"] for b in frame.itertuples(index=False)]
        if several_models:
            parts.append(Heading(3, model))
        plot_frame = frame.assign(kv_mib=frame["kv_bytes"] / 2**20,
                                  decode_peak_mib=frame["decode_peak_mem_bytes"] / 2**20,
                                  prefill_x=frame["prefill_s_x"], decode_x=frame["decode_tok_s_x"])
        parts += [
            Table(header, rows, {"method"}),
            Figure(f"{FIGURE_PREFIX}bench-speed-{_slug(model)}.png",
                   plots.bench_speed(plot_frame, colours, f"{model}: speed relative to full"),
                   "Prefill time and decode speed relative to full, by context length."),
            Figure(f"{FIGURE_PREFIX}bench-memory-{_slug(model)}.png",
                   plots.bench_memory(plot_frame, colours, f"{model}: measured memory"),
                   "Peak memory while decoding and KV bytes held, by budget."),
        ]
    return parts


def _failures_section(tables: ReportTables) -> list[Block]:
    failures = tables.failures
    if failures.empty:
        return [Heading(2, "Failed cells"), Text("none")]
    several_models = failures["model"].nunique() > 1
    header = [*(["model"] if several_models else []), "method", "budget", "task", "sample", "query mode", "error"]
    rows = [[*([f.model] if several_models else []), f.method, f"{f.budget:.3f}", str(f.task), str(f.sample_id),
             f.mode, f.error if isinstance(f.error, str) and f.error else "(no error recorded)"]
            for f in failures.itertuples(index=False)]
    return [Heading(2, "Failed cells"),
            Text(f"{len(failures)} cell(s) whose last attempt failed (rerun with `--retry-errors` to try them "
                 "again):"), Table(header, rows, set(header))]


META_FIELDS = ("git_commit", "versions", "device", "seed", "started", "model", "model_kind", "dtype",
               "attn_implementation", "methods", "budgets", "tasks", "query_modes", "task_config")


def _metadata_section(metas: list[tuple[Path, dict[str, Any] | None]]) -> list[Block]:
    parts: list[Block] = [Heading(2, "Run metadata")]
    for run_dir, meta in metas:
        if meta is None:
            parts += [Heading(3, f"`{run_dir}`"), Text("no readable run.json")]
            continue
        versions = ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items()) or MISSING
        kind = f" ({meta['model_kind']})" if meta.get("model_kind") else ""
        config = ", ".join(f"{k}={v}" for k, v in (meta.get("task_config") or {}).items())
        header, rows = ["field", "value"], [
            ["model", f"{meta.get('model', MISSING)}{kind}"],
            ["device", str(meta.get("device", MISSING))],
            ["dtype", str(meta.get("dtype", MISSING))],
            ["attention", str(meta.get("attn_implementation", MISSING))],
            ["versions", versions],
            ["git commit", f"`{meta.get('git_commit') or 'unknown'}`"],
            ["seed", str(meta.get("seed", MISSING))],
            ["started", str(meta.get("started", MISSING))],
            ["query modes", ", ".join(meta.get("query_modes") or []) or MISSING],
            ["task config", config or MISSING],
        ]
        rows = [row for row in rows if row[1] != MISSING]
        rows += [[name, _meta_value(value)] for name, value in meta.items()
                 if name not in META_FIELDS and name not in ("run_id", "command")]
        parts += [Heading(3, f"{meta.get('run_id') or run_dir.name} (`{run_dir}`)"),
                  Code(str(meta.get("command", ""))), Table(header, rows, set(header))]
    return parts


def _meta_value(value: Any) -> str:
    """Any other recorded field (e.g. a task's data source or protocol deviations), shown as it is."""
    if isinstance(value, str):
        return value
    return f"`{json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)}`"


def _run_meta(run_dir: Path) -> dict[str, Any] | None:
    try:
        meta = ResultsStore(run_dir).run_meta()
    except ValueError:  # a run.json cut short by a kill: the results still deserve a report
        return None
    return meta if isinstance(meta, dict) else None


# ---- formatting ---------------------------------------------------------------------------------


def _digits(higher_is_better: bool) -> int:
    return 1 if higher_is_better else 2


def _score(score: float, of_full: float, best: bool, lower_is_better: bool) -> str:
    if pd.isna(score):
        return MISSING
    text = f"{score:.{_digits(not lower_is_better)}f}"
    text = f"**{text}**" if best else text
    if pd.isna(of_full):
        return text
    return f"{text} (×{of_full:.2f})" if lower_is_better else f"{text} ({100 * of_full:.0f}%)"


def _fixed(value: Any, digits: int) -> str:
    return MISSING if value is None or pd.isna(value) else f"{value:.{digits}f}"


def _ratio(value: float) -> str:
    return MISSING if pd.isna(value) else f"{value:.2f}"


def _percent(value: float) -> str:
    return MISSING if pd.isna(value) else f"{100 * value:.0f}%"


def _sig(value: float) -> str:
    """Three significant digits, without exponents for the magnitudes timings and rates take."""
    if pd.isna(value):
        return MISSING
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:#.3g}".rstrip(".")


def _bytes(value: float) -> str:
    if pd.isna(value):
        return MISSING
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    exponent = 0
    while abs(value) >= 1024 and exponent < len(units) - 1:
        value /= 1024
        exponent += 1
    return f"{value:.0f} B" if exponent == 0 else f"{_sig(value)} {units[exponent]}"


def _kind(kind: Any) -> str:
    return kind if isinstance(kind, str) and kind else MISSING


def _peak(value: float, kind: Any) -> str:
    return MISSING if _kind(kind) in (MISSING, "unavailable") else _bytes(value)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")


def _figures(blocks: Sequence[Block]) -> list[Figure]:
    found = []
    for block in blocks:
        if isinstance(block, Figure):
            found.append(block)
        elif isinstance(block, SideBySide):
            found += [f for column in block.columns for f in _figures(column)]
    return found


# ---- renderers ----------------------------------------------------------------------------------


def to_markdown(title: str, blocks: Sequence[Block]) -> str:
    return "\n\n".join([f"# {title}", *(_md_block(b) for b in blocks)]) + "\n"


def _md_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, Text):
        return block.markdown
    if isinstance(block, Code):
        return f"```\n{block.text}\n```"
    if isinstance(block, Alert):
        return f"> **Warning: {block.markdown}**"
    if isinstance(block, Table):
        clean = [[str(c).replace("|", "\\|").replace("\n", " ") for c in row] for row in block.rows]
        align = ["left" if name in block.text_columns else "right" for name in block.header]
        return tabulate(clean, headers=block.header, tablefmt="github", disable_numparse=True, colalign=align)
    if isinstance(block, Figure):
        return f"![{block.caption}]({block.name})"
    return "\n\n".join(_md_block(b) for column in block.columns for b in column)


_INLINE = MarkdownIt("commonmark", {"html": False})


def to_html(title: str, blocks: Sequence[Block]) -> str:
    """A self-contained page: inline CSS, figures as data URIs, nothing fetched."""
    toc = "".join(f'<li><a href="#{_slug(b.text)}">{html.escape(b.text)}</a></li>'
                  for b in blocks if isinstance(b, Heading) and b.level == 2)
    ids: dict[str, int] = {}  # heading anchors, made unique ("query-aware" recurs under every section)
    body = "\n".join(_html_block(b, ids) for b in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n<nav><ul>{toc}</ul></nav>\n{body}\n</body>\n</html>\n")


def _html_block(block: Block, ids: dict[str, int]) -> str:
    if isinstance(block, Heading):
        anchor = _slug(block.text)
        ids[anchor] = ids.get(anchor, 0) + 1
        anchor += f"-{ids[anchor]}" if ids[anchor] > 1 else ""
        return f'<h{block.level} id="{anchor}">{_inline(block.text)}</h{block.level}>'
    if isinstance(block, Text):
        return f"<p>{_inline(block.markdown)}</p>"
    if isinstance(block, Code):
        return f"<pre><code>{html.escape(block.text)}</code></pre>"
    if isinstance(block, Alert):
        return f'<div class="warning" role="alert">Warning: {_inline(block.markdown)}</div>'
    if isinstance(block, Table):
        classes = ["" if name in block.text_columns else ' class="num"' for name in block.header]
        head = "".join(f"<th{c}>{_inline(h)}</th>" for c, h in zip(classes, block.header, strict=True))
        body = "".join("<tr>" + "".join(f"<td{c}>{_inline(str(v))}</td>" for c, v in zip(classes, row, strict=True))
                       + "</tr>" for row in block.rows)
        return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    if isinstance(block, Figure):
        data = base64.b64encode(block.png).decode("ascii")
        caption = html.escape(block.caption)
        return (f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
                f"<figcaption>{caption}</figcaption></figure>")
    columns = "".join("<div>" + "\n".join(_html_block(b, ids) for b in column) + "</div>" for column in block.columns)
    return f'<div class="side">{columns}</div>'


def _inline(text: str) -> str:
    return _INLINE.renderInline(text)
