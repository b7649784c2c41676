"""The runner: expand a grid into cells, skip the ones already stored, evaluate the rest.

Data flows one way: CLI -> runner -> (model + cache + method) -> result rows -> report.
"""

from __future__ import annotations

import platform
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kvbench.evaluate import Cell, evaluate_cell
from kvbench.measure import freeze_loaded
from kvbench.models import ModelRef, load, load_tokenizer
from kvbench.prefill import prepare
from kvbench.provenance import device_name, git_commit, package_version
from kvbench.results import ResultsStore, cell_key
from kvbench.shards import Shard, select
from kvbench.spec import MethodSpec
from kvbench.tasks import Sample, Task, TaskConfig


@dataclass
class RunConfig:
    run_id: str
    results_dir: Path
    model: ModelRef
    methods: Sequence[MethodSpec]
    budgets: Sequence[float]
    tasks: Sequence[type[Task]]
    task_config: TaskConfig
    query_modes: Sequence[bool]  # True = query-aware
    device: str
    dtype: torch.dtype
    attn_implementation: str = "sdpa"
    retry_errors: bool = False
    argv: Sequence[str] = field(default_factory=lambda: sys.argv)
    device_map: str | None = None  # accelerate's device map: the model spread over the machine's GPUs
    shard: Shard | None = None  # this process runs that part of the grid and writes results-<shard>.jsonl
    executor: str = "serial"  # or "ray": the cells go to Ray actors, this process writes their rows
    workers: int | None = None  # Ray actors (default: one per GPU of the cluster)
    ray_address: str | None = None  # an existing Ray cluster (default: RAY_ADDRESS, else a local one)

    @property
    def run_dir(self) -> Path:
        return self.results_dir / self.run_id


@dataclass
class Plan:
    """The grid of an invocation, the part this process owns (its shard), and what of it is left to run."""

    tasks: list[Task]
    samples: dict[str, Sequence[Sample]]
    cells: list[Cell]
    owned: list[Cell]
    todo: list[Cell]


def budgets_for(spec: MethodSpec, budgets: Sequence[float]) -> list[float]:
    """The reference keeps everything, so it runs once, at budget 1.0."""
    return [1.0] if spec.method.family == "reference" else list(budgets)


def run_settings(config: RunConfig) -> dict[str, Any]:
    """What every row of a run must share (``kvbench.results.SETTINGS``); a resume with others is refused."""
    return {
        "seed": config.task_config.seed,
        "dtype": str(config.dtype).removeprefix("torch."),
        "device_type": config.device.partition(":")[0],
        "attn_implementation": config.attn_implementation,
        "max_prompt_tokens": config.task_config.max_prompt_tokens,
        "task_versions": {task.name: task.version for task in config.tasks},
    }


def grid_of(config: RunConfig) -> dict[str, list[Any]]:
    """The grid an invocation asks for; a resume may grow it (recorded in ``invocations.jsonl``)."""
    return {
        "models": [config.model.name],
        "methods": [spec.canonical for spec in config.methods],
        "budgets": list(config.budgets),
        "tasks": [task.name for task in config.tasks],
        "query_modes": ["query-aware" if mode else "query-agnostic" for mode in config.query_modes],
        "lengths": list(config.task_config.lengths),
        "depths": list(config.task_config.depths),
        "subtasks": sorted(f"{task}:{sub}" for task, subs in config.task_config.subtasks.items() for sub in subs),
        "max_samples": [config.task_config.max_samples],
    }


def run_metadata(config: RunConfig) -> dict[str, Any]:
    return {
        "run_id": config.run_id,
        "command": shlex.join(["python", "-m", "kvbench", *config.argv[1:]]),
        "git_commit": git_commit(),
        "versions": {name: package_version(name) for name in ("kvbench", "torch", "transformers")}
        | {"python": platform.python_version()},
        "device": (f"{config.device} on Ray workers" if config.executor == "ray" else device_name(config.device))
        + (f", device map {config.device_map}" if config.device_map else ""),
        "seed": config.task_config.seed,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": config.model.name,
        "model_kind": config.model.kind,
        "dtype": str(config.dtype).removeprefix("torch."),
        "attn_implementation": config.attn_implementation,
        "settings": run_settings(config),
        **grid_of(config),
        "task_config": {k: v for k, v in vars(config.task_config).items() if k != "seed"},
        "task_info": {task.name: task().info(config.task_config) for task in config.tasks},
    }


def expand(config: RunConfig, tasks: Sequence[Task], samples: dict[str, Sequence[Sample]]) -> list[Cell]:
    """Sample-major order, so an interrupted run has compared every method on the same samples."""
    return [
        Cell(spec, budget, task, sample, query_aware)
        for task in tasks
        for sample in samples[task.name]
        for query_aware in config.query_modes
        for spec in config.methods
        for budget in budgets_for(spec, config.budgets)
    ]


def row_for(config: RunConfig, cell: Cell) -> dict[str, Any]:
    return {
        "run_id": config.run_id,
        "model": config.model.name,
        "method": cell.spec.canonical,
        "method_options": cell.spec.options,
        "budget": cell.budget,
        "task": cell.sample.task or cell.task.name,
        "sample_id": cell.sample.sample_id,
        "sample_meta": cell.sample.metadata,
        "query_aware": cell.query_aware,
        "metric": cell.sample.metric or cell.task.metric,
        "higher_is_better": cell.task.higher_is_better,
        "task_version": cell.task.version,
        "quality_meaningful": config.model.meaningful_quality,
        **{key: value for key, value in run_settings(config).items() if key != "task_versions"},
    }


