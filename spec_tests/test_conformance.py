"""The attention conformance tool, tested: torch passes it, every planted bug is caught.

A check is trusted only once it has been seen to catch a planted fault, so
``planted_kernels.py`` holds kernels with one bug each (a forgotten scale, causal off by
one, a score matrix in memory, ...) and each must FAIL the property named for it in the
default (quick) run, while ``torch.nn.functional.scaled_dot_product_attention`` itself
passes every core and memory property. The command line, the report and the pytest
plugin are tested as a kernel author meets them.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import planted_kernels
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from transformer.cli import main
from transformer.conformance import PROPERTIES, Settings, run
from transformer.conformance.compare import judge

spec = functools.partial(pytest.mark.spec, component="conformance")
QUICK = Settings("quick", (torch.float32, torch.bfloat16))
HERE = Path(__file__).parent


@spec(section="torch", kind="equivalence")
def test_torch_sdpa_passes_every_core_and_memory_property() -> None:
    """torch's own ``scaled_dot_product_attention`` passes every core and memory property (the suite's core is torch's documented semantics)."""
    report = run(F.scaled_dot_product_attention, QUICK)
    bad = {
        p.prop.name: p.status
        for p in report.properties
        if p.prop.section in ("core", "memory") and p.status not in ("PASS", "NOT RUN")
    }
    assert bad == {}
    assert report.exit_code() == 0


@spec(section="extra", kind="property")
@pytest.mark.parametrize(("name", "caught_by"), sorted(planted_kernels.CAUGHT_BY.items()))
def test_every_planted_bug_is_caught_by_its_property(name: str, caught_by: str) -> None:
    """Each planted-bug kernel FAILs the property named for its bug in the quick tier, and the exit status is 1 (under ``--strict`` for a bug only an extension sees)."""
    report = run(getattr(planted_kernels, name), QUICK)
    failed = [p.prop.name for p in report.failures()]
    assert caught_by in failed, f"{name} was not caught by {caught_by}; failures: {failed}"
    section = PROPERTIES[caught_by].section
    assert report.exit_code(strict=section == "extensions") == 1


def _dropout_rate_notes(dtypes: tuple[torch.dtype, ...]) -> dict[str, str]:
    """The observed drop rates of torch SDPA's dropout-rate cases, by case id."""
    report = run(
        F.scaled_dot_product_attention, Settings("quick", dtypes), properties=["dropout-rate"]
    )
    return {r.case.id: r.detail for p in report.properties for r in p.results}


@spec(section="extra", kind="property")
def test_a_case_draws_the_same_dropout_whatever_ran_before_it() -> None:
    """Each case runs under its own seed, in a fork of torch's random state: the drop rates dropout-rate observes for torch SDPA are the same after another global seed and after the bf16 cases ran first, and the caller's random state is where it was before the run."""
    torch.manual_seed(1)
    first = _dropout_rate_notes((torch.float32,))
    torch.manual_seed(2)
    assert _dropout_rate_notes((torch.float32,)) == first
    after_bf16 = _dropout_rate_notes((torch.bfloat16, torch.float32))
    assert {case: note for case, note in after_bf16.items() if case in first} == first
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    _dropout_rate_notes((torch.float32,))
    assert torch.equal(torch.rand(4), want)


