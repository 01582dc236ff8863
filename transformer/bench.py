"""``transformer bench attention``: the attention kernels timed side by side.

Every registered kernel (through :func:`transformer.scaled_dot_product_attention`),
torch's own ``F.scaled_dot_product_attention`` ("torch-sdpa", torch's own choice of
backend; on CUDA also pinned to each backend: "torch-sdpa-flash", "-efficient",
"-cudnn", "-math") and ``torch.nn.MultiheadAttention`` ("torch-mha", which adds its
input and output projections) are measured interleaved in one process: each repeat
runs every candidate once, in turn, so machine noise hits them alike. Modes: "fwd",
"bwd" (the backward pass alone, over a graph built once) and "fwd+bwd". Reported per
row: median time, GFLOP/s, the percentage of the device's peak (CUDA fp16/bf16, from
:data:`PEAK_BF16_TFLOPS`, or ``--peak-tflops``), the ratio to torch SDPA and the peak
memory. A candidate that refuses a combination (a backend that does not support it)
is reported as skipped with its error.

FLOPs follow FlashAttention-2's count: forward ``4 * B * H * L * S * E`` (the two
matmuls ``QK^T`` and ``PV``), halved under ``is_causal``; backward 2.5x forward (five
matmuls), so forward + backward is 3.5x.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` beyond the inputs. On the CPU
the peak, during one run, of the bytes held by torch's CPU allocator beyond what it held
before: c10's own process-wide counter (``FLAGS_caffe2_report_cpu_memory_usage``), which
every allocation and free updates under one lock on whichever thread it happens, worker
threads of a kernel included, and logs with the running total; the log goes to a
temporary file, never the terminal, and its totals give the peak (see
:func:`cpu_peak_bytes`). ``torch.profiler`` is not used for this: its memory events come
only from the thread that started it, so a kernel's worker threads were invisible, and
its per-op attribution cancels a buffer allocated and freed inside one op. Not seen:
memory a C++ library takes outside torch's allocator (BLAS or oneDNN workspaces,
``std::vector`` scratch). torch's own fused CPU kernels (``torch-sdpa``, ``torch``,
``torch-mha``) take their scratch from torch's allocator today, which the figure counts,
but they are marked (``*`` in the table, ``memory_note`` in the JSON) because nothing here
can prove a fused op took nothing else.

``transformer bench torch-wrapper`` (:func:`run_wrapper_bench`) compares the ``"torch"``
kernel with the raw ``F.scaled_dot_product_attention`` it wraps, with
``torch.utils.benchmark``, side by side in one process.

Notation: B batch, H heads, L = S sequence length, E head dim.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PEAK_BF16_TFLOPS",
    "BenchConfig",
    "add_bench_parser",
    "cpu_peak_bytes",
    "make_attention_call",
    "peak_tflops",
    "run_attention_bench",
    "run_wrapper_bench",
]

TORCH_SDPA = "torch-sdpa"
TORCH_MHA = "torch-mha"
# torch SDPA pinned to one backend with torch.nn.attention.sdpa_kernel (enum names).
SDPA_BACKENDS = {
    "torch-sdpa-flash": "FLASH_ATTENTION",
    "torch-sdpa-efficient": "EFFICIENT_ATTENTION",
    "torch-sdpa-cudnn": "CUDNN_ATTENTION",
    "torch-sdpa-math": "MATH",
}
MODES = ("fwd", "bwd", "fwd+bwd")
_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}

#: Dense (no sparsity) fp16/bf16 tensor-core peaks in TFLOP/s from the vendors' data
#: sheets, matched in order (first match wins) against ``torch.cuda.get_device_name()``.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
]


def peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of the GPU called ``name``, or ``None`` when it is not in the table."""
    for pattern, peak in PEAK_BF16_TFLOPS:
        if pattern.lower() in name.lower():
            return peak
    return None


DEFAULT_SEQ_LENS = (128, 256, 512, 1024, 2048, 4096, 8192)
# Kernels that materialise (B, H, L, S) score matrices: skipped when those would not fit.
_QUADRATIC = {"reference", "torch", TORCH_MHA}


class BenchError(ValueError):
    """A bad benchmark request (unknown kernel, missing device, bad size)."""


