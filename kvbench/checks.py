"""Checks of command-line input, made before any model loads; each failure is one ``UsageError`` line.

This module imports nothing heavy, so bad input is answered at once; method specs (which import the method's
module, and with it torch) and models are checked by the functions that need them, lazily.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

RUN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
DEVICE = re.compile(r"cpu|cuda(:\d+)?")
VIRTUAL_FILESYSTEMS = ("/proc", "/sys", "/dev")
SEEDS = 2**32  # 0 <= seed < 2**32: scaled by about 10**6 (random eviction, bench prompts), a seed stays a valid
# torch generator seed (below 2**64), which a larger one would overflow in every such cell


class UsageError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def short(text: str, limit: int = 80) -> str:
    """A user-supplied string as a message may quote it: one line, at most ``limit`` characters."""
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def floats(text: str, what: str, low: float, high: float, low_open: bool) -> list[float]:
    values = []
    for piece in filter(None, (p.strip() for p in text.split(","))):
        try:
            value = float(piece)
        except ValueError:
            raise UsageError(f"{what} must be numbers, got {short(piece)!r}") from None
        inside = low < value <= high if low_open else low <= value <= high
        if not inside or not math.isfinite(value):
            interval = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
            raise UsageError(f"{what} must be in {interval}, got {short(piece)}")
        values.append(value)
    if not values:
        raise UsageError(f"{what}: give at least one value")
    return list(dict.fromkeys(values))


def ints(text: str, what: str, low: int = 1) -> list[int]:
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"{what} must be whole numbers, got {short(text)!r}") from None
    if not values or min(values) < low:
        raise UsageError(f"{what} must be whole numbers >= {low}, got {short(text)!r}")
    return list(dict.fromkeys(values))


def at_least(value: int | None, what: str, low: int) -> None:
    if value is not None and value < low:
        raise UsageError(f"{what} must be at least {low}, got {value}")


def seed(value: int) -> int:
    if not 0 <= value < SEEDS:
        raise UsageError(f"--seed must be in [0, 2**32), got {short(str(value))}")
    return value


def run_id(text: str | None) -> str | None:
    """A run id is a plain folder name: letters, digits, ``._-``, not starting with a dot, at most 128."""
    if text is not None and not RUN_ID.fullmatch(text):
        raise UsageError(f"--run-id {short(text)!r} is not a plain name (letters, digits, '.', '_', '-'; "
                         "not starting with a dot; at most 128 characters)")
    return text


def _resolved(path: Path | str, what: str) -> Path:
    """The absolute path, or one line when the operating system cannot even look it up (too long, a NUL byte)."""
    try:
        resolved = Path(path).expanduser().resolve()
        resolved.exists()
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise UsageError(f"{what} {short(str(path))!r} is not a usable path ({reason})") from None
    return resolved


def readable_path(path: Path, what: str) -> Path:
    """A path given to read from, checked to be one the operating system can look up."""
    _resolved(path, what)
    return path


def output_dir(path: Path, what: str) -> Path:
    """A folder kvbench may create and write into: not a file, not in /proc, /sys or /dev, under a writable folder."""
    resolved, shown = _resolved(path, what), short(str(path))
    if any(resolved == Path(v) or Path(v) in resolved.parents for v in VIRTUAL_FILESYSTEMS):
        raise UsageError(f"{what} {shown} is inside a virtual file system; choose a normal folder")
    if resolved.exists() and not resolved.is_dir():
        raise UsageError(f"{what} {shown} exists and is not a folder")
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {shown}: {short(str(existing))} is not a writable folder")
    return path


def data_dir(path: str | None) -> str | None:
    """--data-dir: an existing folder (task data files are looked up inside it)."""
    if path is not None:
        resolved = _resolved(path, "--data-dir")
        if not resolved.is_dir():
            state = "is not a folder" if resolved.exists() else "does not exist"
            raise UsageError(f"--data-dir {short(path)} {state}; give the folder that holds the task data files")
    return path


def include_path(path: str | None) -> str | None:
    """--include-path: an existing folder of lm-eval task YAMLs, made absolute (run.json names it unambiguously)."""
    if path is None:
        return None
    resolved = _resolved(path, "--include-path")
    if not resolved.is_dir():
        state = "is not a folder" if resolved.exists() else "does not exist"
        raise UsageError(f"--include-path {short(path)} {state}; give the folder that holds your lm-eval task YAMLs")
    return str(resolved)


def existing_run(run_dir: Path) -> None:
    """A run folder about to be resumed must have a readable run.json (its settings are checked on resume)."""
    from kvbench.results import StoreError, read_run_meta

    try:
        read_run_meta(run_dir)
    except StoreError as error:
        raise UsageError(str(error)) from None


def device_spelling(requested: str | None) -> None:
    if requested is not None and not DEVICE.fullmatch(requested):
        raise UsageError(f"--device must be cpu or cuda[:N], got {short(requested)!r}")


def device(requested: str | None) -> str:
    """``cpu`` or ``cuda[:N]``; CUDA is checked only when asked for (it imports torch)."""
    device_spelling(requested)
    if requested == "cpu":
        return requested
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: no CUDA device is available here; use --device cpu")
    index = int(requested.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return requested


def shard(text: str | None) -> Any:
    """``--shard i/n``, else the shard a SLURM array or torchrun gives this process (``kvbench.shards``)."""
    from kvbench.shards import resolve

    try:
        return resolve(text)
    except ValueError as error:
        raise UsageError(str(error)) from None


def executor(args: Any) -> None:
    """``--workers`` and ``--ray-address`` belong to ``--executor ray``, which needs Ray installed."""
    from importlib.util import find_spec

    at_least(args.workers, "--workers", 1)
    if args.executor != "ray":
        if args.workers is not None or args.ray_address is not None:
            raise UsageError("--workers and --ray-address go with --executor ray")
        return
    if find_spec("ray") is None:
        raise UsageError("--executor ray needs Ray: pip install 'kvbench[ray]'")
    if args.device_map is not None:
        raise UsageError("--device-map spreads one model over one machine's GPUs; with --executor ray each worker "
                         "holds a whole model on one GPU: use one or the other")


def attention(name: str) -> None:
    from importlib.util import find_spec

    from kvbench.attention import SUPPORTED_BASES

    if name == "flash_attention_2" and find_spec("flash_attn") is None:
        raise UsageError("--attn-implementation flash_attention_2 needs the flash-attn package and a CUDA GPU "
                         "(pip install 'kvbench[gpu]'); use sdpa")
    if name not in SUPPORTED_BASES:
        raise UsageError(f"--attn-implementation {short(name)!r} is not supported; valid: {', '.join(SUPPORTED_BASES)}")


def methods(text: str, reference: bool, calibration_data: str | None = None) -> list[Any]:
    """Parsed method specs, ``full`` first when ``reference``; duplicates (same canonical spec) dropped."""
    from kvbench.spec import SpecError, parse_spec, split_spec_list

    specs: dict[str, Any] = {}
    try:
        for item in split_spec_list(text):
            spec = parse_spec(item, calibration_data)
            specs.setdefault(spec.canonical, spec)
        if reference and "full" not in specs:
            specs = {"full": parse_spec("full"), **specs}
    except SpecError as error:
        raise UsageError(str(error)) from None
    if not specs:
        raise UsageError("--methods: give at least one method")
    return list(specs.values())


def calibration_file(path: str | None) -> str | None:
    """The --calibration-data file, checked readable (absolute, so results name it unambiguously)."""
    if path is None:
        return None
    resolved = _resolved(path, "--calibration-data")
    from kvbench.calibration import CalibrationDataError, read_calibration_file

    try:
        read_calibration_file(Path(path))
    except CalibrationDataError as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        raise UsageError(f"--calibration-data {short(path)} cannot be read ({error.strerror or error})") from None
    return str(resolved)


def tasks(text: str) -> dict[str, tuple[str, ...]]:
    """Task names and their subtasks from --tasks; an empty tuple is the task's default selection.

    A family takes subtasks after a colon (``longbench:hotpotqa,trec``); a comma-separated piece that is not a
    task name continues the subtasks of the family before it. A prefix names a task made on demand
    (``lm-eval:arc_easy,hellaswag`` is two tasks, ``lm-eval:arc_easy`` and ``lm-eval:hellaswag``).
    """
    from kvbench.registry import TASKS, RegistryError

    selected: dict[str, list[str]] = {}
    family = None
    for piece in filter(None, (t.strip() for t in text.split(","))):
        name, colon, sub = piece.partition(":")
        if not colon and family is not None and name not in TASKS.entries():
            name, sub, colon = family, name, ":"
        if colon and name in TASKS.prefixes():
            name, colon, family = f"{name}:{sub}", "", name
        try:
            task = TASKS.get(name)
        except RegistryError as error:
            raise UsageError(str(error)) from None
        subs = selected.setdefault(name, [])
        if not colon:
            family = family if name.partition(":")[0] == family else None
            continue
        if sub not in task.subtask_names:
            valid = ", ".join(task.subtask_names) or "none"
            raise UsageError(f"unknown {name} subtask {short(sub)!r}; valid: {valid}")
        subs.append(sub)
        family = name
    if not selected:
        raise UsageError("--tasks: give at least one task")
    return {name: tuple(dict.fromkeys(subs)) for name, subs in selected.items()}


def task_configs(selected: dict[str, tuple[str, ...]], config: Any) -> list[type]:
    """The selected task classes, each of which checked its data and the settings it uses (lengths, depths)."""
    from kvbench.registry import TASKS
    from kvbench.tasks import DataUnavailable

    tasks = []
    for name in selected:
        task = TASKS.get(name)
        try:
            task.check_config(config)
        except (DataUnavailable, ValueError) as error:
            raise UsageError(str(error)) from None
        tasks.append(task)
    return tasks


def context(model: Any, lengths: list[int], tasks: list[type]) -> None:
    """The --lengths of the tasks that use them, plus what a task adds after them (``tokens_after_length``: the
    chunk perplexity scores), must fit the model's context."""
    using = [task for task in tasks if "lengths" in task.grid_options]
    if not model.max_context or not using:
        return
    after = max(using, key=lambda task: getattr(task, "tokens_after_length", 0))
    extra = getattr(after, "tokens_after_length", 0)
    if max(lengths) + extra > model.max_context:
        plus = f" plus the {extra} tokens {after.name} adds after it" if extra else ""
        raise UsageError(f"--lengths {max(lengths)}{plus} is longer than {model.name}'s context of "
                         f"{model.max_context} tokens")


