"""Which attention kernel ``kernel=None`` runs: the fastest correct one, as measured.

Kernels know no module and this module knows no kernel: it holds the project's own
committed measurements (``benchmarks/results/``, written by ``transformer bench attention
--out``) boiled down to one number per kernel, device type and dtype, and orders the
names the registry in :mod:`transformer.attention` hands it.

The number is a kernel's *relative time*: the geometric mean, over the measured cases
(sequence length x causal flag x mode) that every ranked kernel of that dtype has a row
for, of ``kernel time / torch SDPA time`` in the same case; lower is faster.
:data:`MEASURED` is what :func:`measured_from_report` derives from the files it names,
rounded to three decimals; ``spec_tests/test_attention_selection.py`` re-derives it from
those files, so the table cannot drift from the measurements it cites.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DTYPE_NAMES", "MEASURED", "Measured", "measured_from_report", "rank_by_speed"]

#: The dtype names the benchmark reports use.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
}


@dataclass(frozen=True)
class Measured:
    """The kernels of one device type and dtype, by measured speed."""

    # The committed report the numbers come from (path in the repository).
    source: str
    # Kernel name -> relative time (geometric mean of time / torch SDPA time; lower wins).
    relative_time: Mapping[str, float]


_SOURCE = "benchmarks/results/cpu-epyc-2core-B4H8E64-kernels.json"

#: (device type, dtype name) -> the committed measurement that decides ``kernel=None``.
#: From ``transformer bench attention --kernels chunked torch --seq-lens 256 2048 --dtypes
#: fp32 bf16 --modes fwd fwd+bwd --repeats 3`` (B 4, H 8, E 64, 2 threads of an AMD EPYC,
#: torch 2.13.0): on fp32 the "torch" wrapper is faster, on bf16 "chunked" (torch's bf16
#: CPU backward is 4x slower than its forward would suggest).
MEASURED: dict[tuple[str, str], Measured] = {
    ("cpu", "fp32"): Measured(_SOURCE, {"chunked": 1.252, "torch": 1.068}),
    ("cpu", "bf16"): Measured(_SOURCE, {"chunked": 0.951, "torch": 1.118}),
}


def measured_from_report(
    report: Mapping[str, Any], source: str, *, digits: int | None = 3
) -> dict[tuple[str, str], Measured]:
    """The :data:`MEASURED` entries one benchmark report supports, one per dtype in it.

    ``report``: the JSON ``transformer bench attention --out DIR`` writes. Ranked are the
    registry's kernels, i.e. every measured row except torch's own baselines (names
    starting ``torch-``: raw SDPA, its pinned backends, ``nn.MultiheadAttention``); a
    case counts when every ranked kernel of the dtype was measured in it (skipped rows,
    e.g. a quadratic kernel over the memory budget, leave the case out for all).
    ``digits`` rounds the relative times (``None``: unrounded).
    """
    by_dtype: dict[str, dict[tuple[int, bool, str], dict[str, float]]] = {}
    for row in report["rows"]:
        if row["kernel"].startswith("torch-") or row.get("ratio_to_torch_sdpa") is None:
            continue
        case = (row["seq_len"], row["causal"], row["mode"])
        by_dtype.setdefault(row["dtype"], {}).setdefault(case, {})[row["kernel"]] = row[
            "ratio_to_torch_sdpa"
        ]
    table: dict[tuple[str, str], Measured] = {}
    for dtype, cases in by_dtype.items():
        kernels = set().union(*cases.values())
        common = [ratios for ratios in cases.values() if set(ratios) == kernels]
        if not common:
            continue
        relative = {
            name: math.exp(sum(math.log(r[name]) for r in common) / len(common))
            for name in sorted(kernels)
        }
        if digits is not None:
            relative = {name: round(value, digits) for name, value in relative.items()}
        table[(report["device"], dtype)] = Measured(source, relative)
    return table


def rank_by_speed(
    candidates: Sequence[str],
    device_type: str,
    dtype: torch.dtype,
    table: Mapping[tuple[str, str], Measured] | None = None,
) -> list[str]:
    """``candidates`` in the order ``kernel=None`` prefers them on this device type and dtype.

    The ones ``table`` (default :data:`MEASURED`) has a time for come first, fastest
    first; the rest follow in their given order (the registry passes them by priority).
    With no entry for the device type and dtype (say CUDA, or fp64 on the CPU, where
    nothing is committed) the given order is returned unchanged, so priority decides.
    """
    measured = (MEASURED if table is None else table).get(
        (device_type, DTYPE_NAMES.get(dtype, str(dtype)))
    )
    if measured is None:
        return list(candidates)
    timed = sorted(
        (name for name in candidates if name in measured.relative_time),
        key=lambda name: measured.relative_time[name],
    )
    return timed + [name for name in candidates if name not in measured.relative_time]
