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
from kvbench.models import ModelRef, load
from kvbench.prefill import prepare
from kvbench.provenance import device_name, git_commit, package_version
from kvbench.results import ResultsStore, cell_key
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

    @property
    def run_dir(self) -> Path:
        return self.results_dir / self.run_id


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
        "device": device_name(config.device),
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
                  methods: Sequence[MethodSpec]) -> tuple[Any, Any]:
    """Load the model and let every method prepare for it (e.g. load or fit its calibration artifact)."""
    print(f"kvbench: loading {ref.name} on {device} ({dtype})", flush=True)
    model, tokenizer = load(ref, device, dtype, attn_implementation)
    for spec in methods:
        prepare(spec.method, model, tokenizer)
    return model, tokenizer


def run(config: RunConfig) -> Path:
    """Evaluate every cell not yet in the store; returns the run directory.

    The store is opened (writer's lock taken, resume checked) before the model loads, so a refused run costs
    nothing.
    """
    with ResultsStore(config.run_dir) as store:
        store.open(run_metadata(config), grid_of(config))
        model, tokenizer = load_prepared(config.model, config.device, config.dtype, config.attn_implementation,
                                         config.methods)
        _run_cells(config, store, model, tokenizer)
    return config.run_dir


def _run_cells(config: RunConfig, store: ResultsStore, model: Any, tokenizer: Any) -> None:
    tasks = [task_cls() for task_cls in config.tasks]
    samples = {task.name: task.samples(tokenizer, config.task_config) for task in tasks}
    cells = expand(config, tasks, samples)
    done = store.done_keys(include_errors=not config.retry_errors)
    todo = [c for c in cells if cell_key(row_for(config, c)) not in done]
    _print_grid(config, tasks, samples, len(cells), len(cells) - len(todo))
    failures = 0
    with tqdm(total=len(todo), unit="cell", desc="kvbench", dynamic_ncols=True) as progress:
        for cell in todo:
            progress.set_postfix_str(f"{cell.spec.canonical} @ {cell.budget:g} {cell.sample.sample_id}")
            row = row_for(config, cell)
            try:
                row |= evaluate_cell(model, tokenizer, cell, config.task_config.seed) | {"status": "ok", "error": None}
            except Exception as error:  # noqa: BLE001 - a failing cell is recorded and the sweep goes on
                failures += 1
                row |= {"status": "error", "error": f"{type(error).__name__}: {error}"}
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            store.append(row)
            progress.update(1)
    if failures:
        print(f"kvbench: {failures} cell(s) failed; their errors are in {store.results_path}", flush=True)


def _print_grid(config: RunConfig, tasks: Sequence[Task], samples: dict[str, Sequence[Sample]], total: int,
                done: int) -> None:
    """The grid, each task with the settings it actually uses (``Task.grid_options``)."""
    def shown(value: Any) -> str:
        values = value if isinstance(value, (list, tuple)) else [value]
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)

    def task_text(task: Task) -> str:
        used = [f"{option.replace('_', ' ')} {shown(value)}" for option in task.grid_options
                if (value := getattr(config.task_config, option)) not in (None, (), [])]
        return f"{task.name}: {len(samples[task.name])} samples" + (f" ({' x '.join(used)})" if used else "")

    modes = " + ".join("query-aware" if m else "query-agnostic" for m in config.query_modes)
    print(
        f"kvbench: grid = model {config.model.name} | methods {', '.join(s.canonical for s in config.methods)}"
        f" | budgets {','.join(f'{b:g}' for b in config.budgets)} | {'; '.join(map(task_text, tasks))}"
        f" | {modes} | {total} cells, {done} already done, {total - done} to run",
        flush=True,
    )
