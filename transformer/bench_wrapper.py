"""``transformer bench torch-wrapper``: the ``"torch"`` kernel against the raw torch SDPA it wraps.

:func:`run_wrapper_bench` compares the ``"torch"`` kernel with the raw
``F.scaled_dot_product_attention`` it wraps, with ``torch.utils.benchmark``, side by
side in one process, so what the wrapper adds is all that differs.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from transformer.bench_candidates import _DTYPES, BenchError
from transformer.bench_device import _hardware, cpu_capability

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
    from transformer.bench import check_sizes

    check_sizes(
        {"--batch": batch, "--heads": heads, "--head-dim": head_dim},
        repeats=("--rounds", rounds),
        seq_lens=seq_lens,
    )
    if not min_run_time > 0:
        raise BenchError(f"--min-run-time must be > 0 seconds, got {min_run_time}")
    if dtype not in _DTYPES:
        raise BenchError(f"unknown dtype {dtype!r}; known: {', '.join(_DTYPES)}")
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
        "cpu_capability": cpu_capability(),
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
