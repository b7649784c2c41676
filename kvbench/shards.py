"""Shards: disjoint, balanced parts of a run's grid, so that SLURM job arrays and torchrun run one run together.

``--shard i/n`` (0 <= i < n) runs part ``i`` of ``n``. Without it, the shard comes from the environment:
``SLURM_ARRAY_TASK_ID`` / ``SLURM_ARRAY_TASK_COUNT`` (counted from ``SLURM_ARRAY_TASK_MIN``) and torchrun's
``RANK`` / ``WORLD_SIZE``; an array job whose tasks each start torchrun gets ``task x world + rank`` of
``tasks x world``. Under torchrun, ``LOCAL_RANK`` picks the GPU (``cuda:LOCAL_RANK``).

The partition is a function of the set of cell keys alone (model, method, budget, task, sample, query mode), taken
over the whole grid the command asks for, never over the cells left to run (which shards would see differently,
each reading the store at its own moment). The keys need the samples, which need only the tokenizer, so a shard
knows its part before its model loads, and a shard with nothing to run loads no model. Every shard of a run
loads the same tokenizer with the same seed and task settings (the run's settings check refuses others), so all
of them see the same keys.

Balance: cells are grouped by sample (samples sorted by task and id), ordered inside a sample by a SHA-256 digest
of their key, and dealt round-robin in that order. Shard sizes differ by at most one cell, every shard gets a
like share of each sample's cells (so of long and short prompts), and no method or budget is tied to a shard.
The price of exact balance: the partition depends on the whole grid, so shards running at the same time must be
given the same grid (the same command, as an array job or torchrun gives them); grow a run's grid only when
none of its shards is running.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvbench.results import CELL_KEY

_SHARD = re.compile(r"(\d{1,9})/(\d{1,9})")
_SAMPLE = tuple(CELL_KEY.index(field) for field in ("model", "task", "sample_id"))  # what a sample is in a key


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based
    count: int
    source: str = "--shard"  # where it came from, for the log line

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count} does not exist: the index runs from 0 to "
                             f"{self.count - 1}")

    @property
    def name(self) -> str:
        """The suffix of this shard's results file: ``results-<name>.jsonl``."""
        return f"{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse(text: str) -> Shard:
    """``i/n`` with 0 <= i < n; a ValueError with one line otherwise."""
    match = _SHARD.fullmatch(text.strip())
    if match is None:
        shown = text if len(text) <= 40 else text[:40] + "…"
        raise ValueError(f"--shard must be i/n with 0 <= i < n (e.g. 0/4), got {shown!r}")
    index, count = int(match[1]), int(match[2])
    if count < 1:
        raise ValueError(f"--shard {text.strip()}: the shard count must be at least 1")
    return Shard(index, count)


def _int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"environment variable {name}={value[:40]!r} is not a whole number")
    return int(value)


def from_environment(environ: Mapping[str, str] | None = None) -> Shard | None:
    """The shard a job array and/or torchrun gives this process; None when neither does (or both give one part)."""
    environ = os.environ if environ is None else environ
    parts: list[tuple[int, int, str]] = []
    task, tasks = _int(environ, "SLURM_ARRAY_TASK_ID"), _int(environ, "SLURM_ARRAY_TASK_COUNT")
    if task is not None and tasks is not None:
        first = _int(environ, "SLURM_ARRAY_TASK_MIN") or 0
        step = _int(environ, "SLURM_ARRAY_TASK_STEP") or 1
        parts.append(((task - first) // step, tasks, "SLURM array"))
    rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
    if rank is not None and world is not None:
        parts.append((rank, world, "torchrun"))
    index, count = 0, 1
    for part, parts_count, _ in parts:
        if not 0 <= part < parts_count:
            raise ValueError(f"the environment puts this process at {part} of {parts_count} parts; check the "
                             "SLURM array or torchrun settings")
        index, count = index * parts_count + part, count * parts_count
    if count == 1:
        return None
    return Shard(index, count, " x ".join(source for _, _, source in parts))


def resolve(text: str | None, environ: Mapping[str, str] | None = None) -> Shard | None:
    """``--shard`` when given, else the environment's; None for an unsharded run (``1`` part counts as none)."""
    shard = parse(text) if text is not None else from_environment(environ)
    return shard if shard is not None and shard.count > 1 else None


def local_device(device: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """Under torchrun, ``cuda`` (or no ``--device``, on a CUDA machine) means ``cuda:LOCAL_RANK``.

    A device with an index is kept as given; CPU runs ignore ``LOCAL_RANK``.
    """
    environ = os.environ if environ is None else environ
    local_rank = _int(environ, "LOCAL_RANK")
    if local_rank is None or device not in (None, "cuda"):
        return device
    if device is None:
        import torch

        if not torch.cuda.is_available():
            return None
    return f"cuda:{local_rank}"


def _digest(key: Sequence[object]) -> str:
    return hashlib.sha256(json.dumps(list(key), default=str).encode("utf-8")).hexdigest()


def assign(keys: Iterable[tuple], count: int) -> dict[tuple, int]:
    """The shard of every cell key (``kvbench.results.CELL_KEY`` order): dealt round-robin over the keys grouped by
    sample (model, task, sample id; sorted) and ordered inside a sample by their digest.
    """
    ordered = sorted(set(keys), key=lambda key: (tuple(str(key[i]) for i in _SAMPLE), _digest(key)))
    return {key: position % count for position, key in enumerate(ordered)}


def select(keys: Sequence[tuple], shard: Shard | None) -> list[bool]:
    """For each key (in the given order), whether it belongs to ``shard`` (every key when ``shard`` is None)."""
    if shard is None:
        return [True] * len(keys)
    owner = assign(keys, shard.count)
    return [owner[key] == shard.index for key in keys]
