"""Command line: ``python -m kvbench run|list|report``.

Every user mistake is caught here, before a model loads, and reported as one line with a
non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kvbench import models, registry
from kvbench.spec import MethodSpec, MethodUnavailable, SpecError, parse_spec, split_spec_list

DEFAULT_LENGTHS = "1000,2000,4000"
DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"

METHODS_HELP = """\
method specs, comma-separated: name[:option=value,...]; e.g. snapkv:window=64,kernel=5,knorm
is snapkv with two options, then knorm (a comma-separated key=value piece continues the options
of the spec before it). 'a+b' composes a token method with a dimension method (issue #3).
'python -m kvbench list' shows every method and its options."""


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


def _methods(text: str, reference: bool) -> list[MethodSpec]:
    specs: dict[str, MethodSpec] = {}
    unavailable: dict[str, str] = {}
    for item in split_spec_list(text):
        try:
            spec = parse_spec(item)
        except MethodUnavailable as reason:
            unavailable[item] = str(reason)
            continue
        specs.setdefault(spec.canonical, spec)
    if not specs:
        raise UsageError("no runnable method in --methods: " + "; ".join(dict.fromkeys(unavailable.values())))
    for item, reason in unavailable.items():
        print(f"kvbench: skipping {item}: {reason}", file=sys.stderr, flush=True)
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
    run.add_argument("--tasks", default="niah", help="comma-separated task names (default: niah)")
    run.add_argument("--model", default=models.DEFAULT_MODEL,
                     help="model alias (see 'list'), Hugging Face id or local path")
    run.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    run.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, "
                                                      "float16, bfloat16")
    run.add_argument("--attn-implementation", default="sdpa", help="attention kernel under kvbench's hook")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--max-samples", type=int, default=None, help="cap on samples per task")
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

    commands.add_parser("list", help="list methods, tasks and model aliases")

    report = commands.add_parser("report", help="write report.md from results directories")
    report.add_argument("run_dirs", nargs="+", type=Path)
    report.add_argument("--out", type=Path, default=None, help="output directory (default reports/<run-id>)")
    return parser


def _run(args: argparse.Namespace) -> int:
    from kvbench.models import ModelUnavailable, parse_dtype, resolve
    from kvbench.tasks import DataUnavailable, TaskConfig

    try:
        methods = _methods(args.methods, reference=not args.no_reference)
    except SpecError as error:
        raise UsageError(str(error)) from None
    budgets = _floats(args.budget, "--budget", 0.0, 1.0, low_open=True)
    depths = _floats(args.depths, "--depths", 0.0, 1.0, low_open=False)
    lengths = _ints(args.lengths, "--lengths")
    if args.max_samples is not None and args.max_samples < 1:
        raise UsageError("--max-samples must be at least 1")
    tasks = []
    for name in filter(None, (t.strip() for t in args.tasks.split(","))):
        try:
            task = registry.task_class(name)
            task.check_data()
        except (registry.RegistryError, DataUnavailable) as error:
            raise UsageError(str(error)) from None
        tasks.append(task)
    if not tasks:
        raise UsageError("--tasks: give at least one task")
    device = _device(args.device)
    try:
        dtype = parse_dtype(args.dtype, device)
    except ValueError as error:
        raise UsageError(str(error)) from None
    from kvbench.attention import SUPPORTED_BASES

    if args.attn_implementation not in SUPPORTED_BASES:
        raise UsageError(f"--attn-implementation {args.attn_implementation!r} is not supported; "
                         f"valid: {', '.join(SUPPORTED_BASES)}")
    try:
        model = resolve(args.model)
    except ModelUnavailable as error:
        raise UsageError(str(error)) from None
    if model.max_context and max(lengths) > model.max_context:
        raise UsageError(
            f"--lengths {max(lengths)} is longer than {model.name}'s context of {model.max_context} tokens"
        )

    from kvbench.report import write_report
    from kvbench.runner import RunConfig, run

    run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S-") + model.name.replace("/", "_").replace(":", "-")
    config = RunConfig(
        run_id=run_id, results_dir=args.results_dir, model=model, methods=methods, budgets=budgets,
        tasks=tasks, task_config=TaskConfig(tuple(lengths), tuple(depths), args.max_samples, args.seed),
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


def _list() -> int:
    print("methods:")
    for name, cls in sorted(registry.methods().items()):
        options = ", ".join(f"{f}={field.default}" for f, field in cls.options().items())
        family = cls.family + (", scores with queries" if cls.uses_queries else "")
        print(f"  {name:<14} [{family}] {cls.summary}" + (f" (options: {options})" if options else ""))
    for name, reason in sorted(registry.PLANNED_METHODS.items()):
        print(f"  {name:<14} [planned] {reason}")
    print("tasks:")
    from kvbench.tasks import DataUnavailable

    for name, cls in sorted(registry.tasks().items()):
        try:
            cls.check_data()
            state = "data available offline"
        except DataUnavailable as missing:
            state = f"NO DATA: {missing}"
        print(f"  {name:<14} {cls.summary} [{cls.data_source}; {state}]")
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


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "run":
            return _run(args)
        if args.command == "list":
            return _list()
        return _report(args)
    except UsageError as error:
        print(f"kvbench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvbench: interrupted; finished cells are saved, rerun with the same --run-id to resume",
              file=sys.stderr)
        return 130
