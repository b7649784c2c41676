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


def run_id(text: str | None) -> str | None:
    """A run id is a plain folder name: letters, digits, ``._-``, not starting with a dot, at most 128."""
    if text is not None and not RUN_ID.fullmatch(text):
        raise UsageError(f"--run-id {short(text)!r} is not a plain name (letters, digits, '.', '_', '-'; "
                         "not starting with a dot; at most 128 characters)")
    return text


def output_dir(path: Path, what: str) -> Path:
    """A folder kvbench may create and write into: not a file, not in /proc, /sys or /dev, under a writable folder."""
    resolved = path.expanduser().resolve()
    if any(resolved == Path(v) or Path(v) in resolved.parents for v in VIRTUAL_FILESYSTEMS):
        raise UsageError(f"{what} {path} is inside a virtual file system; choose a normal folder")
    if resolved.exists() and not resolved.is_dir():
        raise UsageError(f"{what} {path} exists and is not a folder")
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: {existing} is not a writable folder")
    return path


def device(requested: str | None) -> str:
    """``cpu`` or ``cuda[:N]``; CUDA is checked only when asked for (it imports torch)."""
    if requested is not None and not DEVICE.fullmatch(requested):
        raise UsageError(f"--device must be cpu or cuda[:N], got {short(requested)!r}")
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
    from kvbench.calibration import CalibrationDataError, read_calibration_file

    try:
        read_calibration_file(Path(path))
    except CalibrationDataError as error:
        raise UsageError(str(error)) from None
    return str(Path(path).resolve())


def tasks(text: str) -> dict[str, tuple[str, ...]]:
    """Task names and their subtasks from --tasks; an empty tuple is the task's default selection.

    A family takes subtasks after a colon (``longbench:hotpotqa,trec``); a comma-separated piece that is not a
    task name continues the subtasks of the family before it.
    """
    from kvbench.registry import TASKS, RegistryError

    selected: dict[str, list[str]] = {}
    family = None
    for piece in filter(None, (t.strip() for t in text.split(","))):
        name, colon, sub = piece.partition(":")
        if not colon and family is not None and name not in TASKS.entries():
            name, sub, colon = family, name, ":"
        try:
            task = TASKS.get(name)
        except RegistryError as error:
            raise UsageError(str(error)) from None
        subs = selected.setdefault(name, [])
        if not colon:
            family = None
            continue
        if sub not in task.subtask_names:
            valid = ", ".join(task.subtask_names) or "none"
            raise UsageError(f"unknown {name} subtask {short(sub)!r}; valid: {valid}")
        subs.append(sub)
        family = name
    if not selected:
        raise UsageError("--tasks: give at least one task")
    return {name: tuple(dict.fromkeys(subs)) for name, subs in selected.items()}


def placement(args: Any) -> tuple[str, Any, Any]:
    """Device, dtype and resolved model of a command, each checked before anything loads."""
    from kvbench.models import ModelUnavailable, parse_dtype, resolve

    chosen = device(args.device)
    try:
        dtype = parse_dtype(args.dtype, chosen)
    except ValueError as error:
        raise UsageError(str(error)) from None
    attention(getattr(args, "attn_implementation", "sdpa"))
    try:
        return chosen, dtype, resolve(args.model)
    except ModelUnavailable as error:
        raise UsageError(str(error)) from None
