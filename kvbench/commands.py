"""The commands behind ``python -m kvbench``: each checks all of its input first, then loads and runs."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from kvbench import checks
from kvbench.checks import UsageError


def default_run_id(model_name: str, kind: str = "") -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + kind + model_name.replace("/", "_").replace(":", "-")


def run(args: argparse.Namespace) -> int:
    """Checks that need no torch come first (bad input answers at once), then method specs, then the device."""
    from kvbench.tasks import TaskConfig

    checks.run_id(args.run_id)
    checks.output_dir(args.results_dir, "--results-dir")
    checks.output_dir(args.reports_dir, "--reports-dir")
    budgets = checks.floats(args.budget, "--budget", 0.0, 1.0, low_open=True)
    depths = checks.floats(args.depths, "--depths", 0.0, 1.0, low_open=False)
    lengths = checks.ints(args.lengths, "--lengths")
    checks.at_least(args.max_samples, "--max-samples", 1)
    checks.at_least(args.max_prompt_tokens, "--max-prompt-tokens", 2)
    checks.seed(args.seed)
    checks.data_dir(args.data_dir)
    selected = checks.tasks(args.tasks)
    task_config = TaskConfig(tuple(lengths), tuple(depths), args.max_samples, args.seed,
                             subtasks={name: subs for name, subs in selected.items() if subs},
                             data_dir=args.data_dir, include_path=checks.include_path(args.include_path))
    tasks = checks.task_configs(selected, task_config)
    model = checks.model(args)
    checks.context(model, lengths, tasks)
    if args.run_id is not None:
        checks.existing_run(args.results_dir / args.run_id)
    methods = checks.methods(args.methods, reference=not args.no_reference,
                             calibration_data=checks.calibration_file(args.calibration_data))
    shard = checks.shard(args.shard)
    if shard is not None and args.run_id is None:
        raise UsageError(f"shard {shard} ({shard.source}): give every shard the same --run-id, so that they write "
                         "one run")
    checks.executor(args)
    cluster_device = None
    if args.executor == "ray":
        from kvbench.executors.ray import cluster_device as ray_device

        try:
            cluster_device = ray_device(args.device, args.ray_address)
        except ValueError as error:
            raise UsageError(str(error)) from None
    else:
        from kvbench.shards import local_device

        args.device = local_device(args.device)
    device, dtype, model = checks.placement(args, cluster_device, model)

    from kvbench.report import write_report
    from kvbench.runner import RunConfig
    from kvbench.runner import run as run_grid
    from kvbench.tasks.longbench import ANSWER_RESERVE as LONGBENCH_ANSWER_RESERVE

    run_id = args.run_id or default_run_id(model.name)
    config = RunConfig(
        run_id=run_id, results_dir=args.results_dir, model=model, methods=methods, budgets=budgets,
        tasks=tasks, task_config=replace(task_config, max_prompt_tokens=args.max_prompt_tokens or (
            model.max_context - LONGBENCH_ANSWER_RESERVE if model.max_context else None)),
        query_modes=[mode for mode, on in ((True, args.query_aware), (False, args.query_agnostic)) if on] or [True],
        device=device, dtype=dtype, attn_implementation=args.attn_implementation, retry_errors=args.retry_errors,
        device_map=args.device_map, shard=shard, executor=args.executor, workers=args.workers,
        ray_address=args.ray_address,
    )
    from kvbench.executors import ExecutorError

    try:
        run_dir = run_grid(config)
    except ValueError as error:  # an incompatible resume or a second writer is refused before the model loads
        raise UsageError(str(error)) from None
    except ExecutorError as error:
        print(f"kvbench: error: {error}", file=sys.stderr)
        return 1
    if shard is not None:  # the other shards may still be running: the report is made once, over all of them
        print(f"kvbench: shard {shard} done, rows in {run_dir}; when every shard has finished: "
              f"python -m kvbench report {run_dir}")
        return 0
    report = write_report([run_dir], args.reports_dir / run_id)
    print(f"kvbench: results in {run_dir}; report in {report}")
    return 0


def bench(args: argparse.Namespace) -> int:
    checks.run_id(args.run_id)
    checks.output_dir(args.results_dir, "--results-dir")
    checks.output_dir(args.reports_dir, "--reports-dir")
    budgets = checks.floats(args.budget, "--budget", 0.0, 1.0, low_open=True)
    lengths = checks.ints(args.lengths, "--lengths", low=2)
    checks.at_least(args.decode_tokens, "--decode-tokens", 1)
    checks.at_least(args.repeats, "--repeats", 1)
    checks.at_least(args.warmup, "--warmup", 0)
    checks.seed(args.seed)
    model = checks.model(args)
    longest = max(lengths) + args.decode_tokens
    if model.max_context and longest > model.max_context:
        raise UsageError(f"--lengths {max(lengths)} plus --decode-tokens {args.decode_tokens} is longer than "
                         f"{model.name}'s context of {model.max_context} tokens")
    run_id = args.run_id or default_run_id(model.name, "bench-")
    if (args.results_dir / run_id).exists():
        raise UsageError(f"{args.results_dir / run_id} exists; bench runs are not resumed (timings must be side "
                         "by side in one process): use a new --run-id")
    methods = checks.methods(args.methods, reference=True)
    device, dtype, model = checks.placement(args, resolved=model)

    from kvbench.bench import BenchConfig, run_bench
    from kvbench.report import write_report

    config = BenchConfig(
        run_id=run_id, results_dir=args.results_dir, model=model, methods=methods, budgets=budgets,
        lengths=lengths, decode_tokens=args.decode_tokens, repeats=args.repeats, warmup=args.warmup,
        device=device, dtype=dtype, attn_implementation=args.attn_implementation, seed=args.seed,
    )
    try:
        run_dir = run_bench(config)
    except ValueError as error:
        raise UsageError(str(error)) from None
    report = write_report([run_dir], args.reports_dir / run_id)
    print(f"kvbench: measurements in {run_dir}; report in {report} (and report.html)")
    return 0


def calibrate(args: argparse.Namespace) -> int:
    from kvbench.models import load
    from kvbench.registry import METHODS

    model_ref = checks.model(args)
    specs = checks.methods(args.method, reference=False,
                           calibration_data=checks.calibration_file(args.calibration_data))
    if len(specs) > 1:
        raise UsageError(f"calibrate takes one method spec, got {checks.short(args.method)!r}")
    spec = specs[0]
    method = spec.parts[0].method if spec.parts else spec.method
    if not callable(getattr(method, "calibrate", None)):
        needing = ", ".join(n for n, c in METHODS.all().items() if callable(getattr(c, "calibrate", None)))
        raise UsageError(f"{spec.name} needs no calibration (methods that do: {needing})")
    device, dtype, model_ref = checks.placement(args, resolved=model_ref)
    print(f"kvbench: loading {model_ref.name} on {device} ({dtype})", flush=True)
    model, tokenizer = load(model_ref, device, dtype)
    start = time.perf_counter()
    path = method.calibrate(model, tokenizer, force=args.force)
    print(f"kvbench: {method.name} calibration artifact for {model_ref.name}: {path} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


def report(args: argparse.Namespace) -> int:
    from kvbench.results import result_files

    for run_dir in args.run_dirs:  # a broken run.json is shown as such in the report; the rows still count
        checks.readable_path(run_dir, "run folder")
    missing = [str(d) for d in args.run_dirs if not result_files(d)]
    if missing:
        raise UsageError(f"no results files in: {checks.short(', '.join(missing), 200)}")
    out = args.out or Path("reports") / args.run_dirs[0].name
    checks.output_dir(out, "--out")

    from kvbench.report import write_report

    print(f"kvbench: report in {write_report(list(args.run_dirs), out)}")
    return 0


def list_all(args: argparse.Namespace) -> int:
    """Every method (with family and options), task (with offline availability) and model alias."""
    from kvbench import models
    from kvbench.registry import METHODS, TASKS
    from kvbench.tasks import DataUnavailable, TaskConfig

    checks.data_dir(args.data_dir)
    print("methods:")
    for name, cls in METHODS.all().items():
        options = ", ".join(f"{f}={field.default}" for f, field in cls.options().items())
        family = cls.family + (", scores with queries" if cls.uses_queries else "")
        print(f"  {name:<14} [{family}] {cls.summary}" + (f" (options: {options})" if options else ""))
    for prefix in METHODS.prefixes():
        print(f"  {prefix}:<name>  [prefix] methods made on demand, e.g. {prefix}:SnapKVPress")
    print("tasks:")
    for name, cls in TASKS.all().items():
        try:
            if args.data_dir is None:
                cls.check_data()
            else:
                cls.check_config(TaskConfig((), (), 1, 0, data_dir=args.data_dir))  # first rows only
            state = "data available offline"
        except (DataUnavailable, ValueError) as missing:
            state = f"NO DATA: {missing}"
        print(f"  {name:<14} {cls.summary} [{cls.data_source}; {state}]")
        if cls.subtask_names:
            print(f"  {'':<14} subtasks: {', '.join(cls.subtask_names)}")
    for prefix in TASKS.prefixes():
        cls = TASKS.get(f"{prefix}:<name>")
        try:
            cls.check_data()
            state = "installed"
        except DataUnavailable as missing:
            state = f"NOT INSTALLED: {missing}"
        print(f"  {prefix}:<name>  [prefix] {cls.summary} [{cls.data_source}; {state}]")
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