@dataclass(frozen=True)
class BenchConfig:
    """What to measure; defaults are the CLI's."""

    device: str = "cpu"
    kernels: tuple[str, ...] | None = None  # None: every registered kernel + torch ones
    seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS
    dtypes: tuple[str, ...] | None = None  # None: fp32, bf16 on CPU; fp16, bf16 on CUDA
    batch: int = 4
    heads: int = 8
    head_dim: int = 64
    modes: tuple[str, ...] = MODES
    causal: tuple[bool, ...] = (False, True)
    repeats: int = 5
    warmup: int = 1
    peak_tflops: float | None = None  # None: from PEAK_BF16_TFLOPS on CUDA (fp16/bf16 rows)
    memory_budget_bytes: int | None = None  # None: half the free memory
    out: str | None = None


@dataclass
class Row:
    """One measured (or skipped) combination."""

    kernel: str
    dtype: str
    seq_len: int
    causal: bool
    mode: str
    median_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    gflops: float | None = None
    percent_of_peak: float | None = None
    ratio_to_torch_sdpa: float | None = None
    peak_memory_mib: float | None = None
    # What the peak may miss (CPU, torch's fused kernels), or why there is none.
    memory_note: str | None = None
    skipped: str | None = None


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _flops(cfg: BenchConfig, L: int, causal: bool, mode: str) -> float:
    fwd = 4.0 * cfg.batch * cfg.heads * L * L * cfg.head_dim
    fwd = fwd / 2 if causal else fwd
    return fwd * _FLOP_FACTOR[mode]


def _free_memory(device: str) -> int:
    # CUDA only (here and in _sync, _peak_memory, _hardware): the default suite runs on
    # the CPU; spec_tests/test_bench.py::test_bench_on_cuda_* runs these on a GPU.
    if device == "cuda":  # pragma: no cover
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 8 << 30


def _predicted_bytes(cfg: BenchConfig, kernel: str, L: int, dtype: torch.dtype) -> int:
    """A rough upper bound: quadratic kernels keep ~4 (B, H, L, L) fp32 matrices alive."""
    item = 4
    inputs = 8 * cfg.batch * cfg.heads * L * cfg.head_dim * item
    if kernel in _QUADRATIC:
        return inputs + 4 * cfg.batch * cfg.heads * L * L * item
    return inputs


def _candidates(cfg: BenchConfig) -> list[str]:
    from transformer.attention import available_kernels

    known = available_kernels(cfg.device)
    if cfg.kernels is None:
        # Each SDPA backend by default on CUDA only: on the CPU torch has just two.
        backends = list(SDPA_BACKENDS) if cfg.device == "cuda" else []
        return [*known, TORCH_SDPA, *backends, TORCH_MHA]
    everything = (*known, TORCH_SDPA, *SDPA_BACKENDS, TORCH_MHA)
    unknown = [k for k in cfg.kernels if k not in everything]
    if unknown:
        raise BenchError(
            f"unknown kernel(s) {', '.join(unknown)} for device {cfg.device}; "
            f"known: {', '.join(everything)}"
        )
    names = list(cfg.kernels)
    return names if TORCH_SDPA in names else [*names, TORCH_SDPA]  # the ratio's baseline


def _check(cfg: BenchConfig) -> None:
    if cfg.device not in ("cpu", "cuda"):
        raise BenchError(f"--device must be cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda requested but CUDA is not available")
    for name in cfg.dtypes or ():
        if name not in _DTYPES:
            raise BenchError(f"unknown dtype {name!r}; known: {', '.join(_DTYPES)}")
    for mode in cfg.modes:
        if mode not in MODES:
            raise BenchError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    if cfg.peak_tflops is not None and not cfg.peak_tflops > 0:
        raise BenchError(f"--peak-tflops must be > 0, got {cfg.peak_tflops}")
    sizes = {"batch": cfg.batch, "heads": cfg.heads, "head_dim": cfg.head_dim}
    sizes.update({"repeats": cfg.repeats, **{f"seq_len {n}": n for n in cfg.seq_lens}})
    bad = [f"{k}={v}" for k, v in sizes.items() if v < 1]
    if bad:
        raise BenchError(f"sizes must be >= 1, got {', '.join(bad)}")


