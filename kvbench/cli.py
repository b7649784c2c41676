"""Command line: ``python -m kvbench run|list|report``.

Every user mistake is caught here, before a model loads, and reported as one line with a
non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvbench import models, registry
from kvbench.spec import MethodSpec, SpecError, parse_spec, split_spec_list

DEFAULT_LENGTHS = "1000,2000,4000"
DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"

METHODS_HELP = """\
method specs, comma-separated: name[:option=value,...]; e.g. snapkv:window=64,kernel=5,knorm
is snapkv with two options, then knorm (a comma-separated key=value piece continues the options
of the spec before it). 'a+b' composes a token method with a dimension method (issue #3).
'python -m kvbench list' shows every method and its options."""


TASKS_HELP = """\
comma-separated tasks (default: niah). A task family takes a subtask list after a colon:
longbench:hotpotqa,trec,ruler:niah_single_1 runs two LongBench tasks and one RULER task (a
comma-separated piece that is not a task name continues the subtasks of the family before it).
longbench alone = its 16 English tasks; longbench:zh, longbench:e (LongBench-E), longbench:all.
'python -m kvbench list' shows every task and its subtasks."""


class UsageError(Exception):
    """A user mistake: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage block
        raise UsageError(f"{message} (see: python -m kvbench {self.prog.split()[-1]} --help)")


def _floats(text: str, what: str, low: float, high: float, low_open: bool) -> list[float]:
    values = []
    for piece in filter(None, (p.strip() for p in text.split(","))):
        try:
            value = float(piece)
        except ValueError:
            raise UsageError(f"{what} must be numbers, got {piece!r}") from None
        if not (low < value <= high if low_open else low <= value <= high):
            interval = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
            raise UsageError(f"{what} must be in {interval}, got {piece}")
        values.append(value)
    if not values:
        raise UsageError(f"{what}: give at least one value")
    return list(dict.fromkeys(values))


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"{what} must be whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{what} must be positive whole numbers, got {text!r}")
    return list(dict.fromkeys(values))


def _methods(text: str, reference: bool, calibration_data: str | None = None) -> list[MethodSpec]:
    specs: dict[str, MethodSpec] = {}
    for item in split_spec_list(text):
        spec = parse_spec(item, calibration_data)
        specs.setdefault(spec.canonical, spec)
    if not specs:
        raise UsageError("--methods: give at least one method")
    if reference and "full" not in specs:
        specs = {"full": parse_spec("full"), **specs}
    return list(specs.values())


