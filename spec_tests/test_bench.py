"""The attention benchmark (``transformer bench attention``): report schema, files, errors, memory.

Benchmarks measure and never assert on time; these tests run them at tiny sizes and
pin what a user relies on: the JSON report's fields, the plot, skipped combinations
saying why, and one-line errors with exit code 2 for bad requests.
"""

from __future__ import annotations

import functools
import io
import json
import platform
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from transformer import attention, bench, bench_device, kernel_registry
from transformer.bench import BenchError, format_table, run_attention_bench
from transformer.cli import main
from transformer.kernel_choice import hardware_kind

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
    "percent_of_peak",
    "ratio_to_torch_sdpa",
    "peak_memory_mib",
    "memory_note",
    "skipped",
}


@spec(kind="shape")
def test_bench_writes_json_report_and_plot_with_every_kernel_row(tmp_path: Path) -> None:
    """run_attention_bench writes attention-cpu.json (device, torch version, hardware and its kind as kernel_choice names it, the vector instruction set torch reports, config, one row per kernel x dtype x length x causal x mode, the modes fwd, bwd and fwd+bwd) and a PNG plot."""
    sizes = {**TINY, "seq_lens": (16,), "repeats": 1}
    report = run_attention_bench(dtypes=("fp32",), out=str(tmp_path), log=None, **sizes)
    written = json.loads((tmp_path / "attention-cpu.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert {"device", "hardware", "torch", "config", "rows", "memory_method"} <= set(written)
    assert written["device"] == "cpu"
    assert written["hardware_kind"] == hardware_kind("cpu")
    assert written["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    png = tmp_path / "attention-cpu.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kernels = {r["kernel"] for r in written["rows"]}
    assert {"chunked", "reference", "torch-sdpa", "torch-mha"} <= kernels
    combos = {(r["kernel"], r["seq_len"], r["causal"], r["mode"]) for r in written["rows"]}
    assert len(combos) == len(written["rows"]) == len(kernels) * 1 * 2 * 3
    assert {r["mode"] for r in written["rows"]} == {"fwd", "bwd", "fwd+bwd"}
    for row in written["rows"]:
        assert set(row) == ROW_FIELDS
        assert row["skipped"] is None, row
        assert len(row["times_ms"]) == sizes["repeats"]
        assert row["median_ms"] > 0 and row["gflops"] > 0 and row["peak_memory_mib"] >= 0
        assert row["percent_of_peak"] is None  # no peak is known for a CPU
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
    table = format_table(report).splitlines()
    (line,) = [t for t in table if t.startswith("reference ") and " 33 " in t]
    assert line.endswith(f"skipped: {rows['reference']['skipped']}")


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
        (["--modes", "backward"], "unknown mode"),
        (["--batch", "0"], "--batch 0"),
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
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch", "0"], "--batch 0"),
        (["--heads", "-1"], "--heads -1"),
        (["--head-dim", "0"], "--head-dim 0"),
        (["--rounds", "0"], "--rounds 0"),
        (["--min-run-time", "-1"], "--min-run-time must be > 0"),
        (["--seq-lens", ""], "--seq-lens: no length given"),
    ],
)
def test_bench_torch_wrapper_bad_arguments_exit_2_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``transformer bench torch-wrapper`` refuses sizes below 1, a non-positive ``--min-run-time`` and an empty ``--seq-lens`` with one error line naming the flag and exit code 2, before any timing (it used to time empty tensors, or fail inside torch)."""
    code = main(["bench", "torch-wrapper", "--seq-lens", "8", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err


@spec(kind="error")
@pytest.mark.parametrize("command", ["attention", "torch-wrapper"])
def test_bench_out_is_checked_before_timing_and_never_overwritten_without_force(
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--out`` that cannot be made (a file in its path), or that holds the report of an earlier run, is refused with one line naming ``--out`` (and ``--force``) and exit code 2 before any timing; the earlier report is left as it was, and ``--force`` replaces it."""
    import transformer.bench as bench

    calls: list[str] = []
    monkeypatch.setattr(bench, "run_attention_bench", lambda **kw: calls.append("attention"))
    monkeypatch.setattr(bench, "run_wrapper_bench", lambda **kw: calls.append("torch-wrapper"))
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    argv = ["bench", command, "--seq-lens", "8"]
    assert main([*argv, "--out", str(blocker / "sub")]) == 2
    assert "--out" in capsys.readouterr().err
    name = "attention-cpu.json" if command == "attention" else "torch-wrapper-cpu.json"
    (tmp_path / name).write_text("earlier")
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and name in err and len(err.strip().splitlines()) == 1
    assert calls == [] and (tmp_path / name).read_text() == "earlier"
    assert main([*argv, "--out", str(tmp_path), "--force"]) == 0
    assert calls == [command]


@spec(kind="error")
def test_bench_cli_cuda_without_cuda_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Asking for --device cuda where CUDA is unavailable prints one error line and exits with code 2."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the error cannot occur")
    code = main(["bench", "attention", "--device", "cuda", "--seq-lens", "8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "CUDA is not available" in err and len(err.splitlines()) == 1


@spec(kind="error")
def test_bench_compile_without_triton_exits_2_saying_it_is_needed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``transformer bench compile`` where triton cannot be imported prints one error line saying it needs triton and exits with code 2 (the report itself is tested in test_triton_offline.py)."""
    import sys

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    code = main(["bench", "compile", "--head-dims", "64", "--configs", "smallest"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "bench compile: error: compile_offline needs triton installed" in err


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


@spec(kind="shape")
def test_a_kernel_failing_on_some_combinations_is_skipped_there_and_measured_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel that raises on some combinations (here every causal call) gets those rows skipped with the error's first line, in the report and the table, while its other rows and the other kernels are measured and plotted."""
    monkeypatch.setattr(kernel_registry, "_KERNELS", dict(kernel_registry._KERNELS))

    def no_causal(query, key, value, *, is_causal=False, **kwargs):  # type: ignore[no-untyped-def]
        if is_causal:
            raise NotImplementedError("no causal masking here\nsecond line")
        return attention.reference_attention(query, key, value, is_causal=is_causal, **kwargs)

    attention.register_kernel("no-causal", no_causal)
    printed: list[str] = []
    sizes = {**TINY, "seq_lens": (16,), "repeats": 1}
    report = run_attention_bench(
        kernels=("no-causal",),
        dtypes=("fp32",),
        modes=("fwd",),
        out=str(tmp_path),
        log=printed.append,
        **sizes,
    )
    rows = {(r["kernel"], r["causal"]): r for r in report["rows"]}
    assert set(rows) == {(k, c) for k in ("no-causal", "torch-sdpa") for c in (False, True)}
    failed = rows[("no-causal", True)]
    assert (failed["skipped"], failed["median_ms"]) == ("error: no causal masking here", None)
    for key in [("no-causal", False), ("torch-sdpa", False), ("torch-sdpa", True)]:
        assert rows[key]["skipped"] is None and rows[key]["median_ms"] > 0, key
    table = printed[-1].splitlines()
    assert [t for t in table if t.endswith("skipped: error: no causal masking here")] == [
        t for t in table if t.startswith("no-causal") and " True " in t
    ]
    assert (tmp_path / "attention-cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@spec(kind="error")
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"device": "tpu"}, "--device must be cpu or cuda, got 'tpu'"),
        (
            {"seq_lens": (16, 0), "head_dim": -1},
            "sizes must be >= 1, got --head-dim -1, --seq-lens 0",
        ),
    ],
    ids=["device", "sizes"],
)
def test_bench_rejects_an_unknown_device_and_sizes_below_one(
    overrides: dict[str, object], message: str
) -> None:
    """An unknown device or any size below 1 raises BenchError naming what was asked, before anything runs."""
    with pytest.raises(BenchError, match=re.escape(message)):
        run_attention_bench(log=None, **{**TINY, **overrides})  # type: ignore[arg-type]


