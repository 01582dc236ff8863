"""Which kernel ``kernel=None`` runs: the fastest correct one by the committed measurements.

:mod:`transformer.kernel_choice` holds one relative time per kernel, device type,
hardware kind and dtype (geometric mean of time / torch SDPA's time), derived from the
benchmark reports committed under ``benchmarks/results/``. These tests pin the rule: the
pick is the fastest measured candidate available on the device, never one the table
shows slower than another; the table of this machine's hardware kind decides, not
another kind's; a table saying otherwise changes the pick; where nothing is measured the
registry's priorities decide; and the shipped table is what its cited files say.
"""

from __future__ import annotations

import functools
import json
import platform
from pathlib import Path

import pytest
import torch

import transformer
import transformer.kernels  # registers "chunked"
from transformer import attention as attention_module
from transformer import kernel_choice, kernel_registry
from transformer.kernel_choice import MEASURED, Measured, measured_from_report, rank_by_speed

spec = functools.partial(pytest.mark.spec, component="attention", section="extra")

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _picked(dtype: torch.dtype, device: torch.device = CPU) -> str:
    """The name of the kernel ``kernel=None`` dispatches to for this device and dtype."""
    fn = kernel_registry.pick_kernel(None, device, dtype)
    (name,) = [n for n, entry in kernel_registry._KERNELS.items() if entry.fn is fn]
    return name


#: The hardware kind the fake tables below are filed under.
KIND = "test-kind"


@pytest.fixture
def fake_table(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[str, str, str], Measured]:
    """An empty measurement table in place of the shipped one, for the test to fill;
    this machine's hardware kind reads as :data:`KIND` meanwhile."""
    table: dict[tuple[str, str, str], Measured] = {}
    monkeypatch.setattr(kernel_choice, "MEASURED", table)
    _pretend_kind(monkeypatch, KIND)
    return table


def _pretend_kind(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Make :func:`~transformer.kernel_choice.hardware_kind` report ``kind`` for every device."""
    monkeypatch.setattr(kernel_choice, "hardware_kind", lambda device_type: kind)


@spec(kind="equivalence")
@pytest.mark.parametrize("key", sorted(MEASURED), ids=lambda k: "-".join(k))
def test_default_kernel_is_the_fastest_available_kernel_in_the_committed_table(
    key: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """For every measured device type, hardware kind and dtype, ``kernel=None`` on a machine of that kind runs the kernel with the lowest committed relative time among the candidates available there, and ``available_kernels`` lists it first."""
    device_type, kind, dtype_name = key
    if device_type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _pretend_kind(monkeypatch, kind)
    dtype = {v: k for k, v in kernel_choice.DTYPE_NAMES.items()}[dtype_name]
    device = torch.device(device_type)
    times = MEASURED[key].relative_time
    candidates = [
        n
        for n in transformer.available_kernels(device, dtype)
        if kernel_registry._KERNELS[n].priority >= 0 and n in times
    ]
    fastest = min(candidates, key=lambda n: times[n])
    assert _picked(dtype, device) == fastest
    assert transformer.available_kernels(device, dtype)[0] == fastest
    assert all(times[fastest] <= times[n] for n in candidates)


@spec(kind="equivalence")
@pytest.mark.parametrize("kind", ["x86", "x86-amx", "x86-avx512-bf16"])
def test_on_cpu_fp32_the_committed_results_make_the_torch_wrapper_the_default(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On every measured CPU kind the committed fp32 measurements show the ``"torch"`` kernel faster than ``"chunked"``, so a float32 call with ``kernel=None`` returns exactly what ``kernel="torch"`` returns."""
    times = MEASURED[("cpu", kind, "fp32")].relative_time
    assert times["torch"] < times["chunked"]
    _pretend_kind(monkeypatch, kind)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=gen) for _ in range(3))
    default = transformer.scaled_dot_product_attention(q, k, v, is_causal=True)
    named = transformer.scaled_dot_product_attention(q, k, v, is_causal=True, kernel="torch")
    assert torch.equal(default, named)


@spec(kind="equivalence")
@pytest.mark.parametrize(("chunked", "winner"), [(0.8, "chunked"), (1.2, "torch")])
def test_a_table_that_shows_chunked_faster_makes_chunked_the_default(
    fake_table: dict[tuple[str, str, str], Measured], chunked: float, winner: str
) -> None:
    """The pick follows the table, not the priorities: with chunked's relative time below torch's, ``kernel=None`` runs chunked; above it, torch."""
    times = {"chunked": chunked, "torch": 1.0, "reference": 5.0}
    fake_table[("cpu", KIND, "fp32")] = Measured("made-up.json", times)
    assert _picked(torch.float32) == winner