def make_attention_call(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch: int = 4,
    heads: int = 8,
    head_dim: int = 64,
    seq_len: int = 1024,
    causal: bool = False,
    mode: str = "fwd",
) -> Callable[[], None]:
    """A closure running one ``mode`` pass of candidate ``name`` on seeded inputs.

    ``name``: a registered kernel, :data:`TORCH_SDPA`, a key of :data:`SDPA_BACKENDS` or
    :data:`TORCH_MHA`. Inputs are ``(B, H, L, E)`` = ``(batch, heads, seq_len,
    head_dim)`` (MHA: ``(B, L, H * E)``). ``mode`` "fwd" runs under ``no_grad``;
    "fwd+bwd" runs forward and ``.sum().backward()``; "bwd" builds the graph once here
    and each call runs only its backward (``retain_graph``, so it can repeat).
    Building the closure does not run the candidate, except "bwd"'s one forward.
    """
    from transformer.attention import scaled_dot_product_attention

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    shape = (batch, heads, seq_len, head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(dev, dtype) for _ in range(3))
    grad = mode != "fwd"
    if name == TORCH_MHA:
        E = heads * head_dim
        mha = torch.nn.MultiheadAttention(E, heads, batch_first=True, device=dev, dtype=dtype)
        x = q.transpose(1, 2).reshape(batch, seq_len, E).requires_grad_(grad)  # (B, L, E)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(
            seq_len, device=dev, dtype=dtype
        )

        def fn() -> Tensor:
            kwargs = {"attn_mask": mask, "is_causal": True} if causal else {}
            return mha(x, x, x, need_weights=False, **kwargs)[0]

    elif name in SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[name], None)
        if backend is None:
            raise NotImplementedError(f"this torch has no SDPA backend {SDPA_BACKENDS[name]}")
        q, k, v = (t.requires_grad_(grad) for t in (q, k, v))

        def fn() -> Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    else:
        q, k, v = (t.requires_grad_(grad) for t in (q, k, v))

        def fn() -> Tensor:
            if name == TORCH_SDPA:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            return scaled_dot_product_attention(q, k, v, is_causal=causal, kernel=name)

    if mode == "bwd":
        out = fn()
        upstream = torch.ones_like(out)

        def backward_only() -> None:
            out.backward(upstream, retain_graph=True)

        return backward_only

    def call() -> None:
        if grad:
            fn().sum().backward()
        else:
            with torch.no_grad():
                fn()

    return call


def _make_call(
    name: str, cfg: BenchConfig, L: int, dtype: torch.dtype, causal: bool, mode: str
) -> Callable[[], None]:
    return make_attention_call(
        name, device=cfg.device, dtype=dtype, batch=cfg.batch, heads=cfg.heads,
        head_dim=cfg.head_dim, seq_len=L, causal=causal, mode=mode,
    )  # fmt: skip


def _sync(device: str) -> None:
    if device == "cuda":  # pragma: no cover  (CUDA only, see _free_memory)
        torch.cuda.synchronize()


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


def _peak_memory(cfg: BenchConfig, call: Callable[[], None]) -> int | None:
    if cfg.device == "cuda":  # pragma: no cover  (CUDA only, see _free_memory)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    return cpu_peak_bytes(call)


def _memory_note(cfg: BenchConfig, name: str, peak: int | None) -> str | None:
    """What a row's peak may not include (CPU only: CUDA's allocator sees everything)."""
    if cfg.device == "cuda":  # pragma: no cover  (CUDA only, see _free_memory)
        return None
    if peak is None:  # pragma: no cover - see cpu_peak_bytes
        return NO_COUNTER_NOTE
    return FUSED_NOTE if name.startswith("torch") else None