@spec(kind="error")
def test_bench_cli_rejects_a_list_that_is_not_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    """`--seq-lens 16,x` exits 2 with argparse's one-line error quoting the list."""
    with pytest.raises(SystemExit) as info:
        main(["bench", "attention", "--seq-lens", "16,x"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "argument --seq-lens: invalid list '16,x'" in err[-1]


@spec(kind="shape")
@pytest.mark.parametrize(
    "cpuinfo", [None, "processor\t: 0\nBogoMIPS\t: 50.00\n"], ids=["no-proc", "no-model-name"]
)
def test_without_proc_the_report_uses_the_platform_name_and_an_8_gib_memory_guess(
    monkeypatch: pytest.MonkeyPatch, cpuinfo: str | None
) -> None:
    """Where /proc is absent (macOS, Windows) or /proc/cpuinfo names no model (some ARM machines), the report names the platform's processor (or machine) as its hardware, and without /proc/meminfo it guesses 8 GiB of free memory, instead of failing."""
    real_open = open

    def fake_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path) == "/proc/cpuinfo" and cpuinfo is not None:
            return io.StringIO(cpuinfo)
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    # bench_device reads /proc for the hardware name and the free memory.
    monkeypatch.setattr(bench_device, "open", fake_open, raising=False)
    assert bench_device._free_memory("cpu") == 8 * 2**30
    report = run_attention_bench(
        kernels=("reference",),
        dtypes=("fp32",),
        modes=("fwd",),
        causal=(False,),
        log=None,
        **{**TINY, "seq_lens": (8,), "repeats": 1},
    )
    assert report["hardware"] == (platform.processor() or platform.machine())


@pytest.mark.cuda
@spec(kind="shape")
def test_bench_on_cuda_reports_the_gpu_and_its_allocator_peak() -> None:
    """On a CUDA device the report names the GPU, measures peak memory with torch.cuda's allocator statistics and budgets from the GPU's free memory."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    report = run_attention_bench(
        device="cuda",
        kernels=("reference",),
        dtypes=("fp32",),
        modes=("fwd",),
        causal=(False,),
        log=None,
        **{**TINY, "seq_lens": (64,), "repeats": 1},
    )
    assert report["hardware"] == torch.cuda.get_device_name()
    assert report["memory_method"] == "torch.cuda.max_memory_allocated beyond inputs"
    for row in report["rows"]:
        assert row["skipped"] is None and row["median_ms"] > 0, row
        assert row["peak_memory_mib"] > 0, row  # the reference's (L, S) scores at least


@spec(kind="property")
def test_bwd_mode_runs_the_backward_alone_over_one_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mode "bwd" runs the candidate's forward once, when the closure is built, and each call only its backward (so backward time is not forward + backward); "fwd+bwd" runs one forward per call."""
    monkeypatch.setattr(kernel_registry, "_KERNELS", dict(kernel_registry._KERNELS))
    forwards: list[int] = []

    def counting(query, key, value, **kwargs):  # type: ignore[no-untyped-def]
        forwards.append(1)
        return attention.reference_attention(query, key, value, **kwargs)

    attention.register_kernel("counting", counting)
    sizes = {"batch": 1, "heads": 2, "head_dim": 8, "seq_len": 16}
    backward_only = bench.make_attention_call("counting", mode="bwd", **sizes)
    assert len(forwards) == 1
    for _ in range(3):
        backward_only()  # repeats over the retained graph
    assert len(forwards) == 1
    both = bench.make_attention_call("counting", mode="fwd+bwd", **sizes)
    assert len(forwards) == 1  # building the closure runs nothing
    for _ in range(3):
        both()
    assert len(forwards) == 4
    with pytest.raises(ValueError, match=r"mode must be one of .*got 'backward'"):
        bench.make_attention_call("counting", mode="backward", **sizes)


@spec(kind="shape")
def test_sdpa_backends_are_pinned_one_by_one_and_refusals_are_skipped() -> None:
    """The torch-sdpa-<backend> candidates run torch SDPA restricted to one backend each: on the CPU the math backend is measured, while the efficient and cuDNN backends, which have no CPU implementation, are reported as skipped with torch's error."""
    backends = ("torch-sdpa-math", "torch-sdpa-efficient", "torch-sdpa-cudnn")
    report = run_attention_bench(
        kernels=backends, dtypes=("fp32",), modes=("fwd",), causal=(False,), log=None, **TINY
    )
    rows = {(r["kernel"], r["seq_len"]): r for r in report["rows"]}
    for L in TINY["seq_lens"]:
        assert rows[("torch-sdpa-math", L)]["median_ms"] > 0
        for refused in ("torch-sdpa-efficient", "torch-sdpa-cudnn"):
            assert rows[(refused, L)]["skipped"].startswith("error: "), rows[(refused, L)]
    assert {r["kernel"] for r in report["rows"]} == {*backends, "torch-sdpa"}
    default = bench._candidates(bench.BenchConfig(device="cpu"))
    assert not set(default) & set(bench.SDPA_BACKENDS)  # pinned backends only when asked on CPU


@spec(kind="property")
def test_percent_of_peak_is_the_achieved_share_of_the_given_peak(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With ``--peak-tflops P`` every measured row reports ``100 * achieved / P`` percent (GFLOP/s against P TFLOP/s), shown in the table's "% peak" column; a peak that is not positive exits 2."""
    report = run_attention_bench(
        kernels=("reference",), dtypes=("fp32",), modes=("fwd",), peak_tflops=0.5, log=None,
        **TINY,
    )  # fmt: skip
    for row in report["rows"]:
        assert row["percent_of_peak"] == pytest.approx(100 * row["gflops"] / 500.0)
    assert report["peak_tflops"] == 0.5
    assert "% peak" in format_table(report)
    code = main(["bench", "attention", "--seq-lens", "8", "--peak-tflops", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--peak-tflops must be > 0, got 0.0" in err


@spec(kind="property")
def test_peak_table_matches_gpu_names_most_specific_first() -> None:
    """The bf16 peak comes from the first table entry whose name occurs in the GPU's name, so an "H100 PCIe" is not taken for the SXM part, and unknown GPUs have no peak."""
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bench.peak_tflops("NVIDIA H200") == 989.4
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("Some Future GPU") is None


def _load_cuda_flash_bench() -> object:
    """benchmarks/cuda_flash_bench.py as a fresh module (a script, not part of the package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cuda_flash_bench.py"
    module_spec = importlib.util.spec_from_file_location("cuda_flash_bench_under_test", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@spec(kind="shape")
def test_cuda_flash_bench_runs_end_to_end_as_a_cpu_dry_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The GPU benchmark script, run with ``--cpu-dry-run``, writes its JSON report: one row per provider x head dim x length x causal flag, each measured provider with ms, TFLOP/s and % of peak for fwd, bwd and fwd+bwd and its distance to torch's default SDPA, a refusing backend with its error; without the flag and without CUDA it exits 2."""
    import torch

    script = _load_cuda_flash_bench()
    out = tmp_path / "dry.json"
    argv = ["--cpu-dry-run", "--seq-lens", "32", "--head-dims", "16", "--batch", "1",
            "--heads", "2", "--warmup", "0", "--iters", "1", "--peak-tflops", "1",
            "--providers", "torch-math", "torch-efficient", "--out", str(out)]  # fmt: skip
    assert script.main(argv) == 0  # type: ignore[attr-defined]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu-dry-run" and "wall clock" in report["timing"]
    rows = report["results"]
    assert [(r["provider"], r["causal"]) for r in rows] == [
        ("torch-math", False), ("torch-efficient", False),
        ("torch-math", True), ("torch-efficient", True),
    ]  # fmt: skip
    for row in rows:
        if row["provider"] == "torch-efficient":  # no CPU implementation
            assert row["error"].startswith("RuntimeError: "), row
            continue
        assert row["max_abs_diff_vs_torch_default"] < 1e-2  # bf16, the same math
        for mode in ("fwd", "bwd", "fwd+bwd"):
            assert row[mode]["ms"] > 0 and row[mode]["tflops"] > 0
            assert row[mode]["pct_of_peak"] == pytest.approx(100 * row[mode]["tflops"] / 1.0)
    if not torch.cuda.is_available():
        assert _load_cuda_flash_bench().main(["--seq-lens", "32"]) == 2  # type: ignore[attr-defined]
        assert "no CUDA device" in capsys.readouterr().err


def _planted_kernel(L: int, S: int, on_worker: bool):  # type: ignore[no-untyped-def]
    """A kernel that holds an (L, S) fp32 buffer for a moment (on a worker thread if asked), then returns the reference's answer."""
    import threading

    import torch

    def planted(query, key, value, **kwargs):  # type: ignore[no-untyped-def]
        def hold() -> None:
            buffer = torch.ones(L, S)  # (L, S): freed before the kernel returns
            buffer.mul_(2.0)

        if on_worker:
            worker = threading.Thread(target=hold)
            worker.start()
            worker.join()
        else:
            hold()
        return attention.reference_attention(query, key, value, **kwargs)

    return planted


@spec(kind="property")
@pytest.mark.parametrize("on_worker", [False, True], ids=["calling-thread", "worker-thread"])
def test_cpu_peak_memory_counts_a_buffer_a_kernel_frees_before_returning(
    monkeypatch: pytest.MonkeyPatch, on_worker: bool
) -> None:
    """The CPU peak-memory column counts every allocation a kernel makes through torch's allocator, also one it frees before returning and also one made on a worker thread: a kernel that holds an L x S fp32 buffer internally reports at least L * S * 4 bytes, where its output alone is 64 times smaller."""
    monkeypatch.setattr(kernel_registry, "_KERNELS", dict(kernel_registry._KERNELS))
    L = S = 512
    attention.register_kernel("planted", _planted_kernel(L, S, on_worker))
    report = run_attention_bench(
        kernels=("planted",), dtypes=("fp32",), modes=("fwd",), causal=(False,), log=None,
        **{**TINY, "seq_lens": (L,)},
    )  # fmt: skip
    rows = {r["kernel"]: r for r in report["rows"]}
    planted = rows["planted"]
    assert planted["peak_memory_mib"] >= L * S * 4 / 2**20, planted
    assert planted["memory_note"] is None  # a Python kernel: all its buffers are tensors


@spec(kind="property")
def test_cpu_peak_memory_counts_the_chunked_kernels_tile_buffers_on_its_worker_threads() -> None:
    """With two torch threads the chunked kernel runs its tiles on worker threads; the peak still includes their score tiles, so it exceeds the output (B, H, L, E) alone."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        call = bench.make_attention_call("chunked", batch=2, heads=4, seq_len=1024, head_dim=64)
        call()
        peak = bench.cpu_peak_bytes(call)
    finally:
        torch.set_num_threads(threads)
    output = 2 * 4 * 1024 * 64 * 4
    assert peak is not None and peak > 2 * output, (peak, output)


@spec(kind="property")
def test_cpu_memory_measurement_keeps_allocator_and_profiler_logs_off_the_terminal(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Measuring CPU peak memory prints nothing to stdout or stderr: c10's per-allocation log lines go to a temporary file and are parsed there, and no profiler banner is written."""
    import torch

    def allocate() -> None:
        torch.ones(256, 256).sum()

    capfd.readouterr()
    assert bench.cpu_peak_bytes(allocate) >= 256 * 256 * 4  # type: ignore[operator]
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)


@spec(kind="shape")
def test_torch_candidates_peak_memory_is_marked_as_possibly_missing_fused_scratch() -> None:
    """Rows of torch's fused candidates (torch-sdpa, the "torch" kernel) carry a memory note, shown as a footnote mark after their figure and a footnote line in the table; the Python kernels' rows carry none, and the table states the method."""
    report = run_attention_bench(
        kernels=("torch", "reference"), dtypes=("fp32",), modes=("fwd",), causal=(False,),
        log=None, **{**TINY, "seq_lens": (16,)},
    )  # fmt: skip
    rows = {r["kernel"]: r for r in report["rows"]}
    assert rows["torch-sdpa"]["memory_note"] == rows["torch"]["memory_note"] == bench.FUSED_NOTE
    assert rows["reference"]["memory_note"] is None
    table = format_table(report).splitlines()
    (sdpa_line,) = [t for t in table if t.startswith("torch-sdpa ")]
    (ref_line,) = [t for t in table if t.startswith("reference ")]
    assert sdpa_line.endswith("*") and not ref_line.endswith("*")
    assert f"* {bench.FUSED_NOTE}" in table
    assert f"peak MiB: {bench.CPU_MEMORY_METHOD}" in table


@spec(kind="shape")
def test_torch_wrapper_bench_reports_ratios_to_raw_sdpa_and_writes_json(tmp_path: Path) -> None:
    """``transformer bench torch-wrapper`` times raw torch SDPA, the "torch" kernel function and the front door with kernel="torch" side by side and writes, per length and causal flag, each one's median time and median ratio to raw SDPA (raw SDPA's own ratio is 1)."""
    code = main(["bench", "torch-wrapper", "--seq-lens", "16", "--batch", "1", "--heads", "1",
                 "--head-dim", "4", "--rounds", "1", "--min-run-time", "0.01",
                 "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "torch-wrapper-cpu.json").read_text())
    assert [(r["seq_len"], r["causal"]) for r in report["rows"]] == [(16, False), (16, True)]
    for row in report["rows"]:
        assert row["sdpa_ratio"] == row["sdpa_best_ratio"] == 1.0
        for name in bench.WRAPPER_CANDIDATES:
            assert row[f"{name}_ms"] > 0 and row[f"{name}_ratio"] > 0, row
    assert main(["bench", "torch-wrapper", "--rounds", "0"]) == 2


@spec(kind="shape")
def test_torch_wrapper_bench_times_the_dtype_given_by_dtype(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``transformer bench torch-wrapper --dtype bf16`` times bf16 inputs: every call of the three candidates gets bf16 query, key and value, and the report's config says bf16; an unknown dtype exits 2 naming --dtype."""
    seen: set[torch.dtype] = set()
    real = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.add(q.dtype)
        return real(q, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    code = main(["bench", "torch-wrapper", "--seq-lens", "16", "--batch", "1", "--heads", "1",
                 "--head-dim", "4", "--rounds", "1", "--min-run-time", "0.01", "--dtype", "bf16",
                 "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    assert seen == {torch.bfloat16}
    assert (
        json.loads((tmp_path / "torch-wrapper-cpu.json").read_text())["config"]["dtype"] == "bf16"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "torch-wrapper", "--dtype", "fp8"])
    assert exit_info.value.code == 2


def _synthetic_report(dtypes: tuple[str, ...], kernels: tuple[str, ...]) -> dict[str, object]:
    """A report with every kernel x dtype x causal x mode x length row measured (no timing)."""
    rows = [
        {
            "kernel": kernel,
            "dtype": dtype,
            "causal": causal,
            "mode": mode,
            "seq_len": seq_len,
            "median_ms": seq_len * (k + 1) / 100,
            "peak_memory_mib": 1.0,
            "skipped": None,
        }
        for k, kernel in enumerate(kernels)
        for dtype in dtypes
        for causal in (False, True)
        for mode in ("fwd+bwd", "bwd", "fwd")  # not the figure's order, on purpose
        for seq_len in (128, 256, 512)
    ]
    return {"rows": rows, "hardware": "test", "torch": "0"}


@spec(kind="shape")
def test_bench_figure_is_a_grid_of_modes_by_dtype_and_causal() -> None:
    """The figure has a row per mode (forward, backward, forward+backward, in that order) and a column per dtype x causal, with one shared legend outside the axes and a marker per kernel."""
    kernels = ("chunked", "reference", "torch-mha", "torch-sdpa", "flash")
    fig = bench.attention_figure(_synthetic_report(("fp16", "bf16"), kernels))
    axes = fig.axes
    assert len(axes) == 3 * 4
    grid = axes[0].get_subplotspec().get_gridspec()
    assert (grid.nrows, grid.ncols) == (3, 4)
    assert [axes[4 * i].get_ylabel().split("\n")[0] for i in range(3)] == [
        "forward",
        "backward",
        "forward+backward",
    ]
    assert [ax.get_title() for ax in axes[:4]] == [
        "fp16, full",
        "fp16, causal",
        "bf16, full",
        "bf16, causal",
    ]
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in axes)
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == sorted(kernels)
    markers = {line.get_label(): line.get_marker() for line in axes[0].get_lines()}
    assert len(set(markers.values())) == len(kernels)


@spec(kind="shape")
def test_bench_png_fits_a_laptop_screen(tmp_path: Path) -> None:
    """The bench PNG of three dtypes x causal x three modes is at most 1600 x 1000 pixels."""
    from PIL import Image

    png = tmp_path / "attention.png"
    bench._plot(_synthetic_report(("fp16", "bf16", "fp32"), ("chunked", "reference")), png)
    with Image.open(png) as image:
        width, height = image.size
    assert width <= 1600 and height <= 1000, (width, height)
