"""``report.md`` from results directories.

The report reads results files only (never the runner, models or methods), so it can be made
anywhere, from a finished, running, killed or sharded run, and regenerated at any time.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from kvbench.results import CELL_KEY, ResultsStore, load_results

REFERENCE = "full"
AVERAGE = "average"
NIAH = "niah"
MODES = {True: "query-aware", False: "query-agnostic"}
MISSING = "–"
NUMERIC = ("budget", "score", "achieved_budget", "kv_bytes", "full_kv_bytes", "peak_mem_bytes",
           "prefill_s", "decode_s", "decode_tokens")
OPTIONAL = ("sample_meta", "peak_mem_kind", "quality_meaningful")
HOW_TO_READ = (
    "How to read: each cell of the grid is one (model, method, budget, task, sample, query mode) "
    "evaluation. The **budget** is the fraction of the full KV-cache bytes a method is asked to keep; "
    "the **achieved budget** is measured from the cache tensors after prefill compression (KV bytes / "
    "full KV bytes), so it shows what a method really kept. Scores are 0-100, averaged over the samples "
    "that ran without error; `full` is the uncompressed reference, run once at budget 1.000, and "
    "\"% of full\" is a method's mean score over full's on the same task and query mode. Query-aware "
    "compresses the prompt with the question in it; query-agnostic compresses the context before the "
    "question is seen."
)


@dataclass
class ReportTables:
    """The report's numbers, unformatted, for the markdown here or any other consumer."""

    cells: pd.DataFrame  # one row per cell, the last row of a retried cell
    headline: dict[str, pd.DataFrame]  # query mode -> mean score; index (model, method), columns (budget, task)
    of_full: dict[str, pd.DataFrame]  # same shape: mean score as a percentage of full's on the same task
    details: pd.DataFrame  # per (model, method, budget, mode, task): quality, memory, speed, counts
    niah_by_length: pd.DataFrame  # index (model, mode, method, budget), columns: context length
    niah_by_depth: pd.DataFrame  # index (model, mode, method, budget), columns: needle depth
    failures: pd.DataFrame  # cells whose last row is an error