def _device(requested: str | None) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: no CUDA device is available here; use --device cpu")
    if not requested.startswith(("cuda", "cpu")):
        raise UsageError(f"--device must be cpu or cuda[:N], got {requested!r}")
    return requested


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvbench", description="Benchmark KV-cache compression methods head to head.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="evaluate methods x budgets x tasks; resumable",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--methods", required=True, help=METHODS_HELP)
    run.add_argument("--budget", default="0.25,0.1",
                     help="fractions of the full KV-cache bytes to keep, comma-separated, each in (0, 1]")
    run.add_argument("--tasks", default="niah", help=TASKS_HELP)
    run.add_argument("--data-dir", default=None,
                     help="folder with task data files, e.g. LongBench's official <task>.jsonl files")
    run.add_argument("--max-prompt-tokens", type=int, default=None,
                     help="truncate real documents (LongBench) in the middle to this many prompt tokens "
                          "(default: the model's context minus 500, LongBench's rule)")
    run.add_argument("--model", default=models.DEFAULT_MODEL,
                     help="model alias (see 'list'), Hugging Face id or local path")
    run.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    run.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, "
                                                      "float16, bfloat16")
    run.add_argument("--attn-implementation", default="sdpa", help="attention kernel under kvbench's hook")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--max-samples", type=int, default=None,
                     help="cap on samples per task; LongBench: the first N rows of each dataset; RULER and "
                          "perplexity: samples per subtask and length (default 3 and 2)")
    run.add_argument("--lengths", default=DEFAULT_LENGTHS,
                     help=f"context lengths in tokens for synthetic tasks (default {DEFAULT_LENGTHS})")
    run.add_argument("--depths", default=DEFAULT_DEPTHS,
                     help=f"needle depths, fractions of the context (default {DEFAULT_DEPTHS})")
    run.add_argument("--query-aware", action="store_true",
                     help="compress the prompt with the question in it (SnapKV's setting; default)")
    run.add_argument("--query-agnostic", action="store_true",
                     help="compress the context, then append the question (kvpress's setting)")
    run.add_argument("--no-reference", action="store_true", help="do not add the 'full' reference method")
    run.add_argument("--results-dir", type=Path, default=Path("results"))
    run.add_argument("--reports-dir", type=Path, default=Path("reports"))
    run.add_argument("--run-id", default=None, help="name of the run; reusing one resumes it")
    run.add_argument("--retry-errors", action="store_true", help="on resume, run failed cells again")
    run.add_argument("--calibration-data", default=None, metavar="FILE",
                     help="calibration text for dimension methods (.txt, or .jsonl with a 'text' field); "
                          "default: SQuAD articles no task uses")

    calibrate = commands.add_parser("calibrate", help="fit a dimension method's calibration artifact (palu, dynakv)")
    calibrate.add_argument("method", help="method spec, e.g. palu or dynakv:calibration_tokens=8192")
    calibrate.add_argument("--model", default=models.DEFAULT_MODEL,
                           help="model alias (see 'list'), Hugging Face id or local path")
    calibrate.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    calibrate.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, "
                                                            "float16, bfloat16")
    calibrate.add_argument("--calibration-data", default=None, metavar="FILE",
                           help="calibration text (.txt, or .jsonl with a 'text' field); default: SQuAD articles")
    calibrate.add_argument("--force", action="store_true", help="recalibrate even when a valid artifact exists")

    listing = commands.add_parser("list", help="list methods, tasks and model aliases")
    listing.add_argument("--data-dir", default=None, help="also look for task data files here")

    report = commands.add_parser("report", help="write report.md and report.html from results directories")
    report.add_argument("run_dirs", nargs="+", type=Path)
    report.add_argument("--out", type=Path, default=None, help="output directory (default reports/<run-id>)")

    bench = commands.add_parser("bench", help="prefill latency, decode tokens/s, KV bytes and peak memory vs full")
    bench.add_argument("--methods", required=True, help=METHODS_HELP + " 'full' is always measured too.")
    bench.add_argument("--budget", default="0.5,0.25,0.1", help="budgets, comma-separated, each in (0, 1]")
    bench.add_argument("--lengths", default="4000,16000,32000", help="prompt lengths in tokens (random token ids)")
    bench.add_argument("--model", default=models.DEFAULT_MODEL,
                       help="model alias (e.g. random:llama-3.1-8b: real shape, random weights), HF id or path")
    bench.add_argument("--decode-tokens", type=int, default=128, help="greedy decoding steps after prefill")
    bench.add_argument("--repeats", type=int, default=3, help="measured repeats; the report shows medians")
    bench.add_argument("--warmup", type=int, default=1, help="unrecorded warm-up repeats per length")
    bench.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    bench.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, "
                                                        "float16, bfloat16")
    bench.add_argument("--attn-implementation", default="sdpa", help="attention kernel under kvbench's hook")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random prompt and of 'random'")
    bench.add_argument("--results-dir", type=Path, default=Path("results"))
    bench.add_argument("--reports-dir", type=Path, default=Path("reports"))
    bench.add_argument("--run-id", default=None, help="name of the run (a new one: bench runs are not resumed)")
    return parser


