"""The specification document and its coverage matrix (``transformer/specification.py``).

Two kinds of test live here. The first three check the suites themselves, statically
(AST only), so they hold whatever subset of tests a run selects: every component has a
test of each kind it requires, every test carries a valid spec tag, and every test has
a docstring whose first sentence is the statement rendered into
``docs/specification.md``. The others pin the machinery down on small synthetic inputs:
the static scanner, the pytest recorder (run on a throw-away suite with ``pytester``),
the coverage matrix, the Markdown and HTML renderers and the ``transformer spec`` hook,
all reached through ``transformer.specification``, which re-exports the
``transformer/spec_*.py`` modules that hold them.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from transformer import specification as sp
from transformer.cli import build_parser, main

pytest_plugins = ["pytester"]

spec = functools.partial(pytest.mark.spec, component="specification", section="extra")

ROOT = Path(__file__).resolve().parents[1]
SUITES = [ROOT / "spec_tests", ROOT / "property_tests"]


@functools.cache
def scan_repository() -> tuple[sp.ScannedTest, ...]:
    return tuple(sp.scan_tests(SUITES, relative_to=ROOT))


def run_recorded(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, sp.SpecRecorder]:
    """Run pytest in-process on ``pytester.path`` with a fresh recorder."""
    recorder = sp.SpecRecorder()
    # The throw-away suite uses neither plugin; hypothesis's alone costs seconds per run.
    blocked = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")
    return pytester.runpytest(*blocked, *args, plugins=[recorder]), recorder


# --------------------------------------------------------------------------------------
# The suites, checked statically.
# --------------------------------------------------------------------------------------


@spec(kind="property")
def test_every_component_has_a_test_of_each_required_kind() -> None:
    """Every component of ``COMPONENTS`` has at least one test of each kind it requires (shape, equivalence, error; attention and layers also masking and property), counted over spec_tests/ and property_tests/."""
    missing = sp.missing_kinds(sp.coverage_counts(scan_repository()))
    assert not missing, "required kinds without a test:\n" + sp.format_missing(missing)


@spec(kind="property")
def test_every_component_lists_exactly_the_test_modules_that_hold_its_tests() -> None:
    """Each test module a component declares in ``COMPONENTS`` is present and holds at least one of its tests, and no module holds tests of a component that does not declare it."""
    tests = scan_repository()
    missing = sp.missing_modules(tests)
    assert not missing, sp.format_missing_modules(missing, sp.coverage_counts(tests))
    assert sp.undeclared_modules(tests) == {}


@spec(kind="property")
def test_deleting_any_test_module_fails_naming_its_components() -> None:
    """Removing any one test module of spec_tests/ or property_tests/ makes the matrix checks fail with a message naming every component it tested (and, where it was the only one, the kinds now missing)."""
    tests = scan_repository()
    modules = sorted({t.path for t in tests})
    assert len(modules) > 20, modules
    for module in modules:
        rest = [t for t in tests if t.path != module]
        tested = {t.component for t in tests if t.path == module}
        missing = sp.missing_modules(rest)
        assert set(missing) >= tested - {None}, (module, missing)
        message = sp.format_missing_modules(missing, sp.coverage_counts(rest))
        assert module in message
        for component in tested - {None}:
            assert f"{component}: no tests of it in" in message
        lacking = sp.missing_kinds(sp.coverage_counts(rest))
        if lacking:  # the module was the only source of these kinds
            assert set(lacking) <= tested | {"embeddings"}, (module, lacking)


@spec(kind="property")
def test_every_test_carries_a_valid_spec_tag() -> None:
    """Every test function in spec_tests/ and property_tests/ carries a spec tag whose component, section and kind are all known values."""
    bad = [
        f"{t.path}:{t.line} {t.name}: {'; '.join(problems)}"
        for t in scan_repository()
        if (problems := sp.tag_problems(t.component, t.section, t.kind))
    ]
    assert not bad, "tests with an invalid spec tag:\n" + "\n".join(bad)


@spec(kind="property")
def test_every_test_has_a_docstring_stating_its_property() -> None:
    """Every test function in spec_tests/ and property_tests/ has a docstring, whose first sentence is the statement the document renders."""
    bare = [f"{t.path}:{t.line} {t.name}" for t in scan_repository() if not t.docstring]
    assert not bare, "tests without a docstring:\n" + "\n".join(bare)


# --------------------------------------------------------------------------------------
# The static scanner.
# --------------------------------------------------------------------------------------

# Every way a module may tag its tests: a partial alias (module and `from` import), the
# mark itself, a module-level and a class-level `pytestmark`, and a class decorator.
TAGGING_FORMS = {
    "test_alias.py": '''
        import functools
        import pytest

        spec = functools.partial(pytest.mark.spec, component="feed_forward", section="3.3")

        @spec(kind="shape")
        @pytest.mark.parametrize("n", [1, 2, 3])
        def test_keeps_shape(n):
            """Output has the input's shape (§3.3)."""

        @spec(kind="error", section="extra")
        def test_bad_size_raises():
            """A negative size raises ValueError."""
            raise AssertionError("fails on purpose")

        def helper_not_a_test():
            pass
    ''',
    "test_direct.py": '''
        import pytest
        from functools import partial
        from pytest import mark

        pytestmark = [pytest.mark.spec(component="positional", section="3.5")]
        tag = partial(mark.spec, kind="equivalence")

        @tag()
        def test_table_matches_formula():
            """The table is the paper's formula. A second sentence is not rendered."""

        @pytest.mark.spec(kind="shape", component="layers")
        def test_closest_tag_wins():
            """Function tags override module tags key by key."""

        @pytest.mark.skip(reason="not on this machine")
        @pytest.mark.spec(kind="error")
        def test_skipped():
            """Skipped tests are reported as skipped."""

        @pytest.fixture
        def broken_teardown():
            yield
            raise RuntimeError("teardown fails")

        @pytest.mark.spec(kind="error")
        def test_teardown_fails(broken_teardown):
            """A test whose teardown fails is a failure even though its call passed."""
    ''',
    "test_class.py": '''
        import pytest

        @pytest.mark.spec(component="model", section="3.4")
        class TestModel:
            pytestmark = pytest.mark.spec(kind="masking")

            def test_in_class(self):
                """A test inside a class inherits the class tags."""

            @pytest.mark.spec(kind="property")
            def test_overrides_class(self):
                """A method tag overrides the class tag."""
    ''',
}

EXPECTED_TAGS = {
    "test_alias.py::test_keeps_shape": ("feed_forward", "3.3", "shape"),
    "test_alias.py::test_bad_size_raises": ("feed_forward", "extra", "error"),
    "test_direct.py::test_table_matches_formula": ("positional", "3.5", "equivalence"),
    "test_direct.py::test_closest_tag_wins": ("layers", "3.5", "shape"),
    "test_direct.py::test_skipped": ("positional", "3.5", "error"),
    "test_direct.py::test_teardown_fails": ("positional", "3.5", "error"),
    "test_class.py::TestModel::test_in_class": ("model", "3.4", "masking"),
    "test_class.py::TestModel::test_overrides_class": ("model", "3.4", "property"),
}


def write_tagging_forms(directory: Path) -> None:
    (directory / "pytest.ini").write_text("[pytest]\nmarkers =\n    spec: a spec tag\n")
    for name, source in TAGGING_FORMS.items():
        (directory / name).write_text(textwrap.dedent(source), encoding="utf-8")


@spec(kind="equivalence")
def test_static_scan_reads_every_tagging_form(tmp_path: Path) -> None:
    """The AST scan finds exactly the test functions and merges the tags of partial aliases, the mark itself, module and class ``pytestmark`` and class decorators, closest winning."""
    write_tagging_forms(tmp_path)
    scanned = sp.scan_tests([tmp_path], relative_to=tmp_path)
    found = {f"{t.path}::{t.name}": (t.component, t.section, t.kind) for t in scanned}
    assert found == EXPECTED_TAGS


@spec(kind="equivalence")
def test_static_scan_and_pytest_recorder_agree_on_tags_lines_and_statements(
    pytester: pytest.Pytester,
) -> None:
    """The static scan and the pytest recorder report the same tag, ``path:line`` and statement for every test, so the matrix checked statically is the matrix rendered."""
    write_tagging_forms(pytester.path)
    _, recorder = run_recorded(pytester)
    recorded = {
        r.nodeid: (r.path, r.line, r.component, r.section, r.kind, r.statement)
        for r in recorder.records()
    }
    scanned = {
        f"{t.path}::{t.name}": (
            t.path,
            t.line,
            t.component,
            t.section,
            t.kind,
            sp.first_sentence(t.docstring),
        )
        for t in sp.scan_tests([pytester.path], relative_to=pytester.path)
    }
    assert recorded == scanned
    assert set(recorded) == set(EXPECTED_TAGS)


def write_suite(directory: Path, modules: dict[str, str]) -> None:
    for name, source in modules.items():
        (directory / name).write_text(textwrap.dedent(source), encoding="utf-8")


COMPLETE_SUITE = {
    name: f'''
        import pytest

        @pytest.mark.spec(component="{name}", section="extra", kind="shape")
        def test_shape():
            """Shape."""

        @pytest.mark.spec(component="{name}", section="extra", kind="equivalence")
        def test_equivalence():
            """Equivalence."""
    '''
    for name in [c.name for c in sp.COMPONENTS]
}


@spec(kind="error")
def test_removing_a_module_reports_its_component_and_missing_kinds(tmp_path: Path) -> None:
    """With the only module of error tests of ``feed_forward`` removed, the matrix check names ``feed_forward`` and the kind ``error`` and nothing else."""
    modules = {f"test_{name}.py": source for name, source in COMPLETE_SUITE.items()}
    for component in sp.COMPONENTS:
        kinds = [k for k in ("error", "masking", "property") if k in component.required]
        decorated = "\n".join(
            f'@pytest.mark.spec(component="{component.name}", section="extra", kind="{k}")\n'
            f'def test_{k}():\n    """{k}."""\n'
            for k in kinds
        )
        modules[f"test_{component.name}_more.py"] = "import pytest\n\n" + decorated
    write_suite(tmp_path, modules)
    assert sp.missing_kinds(sp.coverage_counts(sp.scan_tests([tmp_path]))) == {}

    (tmp_path / "test_feed_forward_more.py").unlink()
    missing = sp.missing_kinds(sp.coverage_counts(sp.scan_tests([tmp_path])))
    assert missing == {"feed_forward": ["error"]}
    assert sp.format_missing(missing) == "feed_forward: no test of kind error"

    (tmp_path / "test_layers_more.py").unlink()
    missing = sp.missing_kinds(sp.coverage_counts(sp.scan_tests([tmp_path])))
    assert missing["layers"] == ["masking", "property", "error"]


@spec(kind="error")
@pytest.mark.parametrize(
    ("tag", "match"),
    [
        (("atention", "3.2.1", "shape"), r"component 'atention' is not one of attention, "),
        (("attention", "3.2", "shape"), r"section '3\.2' is not one of 3\.1, 3\.2\.1, "),
        (("attention", "3.2.1", "equivalent"), r"kind 'equivalent' is not one of shape, "),
        (("attention", "3.2.1", None), r"^no kind$"),
    ],
)
def test_invalid_tag_values_are_named(tag: tuple[str | None, ...], match: str) -> None:
    """A misspelt component, section or kind, or a missing one, is reported naming the value seen and the values allowed."""
    (problem,) = sp.tag_problems(*tag)
    assert re.search(match, problem), problem
    assert sp.tag_problems("attention", "3.2.1", "shape") == []


# --------------------------------------------------------------------------------------
# The recorder, the matrix and the renderers.
# --------------------------------------------------------------------------------------


@spec(kind="shape")
def test_recorder_aggregates_parametrized_cases_into_one_record_with_counts(
    pytester: pytest.Pytester,
) -> None:
    """Each test function gives one record whose counts add up its cases: passed, failed (a failing setup or teardown included), skipped (with the reason) and not run (deselected)."""
    write_tagging_forms(pytester.path)
    result, recorder = run_recorded(pytester, "--deselect", "test_alias.py::test_keeps_shape[3]")
    result.assert_outcomes(passed=7, failed=1, skipped=1, errors=1, deselected=1)
    records = {r.nodeid: r for r in recorder.records()}
    shape = records["test_alias.py::test_keeps_shape"]
    assert shape.counts == Counter({"passed": 2, "not run": 1})
    assert (shape.result, shape.counts_text) == ("PASS", "2 passed, 1 not run")
    assert records["test_alias.py::test_bad_size_raises"].result == "FAIL"
    assert records["test_direct.py::test_teardown_fails"].counts == Counter({"failed": 1})
    skipped = records["test_direct.py::test_skipped"]
    assert (skipped.result, skipped.skip_reason) == ("SKIP", "not on this machine")
    assert recorder.rootpath == pytester.path


def record(nodeid: str, component: str, section: str, kind: str, **counts: int) -> sp.TestRecord:
    path, name = nodeid.split("::")
    return sp.TestRecord(
        nodeid=nodeid,
        path=path,
        line=len(name),  # any distinct line number will do
        component=component,
        section=section,
        kind=kind,
        statement=f"Statement of {name} (§{section}).",
        counts=Counter({k.replace("_", " "): v for k, v in counts.items()}),
    )


SYNTHETIC = [
    record(
        "spec_tests/test_a.py::test_rows_sum_to_one", "attention", "3.2.1", "property", passed=3
    ),
    record(
        "spec_tests/test_a.py::test_mask_hides_keys",
        "attention",
        "3.2.3",
        "masking",
        passed=1,
        failed=1,
    ),
    record("spec_tests/test_a.py::test_bad_dims", "attention", "extra", "error", skipped=2),
    record("spec_tests/test_a.py::test_like_torch", "attention", "torch", "equivalence", not_run=4),
    record(
        "spec_tests/test_a.py::test_like_torch_too", "attention", "torch", "equivalence", passed=1
    ),
    record("spec_tests/test_m.py::test_embedding_scale", "model", "3.4", "equivalence", passed=1),
    record("spec_tests/test_m.py::test_logits_shape", "model", "3.1", "shape", passed=1),
    record("spec_tests/test_f.py::test_no_tag", "feed_forward", "3.3", "shap", passed=1),
]
INFO = sp.RunInfo("2.13.0", "3.11.7", "2025-01-01 00:00 UTC", "abc1234", "-m not slow")


def matrix_rows(markdown: str) -> dict[str, list[str]]:
    """Component -> the cells of its row in the rendered coverage matrix."""
    section = markdown.split("## Coverage matrix", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and (name := re.match(r"`(\w+)`", cells[0])):
            rows[name.group(1)] = cells[1:]
    return rows


@spec(kind="equivalence")
def test_matrix_cells_count_tests_per_component_and_kind(tmp_path: Path) -> None:
    """Each matrix cell holds the number of test functions of that component and kind (embeddings counting model tests of §3.4), or MISSING, or n/a with the reason, or - for an optional kind."""
    rows = matrix_rows(sp.render_markdown(sp.build_document(SYNTHETIC, INFO, tmp_path, tmp_path)))
    assert list(rows) == [c.name for c in sp.COMPONENTS]
    # columns: shape, masking, equivalence, property, error
    assert rows["attention"] == ["**MISSING**", "1", "2", "1", "1"]
    assert rows["model"] == ["1", "-", "1", "-", "**MISSING**"]
    assert rows["embeddings"] == ["**MISSING**", "-", "1", "-", "**MISSING**"]
    assert (
        rows["feed_forward"][1]
        == "n/a: " + sp.COMPONENT_BY_NAME["feed_forward"].not_applicable["masking"]
    )
    assert rows["feed_forward"][0] == "**MISSING**"  # its only test has the invalid kind "shap"
    assert rows["bench"][2].startswith("n/a: measures time and memory only")


@spec(kind="shape")
def test_markdown_states_each_property_with_its_location_and_result(tmp_path: Path) -> None:
    """The Markdown states each valid test's statement under its paper section with its result, ``path:line`` linked relative to the output directory, and case counts; an invalid tag is listed with its problem."""
    out_dir, root = tmp_path / "docs", tmp_path
    markdown = sp.render_markdown(sp.build_document(SYNTHETIC, INFO, out_dir, root))
    for line in ("| torch | `2.13.0` |", "| python | `3.11.7` |", "| commit | `abc1234` |"):
        assert line in markdown
    expected_result = {
        "test_rows_sum_to_one": ("PASS", "3 passed"),
        "test_mask_hides_keys": ("**FAIL**", "1 passed, 1 failed"),
        "test_bad_dims": ("SKIP", "2 skipped"),
        "test_like_torch": ("NOT RUN", "4 not run"),
        "test_embedding_scale": ("PASS", "1 passed"),
    }
    for r in SYNTHETIC[:-1]:
        name = r.nodeid.split("::")[1]
        link = f"[`{r.path}:{r.line}`](../{r.path})"  # no #L: a local file has no line anchors
        row = next(line for line in markdown.splitlines() if r.statement in line)
        assert link in row
        if name in expected_result:
            result, counts = expected_result[name]
            assert row.startswith(f"| {result} | {r.statement} | {r.kind} | ")
            assert row.endswith(f" | {counts} |")
    # Sections in the paper's order, then our guarantees, then torch behaviour.
    headings = [line for line in markdown.splitlines() if line.startswith("### §")]
    assert [h.split()[1] for h in headings] == [f"§{s}" for s in sp.PAPER_SECTIONS]
    where = {r.nodeid.split("::")[1]: markdown.index(r.statement) for r in SYNTHETIC[:-1]}
    assert (
        where["test_logits_shape"]  # §3.1
        < where["test_rows_sum_to_one"]  # §3.2.1
        < where["test_mask_hides_keys"]  # §3.2.3
        < where["test_embedding_scale"]  # §3.4
        < markdown.index("## Beyond the paper")
        < where["test_bad_dims"]
        < markdown.index("## Torch behaviour")
        < where["test_like_torch"]
    )
    invalid = markdown.split("## Tests with an invalid tag", 1)[1]
    assert "`spec_tests/test_f.py::test_no_tag` | kind 'shap' is not one of" in invalid


@spec(kind="equivalence")
def test_html_is_self_contained_and_states_what_the_markdown_states(tmp_path: Path) -> None:
    """The HTML page has inline CSS and no script or outside resource, and carries the same statements, links and results as the Markdown, escaped."""
    records = [
        *SYNTHETIC,
        record("spec_tests/test_x.py::test_lt", "layers", "3.1", "shape", passed=1),
    ]
    records[-1].statement = "Scores `a < b` & ``<b>not bold</b>`` or <i>this</i> stay text (§3.1)."
    blocks = sp.build_document(records, INFO, tmp_path / "docs", tmp_path)
    page, markdown = sp.render_html(blocks), sp.render_markdown(blocks)
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert not re.search(r"<script|<link|src=|url\(|@import|https?:", page)
    assert (
        "Scores <code>a &lt; b</code> &amp; <code>&lt;b&gt;not bold&lt;/b&gt;</code> or "
        "&lt;i&gt;this&lt;/i&gt; stay text" in page
    )
    for r in SYNTHETIC[:-1]:  # the last one's tag is invalid: listed by node id instead
        assert r.statement in markdown and r.statement in page
        assert f'href="../{r.path}"' in page
    assert page.count('class="fail"') == markdown.count("**FAIL**") == 1
    assert page.count('class="missing"') == markdown.count("**MISSING**")


@spec(kind="equivalence")
@pytest.mark.parametrize(
    ("docstring", "sentence"),
    [
        (None, ""),
        ("One line (§3.2.1).", "One line (§3.2.1)."),
        ("Wrapped over\n    two lines.\n\n    Details.", "Wrapped over two lines."),
        ("First. Second.", "First."),
        (
            'Quote (§3.4 "share ... And the pre-softmax"). More.',
            'Quote (§3.4 "share ... And the pre-softmax").',
        ),
        ("Calls ``x.size(0)``. Then.", "Calls ``x.size(0)``."),
        ("Returns `x. Y` as is. Then.", "Returns `x. Y` as is."),
        ("Returns ``x. Y`` as is. Then.", "Returns ``x. Y`` as is."),
        ("Values like 1.5 and e.g. this. Next", "Values like 1.5 and e.g. this."),
        ('He said "stop. Now" and left. Then.', 'He said "stop. Now" and left.'),
        ("No full stop", "No full stop"),
    ],
)
def test_statement_is_the_first_sentence_of_the_docstring(
    docstring: str | None, sentence: str
) -> None:
    """The statement is the docstring's first sentence on one line; a full stop inside brackets, quotes, code or a number does not end it."""
    assert sp.first_sentence(docstring) == sentence


@spec(kind="shape")
def test_spec_command_is_on_the_cli_and_passes_arguments_after_double_dash_to_pytest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``transformer spec --out DIR -- ARGS`` reaches ``run_spec`` with DIR and ARGS (without the ``--``); without arguments it writes to docs/."""
    calls = []
    monkeypatch.setattr(sp, "run_spec", lambda args, out: calls.append((args, out)) or 0)
    parser = build_parser()
    for argv in (["spec", "--out", "site", "--", "-k", "mask", "-x"], ["spec"]):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    assert calls == [(["-k", "mask", "-x"], Path("site")), ([], Path("docs"))]


@pytest.mark.spec(component="specification", section="extra", kind="error")
@pytest.mark.parametrize(
    "case", ["own-notes", "own-notes-forced", "earlier-rendering", "out-is-a-file"]
)
def test_spec_command_replaces_only_documents_it_wrote_and_checks_out_first(
    case: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before any test runs, ``transformer spec --out DIR`` refuses (exit 1, one line naming --out) a specification.md it did not write, unless ``--force``, and an --out that is a file; one it rendered before is replaced."""
    calls = []
    monkeypatch.setattr(sp, "run_spec", lambda args, out: calls.append(out) or 0)
    out = tmp_path / "site"
    out.mkdir()
    document = out / "specification.md"
    if case.startswith("own-notes"):
        document.write_text("MY OWN NOTES\n", encoding="utf-8")
    elif case == "earlier-rendering":
        document.write_text("# x\n\nGenerated by `transformer spec` (or ...)\n", encoding="utf-8")
    else:
        out = tmp_path / "a-file"
        out.write_text("in the way", encoding="utf-8")
    argv = ["spec", "--out", str(out), *(["--force"] if case.endswith("forced") else [])]
    code = main(argv)
    refused = case in ("own-notes", "out-is-a-file")
    assert code == (1 if refused else 0)
    assert calls == ([] if refused else [out])
    err = capsys.readouterr().err.strip()
    if refused:
        assert f"--out {out}" in err and len(err.splitlines()) == 1, err
    if case == "own-notes":
        assert "--force" in err and document.read_text(encoding="utf-8") == "MY OWN NOTES\n"


# --------------------------------------------------------------------------------------
# Static reading limits, the documents' edge rows and `transformer spec` end to end.
# --------------------------------------------------------------------------------------

ALIAS_FORMS = '''
    import functools
    from typing import Any

    import pytest

    KW = {"section": "extra"}
    KIND = "error"
    spec: Any = functools.partial(pytest.mark.spec, component="data", section="extra")
    bare = pytest.mark.spec

    @spec(kind="shape")
    def test_annotated_alias():
        """An annotated alias binds its keywords."""

    @bare(component="data", section="3.1", kind="error")
    def test_bare_alias():
        """The mark itself under another name."""

    @spec(kind=KIND)
    def test_non_literal():
        """A name where a literal belongs."""

    @pytest.mark.spec(component="data", kind="error", **KW)
    def test_double_star():
        """Keywords from a mapping."""
