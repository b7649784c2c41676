"""Wall time and peak memory of one cell, measured, never derived from the budget."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device, into: dict[str, float], key: str) -> Iterator[None]:
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    into[key] = into.get(key, 0.0) + time.perf_counter() - start


@dataclass
class PeakMemory:
    """Peak memory over a block: CUDA allocator peak on GPU; on CPU the rise of the process's
    peak resident set (Linux VmHWM, reset through /proc/self/clear_refs) over its RSS at the start.
    """

    device: torch.device
    kind: str = ""
    peak_bytes: int = 0
    _start: int = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda_peak_allocated_delta"
        elif _reset_cpu_peak():
            self._start = _proc_status_bytes("VmRSS")
            self.kind = "cpu_peak_rss_delta"
        else:
            self.kind = "unavailable"
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda_peak_allocated_delta":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self.kind == "cpu_peak_rss_delta":
            self.peak_bytes = max(0, _proc_status_bytes("VmHWM") - self._start)


def _reset_cpu_peak() -> bool:
    """Return freed heap memory to the OS first, so that the next cell's RSS rise is its own."""
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    try:
        _CLEAR_REFS.write_text("5")
        return _proc_status_bytes("VmHWM") > 0
    except OSError:
        return False


def _proc_status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0
