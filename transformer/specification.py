"""The executable specification as a document: the spec tests, rendered and checked.

Every test in ``spec_tests/`` and ``property_tests/`` carries
``@pytest.mark.spec(component=..., section=..., kind=...)`` and states the property it
proves in the first sentence of its docstring. This module

* defines the vocabulary of those tags in ONE place: :data:`COMPONENTS` (with the kinds
  of test each must have, and the reason wherever a kind does not apply),
  :data:`SECTIONS` (the paper's sections, ``"torch"`` and ``"extra"``) and :data:`KINDS`;
* records a pytest run (:class:`SpecRecorder`, a pytest plugin object): each test's tag,
  ``path:line``, statement and outcome, its parametrized cases aggregated into one line;
* scans test files without importing them (:func:`scan_tests`, AST only), so the coverage
  matrix can be checked whatever subset of tests a run selects;
* renders ``specification.md`` and a self-contained ``specification.html``;
* adds ``transformer spec [--out DIR] [-- PYTEST_ARGS...]`` to the command line
  (:func:`add_spec_parser`, hooked in by :mod:`transformer.cli`).

pytest is imported only when a run starts: it is a test dependency, not a runtime one.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import html
import os
import platform
import re
import shlex
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

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

# ----------------------------------------------------------------------- the vocabulary

KINDS: tuple[str, ...] = ("shape", "masking", "equivalence", "property", "error")

# Section key -> title, in the order the document presents them: the paper's sections
# ("Attention Is All You Need", Vaswani et al. 2017), then our own guarantees ("extra")
# and the torch behaviour we pin down ("torch").
SECTIONS: dict[str, str] = {
    "3.1": "Encoder and decoder stacks",
    "3.2.1": "Scaled dot-product attention",
    "3.2.2": "Multi-head attention",
    "3.2.3": "Applications of attention in our model (masking)",
    "3.3": "Position-wise feed-forward networks",
    "3.4": "Embeddings and softmax",
    "3.5": "Positional encoding",
    "5.3": "Optimizer",
    "5.4": "Regularization",
    "extra": "Beyond the paper: our own guarantees",
    "torch": "Torch behaviour pinned down",
}
PAPER_SECTIONS: tuple[str, ...] = tuple(key for key in SECTIONS if key[0].isdigit())

# Every component needs these kinds unless it documents why one does not apply.
BASE_REQUIRED: tuple[str, ...] = ("shape", "equivalence", "error")


@dataclass(frozen=True)
class Component:
    """One public component of the package and the kinds of test it must have.

    ``also_required`` adds kinds to :data:`BASE_REQUIRED`; ``not_applicable`` maps a kind
    to the reason it does not apply (it is then neither required nor counted missing).
    ``covered_by = (component, section)`` lets the tests of another component in one
    paper section count for this one, for a component that lives inside another module.
    ``tests`` are the test modules (paths from the repository root) that hold its tests:
    every one must be there and hold at least one of them (:func:`missing_modules`), so
    deleting a module is caught even where other modules cover the same kinds.
    """

    name: str
    title: str
    module: str
    also_required: tuple[str, ...] = ()
    not_applicable: Mapping[str, str] = field(default_factory=dict)
    covered_by: tuple[str, str] | None = None
    tests: tuple[str, ...] = ()

    @property
    def required(self) -> tuple[str, ...]:
        """The kinds this component must have at least one test of, in :data:`KINDS` order."""
        wanted = set(BASE_REQUIRED) | set(self.also_required)
        return tuple(k for k in KINDS if k in wanted and k not in self.not_applicable)


_NO_MASK = "takes no mask: it acts on each position separately"

# THE list of components (the `component=` values of the spec tags), in document order.
COMPONENTS: tuple[Component, ...] = (
    Component(
        "attention",
        "Scaled dot-product attention and the kernel registry",
        "transformer/attention.py",
        also_required=("masking", "property"),
        tests=(
            "property_tests/test_attention_properties.py",
            "property_tests/test_hostile_inputs.py",
            "spec_tests/test_attention.py",
            "spec_tests/test_attention_bias.py",
            "spec_tests/test_attention_selection.py",
            "spec_tests/test_compile.py",
            "spec_tests/test_numerical_robustness.py",
        ),
    ),
    Component(
        "conformance",
        "The attention conformance tool for outside kernels",
        "transformer/conformance/__init__.py",
        not_applicable={
            "masking": "runs the masking cases against other kernels; its own cases are "
            "held to torch by running torch's SDPA through it",
        },
        tests=("spec_tests/test_conformance.py",),
    ),
    Component(
        "chunked_kernel",
        "Chunked online-softmax kernel",
        "transformer/kernels/chunked.py",
        tests=("spec_tests/test_chunked_kernel.py",),
    ),
    Component(
        "triton_kernel",
        "Triton flash-attention kernel",
        "transformer/kernels/triton_flash.py",
        tests=("spec_tests/test_triton_kernel.py",),
    ),
    Component(
        "triton_offline",
        "The Triton kernel compiled for GPU targets, offline",
        "transformer/kernels/triton_offline.py",
        also_required=("masking", "property"),
        tests=("spec_tests/test_triton_offline.py",),
    ),
    Component(
        "multi_head_attention",
        "Multi-head attention",
        "transformer/multi_head_attention.py",
        tests=(
            "property_tests/test_hostile_inputs.py",
            "spec_tests/test_compile.py",
            "spec_tests/test_multi_head_attention.py",
            "spec_tests/test_numerical_robustness.py",
        ),
    ),
    Component(
        "feed_forward",
        "Position-wise feed-forward network",
        "transformer/feed_forward.py",
        not_applicable={"masking": f"{_NO_MASK} (§3.3)"},
        tests=("property_tests/test_hostile_inputs.py", "spec_tests/test_feed_forward.py"),
    ),
    Component(
        "positional",
        "Sinusoidal positional encoding",
        "transformer/positional.py",
        not_applicable={"masking": f"{_NO_MASK}, adding a fixed table (§3.5)"},
        tests=("property_tests/test_hostile_inputs.py", "spec_tests/test_positional.py"),
    ),
    Component(
        "embeddings",
        "Embeddings, sqrt(d_model) scaling and the tied pre-softmax projection",
        "transformer/model.py",
        covered_by=("model", "3.4"),
        tests=("spec_tests/test_model.py",),
    ),
    Component(
        "layers",
        "Encoder/decoder layers and stacks, nn.Transformer",
        "transformer/layers.py",
        also_required=("masking", "property"),
        tests=(
            "property_tests/test_hostile_inputs.py",
            "property_tests/test_layers_properties.py",
            "spec_tests/test_layers.py",
            "spec_tests/test_numerical_robustness.py",
        ),
    ),
    Component(
        "model",
        "Seq2SeqTransformer and ModelConfig",
        "transformer/model.py",
        tests=(
            "property_tests/test_hostile_inputs.py",
            "spec_tests/test_compile.py",
            "spec_tests/test_model.py",
            "spec_tests/test_numerical_robustness.py",
        ),
    ),
    Component(
        "generation",
        "Greedy decoding and beam search",
        "transformer/generate.py",
        tests=(
            "property_tests/test_generation_properties.py",
            "property_tests/test_hostile_inputs.py",
            "spec_tests/test_generation.py",
        ),
    ),
    Component(
        "kv_cache",
        "The KV cache: incremental decoding through the modules themselves",
        "transformer/kv_cache.py",
        tests=("spec_tests/test_kv_cache.py", "spec_tests/test_matvec.py"),
    ),
    Component(
        "checkpoint",
        "Checkpoints",
        "transformer/checkpoint.py",
        not_applicable={"masking": "stores and restores tensors; computes no attention"},
        tests=(
            "property_tests/test_hostile_inputs.py",
            "spec_tests/test_checkpoint.py",
            "spec_tests/test_goals.py",
        ),
    ),
    Component(
        "data",
        "Tasks, tokenizer and batching",
        "transformer/data.py",
        tests=(
            "property_tests/test_data_properties.py",
            "spec_tests/test_data.py",
            "spec_tests/test_tokenizer.py",
        ),
    ),
    Component(
        "training",
        "Training recipe: Adam, schedule, label smoothing",
        "transformer/training.py",
        tests=("spec_tests/test_goals.py", "spec_tests/test_training.py"),
    ),
    Component(
        "cli",
        "The `transformer` command",
        "transformer/cli.py",
        not_applicable={"masking": "parses arguments and calls the library, which masks"},
        tests=("spec_tests/test_cli.py", "spec_tests/test_goals.py"),
    ),
    Component(
        "bench",
        "Benchmarks",
        "transformer/bench.py",
        not_applicable={
            "equivalence": "measures time and memory only; the kernels it times are held "
            "to their references by the attention suites",
            "masking": "times the kernels; their masking is pinned by the attention suites",
        },
        tests=("spec_tests/test_bench.py",),
    ),
    Component(
        "specification",
        "This document and its coverage matrix",
        "transformer/specification.py",
        not_applicable={"masking": "renders test records; computes no attention"},
        tests=("spec_tests/test_specification.py",),
    ),
)
COMPONENT_BY_NAME: dict[str, Component] = {c.name: c for c in COMPONENTS}

# The default selection of `transformer spec`, the default suite's (see tox.ini).
DEFAULT_MARK_EXPRESSION = "not slow and not triton and not triton_offline"


def tag_problems(component: object, section: object, kind: object) -> list[str]:
    """What is wrong with one spec tag (empty when it is valid), naming each bad value."""
    problems = []
    for name, value, allowed in (
        ("component", component, tuple(COMPONENT_BY_NAME)),
        ("section", section, tuple(SECTIONS)),
        ("kind", kind, KINDS),
    ):
        if value is None:
            problems.append(f"no {name}")
        elif value not in allowed:
            problems.append(f"{name} {value!r} is not one of {', '.join(allowed)}")
    return problems


# ------------------------------------------------------------------------ the statements


_OPENERS, _CLOSERS = "([{", ")]}"


def first_sentence(docstring: str | None) -> str:
    """The first sentence of a docstring's first paragraph, on one line ("" for none).

    A sentence ends at ``.``, ``!`` or ``?`` followed by the end or by whitespace and an
    upper-case letter, outside brackets, quotes and backticks, so "(§3.4 "share ... and
    the")" or "``x.size(0)``" do not cut it short.
    """
    if not docstring:
        return ""
    paragraph = re.split(r"\n\s*\n", docstring.strip(), maxsplit=1)[0]
    text = " ".join(paragraph.split())
    depth, in_code, in_quote = 0, False, False
    for i, char in enumerate(text):
        if char == "`":
            if text[i - 1 : i] != "`":  # a run of backticks (``code``) opens or closes one span
                in_code = not in_code
        elif in_code:
            continue
        elif char == '"':
            in_quote = not in_quote
        elif char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth = max(depth - 1, 0)
        elif char in ".!?" and depth == 0 and not in_quote:
            rest = text[i + 1 :]
            if not rest or (rest[0] == " " and rest[1:2].isupper()):
                return text[: i + 1]
    return text


# ---------------------------------------------------------------- records and the matrix


class Tagged(Protocol):
    """Anything with a spec tag: a recorded test or a statically scanned one."""

    @property
    def component(self) -> str | None: ...
    @property
    def section(self) -> str | None: ...
    @property
    def kind(self) -> str | None: ...


@dataclass
class TestRecord:
    """One test function of a run, its parametrized cases aggregated.

    ``counts`` maps ``"passed"``, ``"failed"``, ``"skipped"`` and ``"not run"``
    (deselected, or never reached) to numbers of cases.
    """

    __test__ = False  # a data class, not a test, whatever its name says

    nodeid: str
    path: str
    line: int
    component: str | None
    section: str | None
    kind: str | None
    statement: str
    counts: Counter[str] = field(default_factory=Counter)
    skip_reason: str = ""

    @property
    def result(self) -> str:
        """``"FAIL"`` if a case failed, else ``"PASS"`` if one passed, else skip/not run."""
        if self.counts["failed"]:
            return "FAIL"
        if self.counts["passed"]:
            return "PASS"
        return "SKIP" if self.counts["skipped"] else "NOT RUN"

    @property
    def counts_text(self) -> str:
        """The case counts in words, e.g. ``"3 passed, 1 skipped"``."""
        order = ("passed", "failed", "skipped", "not run")
        return ", ".join(f"{self.counts[k]} {k}" for k in order if self.counts[k])


@dataclass(frozen=True)
class ScannedTest:
    """A test function found by :func:`scan_tests`, with its merged spec tag (AST only)."""

    path: str
    line: int
    name: str
    tags: Mapping[str, object]
    docstring: str | None

    @property
    def component(self) -> str | None:
        """The ``component`` of the tag (None when absent or not a string)."""
        return _as_str(self.tags.get("component"))

    @property
    def section(self) -> str | None:
        """The ``section`` of the tag (None when absent or not a string)."""
        return _as_str(self.tags.get("section"))

    @property
    def kind(self) -> str | None:
        """The ``kind`` of the tag (None when absent or not a string)."""
        return _as_str(self.tags.get("kind"))


def _as_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def coverage_counts(tests: Iterable[Tagged]) -> dict[str, Counter[str]]:
    """Component name -> kind -> number of tests, for every component in :data:`COMPONENTS`.

    A component with ``covered_by = (other, section)`` also counts the tests of ``other``
    tagged with that section.
    """
    tests = list(tests)
    counts: dict[str, Counter[str]] = {c.name: Counter() for c in COMPONENTS}
    for component in COMPONENTS:
        for test in tests:
            if _counts_for(component, test) and test.kind in KINDS:
                counts[component.name][test.kind] += 1
    return counts


def missing_kinds(counts: Mapping[str, Counter[str]]) -> dict[str, list[str]]:
    """Component name -> the required kinds it has no test of (complete components omitted)."""
    missing = {}
    for component in COMPONENTS:
        have = counts.get(component.name, Counter())
        lacking = [kind for kind in component.required if not have[kind]]
        if lacking:
            missing[component.name] = lacking
    return missing


def _counts_for(component: Component, test: Tagged) -> bool:
    """Does ``test`` count for ``component`` (its own tag, or via ``covered_by``)?"""
    own = test.component == component.name
    via = component.covered_by is not None and (
        (test.component, test.section) == component.covered_by
    )
    return own or via


def missing_modules(tests: Iterable[ScannedTest]) -> dict[str, list[str]]:
    """Component name -> the declared test modules that hold none of its tests.

    A module that was deleted (or lost its tags) appears here even when the remaining
    modules still cover every required kind of the component.
    """
    tests = list(tests)
    missing = {}
    for component in COMPONENTS:
        holders = {t.path for t in tests if _counts_for(component, t)}
        gone = [m for m in component.tests if m not in holders]
        if gone:
            missing[component.name] = gone
    return missing


def undeclared_modules(tests: Iterable[ScannedTest]) -> dict[str, list[str]]:
    """Component name -> modules holding its tests that its ``tests`` does not list."""
    tests = list(tests)
    extra = {}
    for component in COMPONENTS:
        holders = {t.path for t in tests if t.component == component.name}
        unlisted = sorted(holders - set(component.tests))
        if unlisted:
            extra[component.name] = unlisted
    return extra


def format_missing_modules(
    missing: Mapping[str, Sequence[str]], have: Mapping[str, Counter[str]]
) -> str:
    """One line per component: its absent modules and the kinds it still has tests of."""
    lines = []
    for name, modules in missing.items():
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(have.get(name, Counter()).items()))
        lines.append(
            f"{name}: no tests of it in {', '.join(modules)} (deleted or untagged?); "
            f"kinds still covered: {kinds or 'none'}"
        )
    return "\n".join(lines)


def format_missing(missing: Mapping[str, Sequence[str]]) -> str:
    """One line per component: ``"feed_forward: no test of kind shape, error"``."""
    return "\n".join(
        f"{name}: no test of kind {', '.join(kinds)}" for name, kinds in missing.items()
    )


# ------------------------------------------------------------------- the static scanner


def scan_tests(roots: Iterable[Path], relative_to: Path | None = None) -> list[ScannedTest]:
    """Every test function in the ``test_*.py`` / ``*_test.py`` files under ``roots``.

    Reads the files with :mod:`ast`, never imports them, and merges the spec tags pytest
    would see: module ``pytestmark`` < class decorators and ``pytestmark`` < function
    decorators (closer wins, key by key). Tags are read from ``pytest.mark.spec(...)``,
    ``mark.spec(...)`` and module-level aliases ``NAME = functools.partial(pytest.mark.spec,
    **kw)`` (or ``partial(...)``, or ``NAME = pytest.mark.spec``) called as ``NAME(**kw)``.
    Paths are shown relative to ``relative_to`` when given. ``line`` is the first line of
    the definition, its first decorator included, as pytest reports it.
    """
    found: list[ScannedTest] = []
    for root in roots:
        files = sorted({*root.rglob("test_*.py"), *root.rglob("*_test.py")})
        for path in files:
            shown = path.relative_to(relative_to) if relative_to else path
            found.extend(_scan_module(path, shown.as_posix()))
    return found


def _scan_module(path: Path, shown: str) -> list[ScannedTest]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    aliases: dict[str, dict[str, object]] = {}
    module_tags: dict[str, object] = {}
    for node in tree.body:
        target, value = _simple_assignment(node)
        if target == "pytestmark" and value is not None:
            module_tags = _tags_of_marks(value, aliases)
        elif target is not None and value is not None:
            bound = _alias_kwargs(value)
            if bound is not None:
                aliases[target] = bound
    tests: list[ScannedTest] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith(
            "test"
        ):
            tests.append(_scanned(node, shown, node.name, module_tags, aliases))
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            class_tags = {**module_tags, **_tags_of_decorators(node, aliases)}
            for item in node.body:
                target, value = _simple_assignment(item)
                if target == "pytestmark" and value is not None:
                    class_tags.update(_tags_of_marks(value, aliases))
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and (
                    item.name.startswith("test")
                ):
                    name = f"{node.name}::{item.name}"
                    tests.append(_scanned(item, shown, name, class_tags, aliases))
    return tests


def _scanned(
    node: ast.FunctionDef | ast.AsyncFunctionDef,
    shown: str,
    name: str,
    outer: dict[str, object],
    aliases: dict[str, dict[str, object]],
) -> ScannedTest:
    line = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    tags = {**outer, **_tags_of_decorators(node, aliases)}
    return ScannedTest(shown, line, name, tags, ast.get_docstring(node))


def _simple_assignment(node: ast.stmt) -> tuple[str | None, ast.expr | None]:
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target = node.targets[0]
        return (target.id if isinstance(target, ast.Name) else None), node.value
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id, node.value
    return None, None


def _is_spec_mark(expr: ast.expr) -> bool:
    """``pytest.mark.spec`` or ``mark.spec`` (after ``from pytest import mark``)."""
    if not (isinstance(expr, ast.Attribute) and expr.attr == "spec"):
        return False
    inner = expr.value
    return (isinstance(inner, ast.Attribute) and inner.attr == "mark") or (
        isinstance(inner, ast.Name) and inner.id == "mark"
    )


def _is_partial(expr: ast.expr) -> bool:
    return (isinstance(expr, ast.Name) and expr.id == "partial") or (
        isinstance(expr, ast.Attribute) and expr.attr == "partial"
    )


def _literal_kwargs(call: ast.Call) -> dict[str, object]:
    kwargs: dict[str, object] = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            continue  # **mapping: not readable statically; the tag will show as incomplete
        try:
            kwargs[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            kwargs[keyword.arg] = f"<not a literal: {ast.unparse(keyword.value)}>"
    return kwargs


def _alias_kwargs(value: ast.expr) -> dict[str, object] | None:
    """The keywords an alias of the spec mark binds, or None when ``value`` is no alias."""
    if _is_spec_mark(value):
        return {}
    if (
        isinstance(value, ast.Call)
        and _is_partial(value.func)
        and value.args
        and _is_spec_mark(value.args[0])
    ):
        return _literal_kwargs(value)
    return None


def _tags_of_mark(expr: ast.expr, aliases: dict[str, dict[str, object]]) -> dict[str, object]:
    if not isinstance(expr, ast.Call):
        return {}
    if _is_spec_mark(expr.func):
        return _literal_kwargs(expr)
    if isinstance(expr.func, ast.Name) and expr.func.id in aliases:
        return {**aliases[expr.func.id], **_literal_kwargs(expr)}
    return {}


def _tags_of_marks(value: ast.expr, aliases: dict[str, dict[str, object]]) -> dict[str, object]:
    marks = value.elts if isinstance(value, ast.List | ast.Tuple) else [value]
    tags: dict[str, object] = {}
    for mark in marks:
        tags.update(_tags_of_mark(mark, aliases))
    return tags


def _tags_of_decorators(
    node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef,
    aliases: dict[str, dict[str, object]],
) -> dict[str, object]:
    # Decorators apply bottom-up and pytest treats the last applied as the closest, so
    # reading top to bottom with later ones overriding matches what pytest merges.
    tags: dict[str, object] = {}
    for decorator in node.decorator_list:
        tags.update(_tags_of_mark(decorator, aliases))
    return tags


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


# ------------------------------------------------------------------------ the documents


@dataclass(frozen=True)
class RunInfo:
    """Where and how the records were produced: shown at the top of the document."""

    torch: str
    python: str
    date: str
    commit: str
    pytest_args: str


def collect_run_info(
    pytest_args: Sequence[str], root: Path, outputs: Sequence[Path] = ()
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


# The document is built once as blocks, then written as Markdown and as HTML, so the
# two never disagree. Text uses one piece of inline markup: `code`.


@dataclass(frozen=True)
class Cell:
    """A table cell: text, an optional link, and a status that styles it."""

    text: str
    href: str = ""
    status: str = ""  # "pass", "fail", "skip", "not-run", "missing", "na", "none" or ""


@dataclass(frozen=True)
class Heading:
    """A heading of ``level`` 1-4, with the ``anchor`` the HTML page gives it."""

    level: int
    text: str
    anchor: str


@dataclass(frozen=True)
class Paragraph:
    """A paragraph of text."""

    text: str


@dataclass(frozen=True)
class Table:
    """A table: header texts and rows of cells."""

    header: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]


Block = Heading | Paragraph | Table

_RESULT_STATUS = {"PASS": "pass", "FAIL": "fail", "SKIP": "skip", "NOT RUN": "not-run"}


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _valid(record: TestRecord) -> bool:
    return not tag_problems(record.component, record.section, record.kind) and bool(
        record.statement
    )


def _matrix_table(records: Sequence[TestRecord]) -> Table:
    counts = coverage_counts(records)
    rows = []
    for component in COMPONENTS:
        name = f"`{component.name}`"
        if component.covered_by:
            other, section = component.covered_by
            name += f" (with `{other}` tests of §{section})"
        cells = [Cell(name)]
        for kind in KINDS:
            count = counts[component.name][kind]
            if count:
                cells.append(Cell(str(count), status="pass"))
            elif kind in component.not_applicable:
                cells.append(Cell(f"n/a: {component.not_applicable[kind]}", status="na"))
            elif kind in component.required:
                cells.append(Cell("MISSING", status="missing"))
            else:
                cells.append(Cell("-", status="none"))
        rows.append(tuple(cells))
    return Table(("component", *KINDS), tuple(rows))


def _statements_table(records: Sequence[TestRecord], out_dir: Path, root: Path) -> Table:
    rows = []
    for record in sorted(records, key=lambda r: (r.path, r.line)):
        target = os.path.relpath(root / record.path, out_dir).replace(os.sep, "/")
        result = record.result
        detail = record.counts_text
        if result == "SKIP" and record.skip_reason:
            detail += f": {record.skip_reason}"
        rows.append(
            (
                Cell(result, status=_RESULT_STATUS[result]),
                Cell(record.statement or "(no docstring)"),
                Cell(record.kind or "?"),
                Cell(f"`{record.path}:{record.line}`", href=target),
                Cell(detail),
            )
        )
    return Table(("result", "property", "kind", "test", "cases"), tuple(rows))


def _component_groups(
    records: Sequence[TestRecord], level: int, out_dir: Path, root: Path, prefix: str
) -> list[Block]:
    blocks: list[Block] = []
    for component in COMPONENTS:
        mine = [r for r in records if r.component == component.name]
        if mine:
            text = f"{component.title} (`{component.name}`, {component.module})"
            blocks.append(Heading(level, text, _anchor(f"{prefix}-{component.name}")))
            blocks.append(_statements_table(mine, out_dir, root))
    return blocks


def build_document(
    records: Sequence[TestRecord], info: RunInfo, out_dir: Path, root: Path
) -> list[Block]:
    """The specification document as blocks: header, coverage matrix, then the statements.

    Statements are grouped by paper section, then our own guarantees and the torch
    behaviour pinned, each by component; tests with an invalid tag or no docstring are
    listed last. Links to tests are relative to ``out_dir``; test paths to ``root``.
    """
    valid = [r for r in records if _valid(r)]
    invalid = [r for r in records if not _valid(r)]
    totals: Counter[str] = Counter()
    for record in records:
        totals.update(record.counts)
    results = Counter(record.result for record in records)
    result_order = ("PASS", "FAIL", "SKIP", "NOT RUN")
    case_order = ("passed", "failed", "skipped", "not run")
    blocks: list[Block] = [
        Heading(1, "The executable specification", "top"),
        Paragraph(
            'Every row below is a property of this implementation of "Attention Is All You '
            "Need\", stated by the first sentence of a test's docstring, with that test's "
            "location and its result in this run. Generated by `transformer spec` (or "
            "`tox -e spec`) from the "
            "`@pytest.mark.spec(component, section, kind)` tags of `spec_tests/` and "
            "`property_tests/`; do not edit by hand."
        ),
        Table(
            ("run", ""),
            (
                (Cell("torch"), Cell(f"`{info.torch}`")),
                (Cell("python"), Cell(f"`{info.python}`")),
                (Cell("date"), Cell(info.date)),
                (Cell("commit"), Cell(f"`{info.commit}`")),
                (
                    Cell("pytest arguments"),
                    Cell(f"`{info.pytest_args}`" if info.pytest_args else ""),
                ),
                (
                    Cell("tests"),
                    Cell(
                        f"{len(records)} tests ("
                        + ", ".join(f"{results[r]} {r}" for r in result_order if results[r])
                        + f"); {sum(totals.values())} cases ("
                        + ", ".join(f"{totals[o]} {o}" for o in case_order if totals[o])
                        + ")"
                    ),
                ),
            ),
        ),
        Heading(2, "Coverage matrix", "coverage-matrix"),
        Paragraph(
            "Tests per component and kind. Every component needs a test of kind "
            + ", ".join(BASE_REQUIRED)
            + "; `attention` and `layers` also masking and property. MISSING marks a "
            "required kind with no test; n/a gives the reason a kind does not apply; - is "
            "an optional kind with no test."
        ),
        _matrix_table(records),
    ]
    missing = missing_kinds(coverage_counts(records))
    blocks.insert(3, Heading(2, "Contents", "contents"))
    blocks.append(
        Paragraph(
            "Missing: " + "; ".join(f"`{c}` ({', '.join(k)})" for c, k in missing.items()) + "."
            if missing
            else "Every component has a test of each required kind."
        )
    )
    blocks.append(Heading(2, "The paper, section by section", "paper"))
    for section in PAPER_SECTIONS:
        blocks.append(Heading(3, f"§{section} {SECTIONS[section]}", f"s{_anchor(section)}"))
        in_section = [r for r in valid if r.section == section]
        if not in_section:
            blocks.append(Paragraph("No test cites this section."))
        blocks.extend(_component_groups(in_section, 4, out_dir, root, f"s{section}"))
    for section in ("extra", "torch"):
        blocks.append(Heading(2, SECTIONS[section], section))
        in_section = [r for r in valid if r.section == section]
        blocks.extend(_component_groups(in_section, 3, out_dir, root, section))
    if invalid:
        blocks.append(Heading(2, "Tests with an invalid tag or no docstring", "invalid"))
        problems = []
        for record in invalid:
            why = tag_problems(record.component, record.section, record.kind)
            if not record.statement:
                why.append("no docstring")
            problems.append((Cell(f"`{record.nodeid}`"), Cell("; ".join(why)), Cell(record.result)))
        blocks.append(Table(("test", "problem", "result"), tuple(problems)))
    return _with_contents(blocks)


def _with_contents(blocks: list[Block]) -> list[Block]:
    """Fill the "Contents" heading with a table linking every heading below it."""
    at = next(i for i, b in enumerate(blocks) if isinstance(b, Heading) and b.anchor == "contents")
    rows = tuple(
        (Cell("\u2003" * (b.level - 2) + b.text, href=f"#{b.anchor}"),)
        for b in blocks[at + 1 :]
        if isinstance(b, Heading)
    )
    return [*blocks[: at + 1], Table(("section",), rows), *blocks[at + 1 :]]


def _md_cell(cell: Cell) -> str:
    text = cell.text.replace("|", "\\|")
    if cell.href:
        text = f"[{text}]({cell.href})"
    if cell.status in ("fail", "missing"):
        text = f"**{text}**"
    return text


def render_markdown(blocks: Sequence[Block]) -> str:
    """The blocks as GitHub-flavoured Markdown."""
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += [f'<a id="{block.anchor}"></a>', "", "#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        else:
            lines.append("| " + " | ".join(block.header) + " |")
            lines.append("|" + "---|" * len(block.header))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    # Escape first, then turn `code` and ``code`` spans into <code>: backticks survive
    # escaping.
    return re.sub(r"(`+)(.+?)\1", r"<code>\2</code>", html.escape(text, quote=False))


_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 70em; margin: 2em auto;
       padding: 0 1em; color: #222; }
h1, h2, h3, h4 { line-height: 1.2; } h2 { border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; width: 100%; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
code { font: 0.9em ui-monospace, monospace; background: #f6f6f6; padding: 0 0.2em; }
a { color: #0550ae; }
.pass { background: #e6f4ea; } .fail, .missing { background: #fde2e1; font-weight: bold; }
.skip, .not-run { background: #fff5d6; } .na { color: #666; font-style: italic; }
.none { color: #999; }
"""


