"""The records of spec tests, their statements, and the coverage matrix checked over them.

A test is known from a pytest run (:class:`TestRecord`, with its outcome) or from reading
its file (:class:`ScannedTest`, tag and docstring only); both are :class:`Tagged`. Its
statement is the first sentence of its docstring (:func:`first_sentence`). The matrix
counts tests per component and kind (:func:`coverage_counts`) and names what is missing:
a required kind without a test (:func:`missing_kinds`), a declared test module holding
none of a component's tests (:func:`missing_modules`), and a module holding tests of a
component that does not declare it (:func:`undeclared_modules`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from transformer.spec_components import COMPONENTS, KINDS, Component

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
