"""How a training run starts: afresh, or from its checkpoint, with every rank agreeing which.

:func:`restore_run` loads a checkpoint into the run's parts and writes nothing;
:func:`agree_on_start` then stops every rank together unless all start the same run;
only after that does rank 0 trim the run's files (:func:`trim_run_files`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from transformer.data import BucketBatcher
from transformer.distributed import (
    gather_objects,
)
from transformer.model import Seq2SeqTransformer
from transformer.resume import (
    load_training_state,
    step_checkpoints,
)
from transformer.run_files import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    read_metrics_until_torn,
    write_atomically,
)
from transformer.train_config import TrainConfig

__all__ = ["agree_on_start", "json_line", "new_window", "restore_run", "trim_run_files"]


def new_window() -> dict[str, Any]:
    """The running sums of one metrics record: losses, steps, skipped steps, tokens."""
    return {"loss": 0.0, "nll": 0.0, "steps": 0, "skipped": 0, "tokens": 0}


def json_line(record: dict[str, Any]) -> str:
    """One metrics.jsonl line."""
    return json.dumps(record) + "\n"


def restore_run(
    out: Path,
    model: Seq2SeqTransformer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    batcher: BucketBatcher,
    config: TrainConfig,
) -> tuple[int, float, dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Load ``out/checkpoint`` into the run's parts; writes nothing (:func:`trim_run_files` does).

    Returns the step, the elapsed seconds before this call, the open metrics window, the
    records to keep and the training state.
    """
    metrics_path = out / METRICS_FILE
    state = load_training_state(
        out / CHECKPOINT_DIR, model, optimizer, scheduler, scaler, batcher, config
    )
    step, elapsed_before = int(state["step"]), float(state["elapsed"])
    window = {**new_window(), **state["window"]}
    # Drop records written after the checkpoint and an off-grid record of the stop (at
    # the checkpoint's step, off the grid it was logged on), which a run going on past it
    # would not have; a run with no step left to take ends there, so it keeps that final
    # record as an uninterrupted run would. Earlier records stay whatever --log-every
    # the resumed run asks for.
    finished = step >= config.steps
    logged_every = int(state.get("config", {}).get("log_every", config.log_every))
    previous = [
        r
        for r in read_metrics_until_torn(metrics_path)
        if r["step"] < step or (r["step"] == step and (step % logged_every == 0 or finished))
    ]
    return step, elapsed_before, window, previous, state


def trim_run_files(
    out: Path, state: dict[str, Any], config: TrainConfig, previous: list[dict[str, Any]]
) -> None:
    """Cut metrics.jsonl back to the checkpoint a resume starts from (rank 0 alone)."""
    step = int(state["step"])
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / METRICS_FILE, "".join(json_line(r) for r in previous))
    # A run extended past its old last step would not have kept that step's
    # checkpoint where it lies off the grid: drop it, so the rotation holds what the
    # longer run keeps. Only that one: the others were saved on the grid the run had
    # (it may differ from this one's) and are what keep_last promised to keep.
    saved_every = int(state.get("config", {}).get("checkpoint_every", config.checkpoint_every))
    for kept in step_checkpoints(out):
        saved_at = int(kept.name.removeprefix("step-"))
        off_grid = saved_at % saved_every and saved_at % config.checkpoint_every
        if saved_at == step and off_grid and saved_at < config.steps:
            shutil.rmtree(kept)


def agree_on_start(out: Path, resume: bool, step: int, failure: Exception | None) -> None:
    """Raise on every rank unless all ranks start the same run: all afresh, or all resuming
    the same step, with no rank's resume failed.

    Each rank reads ``out_dir`` itself on a resume (and, under the CLI, decides from it
    whether to resume), so ranks that do not see one directory would otherwise part
    ways: the one that cannot load fails alone while the others wait for it in the first
    collective until the group times out, or ranks start from different steps and train
    on with different optimizer states, the weights drifting apart unseen.
    """
    failed = None if failure is None else f"{type(failure).__name__}: {failure}"
    views = gather_objects((resume, step, failed))
    if any(view[2] for view in views):
        if failure is not None:
            raise failure
        rank, why = next((r, view[2]) for r, view in enumerate(views) if view[2])
        raise RuntimeError(
            f"train: rank {rank} could not resume the run in {out} ({why}); "
            "every rank must read the same out_dir"
        )
    if len({view[:2] for view in views}) > 1:
        seen = ", ".join(
            f"rank {r} " + (f"resumes at step {s}" if res else "starts afresh")
            for r, (res, s, _) in enumerate(views)
        )
        raise RuntimeError(
            f"train: the ranks do not see the same run in {out} ({seen}); out_dir must "
            "be one directory every rank sees (on several machines, a shared filesystem)"
        )