'''


@spec(kind="error")
def test_static_scan_follows_aliases_and_flags_tags_it_cannot_read(tmp_path: Path) -> None:
    """The AST scan reads annotated and bare aliases of the mark, and reports a tag value it cannot evaluate statically (a name, ``**mapping``) as a problem instead of guessing it."""
    (tmp_path / "test_forms.py").write_text(textwrap.dedent(ALIAS_FORMS), encoding="utf-8")
    scanned = {t.name: t for t in sp.scan_tests([tmp_path])}
    tags = {name: (t.component, t.section, t.kind) for name, t in scanned.items()}
    assert tags["test_annotated_alias"] == ("data", "extra", "shape")
    assert tags["test_bare_alias"] == ("data", "3.1", "error")
    (problem,) = sp.tag_problems(*tags["test_non_literal"])
    assert problem.startswith("kind '<not a literal: KIND>' is not one of")
    assert sp.tag_problems(*tags["test_double_star"]) == ["no section"]


@spec(kind="shape")
def test_skip_reasons_and_missing_docstrings_are_shown(tmp_path: Path) -> None:
    """A skipped test's row gives the skip reason after its counts, and a test with a valid tag but no docstring is listed among the invalid ones as 'no docstring'."""
    skipped = record("spec_tests/test_k.py::test_on_gpu", "attention", "extra", "shape", skipped=2)
    skipped.skip_reason = "needs CUDA"
    bare = record("spec_tests/test_k.py::test_bare", "attention", "extra", "error", passed=1)
    bare.statement = ""
    markdown = sp.render_markdown(sp.build_document([skipped, bare], INFO, tmp_path, tmp_path))
    row = next(line for line in markdown.splitlines() if skipped.statement in line)
    assert row.endswith(" | 2 skipped: needs CUDA |")
    invalid = markdown.split("## Tests with an invalid tag or no docstring", 1)[1]
    assert "| `spec_tests/test_k.py::test_bare` | no docstring | PASS |" in invalid


@spec(kind="shape")
def test_recorder_skips_items_that_are_not_test_functions(pytester: pytest.Pytester) -> None:
    """Doctests (items without a Python test function) run but give no record; test functions beside them are recorded."""
    write_suite(
        pytester.path,
        {
            "helpers.py": '''
                def double(x):
                    """Twice x.

                    >>> double(2)
                    4
                    """
                    return 2 * x
            ''',
            "test_one.py": '''
                import pytest

                @pytest.mark.spec(component="data", section="extra", kind="shape")
                def test_one():
                    """One test."""
            ''',
        },
    )
    result, recorder = run_recorded(pytester, "--doctest-modules")
    result.assert_outcomes(passed=2)
    assert [r.nodeid for r in recorder.records()] == ["test_one.py::test_one"]


def _spec_args(*extra: str) -> list[str]:
    return ["-p", "no:cacheprovider", "-p", "no:hypothesispytest", *extra]


@spec(kind="shape")
def test_run_spec_runs_pytest_and_writes_markdown_and_html(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run_spec` runs pytest with the default suite's -m selection (unless -m is given), writes specification.md and .html with the run's arguments and statements, prints the required kinds missing, and returns pytest's status."""
    write_tagging_forms(pytester.path)
    status = sp.run_spec(_spec_args(), pytester.path / "docs")
    assert status == pytest.ExitCode.TESTS_FAILED  # test_bad_size_raises fails on purpose
    markdown = (pytester.path / "docs" / "specification.md").read_text(encoding="utf-8")
    page = (pytester.path / "docs" / "specification.html").read_text(encoding="utf-8")
    default_selection = "-m 'not slow and not triton and not triton_offline'"
    assert f"| pytest arguments | `{default_selection} -p no:cacheprovider " in markdown
    assert "| commit | `unknown (not a git checkout)` |" in markdown
    for statement in (
        "Output has the input's shape (§3.3).",
        "A method tag overrides the class tag.",
    ):
        assert statement in markdown and statement in page
    printed = capsys.readouterr().out
    assert "coverage matrix, required kinds without a test:\nattention: no test of kind" in printed
    assert f"wrote {pytester.path / 'docs' / 'specification.md'} and " in printed

    status = sp.run_spec(_spec_args("-mslow"), pytester.path / "picked")
    assert status == pytest.ExitCode.NO_TESTS_COLLECTED  # every test deselected
    markdown = (pytester.path / "picked" / "specification.md").read_text(encoding="utf-8")
    assert "| pytest arguments | `-p no:cacheprovider -p no:hypothesispytest -mslow` |" in markdown
    assert "8 tests (8 NOT RUN); 10 cases (10 not run)" in markdown


@spec(kind="equivalence")
def test_run_spec_draws_under_the_ci_profile_unless_hypothesis_profile_names_one(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run_spec` runs the tests with HYPOTHESIS_PROFILE=ci (the default suite's derandomized profile) when the variable is unset, and with the named profile when it is set; the document names the profile and the variable is as before afterwards."""
    seen = pytester.path / "seen.txt"
    pytester.makepyfile(
        test_profile=textwrap.dedent(
            f'''
            import os
            import pytest

            @pytest.mark.spec(component="attention", section="3.2.1", kind="shape")
            def test_records_profile():
                """Records the profile."""
                with open({str(seen)!r}, "a") as f:
                    f.write(os.environ.get("HYPOTHESIS_PROFILE", "<unset>") + " ")
            '''
        )
    )
    monkeypatch.delenv("HYPOTHESIS_PROFILE", raising=False)
    assert sp.run_spec(_spec_args(), pytester.path / "a") == pytest.ExitCode.OK
    assert "HYPOTHESIS_PROFILE" not in os.environ
    monkeypatch.setenv("HYPOTHESIS_PROFILE", "thorough")
    assert sp.run_spec(_spec_args(), pytester.path / "b") == pytest.ExitCode.OK
    assert os.environ["HYPOTHESIS_PROFILE"] == "thorough"
    assert seen.read_text().split() == ["ci", "thorough"]
    for out, profile in (("a", "ci"), ("b", "thorough")):
        markdown = (pytester.path / out / "specification.md").read_text(encoding="utf-8")
        assert f"| hypothesis profile | `{profile}` |" in markdown


@spec(kind="error")
def test_run_spec_without_tests_or_without_pytest_renders_nothing_and_fails(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run_spec` on a directory without tests, or where pytest cannot be imported, writes no document, says why on stderr and returns a non-zero status."""
    status = sp.run_spec(_spec_args(), pytester.path / "docs")
    assert status == pytest.ExitCode.NO_TESTS_COLLECTED
    assert "transformer spec: no test collected; nothing rendered" in capsys.readouterr().err
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "pytest", None)  # `import pytest` raises ImportError
        status = sp.run_spec([], pytester.path / "docs")
    assert status == 2
    assert "`transformer spec` needs pytest: pip install" in capsys.readouterr().err
    assert not (pytester.path / "docs").exists()


@spec(kind="equivalence")
def test_commit_is_head_now_marked_when_the_tree_differs_except_for_the_documents(
    tmp_path: Path,
) -> None:
    """The run's commit is git's short HEAD hash at render time, with '(with uncommitted changes)' when a tracked or untracked file differs other than the documents being written, and 'unknown (not a git checkout)' outside a repository."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert sp.git_commit(plain) == "unknown (not a git checkout)"

    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)

    def git(*args: str) -> str:
        identity = ["-c", "user.name=spec", "-c", "user.email=spec@example.invalid"]
        done = subprocess.run(
            ["git", *identity, *args], cwd=repo, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    documents = [repo / "docs" / "specification.md", repo / "docs" / "specification.html"]
    git("init", "-q")
    (repo / "tracked.txt").write_text("one\n")
    documents[0].write_text("old\n")
    git("add", "tracked.txt", "docs/specification.md")
    git("commit", "-q", "-m", "first")
    first = git("rev-parse", "--short", "HEAD")
    assert sp.git_commit(repo, documents) == first
    documents[0].write_text("rendered again\n")
    documents[1].write_text("new page\n")
    assert sp.git_commit(repo, documents) == first
    (repo / "tracked.txt").write_text("two\n")
    git("commit", "-q", "-am", "second")
    second = git("rev-parse", "--short", "HEAD")
    assert second != first
    assert sp.git_commit(repo, documents) == second
    (repo / "test_new.py").write_text("untracked\n")
    assert sp.git_commit(repo, documents) == f"{second} (with uncommitted changes)"
    (repo / "test_new.py").unlink()
    (repo / "tracked.txt").write_text("three\n")
    assert sp.git_commit(repo, documents) == f"{second} (with uncommitted changes)"


@spec(kind="error")
def test_a_module_no_component_declares_is_reported_under_its_component(tmp_path: Path) -> None:
    """Tests of ``feed_forward`` in a module that ``feed_forward`` does not list are reported as undeclared, naming the component and the module."""
    write_suite(tmp_path, {"test_stray.py": COMPLETE_SUITE["feed_forward"]})
    tests = sp.scan_tests([tmp_path], relative_to=tmp_path)
    assert sp.undeclared_modules(tests) == {"feed_forward": ["test_stray.py"]}
    missing = sp.missing_modules(tests)
    assert "spec_tests/test_feed_forward.py" in missing["feed_forward"]


@spec(kind="property")
def test_contents_links_every_section_to_an_anchor_of_both_documents(tmp_path: Path) -> None:
    """The document opens with a table of contents linking every heading after it; each link's anchor is an id in the HTML page and in the Markdown."""
    blocks = sp.build_document(SYNTHETIC, INFO, tmp_path / "docs", tmp_path)
    headings = [b for b in blocks if isinstance(b, sp.Heading)]
    at = next(i for i, h in enumerate(headings) if h.anchor == "contents")
    assert at == 1  # right after the title
    page, markdown = sp.render_html(blocks), sp.render_markdown(blocks)
    links = re.findall(r'href="#([^"]+)"', page)
    assert links == [h.anchor for h in headings[at + 1 :]]
    assert len(links) == len(set(links))
    for anchor in links:
        assert f'id="{anchor}"' in page
        assert f'<a id="{anchor}"></a>' in markdown and f"](#{anchor})" in markdown
