"""The conformance report: Markdown for people, JSON for tools, one row per property.

The Markdown opens with the verdict and, when something fails, the property to look at
first (the lowest-ranked failure: a wrong default scale, not the many equivalence cases
it breaks). Then one table per section, and each failure in full: the property in one
sentence, the case, the worst element with both values, its error against its bound.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformer.conformance.case import DTYPES
from transformer.conformance.memory import LIMITS
from transformer.conformance.registry import SECTIONS
from transformer.conformance.runner import (
    FAIL,
    FORWARD_ONLY,
    SILENT,
    UNSUPPORTED,
    PropertyResult,
    Report,
)

__all__ = ["render_markdown", "render_matrix", "to_json", "write_matrix", "write_report"]

_SHORT = {dtype: name for name, dtype in DTYPES.items()}


def _detail(p: PropertyResult) -> str:
    bad = p.first(FAIL)
    if bad is not None:
        return bad.detail.splitlines()[0]
    refused = p.first(UNSUPPORTED) or p.first(FORWARD_ONLY)
    notes = [r.detail for r in p.results if r.status == "PASS" and r.detail]
    if p.status in (UNSUPPORTED, FORWARD_ONLY) and refused is not None:
        return refused.detail
    if not p.results:
        return "no case on this device"
    # The memory note repeats what the check cannot see; the report says that once.
    text = notes[0].split("; cannot see:")[0] if notes else ""
    if refused is not None:
        text = (text + "; " if text else "") + f"some cases refused: {refused.detail}"
    return text


def _counts(p: PropertyResult) -> str:
    parts = [f"{p.count('PASS')} pass"]
    if p.count(FAIL):
        parts.append(f"{p.count(FAIL)} {'silent' if p.prop.section == 'errors' else 'fail'}")
    if p.count(FORWARD_ONLY):
        parts.append(f"{p.count(FORWARD_ONLY)} forward only")
    if p.count(UNSUPPORTED):
        parts.append(f"{p.count(UNSUPPORTED)} unsupported")
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary(report: Report) -> str:
    """One line: the verdict on core and memory, and the counts of the rest."""
    core = [p for p in report.properties if p.prop.section == "core"]
    core_fail = sum(p.status == FAIL for p in core)
    mem_fail = sum(p.status == FAIL for p in report.in_section("memory"))
    if core_fail or mem_fail:
        verdict = f"{core_fail} core and {mem_fail} memory properties FAIL"
    else:
        passing = sum(p.status == "PASS" for p in core)
        forward = sum(p.status == FORWARD_ONLY for p in core)
        extra = f", {forward} forward only" if forward else ""
        verdict = f"no core or memory property fails ({passing} of {len(core)} core pass{extra})"
    ext = report.in_section("extensions")
    ext_text = ", ".join(
        f"{sum(p.status == s for p in ext)} {s}" for s in ("PASS", FAIL, UNSUPPORTED)
    )
    silent = sum(p.count(FAIL) for p in report.in_section("errors"))
    return f"{verdict}; extensions: {ext_text}; bad inputs answered silently: {silent}"


def render_markdown(report: Report) -> str:
    """The whole report as Markdown."""
    s = report.settings
    cases = sum(len(p.results) for p in report.properties)
    lines = [
        f"# Attention conformance of `{report.target}`",
        "",
        f"torch {report.torch_version}, device {s.device}, tier {s.tier}, dtypes "
        f"{', '.join(_SHORT[d] for d in s.dtypes)}: {cases} cases in {report.seconds:.1f} s.",
        "",
        f"**{summary(report)}.**",
        "",
    ]
    if report.interrupted is not None:
        lines += [
            f"**Interrupted** while running {report.interrupted}: only what finished before "
            "is reported.",
            "",
        ]
    failures = report.failures()
    if failures:
        first = failures[0]
        lines += [
            f"Start here: **{first.prop.name}** ({first.prop.section}): {first.prop.statement}",
            "",
        ]
    for section, title in SECTIONS.items():
        rows = report.in_section(section)
        if not rows:
            continue
        lines += [f"## {title}", "", "| property | status | cases | detail |", "|---|---|---|---|"]
        for p in rows:
            lines.append(f"| {p.prop.name} | {p.status} | {_counts(p)} | {_cell(_detail(p))} |")
        if section == "memory":
            lines += ["", f"What the memory check cannot see: {LIMITS}."]
        lines.append("")
    if failures or report.silent():
        lines += ["## Failures, root cause first", ""]
        for p in [*failures, *report.silent()]:
            bad = p.first(FAIL)
            assert bad is not None
            lines += [
                f"### {p.prop.name}: {p.status}",
                "",
                p.prop.statement,
                "",
                f"Source: {p.prop.source}. {_counts(p)} of {len(p.results)} cases.",
                "",
                "```",
                bad.detail,
                "```",
                "",
            ]
    lines += [
        "## What the sections mean",
        "",
        "- **core**: torch SDPA's documented behaviour; the exit status fails on a FAIL here.",
        "- **memory**: FlashAttention's O(L + S) promise; the exit status fails on a FAIL here.",
        "- **extensions**: this package's additions; a kernel that raises there is "
        "UNSUPPORTED, and only `--strict` counts them.",
        "- **errors**: bad input; SILENT means the kernel answered instead of raising "
        "(informational).",
        "- PASS (forward only): the output is right on every case that ran; the kernel "
        "refused the backward.",
        "- UNSUPPORTED: the kernel raised NotImplementedError, TypeError or ValueError "
        "(any error, in extensions) for every case of the property.",
        "",
    ]
    return "\n".join(lines)


def to_json(report: Report) -> dict[str, Any]:
    """The report as plain data: settings, then one entry per property with every failing case."""
    s = report.settings
    props = []
    for p in report.properties:
        bad = [r for r in p.results if r.status == FAIL]
        props.append(
            {
                "name": p.prop.name,
                "section": p.prop.section,
                "status": p.status,
                "statement": p.prop.statement,
                "source": p.prop.source,
                "cases": len(p.results),
                "passed": p.count("PASS"),
                "failed": len(bad),
                "unsupported": p.count(UNSUPPORTED),
                "detail": _detail(p),
                "failures": [{"case": r.case.describe(), "message": r.detail} for r in bad],
                "seconds": round(sum(r.seconds for r in p.results), 3),
            }
        )
    return {
        "target": report.target,
        "torch": report.torch_version,
        "device": s.device,
        "tier": s.tier,
        "dtypes": [_SHORT[d] for d in s.dtypes],
        "seconds": round(report.seconds, 2),
        "summary": summary(report),
        "root_cause": report.failures()[0].prop.name if report.failures() else None,
        "interrupted": report.interrupted,
        "memory_limits": LIMITS,
        "properties": props,
        "status_values": [
            "PASS",
            FAIL,
            UNSUPPORTED,
            FORWARD_ONLY,
            SILENT,
            "NOT RUN",
        ],
    }


def write_report(report: Report, out_dir: Path) -> tuple[Path, Path]:
    """Write ``conformance.md`` and ``conformance.json`` into ``out_dir``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "conformance.md", out_dir / "conformance.json"
    md.write_text(render_markdown(report))
    js.write_text(json.dumps(to_json(report), indent=2) + "\n")
    return md, js


