"""The specification document: its blocks, their Markdown and HTML renderings, writing both.

:func:`build_document` turns test records into blocks (headings, paragraphs, tables):
the run, the coverage matrix, then the statements by paper section and component;
:func:`render_markdown` and :func:`render_html` write the same blocks as
``specification.md`` and a self-contained ``specification.html``
(:func:`write_documents`).
"""

from __future__ import annotations

import html
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformer.spec_components import (
    BASE_REQUIRED,
    COMPONENTS,
    KINDS,
    PAPER_SECTIONS,
    SECTIONS,
    tag_problems,
)
from transformer.spec_records import TestRecord, coverage_counts, missing_kinds


@dataclass(frozen=True)
class RunInfo:
    """Where and how the records were produced: shown at the top of the document."""

    torch: str
    python: str
    date: str
    commit: str
    pytest_args: str
    #: The Hypothesis profile the property tests drew their examples under ("" = not known).
    hypothesis_profile: str = ""


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
                    Cell("hypothesis profile"),
                    Cell(f"`{info.hypothesis_profile}`" if info.hypothesis_profile else ""),
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
