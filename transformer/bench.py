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

This module holds the benchmark's configuration, its rows and its timing loop
(:func:`run_attention_bench`), and re-exports the benchmarks' public names from the
modules that hold the rest: :mod:`transformer.bench_candidates` (what is timed:
candidate names, modes, :func:`make_attention_call`), :mod:`transformer.bench_device`
(hardware name, free memory, GPU peaks), :mod:`transformer.bench_memory` (peak memory,
:func:`cpu_peak_bytes`, and what it cannot see), :mod:`transformer.bench_report` (table
and figure), :mod:`transformer.bench_wrapper` (``transformer bench torch-wrapper``,
:func:`run_wrapper_bench`) and :mod:`transformer.bench_cli` (the ``bench``
subcommands, :func:`add_bench_parser`).

Notation: B batch, H heads, L = S sequence length, E head dim.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from transformer.bench_candidates import (
    _DTYPES,
    MODES,
    SDPA_BACKENDS,
    TORCH_MHA,
    TORCH_SDPA,
    BenchError,
    make_attention_call,
)
from transformer.bench_cli import add_bench_parser
from transformer.bench_device import (
    PEAK_BF16_TFLOPS,
    _free_memory,
    _hardware,
    _sync,
    cpu_capability,
    peak_tflops,
)
from transformer.bench_memory import (
    CPU_MEMORY_METHOD,
    CUDA_MEMORY_METHOD,
    _memory_note,
    _peak_memory,
    cpu_peak_bytes,
)
from transformer.bench_memory import FUSED_NOTE as FUSED_NOTE
from transformer.bench_memory import NO_COUNTER_NOTE as NO_COUNTER_NOTE
from transformer.bench_report import MODE_TITLES as MODE_TITLES
from transformer.bench_report import _plot, format_table
from transformer.bench_report import attention_figure as attention_figure
from transformer.bench_wrapper import WRAPPER_CANDIDATES as WRAPPER_CANDIDATES
from transformer.bench_wrapper import run_wrapper_bench
from transformer.kernel_choice import hardware_kind

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

_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
DEFAULT_SEQ_LENS = (128, 256, 512, 1024, 2048, 4096, 8192)
# Kernels that materialise (B, H, L, S) score matrices: skipped when those would not fit.
_QUADRATIC = {"reference", "torch", TORCH_MHA}


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


def _flops(cfg: BenchConfig, L: int, causal: bool, mode: str) -> float:
    fwd = 4.0 * cfg.batch * cfg.heads * L * L * cfg.head_dim
    fwd = fwd / 2 if causal else fwd
    return fwd * _FLOP_FACTOR[mode]


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
    check_sizes(
        {"--batch": cfg.batch, "--heads": cfg.heads, "--head-dim": cfg.head_dim},
        repeats=("--repeats", cfg.repeats),
        seq_lens=cfg.seq_lens,
    )


def check_sizes(
    sizes: dict[str, int], *, repeats: tuple[str, int], seq_lens: Sequence[int]
) -> None:
    """``BenchError`` naming each flag whose size is below 1, and an empty ``--seq-lens``."""
    if not seq_lens:
        raise BenchError("--seq-lens: no length given")
    named = {**sizes, repeats[0]: repeats[1]}
    bad = [f"{flag} {value}" for flag, value in named.items() if value < 1]
    bad += [f"--seq-lens {n}" for n in seq_lens if n < 1]
    if bad:
        raise BenchError(f"sizes must be >= 1, got {', '.join(bad)}")


def _make_call(
    name: str, cfg: BenchConfig, L: int, dtype: torch.dtype, causal: bool, mode: str
) -> Callable[[], None]:
    return make_attention_call(
        name, device=cfg.device, dtype=dtype, batch=cfg.batch, heads=cfg.heads,
        head_dim=cfg.head_dim, seq_len=L, causal=causal, mode=mode,
    )  # fmt: skip


def run_attention_bench(
    cfg: BenchConfig | None = None, *, log: Callable[[str], None] | None = print, **overrides: Any
) -> dict[str, Any]:
    """Measure every candidate kernel; return (and, with ``cfg.out``, write) the report.

    ``overrides`` replace fields of ``cfg`` (e.g. ``run_attention_bench(seq_lens=(128,))``).
    The report: ``device``, ``hardware``, ``hardware_kind`` (what
    :data:`transformer.kernel_choice.MEASURED` is keyed by), ``cpu_capability`` (the
    vector instruction set torch's CPU kernels run, on a CPU run), ``torch``, ``config``,
    ``flops_model``, ``memory_method`` and ``rows`` (one per kernel x dtype x length x
    causal x mode).
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
        "hardware_kind": hardware_kind(cfg.device),
        "cpu_capability": cpu_capability() if cfg.device == "cpu" else None,
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
        peak_bytes = _peak_memory(cfg.device, calls[name])
        row.peak_memory_mib = None if peak_bytes is None else peak_bytes / 2**20
        row.memory_note = _memory_note(cfg.device, name, peak_bytes)
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