def _hardware(device: str) -> str:
    if device == "cuda":  # pragma: no cover  (CUDA only, see _free_memory)
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_attention_bench(
    cfg: BenchConfig | None = None, *, log: Callable[[str], None] | None = print, **overrides: Any
) -> dict[str, Any]:
    """Measure every candidate kernel; return (and, with ``cfg.out``, write) the report.

    ``overrides`` replace fields of ``cfg`` (e.g. ``run_attention_bench(seq_lens=(128,))``).
    The report: ``device``, ``hardware``, ``torch``, ``config``, ``flops_model``,
    ``memory_method`` and ``rows`` (one per kernel x dtype x length x causal x mode).
    With ``cfg.out`` it is written to ``DIR/attention-<device>.json`` with a plot
    ``DIR/attention-<device>.png`` (time and memory against length, log-log).

    Raises:
        BenchError: unknown kernel/dtype/mode, CUDA requested without CUDA, bad sizes.
    """
    import transformer.kernels  # noqa: F401  (registers the scratch kernels)

    cfg = BenchConfig(**{**asdict(cfg or BenchConfig()), **overrides})
    _check(cfg)
    names = _candidates(cfg)
    dtypes = cfg.dtypes or (("fp16", "bf16") if cfg.device == "cuda" else ("fp32", "bf16"))
    budget = cfg.memory_budget_bytes or _free_memory(cfg.device) // 2
    rows: list[Row] = []
    for dtype_name in dtypes:
        for L in cfg.seq_lens:
            for causal in cfg.causal:
                for mode in cfg.modes:
                    rows += _measure_group(cfg, names, dtype_name, L, causal, mode, budget, log)
    report = {
        "device": cfg.device,
        "hardware": _hardware(cfg.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "config": asdict(cfg),
        "flops_model": "fwd 4*B*H*L*S*E (halved if causal); bwd 2.5x fwd; fwd+bwd 3.5x fwd",
        "peak_tflops": _peak_for(cfg, "bf16"),
        "memory_method": CUDA_MEMORY_METHOD if cfg.device == "cuda" else CPU_MEMORY_METHOD,
        "rows": [asdict(r) for r in rows],
    }
    if cfg.out is not None:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"attention-{cfg.device}.json").write_text(json.dumps(report, indent=2) + "\n")
        _plot(report, out / f"attention-{cfg.device}.png")
    if log is not None:
        log(format_table(report))
    return report


def _measure_group(
    cfg: BenchConfig,
    names: Sequence[str],
    dtype_name: str,
    L: int,
    causal: bool,
    mode: str,
    budget: int,
    log: Callable[[str], None] | None,
) -> list[Row]:
    """Time every kernel on one (dtype, L, causal, mode), interleaved repeat by repeat."""
    dtype = _DTYPES[dtype_name]
    rows = {n: Row(n, dtype_name, L, causal, mode) for n in names}
    calls: dict[str, Callable[[], None]] = {}
    for name in names:
        need = _predicted_bytes(cfg, name, L, dtype)
        if need > budget:
            rows[name].skipped = f"predicted {need / 2**30:.1f} GiB > budget {budget / 2**30:.1f}"
            continue
        try:
            calls[name] = _make_call(name, cfg, L, dtype, causal, mode)
            # At least one untimed call, also with warmup=0: a kernel that fails on this
            # combination is skipped here instead of aborting the timed loop below.
            for _ in range(max(cfg.warmup, 1)):
                calls[name]()
        except (RuntimeError, ValueError, NotImplementedError) as err:
            rows[name].skipped = f"error: {str(err).splitlines()[0][:200]}"
            calls.pop(name, None)
    for _ in range(cfg.repeats):
        for name, call in calls.items():
            _sync(cfg.device)
            start = time.perf_counter()
            call()
            _sync(cfg.device)
            rows[name].times_ms.append((time.perf_counter() - start) * 1e3)
    flops = _flops(cfg, L, causal, mode)
    peak = _peak_for(cfg, dtype_name)
    for name in calls:
        row = rows[name]
        row.median_ms = statistics.median(row.times_ms)
        row.gflops = flops / (row.median_ms * 1e-3) / 1e9
        if peak is not None:
            row.percent_of_peak = 100.0 * row.gflops / (peak * 1e3)
        peak_bytes = _peak_memory(cfg, calls[name])
        row.peak_memory_mib = None if peak_bytes is None else peak_bytes / 2**20
        row.memory_note = _memory_note(cfg, name, peak_bytes)
    base = rows[TORCH_SDPA].median_ms if TORCH_SDPA in rows else None
    for row in rows.values():
        if base and row.median_ms is not None:
            row.ratio_to_torch_sdpa = row.median_ms / base
    if log is not None:
        log(f"measured {dtype_name} L={L} causal={causal} {mode}")
    return list(rows.values())


def _peak_for(cfg: BenchConfig, dtype_name: str) -> float | None:
    """The TFLOP/s that rows of ``dtype_name`` are a percentage of (None: no percentage)."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops
    if cfg.device == "cuda" and dtype_name in ("fp16", "bf16"):  # pragma: no cover
        return peak_tflops(torch.cuda.get_device_name())
    return None


def format_table(report: dict[str, Any]) -> str:
    """The report's rows as a fixed-width text table (skipped rows say why)."""
    head = f"{'kernel':<20} {'dtype':<5} {'L':>6} {'causal':<6} {'mode':<8} "
    head += f"{'median ms':>10} {'GFLOP/s':>8} {'% peak':>7} {'x sdpa':>7} {'peak MiB':>9}"
    lines = [f"{report['device']} | {report['hardware']} | torch {report['torch']}", head]
    notes: dict[str, str] = {}
    for r in report["rows"]:
        key = f"{r['kernel']:<20} {r['dtype']:<5} {r['seq_len']:>6} "
        key += f"{r['causal']!s:<6} {r['mode']:<8} "
        if r["skipped"]:
            lines.append(key + f"skipped: {r['skipped']}")
            continue
        ratio, share = r["ratio_to_torch_sdpa"], r.get("percent_of_peak")
        lines.append(
            key
            + f"{r['median_ms']:>10.2f} {r['gflops']:>8.1f} "
            + f"{(f'{share:.1f}' if share is not None else '-'):>7} "
            + f"{(f'{ratio:.2f}' if ratio is not None else '-'):>7} "
            + _memory_cell(r, notes)
        )
    lines += [f"{mark} {note}" for note, mark in notes.items()]
    if report.get("memory_method"):
        lines.append(f"peak MiB: {report['memory_method']}")
    return "\n".join(lines)


def _memory_cell(row: dict[str, Any], notes: dict[str, str]) -> str:
    """The peak column: the figure, with a footnote mark when something may be unseen."""
    mib, note = row["peak_memory_mib"], row.get("memory_note")
    if mib is None:
        return f"{'n/a':>9}" + (
            "" if note is None else f" {notes.setdefault(note, '*' * (len(notes) + 1))}"
        )
    cell = f"{mib:>9.1f}"
    return cell if note is None else f"{cell}{notes.setdefault(note, '*' * (len(notes) + 1))}"


#: Row labels of the bench figure, in :data:`MODES` order.
MODE_TITLES = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "forward+backward"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
#: The bench figure is at most this wide (inches, at dpi 100: 1600 px), so it reads at 100%.
_MAX_WIDTH_IN = 16.0