@spec(section="extra", kind="property")
@pytest.mark.parametrize(
    ("name", "root"),
    [
        ("forgets_scale", "default-scale"),
        ("ignores_is_causal", "causal-top-left"),
        ("top_left_for_bottom_right", "causal-bias-objects"),
        ("materialises_scores", "no-score-matrix"),
        # Ranked before the bias objects, which kernels usually turn into a bool mask.
        ("mask_polarity_inverted", "bool-mask"),
        ("writes_into_its_query", "accepts-plain-call"),
        # default-scale fails too, but the output is as wrong with the scale given.
        ("softmax_over_queries", "forward"),
    ],
)
def test_report_names_the_broken_property_first(name: str, root: str, tmp_path: Path) -> None:
    """The report's first failure is the root cause (a forgotten scale is "default-scale", not the many equivalence cases it breaks), in the Markdown and the JSON."""
    code = main(
        [
            "conform",
            f"planted_kernels:{name}",
            "--tier",
            "quick",
            "--report",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 1
    data = json.loads((tmp_path / "conformance.json").read_text())
    assert data["root_cause"] == root
    assert f"Start here: **{root}**" in (tmp_path / "conformance.md").read_text()


@spec(section="extra", kind="shape")
def test_the_console_gives_the_start_here_failure_in_full_with_its_case(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without ``--report`` the command still prints the first failure's whole message under "start here", the case (shapes, dtype, flags) included, not only its first line cut short."""
    argv = ["conform", "planted_kernels:ignores_is_causal", "--tier", "quick", "--quiet"]
    argv += ["--dtypes", "fp32", "--properties", "causal-top-left"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    after = out.split("start here: causal-top-left", 1)[1]
    assert "case: query (2, 2, 17, 32)" in after and "is_causal=True" in after, out


@spec(section="extra", kind="error")
def test_strict_says_why_it_fails_when_core_and_memory_pass(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Under ``--strict`` a run whose core and memory pass but whose other properties are UNSUPPORTED exits 1 and says that --strict is why, after the summary that no core or memory property fails."""
    target = f"{__name__}:_refuses_masks"
    argv = ["conform", target, "--dtypes", "fp32", "--properties", "forward", "bool-mask"]
    assert main([*argv, "--strict"]) == 1
    out = capsys.readouterr().out
    assert "no core or memory property fails" in out
    assert "exit status 1 under --strict" in out


def _hangs_on_long_keys(query: Tensor, key: Tensor, value: Tensor, **kw: object) -> Tensor:
    if key.size(-2) > 40:
        raise KeyboardInterrupt  # what Ctrl-C raises in a call that never returns
    return F.scaled_dot_product_attention(query, key, value, **kw)  # type: ignore[arg-type]


@spec(section="extra", kind="error")
def test_an_interrupted_run_names_the_case_that_was_running_and_reports_what_finished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C during a case (a kernel that hangs on long inputs) ends the run with exit status 130, naming the property and case that were running, and still writes the report of the properties finished before, marked as interrupted."""
    argv = ["conform", f"{__name__}:_hangs_on_long_keys", "--dtypes", "fp32", "--quiet"]
    argv += ["--properties", "output-shape", "explicit-scale", "--report", str(tmp_path)]
    assert main(argv) == 130
    out = capsys.readouterr().out
    assert "interrupted while running explicit-scale on case query (2, 2, 33, 24)" in out, out
    data = json.loads((tmp_path / "conformance.json").read_text())
    assert data["interrupted"].startswith("explicit-scale on case")
    assert [p["name"] for p in data["properties"]] == ["output-shape"]
    assert "**Interrupted**" in (tmp_path / "conformance.md").read_text()


def _doubled_scale_without_scale_argument(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: object = None, **kw: object
) -> Tensor:
    if "scale" in kw:
        raise TypeError("unexpected keyword argument 'scale'")
    factor = 2.0 / math.sqrt(query.size(-1))  # the bug: twice the default scale
    return F.scaled_dot_product_attention(query, key, value, attn_mask, scale=factor, **kw)  # type: ignore[arg-type]


@spec(section="extra", kind="error")
def test_a_scale_bug_of_a_kernel_taking_no_scale_argument_still_fails_default_scale() -> None:
    """default-scale FAILs a kernel whose default scale is wrong even when the kernel refuses the ``scale`` keyword: the probe that asks whether an explicit scale helps is then skipped, not turned into UNSUPPORTED."""
    report = run(_doubled_scale_without_scale_argument, QUICK, properties=["default-scale"])
    (result,) = report.properties
    assert result.status == "FAIL", [r.detail for r in result.results]
    assert report.exit_code() == 1


@spec(section="extra", kind="error")
def test_a_kernel_writing_into_its_inputs_fails_naming_the_input() -> None:
    """A kernel that writes into its query in place (here folding the scale into it, with an output that is right) FAILs every case it runs with a message naming the input it changed, instead of having its mutated input feed the reference (which then judged its right output wrong, or blamed the scale)."""
    report = run(planted_kernels.writes_into_its_query, QUICK, properties=["forward"])
    (result,) = report.properties
    assert result.status == "FAIL" and result.count("FAIL") == len(result.results)
    detail = result.first("FAIL").detail  # type: ignore[union-attr]
    assert "the kernel wrote into its input query (in place)" in detail, detail


def _returns_out_and_lse(query: Tensor, key: Tensor, value: Tensor, **kw: object) -> object:
    out = F.scaled_dot_product_attention(query, key, value, **kw)  # type: ignore[arg-type]
    return out, torch.zeros(out.shape[:-1])


@spec(section="extra", kind="error")
def test_a_kernel_returning_a_tuple_fails_every_property_and_the_run_still_reports() -> None:
    """A kernel returning ``(out, lse)``, as flash kernels often do internally, FAILs each core and memory property it runs with a message saying it returned a tuple, the dropout ones included (which read the result directly); no exception ends the run, so every property gets a line and the report can be written."""
    report = run(_returns_out_and_lse, QUICK)
    judged = [r for r in report.properties if r.prop.section in ("core", "memory") and r.results]
    assert {"forward", "dropout-rate", "dropout-seed"} <= {r.prop.name for r in judged}
    for result in judged:
        assert result.status == "FAIL", (result.prop.name, result.status)
        assert "returned tuple, not a Tensor" in result.first("FAIL").detail  # type: ignore[union-attr]
    assert report.exit_code() == 1


def _forward_only(query: Tensor, key: Tensor, value: Tensor, **kw: object) -> Tensor:
    with torch.no_grad():  # an inference kernel: its output does not require grad
        return F.scaled_dot_product_attention(query, key, value, **kw)  # type: ignore[arg-type]


_CALLS = itertools.count()


def _forward_only_noisy(query: Tensor, key: Tensor, value: Tensor, **kw: object) -> Tensor:
    out = _forward_only(query, key, value, **kw)
    return out + 1e-3 * next(_CALLS)  # another output at every call, whatever the seed


@spec(section="extra", kind="property")
def test_a_kernel_without_a_backward_still_has_its_outputs_checked_for_determinism() -> None:
    """For a kernel with no backward, ``deterministic`` and ``dropout-seed`` still compare the outputs of repeated calls: a kernel adding noise at every call FAILs both, a repeatable one passes them as forward only (before, both were UNSUPPORTED whatever the outputs did)."""
    names = ["deterministic", "dropout-seed"]
    noisy = run(_forward_only_noisy, QUICK, properties=names)
    assert [r.status for r in noisy.properties] == ["FAIL", "FAIL"]
    assert "differs between two" in noisy.properties[0].first("FAIL").detail  # type: ignore[union-attr]
    steady = run(_forward_only, QUICK, properties=names)
    assert [r.status for r in steady.properties] == ["PASS (forward only)"] * 2


@spec(section="extra", kind="property")
def test_two_calls_that_give_the_same_nan_are_deterministic() -> None:
    """Determinism compares NaN-aware: a kernel whose output is NaN at the same elements on every call is deterministic (torch.equal would call NaN != NaN a difference)."""

    def nan_in_first_row(query: Tensor, key: Tensor, value: Tensor, **kw: object) -> Tensor:
        out = F.scaled_dot_product_attention(query, key, value, **kw)  # type: ignore[arg-type]
        return torch.cat([torch.full_like(out[..., :1, :], float("nan")), out[..., 1:, :]], -2)

    report = run(nan_in_first_row, QUICK, properties=["deterministic"])
    (result,) = report.properties
    assert result.status == "PASS", [r.detail for r in result.results]


@spec(section="extra", kind="shape")
def test_failure_names_case_worst_element_values_and_bound() -> None:
    """A failure gives the property's sentence, then the case (shapes, dtype, flags), the worst element's index, both values, and the error against its bound."""
    report = run(
        planted_kernels.ignores_is_causal,
        Settings("quick", (torch.float32,)),
        properties=["causal-top-left"],
    )
    (result,) = report.properties
    detail = result.first("FAIL").detail  # type: ignore[union-attr]
    assert "output[" in detail and "expected" in detail and "> bound" in detail
    assert (
        "case: query (2, 2, 17, 32)" in detail and "is_causal=True" in detail and "fp32" in detail
    )


@spec(section="extra", kind="equivalence")
def test_bound_is_twice_the_reference_error_plus_one_rounding() -> None:
    """FlashAttention's rule: in fp64, an error of 1.5x the reference math's own error passes, 3x fails."""
    exact = torch.linspace(-1, 1, 101, dtype=torch.float64)
    ref_low = exact + 0.01
    assert judge("out", exact + 0.015, exact, ref_low) is None
    mismatch = judge("out", exact + 0.03, exact, ref_low)
    assert mismatch is not None and mismatch.error == pytest.approx(0.03)


def _refuses_everything(*args: object, **kwargs: object) -> torch.Tensor:
    raise NotImplementedError("this kernel only prints")


def _refuses_masks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: object = None,
    **kw: object,
) -> torch.Tensor:
    if attn_mask is not None:
        raise NotImplementedError("no masks here")
    return F.scaled_dot_product_attention(query, key, value, **kw)  # type: ignore[arg-type]


@spec(section="extra", kind="error")
def test_a_refused_feature_is_unsupported_and_fails_only_under_strict() -> None:
    """A kernel that raises NotImplementedError for a feature (here any ``attn_mask``) is UNSUPPORTED there, not FAIL: the exit status is 0, and 1 with ``--strict``."""
    report = run(_refuses_masks, Settings("quick", (torch.float32,)))
    status = {p.prop.name: p.status for p in report.properties}
    assert status["bool-mask"] == status["float-mask"] == "UNSUPPORTED"
    assert status["accepts-plain-call"] == status["forward"] == "PASS"
    assert report.exit_code() == 0 and report.exit_code(strict=True) == 1


@spec(section="extra", kind="error")
def test_a_kernel_refusing_the_plain_call_fails_instead_of_being_unsupported_everywhere() -> None:
    """A kernel that refuses every call (a bug such as a TypeError in its first line looks the same) is not let off as UNSUPPORTED: the core property ``accepts-plain-call`` FAILs with the kernel's error, it leads the report, and the exit status is 1."""
    report = run(_refuses_everything, Settings("quick", (torch.float32,)))
    (plain,) = [p for p in report.properties if p.prop.name == "accepts-plain-call"]
    assert plain.status == "FAIL"
    assert "refused the plain call: NotImplementedError: this kernel only prints" in (
        plain.first("FAIL").detail  # type: ignore[union-attr]
    )
    assert report.failures()[0] is plain
    assert report.exit_code() == 1


@spec(section="extra", kind="shape")
def test_a_property_line_shows_how_many_cases_were_refused_and_why(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The command's line for a property that passed on some cases and was refused on others says how many of each, and the first refusal's reason; an all-refused one gives the reason too."""
    target = "torch.nn.functional:scaled_dot_product_attention"
    assert main(["conform", target, "--dtypes", "fp32", "--properties", "forward"]) == 0
    plain_line = capsys.readouterr().out
    assert "refused" not in plain_line
    code = main(
        [
            "conform",
            f"{__name__}:_refuses_masks",
            "--dtypes",
            "fp32",
            "--properties",
            "forward",
            "bool-mask",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    (mask_line,) = [line for line in lines if "bool-mask" in line]
    assert "UNSUPPORTED" in mask_line and "refused: NotImplementedError: no masks here" in mask_line


@spec(section="extra", kind="error")
@pytest.mark.parametrize("under", ["a file", "a missing folder under a file"])
def test_conform_refuses_a_report_folder_it_could_not_write_before_running(
    under: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--report`` naming a file, or a folder that cannot be made because a file stands in its path, is refused before any case runs: exit status 2 and a message naming ``--report``."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    report = blocker if under == "a file" else blocker / "sub" / "dir"
    target = "torch.nn.functional:scaled_dot_product_attention"
    assert main(["conform", target, "--report", str(report), "--properties", "forward"]) == 2
    captured = capsys.readouterr()
    assert "--report" in captured.err and "conformance of" not in captured.out
    assert blocker.read_text() == "mine"


@spec(section="extra", kind="property")
def test_every_case_of_a_property_has_its_own_id() -> None:
    """No two cases of one property share a pytest id in any tier, so ``-k`` and the report name one case each (cases that differ only in broadcast batch dims or in a mismatched dimension included)."""
    for tier in ("quick", "full", "thorough"):
        settings = Settings(tier, (torch.float64, torch.float32, torch.float16, torch.bfloat16))
        for prop in PROPERTIES.values():
            ids = [case.id for case in prop.cases(settings)]
            assert len(ids) == len(set(ids)), (tier, prop.name, ids)


@spec(section="extra", kind="error")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nowhere.module:fn"], "TARGET"),
        ([".relative_module:fn"], "TARGET"),
        (["torch.nn.functional:scaled_dot_product_attention", "--dtypes", "fp8"], "--dtypes"),
        ([], "either TARGET"),
        (["--kernel", "nope"], "--kernel"),
    ],
)
def test_conform_refuses_bad_arguments_before_running(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``transformer conform`` checks the target, the dtypes and the kernel name before any case runs, exits 2 and names the flag."""
    assert main(["conform", *argv]) == 2
    assert message in capsys.readouterr().err


@spec(section="extra", kind="error")
def test_conform_refuses_a_registered_kernel_not_available_on_the_device(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``conform --kernel NAME`` for a kernel registered but not available on the run's device (``triton`` where it is not installed) exits 2 before any case runs, naming --kernel and the kernels available, instead of reporting a FAIL for every refused call."""
    from transformer import kernel_registry

    def never_called(*args: object, **kwargs: object) -> None:
        raise AssertionError("a case ran")

    monkeypatch.setitem(
        kernel_registry._KERNELS,
        "elsewhere",
        kernel_registry._Entry(never_called, lambda device: False, -1),
    )
    assert main(["conform", "--kernel", "elsewhere", "--tier", "quick"]) == 2
    err = capsys.readouterr().err
    assert "--kernel elsewhere: not available on cpu" in err and "reference" in err


@spec(section="extra", kind="error")
def test_conform_never_overwrites_a_report_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A report folder that already holds a report is refused (naming ``--force``), and left as it was."""
    (tmp_path / "conformance.md").write_text("mine")
    target = "torch.nn.functional:scaled_dot_product_attention"
    assert main(["conform", target, "--report", str(tmp_path), "--properties", "output-shape"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "conformance.md").read_text() == "mine"
    assert (
        main(
            [
                "conform",
                target,
                "--report",
                str(tmp_path),
                "--properties",
                "output-shape",
                "--force",
                "--quiet",
            ]
        )
        == 0
    )
    assert "output-shape" in (tmp_path / "conformance.md").read_text()


@spec(section="extra", kind="shape")
def test_pytest_plugin_runs_the_suite_on_an_outside_kernel_from_an_empty_folder(
    tmp_path: Path,
) -> None:
    """``pytest --attention-kernel package.module:function`` in a folder without tests collects the suite through the entry point and fails on the planted bug."""
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--attention-kernel",
        "planted_kernels:forgets_scale",
        "--conformance-dtypes",
        "fp32",
        "-k",
        "default-scale or output-shape",
    ]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "default-scale" in proc.stdout and "no scale at all" in proc.stdout
    assert "4 passed" in proc.stdout  # the output-shape cases, in fp32


@spec(section="extra", kind="error")
@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--conformance-memory-length", "0"], "--conformance-memory-length must be a positive"),
        (["--conformance-device", "cuda"], "--conformance-device cuda: torch sees no CUDA device"),
    ],
    ids=["memory-length", "cuda"],
)
def test_the_plugin_refuses_bad_options_before_collecting(
    tmp_path: Path, option: list[str], message: str
) -> None:
    """A non-positive ``--conformance-memory-length``, or ``--conformance-device cuda`` where torch sees no CUDA device, ends the pytest run with a usage error naming the option (exit status 4) before any case runs."""
    if option[0] == "--conformance-device" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "--attention-kernel", "planted_kernels:forgets_scale", *option]  # fmt: skip
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "passed" not in proc.stdout and "failed" not in proc.stdout


@spec(section="extra", kind="shape")
def test_the_plugins_memory_length_sets_the_length_of_the_memory_cases(tmp_path: Path) -> None:
    """``--conformance-memory-length N`` makes the memory property's cases L = S = N, as ``transformer conform --memory-length`` does."""
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
            "--attention-kernel", "torch.nn.functional:scaled_dot_product_attention",
            "--conformance-dtypes", "fp32", "--conformance-memory-length", "384",
            "-k", "no-score-matrix"]  # fmt: skip
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "L384-S384" in proc.stdout and "L2048" not in proc.stdout


@spec(section="extra", kind="error")
def test_without_the_option_the_plugin_adds_nothing(tmp_path: Path) -> None:
    """Installed, the plugin is inert: a pytest run without ``--attention-kernel`` collects no conformance case."""
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout
