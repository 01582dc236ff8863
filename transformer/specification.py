"""The executable specification as a document: the spec tests, rendered and checked.

Every test in ``spec_tests/`` and ``property_tests/`` carries
``@pytest.mark.spec(component=..., section=..., kind=...)`` and states the property it
proves in the first sentence of its docstring. The machinery lives in four modules:

* :mod:`transformer.spec_components`: the vocabulary of those tags in ONE place,
  :data:`COMPONENTS` (with the kinds of test each must have, and the reason wherever a
  kind does not apply), :data:`SECTIONS` (the paper's sections, ``"torch"`` and
  ``"extra"``) and :data:`KINDS`;
* :mod:`transformer.spec_records`: the records of tests, their statements and the
  coverage-matrix checks over them;
* :mod:`transformer.spec_scanner`: reading test files without importing them
  (:func:`scan_tests`, AST only), so the coverage matrix can be checked whatever subset
  of tests a run selects;
* :mod:`transformer.spec_documents`: ``specification.md`` and a self-contained
  ``specification.html``, built from the records.

This module records a pytest run (:class:`SpecRecorder`, a pytest plugin object): each
test's tag, ``path:line``, statement and outcome, its parametrized cases aggregated into
one line; and adds ``transformer spec [--out DIR] [-- PYTEST_ARGS...]`` to the command
line (:func:`add_spec_parser`, hooked in by :mod:`transformer.cli`), which runs the tests
and writes the documents (:func:`run_spec`). The names of the four modules are importable
from here too.

pytest is imported only when a run starts: it is a test dependency, not a runtime one.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The public names of the four modules stay importable from here, where they were
# defined before the split: callers and tests reach the whole machinery through this module.
from transformer.spec_components import (  # noqa: F401
    BASE_REQUIRED,
    COMPONENT_BY_NAME,
    COMPONENTS,
    KINDS,
    PAPER_SECTIONS,
    SECTIONS,
    Component,
    tag_problems,
)
from transformer.spec_documents import (  # noqa: F401
    Block,
    Cell,
    Heading,
    Paragraph,
    RunInfo,
    Table,
    build_document,
    render_html,
    render_markdown,
    write_documents,
)
from transformer.spec_records import (  # noqa: F401
    ScannedTest,
    Tagged,
    TestRecord,
    _as_str,
    coverage_counts,
    first_sentence,
    format_missing,
    format_missing_modules,
    missing_kinds,
    missing_modules,
    undeclared_modules,
)
from transformer.spec_scanner import (
    scan_tests,
)

if TYPE_CHECKING:
    import pytest

__all__ = [
    "COMPONENTS",
    "KINDS",
    "SECTIONS",
    "Component",
    "RunInfo",
    "ScannedTest",
    "SpecRecorder",
    "TestRecord",
    "add_spec_parser",
    "coverage_counts",
    "first_sentence",
    "format_missing",
    "format_missing_modules",
    "missing_kinds",
    "missing_modules",
    "render_html",
    "render_markdown",
    "run_spec",
    "scan_tests",
    "tag_problems",
    "undeclared_modules",
]

# ---------------------------------------------------------------------- the run recorder


class SpecRecorder:
    """pytest plugin object: records each test's spec tag, location, statement and outcome.

    Pass it to ``pytest.main(args, plugins=[recorder])``; afterwards :meth:`records` has
    one :class:`TestRecord` per test function (parametrized cases aggregated), deselected
    tests included as ``"not run"``, and :attr:`rootpath` is the run's root directory.
    """

    def __init__(self) -> None:
        self.rootpath: Path | None = None
        self._records: dict[str, TestRecord] = {}
        self._test_of_case: dict[str, str] = {}
        self._outcome_of_case: dict[str, str] = {}
        self._skip_reason_of_case: dict[str, str] = {}

    def records(self) -> list[TestRecord]:
        """The records of the run, in collection order, with their case counts."""
        for record in self._records.values():
            record.counts = Counter()
            record.skip_reason = ""
        for case, test in self._test_of_case.items():
            record = self._records[test]
            record.counts[self._outcome_of_case.get(case, "not run")] += 1
            reason = self._skip_reason_of_case.get(case, "")
            if reason and not record.skip_reason:
                record.skip_reason = reason
        return list(self._records.values())

    # pytest hooks (matched by name; see the pytest reference of hooks).

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.rootpath = Path(session.config.rootpath)

    def pytest_itemcollected(self, item: pytest.Item) -> None:
        function = getattr(item, "function", None)
        if function is None:
            return  # not a Python test function (a doctest, say): nothing to render
        parent = item.parent.nodeid if item.parent is not None else ""
        test = f"{parent}::{getattr(item, 'originalname', item.name)}"
        self._test_of_case[item.nodeid] = test
        if test in self._records:
            return
        tags: dict[str, Any] = {}
        # iter_markers yields the closest marks first; let closer ones override farther.
        for mark in reversed(list(item.iter_markers("spec"))):
            tags.update(mark.kwargs)
        path, line, _ = item.location
        self._records[test] = TestRecord(
            nodeid=test,
            path=path,
            line=(line or 0) + 1,
            component=_as_str(tags.get("component")),
            section=_as_str(tags.get("section")),
            kind=_as_str(tags.get("kind")),
            statement=first_sentence(getattr(function, "__doc__", None)),
        )

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:
            outcome = "failed"
        elif report.skipped:
            outcome = "skipped"
            if isinstance(report.longrepr, tuple):
                reason = str(report.longrepr[2]).removeprefix("Skipped: ")
                self._skip_reason_of_case.setdefault(report.nodeid, reason)
        elif report.when == "call":
            outcome = "passed"
        else:
            return
        # Phases come in order and a phase after a failure or a skip can only fail, so the
        # last report that is not a passed setup/teardown is the case's outcome (a failing
        # teardown fails a passed call).
        self._outcome_of_case[report.nodeid] = outcome


# ----------------------------------------------------------------- the run it documents


def collect_run_info(
    pytest_args: Sequence[str],
    root: Path,
    outputs: Sequence[Path] = (),
    hypothesis_profile: str = "",
) -> RunInfo:
    """torch and Python versions, the UTC time and the git commit of ``root`` (if any).

    Call it after the tests ran and before the documents are written; ``outputs`` (the
    documents about to be rewritten) do not count as uncommitted changes.
    """
    import torch

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return RunInfo(
        torch=torch.__version__,
        python=platform.python_version(),
        date=now,
        commit=git_commit(root, outputs),
        pytest_args=shlex.join(pytest_args),
        hypothesis_profile=hypothesis_profile,
    )


def git_commit(root: Path, outputs: Sequence[Path] = ()) -> str:
    """HEAD of the checkout at ``root`` now, "(with uncommitted changes)" when the tree is dirty.

    Dirty counts untracked files too (a new test module changes the results), but not
    ``outputs``: a document is built from the tree, not from its previous rendering.
    """

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        excluded = [
            f":(exclude){os.path.relpath(Path(p).resolve(), root.resolve())}" for p in outputs
        ]
        dirty = bool(git("status", "--porcelain", "--untracked-files=all", "--", ".", *excluded))
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{commit} (with uncommitted changes)" if dirty else commit


# ------------------------------------------------------------------ the `spec` command

# The default selection of `transformer spec`, the default suite's (see tox.ini).
DEFAULT_MARK_EXPRESSION = "not slow and not triton and not triton_offline"
# The Hypothesis profile of `transformer spec` unless HYPOTHESIS_PROFILE names one: the
# derandomized one the default suite runs under (tox.ini), so that a document rendered
# twice from one commit states the same results.
DEFAULT_HYPOTHESIS_PROFILE = "ci"


def run_spec(pytest_args: Sequence[str], out_dir: Path) -> int:
    """Run pytest with :class:`SpecRecorder`, write the documents; return pytest's status.

    Without a ``-m`` among ``pytest_args`` the default suite's selection
    (:data:`DEFAULT_MARK_EXPRESSION`) is used; deselected tests are listed as not run.
    Property tests draw their examples under the Hypothesis profile that
    ``HYPOTHESIS_PROFILE`` names, by default :data:`DEFAULT_HYPOTHESIS_PROFILE` (set
    for the run only); the document names it. The documents are written even when
    tests fail, showing which.
    """
    try:
        import pytest
    except ImportError:
        print(
            "transformer: error: `transformer spec` needs pytest: pip install "
            "'transformer-spec[test]'",
            file=sys.stderr,
        )
        return 2
    args = list(pytest_args)
    if not any(a == "-m" or (a.startswith("-m") and len(a) > 2) for a in args):
        args = ["-m", DEFAULT_MARK_EXPRESSION, *args]
    recorder = SpecRecorder()
    chosen = os.environ.get("HYPOTHESIS_PROFILE")
    profile = chosen or DEFAULT_HYPOTHESIS_PROFILE
    os.environ["HYPOTHESIS_PROFILE"] = profile
    try:
        # pytest.main prepends the ini's addopts to the list it is given: give it a copy.
        status = int(pytest.main(list(args), plugins=[recorder]))
    finally:
        if chosen is None:
            del os.environ["HYPOTHESIS_PROFILE"]
        else:
            os.environ["HYPOTHESIS_PROFILE"] = chosen
    records = recorder.records()
    if not records:
        print("transformer spec: no test collected; nothing rendered", file=sys.stderr)
        return status or 1
    root = recorder.rootpath or Path.cwd()
    outputs = [out_dir / "specification.md", out_dir / "specification.html"]
    info = collect_run_info(args, root, outputs, hypothesis_profile=profile)
    markdown, page = write_documents(records, info, out_dir, root)
    missing = missing_kinds(coverage_counts(records))
    if missing:
        print("coverage matrix, required kinds without a test:\n" + format_missing(missing))
    print(f"wrote {markdown} and {page}")
    return status


#: A line each document this command writes holds: what it finds there, it wrote before.
_GENERATED_MARKS = {
    "specification.md": "Generated by `transformer spec`",
    "specification.html": "<title>The executable specification</title>",
}


def _cmd_spec(args: argparse.Namespace) -> int:
    from transformer.cli_common import CLIError, check_out_dir

    out = check_out_dir(args.out)
    for name, mark in _GENERATED_MARKS.items():
        path = out / name
        if path.exists() and not args.force:
            try:
                ours = mark in path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                ours = False
            if not ours:
                raise CLIError(
                    f"--out {args.out}: {name} there was not written by `transformer spec`; "
                    "choose another --out, or replace it with --force"
                )
    pytest_args = list(args.pytest_args)
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    return run_spec(pytest_args, out)


def add_spec_parser(subparsers: Any) -> None:
    """Register ``transformer spec [--out DIR] [-- PYTEST_ARGS...]`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "spec",
        help="run the spec suites and render the specification document",
        description="Run spec_tests/ and property_tests/ (by default the default suite's "
        f'selection, -m "{DEFAULT_MARK_EXPRESSION}") and write DIR/specification.md and '
        "DIR/specification.html: each test's statement, grouped by paper section, with "
        "its location and result, and the coverage matrix of components and kinds of test. "
        "Arguments after -- go to pytest, e.g. `transformer spec -- -k attention`.",
    )
    parser.add_argument("--out", default="docs", metavar="DIR", help="default %(default)s")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a specification.md/.html in --out that this command did not write",
    )
    parser.add_argument(
        "pytest_args", nargs=argparse.REMAINDER, metavar="-- PYTEST_ARGS", help="passed to pytest"
    )
    parser.set_defaults(func=_cmd_spec)
