"""Which attention kernel ``kernel=None`` runs: the fastest correct one, as measured.

Kernels know no module and this module knows no kernel: it holds the project's own
committed measurements (``benchmarks/results/``, written by ``transformer bench attention
--out``) boiled down to one number per kernel, device type, hardware kind and dtype, and
orders the names the registry in :mod:`transformer.attention` hands it.

The number is a kernel's *relative time*: the geometric mean, over the measured cases
(sequence length x causal flag x mode) that every ranked kernel of that dtype has a row
for, of ``kernel time / torch SDPA time`` in the same case; lower is faster.
:data:`MEASURED` is what :func:`measured_from_report` derives from the files it names,
rounded to three decimals; ``spec_tests/test_attention_selection.py`` re-derives it from
those files, so the table cannot drift from the measurements it cites.

The *hardware kind* (:func:`hardware_kind`) is there because one CPU's ranking is not
another's. On the CPUs measured, the bf16 relative times of the ``"torch"`` wrapper
and of our ``"chunked"`` kernel were 1.118 and 0.951 on an x86 CPU without AMX (an
AMD EPYC, where torch's bf16 backward is slow; its report predates the records of
the CPU's instruction set, and the README of the time called it AVX2), 1.082 and 3.218 on one
with AMX (an Intel Xeon, where torch's bf16 matrix products run on the AMX tile units)
and 0.986 and 1.399 on an AMD EPYC with AVX-512 BF16: a table keyed by device type
alone would give the Xeon a bf16 default 3x slower than the other kernel, and one
keyed by "x86 without AMX" gave that EPYC a bf16 default 1.4x slower. A CPU of an
unmeasured kind (not x86) falls back to the registry's priorities,
as any unmeasured device or dtype does.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DTYPE_NAMES",
    "MEASURED",
    "Measured",
    "hardware_kind",
    "measured_from_report",
    "rank_by_speed",
]

#: The dtype names the benchmark reports use.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
}


@dataclass(frozen=True)
class Measured:
    """The kernels of one device type, hardware kind and dtype, by measured speed."""

    # The committed report the numbers come from (path in the repository).
    source: str
    # Kernel name -> relative time (geometric mean of time / torch SDPA time; lower wins).
    relative_time: Mapping[str, float]


_EPYC = "benchmarks/results/cpu-epyc-2core-B4H8E64-kernels.json"
_XEON = "benchmarks/results/cpu-xeon-amx-2core-B4H8E64-kernels.json"
_EPYC_BF16 = "benchmarks/results/cpu-epyc-avx512-bf16-2core-B4H8E64-kernels.json"

#: (device type, hardware kind, dtype name) -> the committed measurement that decides
#: ``kernel=None``. Both files come from ``transformer bench attention --kernels chunked
#: torch --seq-lens 256 2048 --dtypes fp32 bf16 --modes fwd fwd+bwd --repeats 3`` (B 4,
#: H 8, E 64, 2 threads, torch 2.13.0). On the AMD EPYC (x86 without AMX; its report
#: predates the ``hardware_kind`` field, so the kind is given here) the "torch" wrapper is
#: faster on fp32, "chunked" on bf16 (torch's bf16 CPU backward is 4x slower than its
#: forward would suggest). On the Intel Xeon (AMX), and on an AMD EPYC with AVX-512
#: BF16 (where torch's bf16 forward+backward at L = 2048 took 0.82x and 0.96x of its
#: fp32 time, against 5.4x and 4.3x on the EPYC above), the "torch" wrapper wins both.
MEASURED: dict[tuple[str, str, str], Measured] = {
    ("cpu", "x86", "fp32"): Measured(_EPYC, {"chunked": 1.252, "torch": 1.068}),
    ("cpu", "x86", "bf16"): Measured(_EPYC, {"chunked": 0.951, "torch": 1.118}),
    ("cpu", "x86-amx", "fp32"): Measured(_XEON, {"chunked": 1.673, "torch": 1.035}),
    ("cpu", "x86-amx", "bf16"): Measured(_XEON, {"chunked": 3.218, "torch": 1.082}),
    ("cpu", "x86-avx512-bf16", "fp32"): Measured(_EPYC_BF16, {"chunked": 1.346, "torch": 0.96}),
    ("cpu", "x86-avx512-bf16", "bf16"): Measured(_EPYC_BF16, {"chunked": 1.399, "torch": 0.986}),
}


def _cpu_kind() -> str:
    cpu = getattr(torch, "cpu", None)
    amx = getattr(cpu, "_is_amx_tile_supported", None)
    if callable(amx) and amx():
        return "x86-amx"
    bf16 = getattr(cpu, "_is_avx512_bf16_supported", None)
    if callable(bf16) and bf16():
        return "x86-avx512-bf16"
    if platform.machine().lower() in ("x86_64", "amd64"):
        return "x86"
    return "other"


# Read once, at import: ``kernel=None`` asks at every call, and code that torch.compile
# traces may read a constant but not call torch's CPU feature probes.
_CPU_KIND = _cpu_kind()


def hardware_kind(device_type: str) -> str:
    """The kind of this machine's ``device_type`` hardware that :data:`MEASURED` is keyed by.

    For ``"cpu"``: ``"x86-amx"`` when torch reports AMX tile units (its bf16 matrix
    products then run on them), ``"x86-avx512-bf16"`` when it reports AVX-512 BF16
    dot-product instructions without AMX (torch's bf16 attention then runs several
    times faster than without them), ``"x86"`` for any other x86-64 CPU, otherwise
    ``"other"``. Two AMD EPYC machines measured fall on either side of the bf16 split.
    Other device types have one kind, ``"any"``, until a measurement needs more.
    """
    return _CPU_KIND if device_type == "cpu" else "any"


def measured_from_report(
    report: Mapping[str, Any],
    source: str,
    *,
    kind: str | None = None,
    digits: int | None = 3,
) -> dict[tuple[str, str, str], Measured]:
    """The :data:`MEASURED` entries one benchmark report supports, one per dtype in it.

    ``report``: the JSON ``transformer bench attention --out DIR`` writes; its entries are
    keyed by its ``device``, ``kind`` (default: the report's ``hardware_kind``; a report
    without one needs ``kind``, and one that names another kind than ``kind`` is refused)
    and each dtype. Ranked are the
    registry's kernels, i.e. every measured row except torch's own baselines (names
    starting ``torch-``: raw SDPA, its pinned backends, ``nn.MultiheadAttention``); a
    case counts when every ranked kernel of the dtype was measured in it (skipped rows,
    e.g. a quadratic kernel over the memory budget, leave the case out for all).
    ``digits`` rounds the relative times (``None``: unrounded).
    """
    recorded = report.get("hardware_kind")
    if kind is None:
        if recorded is None:
            raise ValueError(f"{source} records no hardware_kind: pass kind=")
        kind = str(recorded)
    elif recorded is not None and recorded != kind:
        raise ValueError(f"{source} was measured on kind {recorded!r}, not {kind!r}")
    by_dtype: dict[str, dict[tuple[int, bool, str], dict[str, float]]] = {}
    for row in report["rows"]:
        if row["kernel"].startswith("torch-") or row.get("ratio_to_torch_sdpa") is None:
            continue
        case = (row["seq_len"], row["causal"], row["mode"])
        by_dtype.setdefault(row["dtype"], {}).setdefault(case, {})[row["kernel"]] = row[
            "ratio_to_torch_sdpa"
        ]
    table: dict[tuple[str, str, str], Measured] = {}
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
        table[(report["device"], kind, dtype)] = Measured(source, relative)
    return table


def rank_by_speed(
    candidates: Sequence[str],
    device_type: str,
    dtype: torch.dtype,
    table: Mapping[tuple[str, str, str], Measured] | None = None,
    kind: str | None = None,
) -> list[str]:
    """``candidates`` in the order ``kernel=None`` prefers them on this device type and dtype.

    The ones ``table`` (default :data:`MEASURED`) has a time for, under ``kind`` (default
    this machine's :func:`hardware_kind`), come first, fastest first; the rest follow in
    their given order (the registry passes them by priority). With no entry for the
    device type, kind and dtype (say CUDA, fp64 on the CPU, or a CPU of another kind,
    where nothing is committed) the given order is returned unchanged, so priority decides.
    """
    if kind is None:
        kind = hardware_kind(device_type)
    measured = (MEASURED if table is None else table).get(
        (device_type, kind, DTYPE_NAMES.get(dtype, str(dtype)))
    )
    if measured is None:
        return list(candidates)
    timed = sorted(
        (name for name in candidates if name in measured.relative_time),
        key=lambda name: measured.relative_time[name],
    )
    return timed + [name for name in candidates if name not in measured.relative_time]