def load_cells(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One row per cell across all run dirs: a retried cell counts by its last row."""
    rows = load_results(*run_dirs)
    for column in OPTIONAL:
        if column not in rows:
            rows[column] = None
    cells = rows.drop_duplicates(subset=list(CELL_KEY), keep="last").reset_index(drop=True)
    cells[list(NUMERIC)] = cells[list(NUMERIC)].apply(pd.to_numeric, errors="coerce")
    cells["mode"] = cells["query_aware"].map(lambda aware: MODES[bool(aware)])
    return cells


def build_tables(cells: pd.DataFrame) -> ReportTables:
    """All report tables from ``load_cells`` output; means are over ok cells, counts over all."""
    ok = cells[cells["status"] == "ok"]
    headline, of_full = {}, {}
    for mode in (m for m in MODES.values() if m in set(ok["mode"])):
        headline[mode], of_full[mode] = _headline(ok[ok["mode"] == mode])
    failures = _sort(cells[cells["status"] != "ok"])
    return ReportTables(
        cells=cells, headline=headline, of_full=of_full, details=_details(cells),
        niah_by_length=_niah(ok, "length"), niah_by_depth=_niah(ok, "depth"),
        failures=failures[["model", "method", "budget", "task", "sample_id", "mode", "error"]],
    )


def write_report(run_dirs: list[Path], out_dir: Path) -> Path:
    """Write ``out_dir/report.md`` for one run or several merged (shards, reruns); returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    path.write_text(render_report(run_dirs, out_dir), encoding="utf-8")
    return path


def render_report(run_dirs: Sequence[Path], out_dir: Path) -> str:
    """The markdown of ``write_report``; ``out_dir`` only goes into the regenerate command."""
    tables = build_tables(load_cells(run_dirs))
    metas = [(Path(d), _run_meta(Path(d))) for d in run_dirs]
    run_ids = dict.fromkeys(str(meta.get("run_id") or d.name) if meta else d.name for d, meta in metas)
    parts = [f"# kvbench report: {', '.join(run_ids)}", HOW_TO_READ]
    cells = tables.cells
    random_models = sorted(set(cells.loc[cells["quality_meaningful"].eq(False), "model"]))
    if random_models:
        parts.append(f"**Warning: random weights ({', '.join(random_models)}), so the scores are not "
                     "meaningful; memory and speed numbers still are.**")
    parts += _headline_section(tables)
    parts += _details_section(tables)
    parts += _niah_section(tables)
    parts += _failures_section(tables)
    parts += _metadata_section(metas)
    command = shlex.join(["python", "-m", "kvbench", "report", *map(str, run_dirs), "--out", str(out_dir)])
    parts.append(f"Regenerate this report with `{command}`.")
    return "\n\n".join(parts) + "\n"


# ---- tables -------------------------------------------------------------------------------------


def _headline(ok: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean score by method x (budget, task) for one query mode, plus its percentage of full's.

    With several tasks each budget gets an average over tasks, given only where a method has every
    task, so that averages always cover the same task mix.
    """
    long = ok.groupby(["model", "method", "budget", "task"])["score"].mean().reset_index()
    tasks = sorted(set(long["task"]))
    if len(tasks) > 1:
        per_config = long.groupby(["model", "method", "budget"])["score"]
        average = per_config.mean().where(per_config.count() == len(tasks)).dropna().reset_index()
        long = pd.concat([long, average.assign(task=AVERAGE)], ignore_index=True)
        tasks.append(AVERAGE)
    reference = long[long["method"] == REFERENCE].groupby(["model", "task"])["score"].mean()
    long = long.join(reference.rename("reference"), on=["model", "task"])
    long["of_full"] = 100 * long["score"] / long["reference"].where(long["reference"] > 0)
    long = _sort(long)
    columns = [(b, t) for b in sorted(set(long["budget"]), reverse=True) for t in tasks
               if ((long["budget"] == b) & (long["task"] == t)).any()]
    rows = list(dict.fromkeys(zip(long["model"], long["method"], strict=True)))

    def pivot(values: str) -> pd.DataFrame:
        table = long.pivot(index=["model", "method"], columns=["budget", "task"], values=values)
        return table.reindex(index=pd.MultiIndex.from_tuples(rows, names=["model", "method"]),
                             columns=pd.MultiIndex.from_tuples(columns, names=["budget", "task"]))

    return pivot("score"), pivot("of_full")


def _details(cells: pd.DataFrame) -> pd.DataFrame:
    """Quality, memory and speed per configuration; decode speed is total tokens over total time,
    over cells that decoded at all, so one short decode cannot dominate it."""
    keys = ["model", "method", "budget", "mode", "task"]
    counts = cells.groupby(keys)["status"].agg(
        n_ok=lambda s: int((s == "ok").sum()), n_error=lambda s: int((s != "ok").sum())
    )
    ok = cells[cells["status"] == "ok"]
    decoded = ok["decode_s"] > 0
    ok = ok.assign(decode_tokens=ok["decode_tokens"].where(decoded), decode_s=ok["decode_s"].where(decoded))
    stats = ok.groupby(keys).agg(
        score=("score", "mean"), achieved_budget=("achieved_budget", "mean"), kv_bytes=("kv_bytes", "mean"),
        full_kv_bytes=("full_kv_bytes", "mean"), prefill_s=("prefill_s", "mean"),
        decode_tokens=("decode_tokens", "sum"), decode_s=("decode_s", "sum"),
        peak_mem_bytes=("peak_mem_bytes", "max"),
        peak_mem_kind=("peak_mem_kind", lambda k: ", ".join(sorted(set(k.dropna())))),
    )
    stats["decode_tok_s"] = stats["decode_tokens"] / stats["decode_s"].where(stats["decode_s"] > 0)
    details = counts.join(stats.drop(columns=["decode_tokens", "decode_s"])).reset_index()
    return _sort(details).reset_index(drop=True)


def _niah(ok: pd.DataFrame, field: str) -> pd.DataFrame:
    """Mean niah score by a sample property (target length or needle depth)."""
    niah = ok[ok["task"] == NIAH]
    niah = niah.assign(**{field: niah["sample_meta"].map(lambda m: m.get(field) if isinstance(m, dict) else None)})
    niah = niah.dropna(subset=[field])
    if niah.empty:
        return pd.DataFrame()
    keys = ["model", "mode", "method", "budget"]
    table = niah.pivot_table(index=keys, columns=field, values="score", aggfunc="mean")
    order = _sort(table.index.to_frame(index=False))
    return table.reindex(pd.MultiIndex.from_frame(order)).sort_index(axis=1)


def _sort(frame: pd.DataFrame) -> pd.DataFrame:
    """Reading order: query-aware first, the full reference first, then methods A-Z, budgets descending."""
    ranks: dict[str, Callable[[pd.Series], pd.Series]] = {
        "model": lambda s: s,
        "mode": lambda s: s.map({mode: i for i, mode in enumerate(MODES.values())}),
        "method": lambda s: s.map(lambda m: f"{m != REFERENCE:d}{m}"),
        "budget": lambda s: -s,
        "task": lambda s: s,
        "sample_id": lambda s: s.map(str),
    }
    keys = [k for k in ranks if k in frame]
    return frame.sort_values(keys, key=lambda s: ranks[s.name](s), kind="stable")


# ---- markdown -----------------------------------------------------------------------------------


def _headline_section(tables: ReportTables) -> list[str]:
    parts = ["## Headline: mean score by method and budget"]
    cells = tables.cells
    if cells.empty:
        return [*parts, "No cells in these results yet."]
    if not tables.headline:
        return [*parts, f"No cell finished successfully ({len(cells)} failed); see Failed cells below."]
    parts.append("Columns are budgets (descending); a cell is the mean score over ok samples, with its % "
                 "of full in parentheses. **Bold**: the best compression method at that budget.")
    several_models = cells["model"].nunique() > 1
    for mode, scores in tables.headline.items():
        of_full = tables.of_full[mode]
        best = _best(scores)
        single_task = scores.columns.get_level_values("task").nunique() == 1
        header = (["model"] if several_models else []) + ["method"] + [
            f"{b:.3f}" if single_task else f"{b:.3f} · {t}" for b, t in scores.columns
        ]
        rows = []
        for (model, method), score_row in scores.iterrows():
            values = [_score(score_row[c], of_full.at[(model, method), c], best.at[(model, method), c])
                      for c in scores.columns]
            rows.append(([model] if several_models else []) + [method] + values)
        task_note = f" (task {scores.columns[0][1]})" if single_task else ""
        parts += [f"### {mode}{task_note}", _md(header, rows, text={"model", "method"})]
    return parts


def _best(scores: pd.DataFrame) -> pd.DataFrame:
    """True where a compression method has its model's top score (as displayed) in a column; the
    reference is not in the contest."""
    rounded = scores.round(1)
    contender = rounded.index.get_level_values("method") != REFERENCE
    top = rounded[contender].groupby(level="model").max()
    top_per_row = top.reindex(rounded.index.get_level_values("model")).set_axis(rounded.index)
    best = rounded == top_per_row
    best.loc[~contender, :] = False
    return best


def _details_section(tables: ReportTables) -> list[str]:
    details = tables.details
    if details.empty:
        return []
    several_models = details["model"].nunique() > 1
    several_tasks = details["task"].nunique() > 1
    header = [*(["model"] if several_models else []), "method", "budget", "query mode",
              *(["task"] if several_tasks else []), "score", "achieved budget", "KV bytes", "full KV bytes",
              "prefill s", "decode tok/s", "peak mem (max)", "mem kind", "ok / error"]
    rows = []
    for d in details.itertuples(index=False):
        kind = d.peak_mem_kind if isinstance(d.peak_mem_kind, str) and d.peak_mem_kind else MISSING
        rows.append([
            *([d.model] if several_models else []), d.method, f"{d.budget:.3f}", d.mode,
            *([d.task] if several_tasks else []), _fixed(d.score, 1), _fixed(d.achieved_budget, 3),
            _bytes(d.kv_bytes), _bytes(d.full_kv_bytes), _sig(d.prefill_s), _sig(d.decode_tok_s),
            MISSING if kind == "unavailable" else _bytes(d.peak_mem_bytes), kind, f"{d.n_ok} / {d.n_error}",
        ])
    return ["## Details per method and budget",
            "Means over ok samples; KV bytes are measured after prefill compression.",
            _md(header, rows, text={"model", "method", "budget", "query mode", "task", "mem kind"})]


def _niah_section(tables: ReportTables) -> list[str]:
    parts = []
    for title, table, column_format in (("context length (tokens)", tables.niah_by_length, "{:g}"),
                                        ("needle depth (0 = start of the context)", tables.niah_by_depth, "{:.2f}")):
        if table.empty:
            continue
        several_models = table.index.get_level_values("model").nunique() > 1
        header = [*(["model"] if several_models else []), "query mode", "method @ budget",
                  *map(column_format.format, table.columns)]
        rows = [[*([model] if several_models else []), mode, f"{method} @ {budget:.3f}",
                 *(_fixed(v, 1) for v in values)]
                for (model, mode, method, budget), values in table.iterrows()]
        parts += [f"### niah score by {title}", _md(header, rows, text={"model", "query mode", "method @ budget"})]
    return ["## Needle in a haystack", *parts] if parts else []


def _failures_section(tables: ReportTables) -> list[str]:
    failures = tables.failures
    if failures.empty:
        return ["## Failed cells", "none"]
    several_models = failures["model"].nunique() > 1
    header = [*(["model"] if several_models else []), "method", "budget", "task", "sample", "query mode", "error"]
    rows = [[*([f.model] if several_models else []), f.method, f"{f.budget:.3f}", f.task, f.sample_id, f.mode,
             f.error if isinstance(f.error, str) else MISSING] for f in failures.itertuples(index=False)]
    return ["## Failed cells", f"{len(failures)} cell(s) whose last attempt failed "
            "(rerun with `--retry-errors` to try them again):", _md(header, rows, text=header)]


def _metadata_section(metas: list[tuple[Path, dict[str, Any] | None]]) -> list[str]:
    parts = ["## Run metadata"]
    for run_dir, meta in metas:
        if meta is None:
            parts += [f"### `{run_dir}`", "no readable run.json"]
            continue
        versions = ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items()) or MISSING
        kind = f" ({meta['model_kind']})" if meta.get("model_kind") else ""
        config = ", ".join(f"{k}={v}" for k, v in (meta.get("task_config") or {}).items())
        lines = [
            f"- git commit: `{meta.get('git_commit') or 'unknown'}`",
            f"- versions: {versions}",
            f"- device: {meta.get('device', MISSING)}",
            f"- seed: {meta.get('seed', MISSING)}",
            f"- started: {meta.get('started', MISSING)}",
            f"- model: {meta.get('model', MISSING)}{kind}",
            f"- dtype: {meta.get('dtype', MISSING)}",
            f"- query modes: {', '.join(meta.get('query_modes') or []) or MISSING}",
            f"- task config: {config or MISSING}",
        ]
        parts += [f"### {meta.get('run_id') or run_dir.name} (`{run_dir}`)",
                  f"```\n{meta.get('command', '')}\n```", "\n".join(lines)]
    return parts


def _run_meta(run_dir: Path) -> dict[str, Any] | None:
    try:
        return ResultsStore(run_dir).run_meta()
    except ValueError:  # a run.json cut short by a kill: the results still deserve a report
        return None


def _md(header: list[str], rows: list[list[Any]], text: Collection[str]) -> str:
    """A GitHub table: the `text` columns left-aligned, numbers right-aligned, cells kept to one line."""
    clean = [[str(c).replace("|", "\\|").replace("\n", " ") for c in row] for row in rows]
    align = ["left" if name in text else "right" for name in header]
    return tabulate(clean, headers=header, tablefmt="github", disable_numparse=True, colalign=align)


def _score(score: float, of_full: float, best: bool) -> str:
    if pd.isna(score):
        return MISSING
    text = f"**{score:.1f}**" if best else f"{score:.1f}"
    return text if pd.isna(of_full) else f"{text} ({of_full:.0f}%)"


def _fixed(value: float, digits: int) -> str:
    return MISSING if pd.isna(value) else f"{value:.{digits}f}"


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