def render_html(blocks: Sequence[Block], title: str = "The executable specification") -> str:
    """The blocks as one self-contained HTML page (inline CSS, no scripts, no fetches)."""
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            tag = f"h{block.level}"
            body.append(f'<{tag} id="{block.anchor}">{_inline_html(block.text)}</{tag}>')
        elif isinstance(block, Paragraph):
            body.append(f"<p>{_inline_html(block.text)}</p>")
        else:
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in block.header)
            rows = []
            for row in block.rows:
                cells = []
                for cell in row:
                    text = _inline_html(cell.text)
                    if cell.href:
                        text = f'<a href="{html.escape(cell.href)}">{text}</a>'
                    css = f' class="{cell.status}"' if cell.status else ""
                    cells.append(f"<td{css}>{text}</td>")
                rows.append("<tr>" + "".join(cells) + "</tr>")
            body.append(
                f"<table><thead><tr>{head}</tr></thead><tbody>\n"
                + "\n".join(rows)
                + "\n</tbody></table>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def write_documents(
    records: Sequence[TestRecord], info: RunInfo, out_dir: Path, root: Path
) -> tuple[Path, Path]:
    """Write ``out_dir/specification.md`` and ``out_dir/specification.html``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = build_document(records, info, out_dir.resolve(), root.resolve())
    markdown, page = out_dir / "specification.md", out_dir / "specification.html"
    markdown.write_text(render_markdown(blocks), encoding="utf-8")
    page.write_text(render_html(blocks), encoding="utf-8")
    return markdown, page


# ------------------------------------------------------------------ the `spec` command


def run_spec(pytest_args: Sequence[str], out_dir: Path) -> int:
    """Run pytest with :class:`SpecRecorder`, write the documents; return pytest's status.

    Without a ``-m`` among ``pytest_args`` the default suite's selection
    (:data:`DEFAULT_MARK_EXPRESSION`) is used; deselected tests are listed as not run.
    The documents are written even when tests fail, showing which.
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
    # pytest.main prepends the ini's addopts to the list it is given: give it a copy.
    status = int(pytest.main(list(args), plugins=[recorder]))
    records = recorder.records()
    if not records:
        print("transformer spec: no test collected; nothing rendered", file=sys.stderr)
        return status or 1
    root = recorder.rootpath or Path.cwd()
    outputs = [out_dir / "specification.md", out_dir / "specification.html"]
    info = collect_run_info(args, root, outputs)
    markdown, page = write_documents(records, info, out_dir, root)
    missing = missing_kinds(coverage_counts(records))
    if missing:
        print("coverage matrix, required kinds without a test:\n" + format_missing(missing))
    print(f"wrote {markdown} and {page}")
    return status


def _cmd_spec(args: argparse.Namespace) -> int:
    pytest_args = list(args.pytest_args)
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    return run_spec(pytest_args, Path(args.out))


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
        "pytest_args", nargs=argparse.REMAINDER, metavar="-- PYTEST_ARGS", help="passed to pytest"
    )
    parser.set_defaults(func=_cmd_spec)