def _run(args: argparse.Namespace) -> int:
    from kvbench.tasks import DataUnavailable, TaskConfig

    try:
        methods = _methods(args.methods, reference=not args.no_reference,
                           calibration_data=_calibration_file(args.calibration_data))
    except SpecError as error:
        raise UsageError(str(error)) from None
    budgets = _floats(args.budget, "--budget", 0.0, 1.0, low_open=True)
    depths = _floats(args.depths, "--depths", 0.0, 1.0, low_open=False)
    lengths = _ints(args.lengths, "--lengths")
    if args.max_samples is not None and args.max_samples < 1:
        raise UsageError("--max-samples must be at least 1")
    selected = _tasks(args.tasks)
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir}: no such folder")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 2:
        raise UsageError("--max-prompt-tokens must be at least 2")
    task_config = TaskConfig(tuple(lengths), tuple(depths), args.max_samples, args.seed,
                             subtasks={name: subs for name, subs in selected.items() if subs},
                             data_dir=args.data_dir)
    tasks = []
    for name in selected:
        task = registry.task_class(name)
        try:
            task.check_config(task_config)
        except DataUnavailable as error:
            raise UsageError(str(error)) from None
        tasks.append(task)
    device, dtype, model = _placement(args)
    if model.max_context and max(lengths) > model.max_context:
        raise UsageError(
            f"--lengths {max(lengths)} is longer than {model.name}'s context of {model.max_context} tokens"
        )

    from kvbench.report import write_report
    from kvbench.runner import RunConfig, run
    from kvbench.tasks.longbench import ANSWER_RESERVE as LONGBENCH_ANSWER_RESERVE

    run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S-") + model.name.replace("/", "_").replace(":", "-")
    config = RunConfig(
        run_id=run_id, results_dir=args.results_dir, model=model, methods=methods, budgets=budgets,
        tasks=tasks, task_config=replace(task_config, max_prompt_tokens=args.max_prompt_tokens or (
            model.max_context - LONGBENCH_ANSWER_RESERVE if model.max_context else None)),
        query_modes=[mode for mode, on in ((True, args.query_aware), (False, args.query_agnostic)) if on] or [True],
        device=device, dtype=dtype, attn_implementation=args.attn_implementation, retry_errors=args.retry_errors,
    )
    try:
        run_dir = run(config)
    except ValueError as error:  # an incompatible resume is refused before anything runs
        raise UsageError(str(error)) from None
    report = write_report([run_dir], args.reports_dir / run_id)
    print(f"kvbench: results in {run_dir}/results.jsonl; report in {report}")
    return 0


def _tasks(text: str) -> dict[str, tuple[str, ...]]:
    """Task names and their subtasks from --tasks (see TASKS_HELP); an empty tuple = the task's default."""
    selected: dict[str, list[str]] = {}
    family = None
    for piece in filter(None, (t.strip() for t in text.split(","))):
        name, colon, sub = piece.partition(":")
        if not colon and family is not None and name not in registry.tasks():
            name, sub, colon = family, name, ":"
        try:
            task = registry.task_class(name)
        except registry.RegistryError as error:
            raise UsageError(str(error)) from None
        subs = selected.setdefault(name, [])
        if not colon:
            family = None
            continue
        if sub not in task.subtask_names:
            valid = ", ".join(task.subtask_names) or "none"
            raise UsageError(f"unknown {name} subtask {sub!r}; valid: {valid}")
        subs.append(sub)
        family = name
    if not selected:
        raise UsageError("--tasks: give at least one task")
    return {name: tuple(dict.fromkeys(subs)) for name, subs in selected.items()}