def attention_figure(report: dict[str, Any]) -> Any:
    """Median time against sequence length, log-log: a row per mode, a column per dtype x causal.

    Rows are forward, backward, forward+backward (in that order, the modes present);
    columns each dtype (in report order), full then causal. Every kernel keeps its colour
    and marker in all panels, and one legend outside the axes names them. Returns a
    ``matplotlib.figure.Figure`` (Agg, never pyplot's global state).
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = [r for r in report["rows"] if not r["skipped"]]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)] or list(MODES[:1])
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    columns = [
        (d, c)
        for d in dtypes
        for c in (False, True)
        if any((r["dtype"], r["causal"]) == (d, c) for r in rows)
    ] or [("", False)]
    kernels = sorted({r["kernel"] for r in rows})
    width = min(_MAX_WIDTH_IN, 1.8 + 3.4 * len(columns))
    fig = Figure(figsize=(width, 1.2 + 2.6 * len(modes)), dpi=100, layout="constrained")
    axes = fig.subplots(len(modes), len(columns), squeeze=False, sharex=True)
    palette = [f"C{i % 10}" for i in range(len(kernels))]
    for i, mode in enumerate(modes):
        for j, (dtype, causal) in enumerate(columns):
            ax = axes[i][j]
            for k, kernel in enumerate(kernels):
                sel = sorted(
                    (
                        r
                        for r in rows
                        if (r["kernel"], r["dtype"], r["causal"], r["mode"])
                        == (kernel, dtype, causal, mode)
                    ),
                    key=lambda r: r["seq_len"],
                )
                if sel:
                    ax.plot(
                        [r["seq_len"] for r in sel],
                        [r["median_ms"] for r in sel],
                        marker=_MARKERS[k % len(_MARKERS)],
                        color=palette[k],
                        label=kernel,
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if i == 0:
                ax.set_title(f"{dtype}, {'causal' if causal else 'full'}", fontsize=10)
            if i == len(modes) - 1:
                ax.set_xlabel("sequence length L = S")
            if j == 0:
                ax.set_ylabel(f"{MODE_TITLES[mode]}\nmedian time (ms)")
    handles = [
        Line2D([], [], marker=_MARKERS[k % len(_MARKERS)], color=palette[k], label=kernel)
        for k, kernel in enumerate(kernels)
    ]
    fig.legend(handles=handles, loc="outside right upper", title="kernel")
    fig.suptitle(f"attention on {report['hardware']} (torch {report['torch']})", fontsize=11)
    return fig


def _plot(report: dict[str, Any], path: Path) -> None:
    """Write :func:`attention_figure` of ``report`` to a PNG at dpi 100."""
    attention_figure(report).savefig(path, dpi=100)


# --------------------------------------------------------------------------------------
# The "torch" kernel against the raw torch SDPA it wraps.
# --------------------------------------------------------------------------------------

#: What ``run_wrapper_bench`` times, by the names its report uses.
WRAPPER_CANDIDATES = {
    "sdpa": "F.scaled_dot_product_attention(q, k, v, is_causal=causal)",
    "torch_attention": "torch_attention(q, k, v, is_causal=causal)",
    "front_door": "scaled_dot_product_attention(q, k, v, is_causal=causal, kernel='torch')",
}


def run_wrapper_bench(
    *,
    seq_lens: Sequence[int] = (256, 2048),
    causal: Sequence[bool] = (False, True),
    batch: int = 4,
    heads: int = 8,
    head_dim: int = 64,
    dtype: str = "fp32",
    rounds: int = 7,
    min_run_time: float = 0.5,
    out: str | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Time the ``"torch"`` kernel against raw ``F.scaled_dot_product_attention`` (forward).

    Inputs are ``(B, H, L, E)`` with ``S = L``, no mask, so torch's SDPA handles the
    case itself and the wrapper's cost is all overhead. For each length and causal flag
    the three statements of :data:`WRAPPER_CANDIDATES` (raw SDPA; the kernel function
    :func:`transformer.attention.torch_attention`; the front door with
    ``kernel="torch"``, which adds argument validation) are timed with
    ``torch.utils.benchmark.Timer.blocked_autorange`` under ``no_grad``, interleaved
    ``rounds`` times in one process so machine noise hits them alike. Reported per
    case: each candidate's median over rounds (ms) and the median over rounds of its
    per-round ratio to raw SDPA. Writes ``DIR/torch-wrapper-cpu.json`` with ``out``.
    """
    from torch.utils import benchmark

    from transformer.attention import scaled_dot_product_attention, torch_attention

    if rounds < 1 or min(seq_lens, default=1) < 1:
        raise BenchError(f"rounds and seq_lens must be >= 1, got {rounds} and {seq_lens}")
    rows: list[dict[str, Any]] = []
    for L in seq_lens:
        gen = torch.Generator().manual_seed(0)
        shape = (batch, heads, L, head_dim)
        q, k, v = (torch.randn(shape, generator=gen, dtype=_DTYPES[dtype]) for _ in range(3))
        for is_causal in causal:
            scope = {"F": F, "q": q, "k": k, "v": v, "causal": is_causal,
                     "torch_attention": torch_attention,
                     "scaled_dot_product_attention": scaled_dot_product_attention}  # fmt: skip
            timers = {
                name: benchmark.Timer(stmt, globals=scope, num_threads=torch.get_num_threads())
                for name, stmt in WRAPPER_CANDIDATES.items()
            }
            times: dict[str, list[float]] = {name: [] for name in timers}
            best = dict.fromkeys(timers, math.inf)
            with torch.no_grad():
                for _ in range(rounds):
                    for name, timer in timers.items():
                        measured = timer.blocked_autorange(min_run_time=min_run_time)
                        times[name].append(measured.median)
                        best[name] = min(best[name], *measured.times)
            row: dict[str, Any] = {"seq_len": L, "causal": is_causal}
            for name in timers:
                ratios = [t / base for t, base in zip(times[name], times["sdpa"], strict=True)]
                row[f"{name}_ms"] = statistics.median(times[name]) * 1e3
                row[f"{name}_ratio"] = statistics.median(ratios)
                # The fastest block: the cost with the least interference from other
                # processes (on a shared machine a preempted worker thread adds whole
                # scheduler slices to the median).
                row[f"{name}_best_ms"] = best[name] * 1e3
                row[f"{name}_best_ratio"] = best[name] / best["sdpa"]
            rows.append(row)
            if log is not None:
                log(
                    f"L=S={L} causal={is_causal}: sdpa {row['sdpa_ms']:.3f} ms; median "
                    f"ratio torch_attention x{row['torch_attention_ratio']:.3f}, front door "
                    f"x{row['front_door_ratio']:.3f}; best-block ratio torch_attention "
                    f"x{row['torch_attention_best_ratio']:.3f}, front door "
                    f"x{row['front_door_best_ratio']:.3f}"
                )
    report = {
        "what": "the 'torch' kernel vs raw F.scaled_dot_product_attention, forward, no mask",
        "hardware": _hardware("cpu"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "config": {
            "batch": batch,
            "heads": heads,
            "head_dim": head_dim,
            "dtype": dtype,
            "rounds": rounds,
            "min_run_time": min_run_time,
        },
        "statements": WRAPPER_CANDIDATES,
        "method": "torch.utils.benchmark blocked_autorange, interleaved rounds; *_ratio = "
        "median over rounds of (candidate median / sdpa median) in the same round; "
        "*_best_ratio = fastest block of the candidate / fastest block of sdpa",
        "rows": rows,
    }
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "torch-wrapper-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# --------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(part) for part in text.replace(",", " ").split() if part]
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid list {text!r}") from None

    return parse


def _flatten(values: list[list[Any]] | None) -> tuple[Any, ...] | None:
    return None if values is None else tuple(v for group in values for v in group)


def add_bench_parser(subparsers: Any) -> None:
    """Register ``bench attention`` on the ``transformer`` command's subparsers."""
    bench = subparsers.add_parser(
        "bench", help="benchmark components", description="Benchmarks (never assert time)."
    )
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    p = sub.add_parser(
        "attention",
        help="time the attention kernels side by side",
        description="Every registered kernel, torch SDPA (on CUDA also pinned to each of "
        "its backends: torch-sdpa-flash, -efficient, -cudnn, -math) and "
        "torch.nn.MultiheadAttention; forward, backward and forward+backward, causal and "
        "not; prints a table (with % of the GPU's peak on CUDA), writes JSON and a plot "
        "to --out. FLOPs: 4*B*H*L*S*E forward (halved if causal), backward 2.5x.",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--kernels", type=_csv(str), nargs="+", help="names (default: all)")
    p.add_argument("--seq-lens", type=_csv(int), nargs="+", help="default 128 ... 8192")
    p.add_argument("--dtypes", type=_csv(str), nargs="+", help="fp32 bf16 (cpu), fp16 bf16 (cuda)")
    p.add_argument("--batch", type=int, default=4, help="B (default 4)")
    p.add_argument("--heads", type=int, default=8, help="H (default 8)")
    p.add_argument("--head-dim", type=int, default=64, help="E (default 64)")
    p.add_argument("--modes", type=_csv(str), nargs="+", help="fwd bwd fwd+bwd (default all)")
    p.add_argument(
        "--causal",
        choices=("both", "yes", "no"),
        default="both",
        help="time causal attention, full attention or both (default both)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs per kernel (median)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak TFLOP/s for the %% peak column (default on CUDA: the GPU's bf16 peak)",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="write JSON and PNG here")
    p.set_defaults(func=_cmd_bench_attention)

    w = sub.add_parser(
        "torch-wrapper",
        help="time the 'torch' kernel against the raw torch SDPA it wraps (CPU, forward)",
        description="torch.utils.benchmark, side by side in one process: raw "
        "F.scaled_dot_product_attention, transformer.attention.torch_attention and the "
        "front door with kernel='torch', forward, no mask, causal and not; prints and "
        "writes the ratios to raw SDPA.",
    )
    w.add_argument("--seq-lens", type=_csv(int), nargs="+", help="L = S (default 256 2048)")
    w.add_argument("--batch", type=int, default=4, help="B (default 4)")
    w.add_argument("--heads", type=int, default=8, help="H (default 8)")
    w.add_argument("--head-dim", type=int, default=64, help="E (default 64)")
    w.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    w.add_argument("--min-run-time", type=float, default=0.5, help="seconds per timing")
    w.add_argument("--out", default=None, metavar="DIR", help="write JSON here")
    w.set_defaults(func=_cmd_bench_wrapper)

    c = sub.add_parser(
        "compile",
        help="compile the triton kernel for a GPU (none needed) and report its costs",
        description="Offline: compile the triton kernel's forward and backward kernels "
        "with every autotune config for an NVIDIA target, and report shared memory "
        "(against the target's limit), registers, spills and whether the matmuls use "
        "tensor cores. Static facts, nothing is timed. Needs triton and "
        "TRITON_INTERPRET unset; no GPU.",
    )
    c.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90)")
    c.add_argument("--dtypes", type=_csv(str), nargs="+", help="fp16 bf16 fp32 fp64 (default bf16)")
    c.add_argument("--head-dims", type=_csv(int), nargs="+", help="E values (default 64 128)")
    c.add_argument(
        "--causal",
        choices=("both", "yes", "no"),
        default="both",
        help="compile the causal variant, the full one or both (default both)",
    )
    c.add_argument("--seq-len", type=int, default=4096, help="L = S (default 4096)")
    c.add_argument("--batch", type=int, default=4, help="B (default 4)")
    c.add_argument("--heads", type=int, default=8, help="H (default 8)")
    c.add_argument(
        "--configs",
        choices=("all", "smallest"),
        default="all",
        help="every autotune config, or only the smallest tile (default all)",
    )
    c.add_argument("--out", default=None, metavar="DIR", help="write JSON here")
    c.set_defaults(func=_cmd_bench_compile)


def _out_in_the_way(args: argparse.Namespace, command: str) -> bool:
    """True, after one error line, when --out names a file: checked before any work."""
    if args.out is None or not Path(args.out).exists() or Path(args.out).is_dir():
        return False
    print(
        f"transformer bench {command}: error: --out {args.out}: a file is in the way "
        "(expected a directory)",
        file=sys.stderr,
    )
    return True


def _cmd_bench_attention(args: argparse.Namespace) -> int:
    if _out_in_the_way(args, "attention"):
        return 2
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    try:
        run_attention_bench(
            device=args.device,
            kernels=_flatten(args.kernels),
            seq_lens=_flatten(args.seq_lens) or DEFAULT_SEQ_LENS,
            dtypes=_flatten(args.dtypes),
            batch=args.batch,
            heads=args.heads,
            head_dim=args.head_dim,
            modes=_flatten(args.modes) or MODES,
            causal=causal,
            repeats=args.repeats,
            peak_tflops=args.peak_tflops,
            out=args.out,
        )
    except BenchError as err:
        print(f"transformer bench attention: error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_bench_wrapper(args: argparse.Namespace) -> int:
    if _out_in_the_way(args, "torch-wrapper"):
        return 2
    try:
        run_wrapper_bench(
            seq_lens=_flatten(args.seq_lens) or (256, 2048),
            batch=args.batch,
            heads=args.heads,
            head_dim=args.head_dim,
            rounds=args.rounds,
            min_run_time=args.min_run_time,
            out=args.out,
        )
    except BenchError as err:
        print(f"transformer bench torch-wrapper: error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_bench_compile(args: argparse.Namespace) -> int:
    if _out_in_the_way(args, "compile"):
        return 2
    from transformer.kernels.triton_offline import OfflineCompileError, compile_report

    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    try:
        compile_report(
            arch=args.arch,
            dtypes=_flatten(args.dtypes) or ("bf16",),
            head_dims=_flatten(args.head_dims) or (64, 128),
            causal=causal,
            seq_len=args.seq_len,
            batch=args.batch,
            heads=args.heads,
            configs=args.configs,
            out=args.out,
        )
    except (ValueError, OfflineCompileError) as err:
        print(f"transformer bench compile: error: {err}", file=sys.stderr)
        return 2
    return 0
