"""Padding ragged prefixes into a dense block in compiled code: the copy that attention over DynaKV's ragged
storage makes on every decoding step.

Attention reads a rank class's tokens as one block as wide as its largest rank, zeros beyond each token's prefix
(``ragged.dense``). torch has no CPU kernel for that copy: ``masked_scatter_`` with a ``[tokens, width]`` mask
costs about eight times the matmul that follows (4K tokens), and decoding pays it on every step. The copy itself
is one ``memcpy`` and one ``memset`` per token, so kvbench compiles those few lines of C with the system's C
compiler on first use (``cc -O3``; into ``$KVBENCH_CACHE/kernels/``, named by a hash of the source, the flags, the
compiler and the CPU) and calls them through ctypes. Without a compiler, off the CPU, for other dtypes than
float32 or with ``KVBENCH_RAGGED_KERNEL=0``, ``pad_rows`` returns None and the caller pads with torch: the same
numbers either way (a test compares both).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* out[t, :ranks[t]] = the t-th prefix of flat (stored back to back), out[t, ranks[t]:width] = 0. */
void pad_rows(const float *flat, const int64_t *ranks, int64_t tokens, int64_t width, float *out) {
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t rank = ranks[t];
        memcpy(out, flat, (size_t)rank * sizeof(float));
        memset(out + rank, 0, (size_t)(width - rank) * sizeof(float));
        flat += rank;
        out += width;
    }
}
"""
FLAGS = ("-O3", "-shared", "-fPIC")
_library: ctypes.CDLL | None = None
_tried = False


def _cpu() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith("model name")), platform.processor())


def _build(compiler: list[str], target: Path) -> None:
    """Compile into a temporary file beside ``target``, then rename: concurrent first uses never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        source, built = Path(scratch) / "ragged.c", Path(scratch) / target.name
        source.write_text(SOURCE)
        subprocess.run([*compiler, *FLAGS, str(source), "-o", str(built)], check=True, capture_output=True, timeout=120)
        os.replace(built, target)


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None where it cannot be (no compiler, or disabled)."""
    global _library, _tried
    if _tried:
        return _library
    _tried = True
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if os.environ.get("KVBENCH_RAGGED_KERNEL", "1") == "0" or not found:
        return None
    from kvbench.models import cache_dir

    compiler = shlex.split(found)
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        tag = "\0".join([SOURCE, *FLAGS, version, platform.machine(), _cpu()])
        target = cache_dir() / "kernels" / f"ragged-{hashlib.sha256(tag.encode()).hexdigest()[:16]}.so"
        if not target.exists():
            _build(compiler, target)
        loaded = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    loaded.pad_rows.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    loaded.pad_rows.restype = None
    _library = loaded
    return _library


def pad_rows(flat: torch.Tensor, ranks: torch.Tensor, width: int) -> torch.Tensor | None:
    """``[tokens, width]``: each token's prefix of ``flat`` in place, zeros beyond; None when the kernel does not
    apply (see the module docstring). ``ranks`` are the tokens' prefix lengths, each <= ``width``."""
    if flat.device.type != "cpu" or flat.dtype != torch.float32 or torch.is_grad_enabled() and flat.requires_grad:
        return None
    kernel = library()
    if kernel is None:
        return None
    flat, ranks = flat.contiguous(), ranks.to(torch.int64).contiguous()
    low, high = (int(r) for r in ranks.aminmax()) if ranks.numel() else (0, 0)
    if int(ranks.sum()) != flat.numel() or low < 0 or high > width:
        raise ValueError(f"ranks in [{low}, {high}] summing to {int(ranks.sum())} do not fit {flat.numel()} "
                         f"coefficients in rows of width {width}")
    out = flat.new_empty(ranks.shape[0], width)
    kernel.pad_rows(flat.data_ptr(), ranks.data_ptr(), ranks.shape[0], width, out.data_ptr())
    return out