def model(args: Any) -> Any:
    """The resolved model, after the spelling of --device, --dtype and --attn-implementation: nothing imports torch."""
    from kvbench.models import DTYPES, ModelUnavailable, resolve

    device_spelling(args.device)
    if args.dtype not in ("auto", *DTYPES):
        raise UsageError(f"unknown dtype {short(args.dtype)!r}; valid: auto, {', '.join(DTYPES)}")
    attention(getattr(args, "attn_implementation", "sdpa"))
    try:
        return resolve(args.model)
    except ModelUnavailable as error:
        raise UsageError(str(error)) from None


def placement(args: Any, chosen: str | None = None, resolved: Any = None) -> tuple[str, Any, Any]:
    """Device, dtype and resolved model of a command, each checked before anything loads. ``chosen``: a device
    settled elsewhere (the Ray cluster's, which this machine need not have); ``resolved``: ``model(args)``."""
    from kvbench.models import parse_dtype

    resolved = resolved or model(args)
    chosen = chosen or device(args.device)
    try:
        dtype = parse_dtype(args.dtype, chosen)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if getattr(args, "attn_implementation", "sdpa") == "flash_attention_2" and str(dtype) == "torch.float32":
        raise UsageError("--attn-implementation flash_attention_2 runs in float16 or bfloat16, not float32: use "
                         "--dtype bfloat16 (the GPU default) or sdpa")
    return chosen, dtype, resolved
