"""Worker threads of the chunked kernel: units split over threads that each run single-threaded.

One fork per call instead of one OpenMP fork/join per small op, which on a busy machine
costs more than the op itself; a worker sets only its own OpenMP thread count, never
torch's process-wide one.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import torch

from transformer.kernels._chunked_tiles import Unit

__all__ = ["PARALLEL_MIN_SCORES", "SET_THREAD_COUNT", "run_units", "split_by_chunk", "worker_count"]

#: Problems with fewer scores (N * g * L * S) run in the calling thread, where torch's
#: own threads parallelise each op; larger ones are split over worker threads.
PARALLEL_MIN_SCORES = 1 << 20

_POOL_LOCK = threading.Lock()
# (worker count, executor): one pool, rebuilt if torch's thread count changes.
_POOL: list[tuple[int, ThreadPoolExecutor]] = []


def _openmp_set_num_threads() -> Callable[[int], object] | None:
    """The OpenMP runtime's ``omp_set_num_threads`` that ATen's ops obey, or ``None``.

    OpenMP keeps the thread count of the next parallel region per thread (the
    ``nthreads-var`` ICV of the calling thread's task), and ATen's intra-op
    parallelism and MKL read it in the thread that runs the op; so a worker can make
    its own ops single-threaded with it. ``torch.set_num_threads`` cannot be used for
    that: it also stores a process-wide default (the count every new thread starts
    with, read by ``torch.get_num_threads`` elsewhere) and resizes a shared pool.
    torch does not expose the per-thread setter, so it is looked up in the OpenMP
    library the process has loaded (``None`` when ATen does not use OpenMP or the
    library cannot be found: the kernel then runs in the calling thread).
    """
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    candidates: list[str | None] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                name = os.path.basename(path)
                if name.startswith(("libgomp", "libiomp", "libomp")) and path not in candidates:
                    candidates.append(path)
    except OSError:  # no /proc (macOS, Windows): try the symbols already loaded
        pass
    candidates.append(None)
    for library in candidates:
        try:
            setter = ctypes.CDLL(library).omp_set_num_threads
        except (OSError, AttributeError):
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], None
        return cast(Callable[[int], object], setter)
    return None


SET_THREAD_COUNT = _openmp_set_num_threads()


def _single_threaded_worker() -> None:
    """Worker thread start-up: make the ops this thread runs single-threaded, for it only."""
    assert SET_THREAD_COUNT is not None
    # ATen initialises a thread's OpenMP count lazily, on its first parallel query,
    # from the process-wide default; trigger that first so it does not undo ours.
    torch.get_num_threads()
    SET_THREAD_COUNT(1)


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if _POOL and _POOL[0][0] != workers:
            _POOL.pop()[1].shutdown(wait=False)
        if not _POOL:
            pool = ThreadPoolExecutor(
                workers, "chunked-attention", initializer=_single_threaded_worker
            )
            _POOL.append((workers, pool))
        return _POOL[0][1]


def worker_count() -> int:
    """How many worker threads a large problem is split over: one per torch thread."""
    return torch.get_num_threads() if SET_THREAD_COUNT is not None else 1


def _balanced_parts(
    units: list[Unit], workers: int, cost: Callable[[Unit], int]
) -> list[list[Unit]]:
    """Split ``units`` over ``workers`` by cost, largest first onto the least loaded worker.

    Under a causal mask a query block's cost grows with its position, so a round-robin
    split leaves one worker with the longer blocks (1/8 more work at 16 blocks); this
    greedy split depends only on the sizes, and each part keeps the units' order.
    """
    loads = [0] * workers
    owner = [0] * len(units)
    for i in sorted(range(len(units)), key=lambda i: -cost(units[i])):
        w = loads.index(min(loads))
        owner[i] = w
        loads[w] += cost(units[i])
    return [[u for u, o in zip(units, owner, strict=True) if o == w] for w in range(workers)]


def run_units(
    units: list[Unit],
    scores: int,
    work: Callable[[list[Unit], int], None],
    by_chunk: bool,
    cost: Callable[[Unit], int],
) -> int:
    """Run ``work(units_of_worker, worker_index)`` on every unit; return the worker count.

    Small problems, and any problem under a ``TorchDispatchMode``, run in the calling
    thread. Large ones are split over one worker
    thread per torch thread, each running its ops single-threaded (without touching
    process-wide settings: see :func:`_openmp_set_num_threads`); with ``by_chunk`` a
    chunk of slices never straddles two workers (so they never add into the same rows),
    otherwise the caller gives every worker its own accumulators and the units are
    split by ``cost`` (the scores a unit computes).
    """
    workers = worker_count()
    chunks = len({u.chunk for u in units})
    if by_chunk:
        workers = min(workers, chunks)
    # Dispatch modes are per thread too: under one (FlopCounterMode, a tracer) every op
    # runs in the calling thread, where the mode sees it.
    if (
        workers <= 1
        or scores < PARALLEL_MIN_SCORES
        or len(units) < 2
        or torch._C._len_torch_dispatch_stack() > 0
    ):
        work(units, 0)
        return 1
    if by_chunk:
        parts = [[u for u in units if u.chunk % workers == w] for w in range(workers)]
    else:
        parts = _balanced_parts(units, workers, cost)

    # Grad and inference mode are per thread: a worker builds no graph, and under the
    # caller's torch.inference_mode it must be in it too, or writing into the buffers
    # the caller made (inference tensors then) is refused. no_grad goes inside:
    # inference_mode(False) turns grad mode back on.
    inference = torch.is_inference_mode_enabled()

    def run_part(w: int) -> None:
        with torch.inference_mode(inference), torch.no_grad():
            work(parts[w], w)

    for future in [_pool(workers).submit(run_part, w) for w in range(workers)]:
        future.result()
    return workers


def split_by_chunk(units: list[Unit]) -> bool:
    """Can workers own whole chunks (no shared accumulators) and still share the work evenly?"""
    chunks = len({u.chunk for u in units})
    workers = worker_count()
    return chunks % workers == 0 or chunks >= 4 * workers
