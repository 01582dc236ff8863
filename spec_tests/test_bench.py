"""The attention benchmark (``transformer bench attention``, SPEC §7): report schema, files, errors.

Benchmarks measure and never assert on time; these tests run them at tiny sizes and
pin what a user relies on: the JSON report's fields, the plot, skipped combinations
saying why, and one-line errors with exit code 2 for bad requests.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from transformer.bench import BenchError, run_attention_bench
from transformer.cli import main

spec = functools.partial(pytest.mark.spec, component="bench", section="extra")

TINY = {"seq_lens": (16, 33), "batch": 1, "heads": 2, "head_dim": 8, "repeats": 2, "warmup": 0}
ROW_FIELDS = {
    "kernel",
    "dtype",
    "seq_len",
    "causal",
    "mode",
    "median_ms",
    "times_ms",
    "gflops",
    "ratio_to_torch_sdpa",
    "peak_memory_mib",
    "skipped",
}


@spec(kind="shape")
def test_bench_writes_json_report_and_plot_with_every_kernel_row(tmp_path: Path) -> None:
    """run_attention_bench writes attention-cpu.json (device, torch version, hardware, config, one row per kernel x dtype x length x causal x mode) and a PNG plot."""
    sizes = {**TINY, "seq_lens": (16,), "repeats": 1}
    report = run_attention_bench(dtypes=("fp32",), out=str(tmp_path), log=None, **sizes)
    written = json.loads((tmp_path / "attention-cpu.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert {"device", "hardware", "torch", "config", "rows", "memory_method"} <= set(written)
    assert written["device"] == "cpu"
    png = tmp_path / "attention-cpu.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kernels = {r["kernel"] for r in written["rows"]}
    assert {"chunked", "reference", "torch-sdpa", "torch-mha"} <= kernels
    combos = {(r["kernel"], r["seq_len"], r["causal"], r["mode"]) for r in written["rows"]}
    assert len(combos) == len(written["rows"]) == len(kernels) * 1 * 2 * 2
    for row in written["rows"]:
        assert set(row) == ROW_FIELDS
        assert row["skipped"] is None, row
        assert len(row["times_ms"]) == sizes["repeats"]
        assert row["median_ms"] > 0 and row["gflops"] > 0 and row["peak_memory_mib"] >= 0
        if row["kernel"] == "torch-sdpa":
            assert row["ratio_to_torch_sdpa"] == 1.0


@spec(kind="shape")
def test_bench_skips_combinations_predicted_to_exceed_memory_and_says_so() -> None:
    """A combination predicted to need more memory than the budget is skipped with a reason, not run; O(L) kernels still run."""
    report = run_attention_bench(
        kernels=("reference", "chunked"),
        dtypes=("fp32",),
        modes=("fwd",),
        causal=(False,),
        memory_budget_bytes=32 * 1024,
        log=None,
        **TINY,
    )
    rows = {r["kernel"]: r for r in report["rows"] if r["seq_len"] == 33}
    assert rows["reference"]["skipped"] and "predicted" in rows["reference"]["skipped"]
    assert rows["reference"]["median_ms"] is None
    assert rows["chunked"]["skipped"] is None and rows["chunked"]["median_ms"] > 0


@spec(kind="error")
def test_bench_rejects_unknown_kernel_naming_it() -> None:
    """An unknown kernel name raises BenchError (a ValueError) naming it and listing the known ones."""
    with pytest.raises(BenchError, match=r"unknown kernel\(s\) no-such.*known: .*chunked"):
        run_attention_bench(kernels=("no-such",), log=None, **TINY)


@spec(kind="error")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kernels", "no-such"], "unknown kernel"),
        (["--dtypes", "fp8"], "unknown dtype"),
        (["--modes", "bwd"], "unknown mode"),
        (["--batch", "0"], "batch=0"),
    ],
)
def test_bench_cli_bad_arguments_exit_2_with_one_line_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``transformer bench attention`` with a bad argument prints one error line naming it and exits with code 2."""
    code = main(["bench", "attention", "--seq-lens", "8", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err


@spec(kind="error")
def test_bench_cli_cuda_without_cuda_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Asking for --device cuda where CUDA is unavailable prints one error line and exits with code 2."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the error cannot occur")
    code = main(["bench", "attention", "--device", "cuda", "--seq-lens", "8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "CUDA is not available" in err and len(err.splitlines()) == 1


@spec(kind="shape")
def test_bench_cli_runs_and_writes_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``transformer bench attention --out DIR`` at tiny sizes exits 0, prints the table and writes the JSON report."""
    code = main(
        [
            "bench",
            "attention",
            "--kernels",
            "chunked",
            "--seq-lens",
            "16",
            "--dtypes",
            "fp32",
            "--batch",
            "1",
            "--heads",
            "1",
            "--head-dim",
            "4",
            "--modes",
            "fwd",
            "--causal",
            "yes",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert "chunked" in capsys.readouterr().out
    rows = json.loads((tmp_path / "attention-cpu.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"chunked", "torch-sdpa"}