def _list(data_dir: str | None = None) -> int:
    print("methods:")
    for name, cls in sorted(registry.methods().items()):
        options = ", ".join(f"{f}={field.default}" for f, field in cls.options().items())
        family = cls.family + (", scores with queries" if cls.uses_queries else "")
        print(f"  {name:<14} [{family}] {cls.summary}" + (f" (options: {options})" if options else ""))
    print("tasks:")
    from kvbench.tasks import DataUnavailable, TaskConfig

    for name, cls in sorted(registry.tasks().items()):
        try:
            if data_dir is None:
                cls.check_data()
            else:
                cls.check_config(TaskConfig((), (), None, 0, data_dir=data_dir))
            state = "data available offline"
        except DataUnavailable as missing:
            state = f"NO DATA: {missing}"
        print(f"  {name:<14} {cls.summary} [{cls.data_source}; {state}]")
        if cls.subtask_names:
            print(f"  {'':<14} subtasks: {', '.join(cls.subtask_names)}")
    print("models:")
    for alias, summary in models.aliases().items():
        try:
            models.resolve(alias)
            state = "installed"
        except models.ModelUnavailable as missing:
            state = f"not installed: {missing}"
        print(f"  {alias:<20} {summary} [{state}]")
    print("  (or any Hugging Face causal LM id or local path)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from kvbench.report import write_report

    missing = [str(d) for d in args.run_dirs if not (d / "results.jsonl").is_file()]
    if missing:
        raise UsageError(f"no results.jsonl in: {', '.join(missing)}")
    out = args.out or Path("reports") / args.run_dirs[0].name
    print(f"kvbench: report in {write_report(list(args.run_dirs), out)}")
    return 0


def _calibration_file(path: str | None) -> str | None:
    """The --calibration-data file, checked readable (absolute, so results name it unambiguously)."""
    if path is None:
        return None
    from kvbench.calibration import CalibrationDataError, read_calibration_file

    try:
        read_calibration_file(Path(path))
    except CalibrationDataError as error:
        raise UsageError(str(error)) from None
    return str(Path(path).resolve())


def _calibrate(args: argparse.Namespace) -> int:
    from kvbench.models import ModelUnavailable, load, parse_dtype, resolve

    try:
        spec = parse_spec(args.method, _calibration_file(args.calibration_data))
    except SpecError as error:
        raise UsageError(str(error)) from None
    method = spec.parts[0].method if spec.parts else spec.method
    if not callable(getattr(method, "calibrate", None)):
        raise UsageError(f"{spec.name} needs no calibration (only dimension methods do: "
                         f"{', '.join(n for n, c in sorted(registry.methods().items()) if c.family == 'dimension')})")
    device = _device(args.device)
    try:
        dtype = parse_dtype(args.dtype, device)
        model_ref = resolve(args.model)
    except (ValueError, ModelUnavailable) as error:
        raise UsageError(str(error)) from None
    print(f"kvbench: loading {model_ref.name} on {device} ({dtype})", flush=True)
    model, tokenizer = load(model_ref, device, dtype)
    start = time.perf_counter()
    path = method.calibrate(model, tokenizer, force=args.force)
    print(f"kvbench: {method.name} calibration artifact for {model_ref.name}: {path} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


def _attention(name: str) -> None:
    from importlib.util import find_spec

    from kvbench.attention import SUPPORTED_BASES

    if name == "flash_attention_2" and find_spec("flash_attn") is None:
        raise UsageError("--attn-implementation flash_attention_2 needs the flash-attn package and a CUDA GPU "
                         "(pip install 'kvbench[gpu]'); use sdpa")
    if name not in SUPPORTED_BASES:
        raise UsageError(f"--attn-implementation {name!r} is not supported; valid: {', '.join(SUPPORTED_BASES)}")


def _placement(args: argparse.Namespace) -> tuple[str, Any, Any]:
    """Device, dtype and resolved model of a run or bench command, each checked before anything loads."""
    from kvbench.models import ModelUnavailable, parse_dtype, resolve

    device = _device(args.device)
    try:
        dtype = parse_dtype(args.dtype, device)
    except ValueError as error:
        raise UsageError(str(error)) from None
    _attention(args.attn_implementation)
    try:
        return device, dtype, resolve(args.model)
    except ModelUnavailable as error:
        raise UsageError(str(error)) from None


def _bench(args: argparse.Namespace) -> int:
    """Validate everything before the model loads, then measure and write the bench report."""

    try:
        methods = _methods(args.methods, reference=True)
    except SpecError as error:
        raise UsageError(str(error)) from None
    budgets = _floats(args.budget, "--budget", 0.0, 1.0, low_open=True)
    lengths = _ints(args.lengths, "--lengths")
    for name, value, low in (("--decode-tokens", args.decode_tokens, 1), ("--repeats", args.repeats, 1),
                             ("--warmup", args.warmup, 0)):
        if value < low:
            raise UsageError(f"{name} must be at least {low}, got {value}")
    device, dtype, model = _placement(args)
    longest = max(lengths) + args.decode_tokens
    if model.max_context and longest > model.max_context:
        raise UsageError(f"--lengths {max(lengths)} plus --decode-tokens {args.decode_tokens} is longer than "
                         f"{model.name}'s context of {model.max_context} tokens")
    run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S-bench-") + model.name.replace("/", "_").replace(":", "-")
    if (args.results_dir / run_id / "results.jsonl").exists():
        raise UsageError(f"{args.results_dir / run_id} exists; bench runs are not resumed (timings must be side "
                         "by side in one process): use a new --run-id")

    from kvbench.bench import BenchConfig, run_bench
    from kvbench.report import write_report

    config = BenchConfig(
        run_id=run_id, results_dir=args.results_dir, model=model, methods=methods, budgets=budgets,
        lengths=lengths, decode_tokens=args.decode_tokens, repeats=args.repeats, warmup=args.warmup,
        device=device, dtype=dtype, attn_implementation=args.attn_implementation, seed=args.seed,
    )
    run_dir = run_bench(config)
    report = write_report([run_dir], args.reports_dir / run_id)
    print(f"kvbench: measurements in {run_dir}/results.jsonl; report in {report} (and report.html)")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "run":
            return _run(args)
        if args.command == "list":
            return _list(args.data_dir)
        if args.command == "bench":
            return _bench(args)
        if args.command == "calibrate":
            return _calibrate(args)
        return _report(args)
    except UsageError as error:
        print(f"kvbench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvbench: interrupted; finished cells are saved, rerun with the same --run-id to resume",
              file=sys.stderr)
        return 130
