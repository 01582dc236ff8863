"""The static scanner: the spec tags and docstrings of test files, read without importing them.

:func:`scan_tests` reads test modules with :mod:`ast` and merges their tags as pytest
would, so the coverage matrix can be checked whatever subset of tests a run selects.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

from transformer.spec_records import ScannedTest


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
