"""Wall time and peak memory of one cell, measured, never derived from the budget."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def synchronize(device: torch.device) -> None:
    """Wait for the GPU work queued so far: on every CUDA device that holds this process's tensors, because a model
    under a device map runs its last layers on other GPUs than its inputs'. Devices this process never used are
    left alone (syncing them would create a CUDA context there)."""
    if device.type != "cuda":
        return
    own = device.index if device.index is not None else torch.cuda.current_device()
    for index in range(torch.cuda.device_count()):
        if index == own or torch.cuda.memory_allocated(index) > 0:
            torch.cuda.synchronize(index)


@contextmanager
def timed(device: torch.device, into: dict[str, float], key: str) -> Iterator[None]:
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    into[key] = into.get(key, 0.0) + time.perf_counter() - start


def model_devices(model: torch.nn.Module) -> list[torch.device]:
    """The devices a model's weights are on, in first-use order: one, or several under a device map."""
    found: dict[torch.device, None] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        found.setdefault(tensor.device, None)
    return list(found) or [torch.device("cpu")]


class PeakMemory:
    """Peak memory over a block, on each device: the CUDA allocator's peak over what was allocated at the start;
    on CPU the rise of the process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs) over its
    RSS at the start.

    ``per_device`` holds each device's peak; ``peak_bytes`` is their sum (what the block needed in all, an upper
    bound when the devices peak at different moments) and ``max_device_bytes`` the largest (what must fit on one
    device). A model under a device map spans several GPUs; every other model has one entry.
    """

    def __init__(self, devices: torch.device | str | Sequence[torch.device | str]) -> None:
        listed = [devices] if isinstance(devices, (torch.device, str)) else list(devices)
        self.devices = list(dict.fromkeys(torch.device(d) for d in listed))
        self.kind = ""
        self.per_device: dict[str, int] = {}
        self._start: dict[torch.device, int] = {}

    @property
    def peak_bytes(self) -> int:
        return sum(self.per_device.values())

    @property
    def max_device_bytes(self) -> int:
        return max(self.per_device.values(), default=0)

    def __enter__(self) -> PeakMemory:
        cuda = [d for d in self.devices if d.type == "cuda"]
        if cuda:
            self.kind = "cuda_peak_allocated_delta"
            for device in cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                self._start[device] = torch.cuda.memory_allocated(device)
        elif _reset_cpu_peak():
            self._start[torch.device("cpu")] = _proc_status_bytes("VmRSS")
            self.kind = "cpu_peak_rss_delta"
        else:
            self.kind = "unavailable"
        return self

    def __exit__(self, *exc) -> None:
        for device, start in self._start.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) - start
            else:
                peak = max(0, _proc_status_bytes("VmHWM") - start)
            self.per_device[str(device)] = peak

    def fields(self) -> dict[str, object]:
        """The row fields: sum over devices, largest device, each device, and what was measured."""
        return {"peak_mem_bytes": self.peak_bytes, "peak_mem_bytes_max_device": self.max_device_bytes,
                "peak_mem_bytes_per_device": dict(self.per_device), "peak_mem_kind": self.kind}


def freeze_loaded() -> None:
    """Exempt every object alive now (the model, the libraries) from garbage collection for the rest of the process.

    Peak-memory measurements collect garbage before every cell; without this, each collection rescans the loaded
    model and libraries (about a second per cell on a CPU).
    """
    gc.collect()
    gc.freeze()


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
