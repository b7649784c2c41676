"""The cost sections of the report, as blocks: measured memory and speed of the quality run, and the
``python -m kvbench bench`` measurements side by side with ``full`` (decoding against the memory-bound limit,
and kvbench's methods beside the kvpress presses of the same name)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from kvbench.report import formatting as fmt
from kvbench.report import plots
from kvbench.report.render import Block, Figure, Heading, Table, Text, slug
from kvbench.report.sections import FIGURE_PREFIX, method_label
from kvbench.report.tables import ReportTables


def _config_columns(configs: pd.DataFrame) -> tuple[list[str], Callable[[Any], list[str]]]:
    several_models = configs["model"].nunique() > 1
    several_modes = configs["mode"].nunique() > 1
    header = [*(["model"] if several_models else []), "method", "budget", *(["query mode"] if several_modes else [])]

    def key(c: Any) -> list[str]:
        return [*([c.model] if several_models else []), method_label(c.method, bool(c.masked)), f"{c.budget:.3f}",
                *([c.mode] if several_modes else [])]

    return header, key


def memory_section(tables: ReportTables) -> list[Block]:
    configs = tables.configs
    if "kv_bytes" not in configs or configs["kv_bytes"].isna().all():
        return []
    header, key = _config_columns(configs)
    rows = [[*key(c), fmt.fixed(c.achieved_budget, 3), fmt.size(c.kv_bytes), fmt.ratio(c.kv_bytes_x),
             fmt.size(c.full_kv_bytes), fmt.peak(c.peak_mem_bytes, c.peak_mem_kind), fmt.ratio(c.peak_mem_bytes_x),
             fmt.kind(c.peak_mem_kind)] for c in configs.itertuples(index=False)]
    return [Heading(2, "Memory"),
            Text("KV bytes are measured from the cache's tensors right after prefill compression (mean over ok "
                 "cells); × full is the ratio to the uncompressed cache of the same prompts. Peak memory is the "
                 "largest per-cell peak, of the kind named in the last column (GPU: allocator peak over the "
                 "cell's start; CPU: rise of the process's peak RSS over its RSS at the cell's start)."),
            Table([*header, "achieved budget", "KV bytes", "× full", "full KV bytes", "peak memory", "× full",
                   "peak kind"], rows, {*header, "peak kind"} - {"budget"})]


def speed_section(tables: ReportTables) -> list[Block]:
    configs = tables.configs
    if "prefill_s" not in configs or configs["prefill_s"].isna().all():
        return []
    header, key = _config_columns(configs)
    rows = [[*key(c), fmt.sig(c.prefill_s), fmt.ratio(c.prefill_s_x), fmt.sig(c.decode_tok_s),
             fmt.ratio(c.decode_tok_s_x), f"{c.n_ok} / {c.n_error}"] for c in configs.itertuples(index=False)]
    return [Heading(2, "Speed"),
            Text("Prefill time includes compression (mean over ok cells); decode tokens/s is all decoded tokens "
                 "over all decoding time. × full: prefill below 1 is faster, decode above 1 is faster. These are "
                 "quality-run timings on short answers; `python -m kvbench bench` measures speed properly "
                 "(warm-up, repeats, medians)."),
            Table([*header, "prefill s", "× full", "decode tok/s", "× full", "ok / error"], rows,
                  set(header) - {"budget"})]


def bench_section(tables: ReportTables) -> list[Block]:
    bench = tables.bench
    if bench.empty:
        return []
    colours = plots.palette(list(bench["method"]))
    kinds = ", ".join(sorted({k for ks in bench["peak_mem_kind"] for k in ks.split(", ") if k})) or fmt.MISSING
    parts: list[Block] = [
        Heading(2, "Speed and memory benchmark"),
        Text("Measured side by side with `full` in one process, on the same prompt, after warm-up; each value is "
             "the median over the repeats, and spread is (max − min) / median over them. Prefill includes "
             f"compression. Peak memory ({kinds}) is over the memory held before the prompt, so it includes the "
             "cache; the decoding peak is taken while tokens are generated."),
    ]
    several_models = bench["model"].nunique() > 1
    header = ["context tokens", "method", "budget", "prefill s", "× full", "spread", "decode tok/s", "× full",
              "spread", "KV held", "achieved budget", "peak decoding", "× full", "peak prefill", "× full", "repeats"]
    for model, frame in bench.groupby("model", sort=False):
        rows = [[f"{b.length:g}", method_label(b.method, bool(b.masked)), f"{b.budget:.3f}", fmt.sig(b.prefill_s),
                 fmt.ratio(b.prefill_s_x), fmt.percent(b.prefill_spread), fmt.sig(b.decode_tok_s),
                 fmt.ratio(b.decode_tok_s_x), fmt.percent(b.decode_spread), fmt.size(b.kv_bytes),
                 fmt.fixed(b.achieved_budget, 3), fmt.peak(b.decode_peak_mem_bytes, b.peak_mem_kind),
                 fmt.ratio(b.decode_peak_mem_bytes_x), fmt.peak(b.prefill_peak_mem_bytes, b.peak_mem_kind),
                 fmt.ratio(b.prefill_peak_mem_bytes_x), f"{b.repeats}"] for b in frame.itertuples(index=False)]
        if several_models:
            parts.append(Heading(3, model))
        plot_frame = frame.assign(kv_mib=frame["kv_bytes"] / 2**20,
                                  decode_peak_mib=frame["decode_peak_mem_bytes"] / 2**20,
                                  prefill_x=frame["prefill_s_x"], decode_x=frame["decode_tok_s_x"])
        parts += [
            Table(header, rows, {"method"}),
            *_limit_table(frame),
            *_kvpress_table(frame),
            Figure(f"{FIGURE_PREFIX}bench-speed-{slug(model)}.png",
                   plots.bench_speed(plot_frame, colours, f"{model}: speed relative to full"),
                   "Prefill time and decode speed relative to full, by context length."),
            Figure(f"{FIGURE_PREFIX}bench-memory-{slug(model)}.png",
                   plots.bench_memory(plot_frame, colours, f"{model}: measured memory"),
                   "Peak memory while decoding and KV bytes held, by budget."),
        ]
    return parts


def _limit_table(frame: pd.DataFrame) -> list[Block]:
    compressed = frame[(frame["method"] != "full") & frame["decode_limit"].notna()]
    if compressed.empty:
        return []
    rows = [[f"{b.length:g}", method_label(b.method, bool(b.masked)), f"{b.budget:.3f}",
             fmt.fixed(b.achieved_budget, 3), fmt.sig(b.sample_s), fmt.ratio(b.decode_tok_s_x),
             fmt.ratio(b.decode_limit), fmt.ratio(b.of_limit)]
            for b in compressed.itertuples(index=False)]
    return [Text("Decoding against the memory-bound limit: a step reads the weights (W bytes) and the cache, so a "
                 "cache cut to a fraction b of the full cache's KV bytes can speed a step up by at most "
                 "(W + KV) / (W + b·KV). \"of limit\" is the measured decode speed-up (× full) over that limit: 1 "
                 "is all that memory traffic allows; below 1, the method's own work (scoring, rebuilding latent "
                 "keys) costs time; above 1, the full cache costs more per byte than one read (e.g. attention over a "
                 "long context on CPU). Sample s is prefill plus decoding of one sample (median)."),
            Table(["context tokens", "method", "budget", "achieved budget", "sample s", "decode × full", "limit",
                   "of limit"], rows, {"method"})]


def kvpress_pairs(frame: pd.DataFrame) -> list[tuple[Any, Any]]:
    """(kvbench row, kvpress row) of the same method at the same length and budget: ``kvpress:SnapKVPress`` pairs
    with ``snapkv...`` (names compared without ``Press``, case and underscores)."""
    def base(method: str) -> str:
        return method.split(":")[0].replace("_", "").lower()

    rows = list(frame.itertuples(index=False))
    pairs = []
    for press in rows:
        if not press.method.startswith("kvpress:"):
            continue
        name = press.method.split(":")[1].removesuffix("Press").lower()
        pairs += [(own, press) for own in rows if not own.method.startswith("kvpress:") and "+" not in own.method
                  and base(own.method) == name and own.length == press.length and own.budget == press.budget]
    return pairs


def _kvpress_table(frame: pd.DataFrame) -> list[Block]:
    pairs = kvpress_pairs(frame)
    if not pairs:
        return []
    rows = [[f"{own.length:g}", own.method, press.method, f"{own.budget:.3f}", fmt.sig(own.sample_s),
             fmt.sig(press.sample_s), fmt.ratio(own.sample_s / press.sample_s), fmt.sig(own.prefill_s),
             fmt.sig(press.prefill_s), fmt.sig(own.decode_tok_s), fmt.sig(press.decode_tok_s), fmt.size(own.kv_bytes),
             fmt.size(press.kv_bytes)] for own, press in pairs]
    return [Text("kvbench beside kvpress: the same press, the same prompt, in one process; a kvpress press runs "
                 "through kvbench's prefill with its hooks around the compressing forward. Sample s is prefill plus "
                 "decoding (median); KV held is measured from the cache's tensors after compression."),
            Table(["context tokens", "kvbench", "kvpress", "budget", "kvbench sample s", "kvpress sample s",
                   "kvbench / kvpress", "kvbench prefill s", "kvpress prefill s", "kvbench decode tok/s",
                   "kvpress decode tok/s", "kvbench KV held", "kvpress KV held"], rows, {"kvbench", "kvpress"})]