@spec(kind="equivalence")
def test_the_table_of_this_machines_hardware_kind_decides_not_another_kinds(
    fake_table: dict[tuple[str, str, str], Measured], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two kinds with opposite rankings: the default follows the kind this machine reports, and a kind with no entry falls back to the priorities (chunked first)."""
    fake_table[("cpu", "kind-a", "bf16")] = Measured("a.json", {"chunked": 0.9, "torch": 1.1})
    fake_table[("cpu", "kind-b", "bf16")] = Measured("b.json", {"chunked": 3.2, "torch": 1.1})
    _pretend_kind(monkeypatch, "kind-a")
    assert _picked(torch.bfloat16) == "chunked"
    _pretend_kind(monkeypatch, "kind-b")
    assert _picked(torch.bfloat16) == "torch"
    _pretend_kind(monkeypatch, "kind-c")
    assert _picked(torch.bfloat16) == "chunked"


@spec(kind="equivalence")
def test_the_hardware_kind_follows_the_bf16_units_torch_reports_on_the_cpu() -> None:
    """``hardware_kind("cpu")`` is ``"x86-amx"`` exactly when torch reports AMX tile units, else ``"x86-avx512-bf16"`` exactly when it reports AVX-512 BF16 instructions, else ``"x86"`` exactly when the machine is x86-64, else ``"other"``; every other device type is ``"any"``."""
    amx = torch.cpu._is_amx_tile_supported()
    bf16 = torch.cpu._is_avx512_bf16_supported()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    expected = "x86-amx" if amx else "x86-avx512-bf16" if bf16 else "x86" if x86 else "other"
    assert kernel_choice.hardware_kind("cpu") == expected
    assert kernel_choice.hardware_kind("cuda") == "any"


@spec(kind="equivalence")
def test_without_a_measurement_the_default_falls_back_to_priority(
    fake_table: dict[tuple[str, str, str], Measured],
) -> None:
    """For a device type or dtype the table has no entry for, the candidates keep the registry's priority order (chunked 10, torch 5, reference 0); in a measured one, kernels with no time rank after every measured kernel, by priority."""
    fake_table[("cpu", KIND, "fp32")] = Measured("made-up.json", {"reference": 2.0})
    assert _picked(torch.float64) == "chunked"
    names = ["chunked", "torch", "reference"]
    assert rank_by_speed(names, "xpu", torch.float32) == names
    assert rank_by_speed(names, "cpu", torch.float64) == names
    assert rank_by_speed(names, "cpu", torch.float32) == ["reference", "chunked", "torch"]
    assert _picked(torch.float32) == "reference"


@spec(kind="equivalence")
def test_a_kernel_registered_without_priority_is_never_the_default_even_if_measured_fastest(
    fake_table: dict[tuple[str, str, str], Measured], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel registered with the default priority (-1) is only run when named: a table showing it fastest still leaves ``kernel=None`` on the fastest candidate, and it is listed after all of them."""
    monkeypatch.setattr(kernel_registry, "_KERNELS", dict(kernel_registry._KERNELS))
    transformer.register_kernel("user-fast", attention_module.reference_attention)
    fake_table[("cpu", KIND, "fp32")] = Measured("made-up.json", {"user-fast": 0.1, "torch": 1.0})
    assert _picked(torch.float32) == "torch"
    assert transformer.available_kernels("cpu", torch.float32)[-1] == "user-fast"


@spec(kind="equivalence")
def test_the_shipped_table_is_what_the_committed_results_it_names_say() -> None:
    """Every entry of ``MEASURED`` equals what ``measured_from_report`` derives from the committed report it cites (geometric means of time / torch SDPA over the cases every ranked kernel was measured in), under the one hardware kind its entries give it, which a report that records its kind must agree with; and every cited file exists."""
    sources = {m.source for m in MEASURED.values()}
    assert sources, "the table cites no measurement"
    derived: dict[tuple[str, str, str], Measured] = {}
    for source in sorted(sources):
        path = REPO / source
        if not path.exists():
            pytest.skip(f"{source} is not in this checkout (an installed package)")
        (kind,) = {key[1] for key, m in MEASURED.items() if m.source == source}
        derived.update(measured_from_report(json.loads(path.read_text()), source, kind=kind))
    assert {k: v for k, v in derived.items() if k in MEASURED} == MEASURED


@spec(kind="equivalence")
def test_a_report_is_filed_under_the_hardware_kind_it_records_and_no_other() -> None:
    """A report with ``hardware_kind`` is keyed by it; asking for another kind, or giving no kind for a report that records none, is a ``ValueError`` naming the file."""
    row = {"kernel": "a", "dtype": "fp32", "seq_len": 1, "causal": False, "mode": "fwd",
           "ratio_to_torch_sdpa": 2.0}  # fmt: skip
    report = {"device": "cpu", "hardware_kind": "x86-amx", "rows": [row]}
    assert set(measured_from_report(report, "r.json")) == {("cpu", "x86-amx", "fp32")}
    with pytest.raises(ValueError, match=r"r\.json was measured on kind 'x86-amx'"):
        measured_from_report(report, "r.json", kind="x86")
    with pytest.raises(ValueError, match=r"old\.json records no hardware_kind"):
        measured_from_report({"device": "cpu", "rows": [row]}, "old.json")


@spec(kind="equivalence")
def test_relative_time_is_the_geometric_mean_over_cases_every_kernel_has() -> None:
    """``measured_from_report`` ranks only registry kernels (not torch's ``torch-*`` baselines) and averages log-ratios over the cases where every ranked kernel has a row; a case where one was skipped is left out for all."""

    def row(kernel: str, L: int, ratio: float | None) -> dict[str, object]:
        return {"kernel": kernel, "dtype": "fp32", "seq_len": L, "causal": False,
                "mode": "fwd", "ratio_to_torch_sdpa": ratio}  # fmt: skip

    report = {
        "device": "cpu",
        "rows": [
            row("torch-sdpa", 1, 1.0), row("a", 1, 2.0), row("b", 1, 1.0),
            row("torch-sdpa", 2, 1.0), row("a", 2, 8.0), row("b", 2, 4.0),
            row("torch-sdpa", 3, 1.0), row("a", 3, 100.0), row("b", 3, None),
        ],
    }  # fmt: skip
    (entry,) = measured_from_report(report, "x.json", kind=KIND, digits=None).values()
    assert set(entry.relative_time) == {"a", "b"}
    assert entry.relative_time["a"] == pytest.approx(4.0)  # sqrt(2 * 8)
    assert entry.relative_time["b"] == pytest.approx(2.0)  # sqrt(1 * 4)