_MARK = {
    "PASS": "PASS",
    FAIL: "**FAIL**",
    UNSUPPORTED: "unsupported",
    FORWARD_ONLY: "fwd only",
    SILENT: "silent",
    "NOT RUN": "-",
}


def render_matrix(reports: dict[str, dict[str, Any]]) -> str:
    """A kernel x property table (Markdown) from the JSON of several reports, keyed by kernel name."""
    names = list(reports)
    order: list[tuple[str, str]] = []
    for data in reports.values():
        for p in data["properties"]:
            if (p["section"], p["name"]) not in order:
                order.append((p["section"], p["name"]))
    sections = list(SECTIONS)
    order.sort(key=lambda sp: sections.index(sp[0]))
    status = {
        (kernel, p["name"]): p["status"]
        for kernel, data in reports.items()
        for p in data["properties"]
    }
    lines = [
        "| section | property | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for section, prop in order:
        cells = [_MARK.get(status.get((k, prop), "NOT RUN"), "-") for k in names]
        lines.append(f"| {section} | {prop} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_matrix(root: Path) -> Path:
    """Write ``root/README.md``: the matrix of every ``root/*/conformance.json``, with links."""
    reports = {
        path.parent.name: json.loads(path.read_text())
        for path in sorted(root.glob("*/conformance.json"))
    }
    header = [
        "# Conformance reports",
        "",
        "Each folder holds one kernel's report (`conformance.md`, `conformance.json`), made by",
        "`tox -e conformance`. The table gives each property's status per kernel.",
        "",
    ]
    rows = [
        f"- [{name}]({name}/conformance.md): `{data['target']}`, tier {data['tier']}, "
        f"dtypes {', '.join(data['dtypes'])}, torch {data['torch']}: {data['summary']}"
        for name, data in reports.items()
    ]
    out = root / "README.md"
    out.write_text("\n".join([*header, *rows, "", render_matrix(reports)]))
    return out


if __name__ == "__main__":  # python -m transformer.conformance.report DIR
    import sys

    print(write_matrix(Path(sys.argv[1])))
