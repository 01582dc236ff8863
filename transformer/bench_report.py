"""The attention benchmark's report as people read it: a text table and a figure.

:func:`format_table` prints the rows with their peak-memory footnotes;
:func:`attention_figure` plots median time against sequence length, log-log, and
:func:`_plot` writes it as the report's PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformer.bench_candidates import MODES


def format_table(report: dict[str, Any]) -> str:
    """The report's rows as a fixed-width text table (skipped rows say why)."""
    head = f"{'kernel':<20} {'dtype':<5} {'L':>6} {'causal':<6} {'mode':<8} "
    head += f"{'median ms':>10} {'GFLOP/s':>8} {'% peak':>7} {'x sdpa':>7} {'peak MiB':>9}"
    lines = [f"{report['device']} | {report['hardware']} | torch {report['torch']}", head]
    notes: dict[str, str] = {}
    for r in report["rows"]:
        key = f"{r['kernel']:<20} {r['dtype']:<5} {r['seq_len']:>6} "
        key += f"{r['causal']!s:<6} {r['mode']:<8} "
        if r["skipped"]:
            lines.append(key + f"skipped: {r['skipped']}")
            continue
        ratio, share = r["ratio_to_torch_sdpa"], r.get("percent_of_peak")
        lines.append(
            key
            + f"{r['median_ms']:>10.2f} {r['gflops']:>8.1f} "
            + f"{(f'{share:.1f}' if share is not None else '-'):>7} "
            + f"{(f'{ratio:.2f}' if ratio is not None else '-'):>7} "
            + _memory_cell(r, notes)
        )
    lines += [f"{mark} {note}" for note, mark in notes.items()]
    if report.get("memory_method"):
        lines.append(f"peak MiB: {report['memory_method']}")
    return "\n".join(lines)


def _memory_cell(row: dict[str, Any], notes: dict[str, str]) -> str:
    """The peak column: the figure, with a footnote mark when something may be unseen."""
    mib, note = row["peak_memory_mib"], row.get("memory_note")
    if mib is None:
        return f"{'n/a':>9}" + (
            "" if note is None else f" {notes.setdefault(note, '*' * (len(notes) + 1))}"
        )
    cell = f"{mib:>9.1f}"
    return cell if note is None else f"{cell}{notes.setdefault(note, '*' * (len(notes) + 1))}"


#: Row labels of the bench figure, in :data:`MODES` order.
MODE_TITLES = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "forward+backward"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
#: The bench figure is at most this wide (inches, at dpi 100: 1600 px), so it reads at 100%.
_MAX_WIDTH_IN = 16.0


def attention_figure(report: dict[str, Any]) -> Any:
    """Median time against sequence length, log-log: a row per mode, a column per dtype x causal.

    Rows are forward, backward, forward+backward (in that order, the modes present);
    columns each dtype (in report order), full then causal. Every kernel keeps its colour
    and marker in all panels, and one legend outside the axes names them. Returns a
    ``matplotlib.figure.Figure`` (Agg, never pyplot's global state).
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = [r for r in report["rows"] if not r["skipped"]]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)] or list(MODES[:1])
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    columns = [
        (d, c)
        for d in dtypes
        for c in (False, True)
        if any((r["dtype"], r["causal"]) == (d, c) for r in rows)
    ] or [("", False)]
    kernels = sorted({r["kernel"] for r in rows})
    width = min(_MAX_WIDTH_IN, 1.8 + 3.4 * len(columns))
    fig = Figure(figsize=(width, 1.2 + 2.6 * len(modes)), dpi=100, layout="constrained")
    axes = fig.subplots(len(modes), len(columns), squeeze=False, sharex=True)
    palette = [f"C{i % 10}" for i in range(len(kernels))]
    for i, mode in enumerate(modes):
        for j, (dtype, causal) in enumerate(columns):
            ax = axes[i][j]
            for k, kernel in enumerate(kernels):
                sel = sorted(
                    (
                        r
                        for r in rows
                        if (r["kernel"], r["dtype"], r["causal"], r["mode"])
                        == (kernel, dtype, causal, mode)
                    ),
                    key=lambda r: r["seq_len"],
                )
                if sel:
                    ax.plot(
                        [r["seq_len"] for r in sel],
                        [r["median_ms"] for r in sel],
                        marker=_MARKERS[k % len(_MARKERS)],
                        color=palette[k],
                        label=kernel,
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if i == 0:
                ax.set_title(f"{dtype}, {'causal' if causal else 'full'}", fontsize=10)
            if i == len(modes) - 1:
                ax.set_xlabel("sequence length L = S")
            if j == 0:
                ax.set_ylabel(f"{MODE_TITLES[mode]}\nmedian time (ms)")
    handles = [
        Line2D([], [], marker=_MARKERS[k % len(_MARKERS)], color=palette[k], label=kernel)
        for k, kernel in enumerate(kernels)
    ]
    fig.legend(handles=handles, loc="outside right upper", title="kernel")
    fig.suptitle(f"attention on {report['hardware']} (torch {report['torch']})", fontsize=11)
    return fig


def _plot(report: dict[str, Any], path: Path) -> None:
    """Write :func:`attention_figure` of ``report`` to a PNG at dpi 100."""
    attention_figure(report).savefig(path, dpi=100)
