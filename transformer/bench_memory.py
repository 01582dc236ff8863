"""Peak memory of one benchmarked call: torch's CPU allocator counter, or CUDA's statistics.

On CUDA ``torch.cuda.max_memory_allocated`` beyond the inputs. On the CPU the peak,
during one run, of the bytes held by torch's CPU allocator beyond what it held before:
c10's own process-wide counter (``FLAGS_caffe2_report_cpu_memory_usage``), which every
allocation and free updates under one lock on whichever thread it happens, worker
threads of a kernel included, and logs with the running total; the log goes to a
temporary file, never the terminal, and its totals give the peak (see
:func:`cpu_peak_bytes`). ``torch.profiler`` is not used for this: its memory events come
only from the thread that started it, so a kernel's worker threads were invisible, and
its per-op attribution cancels a buffer allocated and freed inside one op. Not seen:
memory a C++ library takes outside torch's allocator (BLAS or oneDNN workspaces,
``std::vector`` scratch). torch's own fused CPU kernels (``torch-sdpa``, ``torch``,
``torch-mha``) take their scratch from torch's allocator today, which the figure counts,
but they are marked (:data:`FUSED_NOTE`: ``*`` in the table, ``memory_note`` in the
JSON) because nothing here can prove a fused op took nothing else.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# c10's DefaultCPUAllocator, with FLAGS_caffe2_report_cpu_memory_usage set, logs every
# allocation and free with the counter's value right after it (updated under a lock).
_ALLOCATOR_LINE = re.compile(rb"C10 (alloc|deleted) (\d+) bytes, total alloc (\d+) bytes")
# Frees of blocks allocated before the flag was set, which the counter cannot subtract.
_UNKNOWN_BLOCK = b"Memory block of unknown size"
_C10_LIBRARIES = ("libc10.so", "libc10.dylib", "c10.dll")
CPU_MEMORY_METHOD = (
    "peak of torch's CPU allocator bytes during one run beyond those held before, every "
    "thread (c10's process-wide counter, FLAGS_caffe2_report_cpu_memory_usage); memory "
    "taken outside torch's allocator (BLAS/oneDNN workspaces, std::vector) is not seen"
)
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated beyond inputs"
# Candidates that run torch's fused C++ attention: their figure is marked in the table.
FUSED_NOTE = "fused C++ op: scratch taken outside torch's allocator would not be seen"
NO_COUNTER_NOTE = "n/a: c10's allocator counter not found in this torch build"


def _c10_flags() -> tuple[Any, Any] | None:
    """c10's ``FLAGS_caffe2_report_cpu_memory_usage`` (bool) and log level (int), or None."""
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in _C10_LIBRARIES:
        try:
            lib = ctypes.CDLL(str(lib_dir / name))
            report = ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage")
            return report, ctypes.c_int.in_dll(lib, "FLAGS_caffe2_log_level")
        except (OSError, ValueError):
            continue
    return None


def _peak_from_log(log: bytes) -> tuple[int, list[bytes]]:
    """Peak bytes above the first logged total (the 1-byte marker) and the other lines.

    Lines are written after the lock is released, so threads may log out of order; each
    total is still the counter's true value at some instant, so their maximum is the peak.
    """
    peak = 0
    base: int | None = None
    others: list[bytes] = []
    for line in log.splitlines():
        match = _ALLOCATOR_LINE.search(line)
        if match is None:
            if line.strip() and _UNKNOWN_BLOCK not in line and not line.startswith(b"[I"):
                others.append(line)
            continue
        total = int(match.group(3))
        if base is None:  # the marker: an allocation of 1 byte made before the call
            base = total - int(match.group(2))
        peak = max(peak, total - base)
    return peak, others


def cpu_peak_bytes(call: Callable[[], None]) -> int | None:
    """Peak bytes torch's CPU allocator held during ``call`` beyond those held before.

    Counts every allocation on every thread of the process (a kernel's worker threads
    included; anything else running in the process at the time too), temporaries freed
    inside one op included. c10 logs each allocation with its running total while
    ``FLAGS_caffe2_report_cpu_memory_usage`` is set; stderr (fd 2) is redirected to a
    temporary file meanwhile, so none of it reaches the terminal, and lines that are not
    the allocator's are written back to stderr afterwards. ``None`` where the flag
    cannot be found in torch's c10 library.
    """
    flags = _c10_flags()
    if flags is None:  # pragma: no cover - every torch build we test exports the flags
        return None
    report, level = flags
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        saved_level = level.value
        try:
            level.value = 0  # the allocator's lines are INFO; the default shows WARNING up
            report.value = True
            marker = torch.empty(1, dtype=torch.uint8)  # its logged total gives the base
            del marker
            call()
        finally:
            report.value = False
            level.value = saved_level
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        log.seek(0)
        peak, others = _peak_from_log(log.read())
    for line in others:
        print(line.decode(errors="replace"), file=sys.stderr)
    return peak


def _peak_memory(device: str, call: Callable[[], None]) -> int | None:
    if device == "cuda":  # pragma: no cover  (CUDA only, see bench_device._free_memory)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    return cpu_peak_bytes(call)


def _memory_note(device: str, name: str, peak: int | None) -> str | None:
    """What a row's peak may not include (CPU only: CUDA's allocator sees everything)."""
    if device == "cuda":  # pragma: no cover  (CUDA only, see bench_device._free_memory)
        return None
    if peak is None:  # pragma: no cover - see cpu_peak_bytes
        return NO_COUNTER_NOTE
    return FUSED_NOTE if name.startswith("torch") else None