def load_prepared(ref: ModelRef, device: str, dtype: torch.dtype, attn_implementation: str,
                  methods: Sequence[MethodSpec], device_map: str | None = None,
                  tokenizer: Any = None) -> tuple[Any, Any]:
    """Load the model and let every method prepare for it (e.g. load or fit its calibration artifact)."""
    where = f"device map {device_map}" if device_map else device
    print(f"kvbench: loading {ref.name} on {where} ({dtype})", flush=True)
    model, tokenizer = load(ref, device, dtype, attn_implementation, device_map=device_map, tokenizer=tokenizer)
    for spec in methods:
        prepare(spec.method, model, tokenizer)
    freeze_loaded()
    return model, tokenizer


def plan(config: RunConfig, tokenizer: Any, done: set[tuple]) -> Plan:
    """Expand the grid (samples need the tokenizer, not the model), take this shard's part, drop stored cells.

    The shard's part is taken over the whole grid, so shards reading the store at different moments still agree.
    """
    tasks = [task_cls() for task_cls in config.tasks]
    samples = {task.name: task.samples(tokenizer, config.task_config) for task in tasks}
    cells = expand(config, tasks, samples)
    keys = [cell_key(row_for(config, cell)) for cell in cells]
    owned = [(cell, key) for cell, key, mine in zip(cells, keys, select(keys, config.shard), strict=True) if mine]
    return Plan(tasks, samples, cells, [cell for cell, _ in owned], [cell for cell, key in owned if key not in done])


def evaluate_row(config: RunConfig, model: Any, tokenizer: Any, cell: Cell) -> dict[str, Any]:
    """One cell's row, whoever runs it (this process or a Ray actor); a failure is a row with its error."""
    row = row_for(config, cell)
    try:
        return row | evaluate_cell(model, tokenizer, cell, config.task_config.seed) | {"status": "ok", "error": None}
    except Exception as error:  # noqa: BLE001 - a failing cell is recorded and the sweep goes on
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return row | {"status": "error", "error": f"{type(error).__name__}: {error}"}


def run(config: RunConfig) -> Path:
    """Evaluate every cell of this process's part that is not yet in the store; returns the run directory.

    The store is opened (writer's lock taken, resume checked) before anything loads, and the cells are known from
    the tokenizer alone, so a refused run, or a shard with nothing left to run, never loads the model.
    """
    with ResultsStore(config.run_dir, shard=config.shard.name if config.shard else None) as store:
        store.open(run_metadata(config), grid_of(config))
        tokenizer = load_tokenizer(config.model)
        work = plan(config, tokenizer, store.done_keys(include_errors=not config.retry_errors))
        _print_grid(config, work)
        if not work.todo:
            return config.run_dir
        if config.executor == "ray":
            from kvbench.executors.ray import run_cells

            failures = run_cells(config, store, work.todo)
        else:
            model, tokenizer = load_prepared(config.model, config.device, config.dtype, config.attn_implementation,
                                             config.methods, config.device_map, tokenizer)
            failures = _run_serial(config, store, model, tokenizer, work.todo)
        if failures:
            print(f"kvbench: {failures} cell(s) failed; their errors are in {store.results_path}", flush=True)
    return config.run_dir


def progress_bar(config: RunConfig, total: int) -> tqdm:
    return tqdm(total=total, unit="cell", dynamic_ncols=True,
                desc="kvbench" + (f" shard {config.shard}" if config.shard else ""))


def _run_serial(config: RunConfig, store: ResultsStore, model: Any, tokenizer: Any, todo: Sequence[Cell]) -> int:
    failures = 0
    with progress_bar(config, len(todo)) as progress:
        for cell in todo:
            progress.set_postfix_str(f"{cell.spec.canonical} @ {cell.budget:g} {cell.sample.sample_id}")
            row = evaluate_row(config, model, tokenizer, cell)
            failures += row["status"] == "error"
            store.append(row)
            progress.update(1)
    return failures


def _print_grid(config: RunConfig, work: Plan) -> None:
    """The grid, each task with the settings it actually uses (``Task.grid_options``), and this process's part."""
    def shown(value: Any) -> str:
        values = value if isinstance(value, (list, tuple)) else [value]
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)

    def task_text(task: Task) -> str:
        used = [f"{option.replace('_', ' ')} {shown(value)}" for option in task.grid_options
                if (value := getattr(config.task_config, option)) not in (None, (), [])]
        return f"{task.name}: {len(work.samples[task.name])} samples" + (f" ({' x '.join(used)})" if used else "")

    modes = " + ".join("query-aware" if m else "query-agnostic" for m in config.query_modes)
    total, owned, todo = len(work.cells), len(work.owned), len(work.todo)
    part = f" | shard {config.shard} ({config.shard.source}): {owned} of them" if config.shard else ""
    print(
        f"kvbench: grid = model {config.model.name} | methods {', '.join(s.canonical for s in config.methods)}"
        f" | budgets {','.join(f'{b:g}' for b in config.budgets)} | {'; '.join(map(task_text, work.tasks))}"
        f" | {modes} | {total} cells{part}, {owned - todo} already done, {todo} to run",
        flush=True,
    )
