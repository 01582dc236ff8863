"""The files of a training run beside its checkpoint: metrics.jsonl and the loss plot.

Imports no torch and nothing of the package: the loop writes through these helpers,
the command line and the tests read through them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINT_DIR",
    "METRICS_FILE",
    "PLOT_FILE",
    "RUN_FILES",
    "STEP_CHECKPOINTS_DIR",
    "held_run_files",
    "plot_metrics",
    "plot_title",
    "read_metrics",
    "read_metrics_until_torn",
    "remove_run_files",
    "write_atomically",
]

#: The run directory's checkpoint (``save_checkpoint`` format).
CHECKPOINT_DIR = "checkpoint"
#: One JSON object per logged step.
METRICS_FILE = "metrics.jsonl"
#: The loss and learning-rate plot.
PLOT_FILE = "loss.png"
#: Where ``keep_last`` keeps the step checkpoints, beside ``DIR/checkpoint``.
STEP_CHECKPOINTS_DIR = "checkpoints"
#: Everything a run writes into its directory: its checkpoint (``.old``: the previous one,
#: kept while a save is between its two renames), the step checkpoints of ``keep_last``,
#: the metrics and the plot. A new run into a directory holding any of them would mix
#: two runs, so ``train`` and the command line refuse it unless told to replace them.
RUN_FILES = (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old", STEP_CHECKPOINTS_DIR, METRICS_FILE, PLOT_FILE)


def held_run_files(out: Path) -> list[str]:
    """The names of :data:`RUN_FILES` present in the run directory ``out``."""
    return [name for name in RUN_FILES if (out / name).exists()]


def remove_run_files(out: Path, names: Sequence[str]) -> None:
    """Delete ``names`` (run files or folders) from ``out``; call only once every check passed."""
    for name in names:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order (an absent file has none)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_metrics_until_torn(path: Path) -> list[dict[str, Any]]:
    """Records of metrics.jsonl up to a torn last line (a process killed mid-append)."""
    records: list[dict[str, Any]] = []
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one rename: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def plot_title(path: str | os.PathLike[str], *, task: str | None = None) -> str:
    """The loss plot's title: the task (when known) and the run, named by its directory."""
    run = Path(os.path.abspath(path)).parent.name or os.fspath(path)
    return f"task {task} \N{EM DASH} run {run}" if task else f"run {run}"


def plot_metrics(
    records: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    task: str | None = None,
    title: str | None = None,
) -> None:
    """Draw the training loss (and plain cross-entropy) and the learning rate to a PNG.

    The title is ``title`` or else :func:`plot_title` (the task, when given, and the run
    directory that holds ``path``).
    """
    # The object-oriented API renders with Agg and never touches pyplot's global backend.
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] for r in records], label="training loss (label-smoothed)")
    if records and "nll" in records[0]:
        ax.plot(steps, [r["nll"] for r in records], label="cross-entropy", alpha=0.8)
    ax.set_title(title or plot_title(path, task=task), fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if records and min(r["loss"] for r in records) > 0:
        ax.set_yscale("log")
        # Plain tick labels: the default mathtext ones ("10^-1") cost a parser run per plot.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in records], color="grey", linestyle=":", label="lr")
    lr_ax.set_ylabel("learning rate")
    lines = ax.get_lines() + lr_ax.get_lines()
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
