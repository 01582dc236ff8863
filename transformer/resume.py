"""What lets a stopped run go on: stop requests, RNG states, the training state, step checkpoints.

* :func:`stop_requests` turns SIGINT and SIGTERM into a request the loop sees after its
  step, so it can save that step before stopping and raise :class:`TrainInterrupted`.
* :func:`rng_state` and :func:`restore_rng_state` capture and put back every generator
  training draws from, as JSON, so a resumed run draws what the uninterrupted one would.
* :func:`save_training_state` writes ``DIR/checkpoint`` with the training state (and the
  step checkpoints ``keep_last`` rotates, which :func:`step_checkpoints` lists);
  :func:`load_training_state` puts it back after :func:`check_resumable` has refused a
  resume whose settings would change the trajectory.

Imports checkpoints, batching and ``TrainConfig``; nothing of the loop, which imports it.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transformer.checkpoint import load_checkpoint, save_checkpoint
from transformer.data import BucketBatcher
from transformer.distributed import world
from transformer.model import Seq2SeqTransformer
from transformer.run_files import CHECKPOINT_DIR, STEP_CHECKPOINTS_DIR
from transformer.train_config import TrainConfig

__all__ = [
    "STEP_CHECKPOINTS_DIR",
    "TrainInterrupted",
    "check_resumable",
    "load_training_state",
    "prune_step_checkpoints",
    "restore_rng_state",
    "rng_state",
    "save_training_state",
    "step_checkpoints",
    "stop_requests",
]

# Fields that shape the trajectory of a run: a resumed run must use the same values.
_TRAJECTORY_FIELDS = (
    "batch_size",
    "warmup",
    "lr_scale",
    "label_smoothing",
    "clip_norm",
    "seed",
    "autocast",
    "accumulate",
    "batch_tokens",
)

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# --------------------------------------------------------------------------- stop requests


class TrainInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped :func:`train` after it saved the last completed step.

    A ``KeyboardInterrupt``, so code that handles Ctrl-C handles it; ``resume=True``
    continues the run from ``step``.
    """

    def __init__(self, signum: int, step: int, total: int, checkpoint: Path) -> None:
        super().__init__(f"{signal.Signals(signum).name} at step {step} of {total}")
        #: The signal that stopped the run (``signal.SIGINT`` or ``signal.SIGTERM``).
        self.signum = signum
        #: The last completed step, the one the checkpoint holds.
        self.step = step
        #: ``config.steps`` of the run.
        self.total = total
        #: The checkpoint directory written before stopping.
        self.checkpoint = checkpoint


@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """While open, SIGINT and SIGTERM append their number to the yielded list instead of
    stopping the process, so the loop can finish its step and save; a second signal of
    either kind raises ``KeyboardInterrupt`` at once. Outside the main thread (where
    Python cannot install handlers) the list stays empty and signals act as before.
    """
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handle(signum: int, frame: object) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)

    before = {s: signal.signal(s, handle) for s in _STOP_SIGNALS}
    try:
        yield requested
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


# --------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Every RNG state training may draw from, as JSON-serialisable lists.

    torch's CPU generator, Python's ``random``, NumPy's global generator and, once this
    process has initialised CUDA, every CUDA device's generator
    (``torch.cuda.get_rng_state_all``); :func:`restore_rng_state` puts them back.
    """
    version, internal, gauss = random.getstate()
    # The legacy global generator is the one third-party code draws from.
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002
    state: dict[str, Any] = {
        "torch": torch.random.get_rng_state().tolist(),
        "python": [version, list(internal), gauss],
        "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # pragma: no cover
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the generators :func:`rng_state` captured (those it holds) back to those states."""
    torch.random.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        keys_array = np.array(keys, dtype=np.uint32)  # (624,) MT19937 words
        np.random.set_state((name, keys_array, pos, has_gauss, cached))  # noqa: NPY002
    if "cuda" in state and torch.cuda.is_available():  # pragma: no cover
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# --------------------------------------------------------------------------- the training state


def check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    """A resumed run must keep every setting that changes its trajectory."""
    ours = dataclasses.asdict(config)
    # A checkpoint written before a field existed trained with that field's default.
    defaults = dataclasses.asdict(TrainConfig())
    changed = [
        f"{k}: {saved.get(k, defaults[k])!r} -> {ours[k]!r}"
        for k in _TRAJECTORY_FIELDS
        if saved.get(k, defaults[k]) != ours[k]
    ]
    if changed:
        raise ValueError(
            "cannot resume: the checkpoint was trained with other settings ("
            + "; ".join(changed)
            + ")"
        )


def load_training_state(
    ckpt_dir: Path,
    model: Seq2SeqTransformer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    batcher: BucketBatcher,
    config: TrainConfig,
) -> dict[str, Any]:
    """Load ``ckpt_dir`` into the run's parts and this rank's RNG states; its training state.

    Refuses a directory without a checkpoint or training state, other trajectory
    settings (:func:`check_resumable`) and another number of processes.
    """
    rank, world_size = world()
    # A save killed between its two renames leaves the complete old one as .old.
    if not ckpt_dir.exists() and not ckpt_dir.with_name(CHECKPOINT_DIR + ".old").exists():
        raise FileNotFoundError(f"cannot resume: no checkpoint at {ckpt_dir}")
    _, saved = load_checkpoint(ckpt_dir, model, optimizer, scheduler)
    state = saved.get("training")
    if not isinstance(state, dict):
        raise ValueError(f"cannot resume: {ckpt_dir} holds no training state")
    check_resumable(state["config"], config)
    rng_states = state["rng"]
    if len(rng_states) != world_size:
        raise ValueError(
            f"cannot resume: the checkpoint was written by {len(rng_states)} process(es), "
            f"this run has {world_size}"
        )
    batcher.load_state_dict(state["loader"])
    if state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    restore_rng_state(rng_states[rank])
    return state


def save_training_state(
    out: Path,
    model: Seq2SeqTransformer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    training: dict[str, Any],
    *,
    keep_last: int,
    meta: dict[str, Any],
) -> None:
    """Save ``out/checkpoint`` with ``training`` beside ``meta``; with ``keep_last`` also as
    the step checkpoint of ``training["step"]``, keeping the newest ``keep_last`` of those."""
    save_checkpoint(out / CHECKPOINT_DIR, model, optimizer, scheduler, training=training, **meta)
    if keep_last:
        save_checkpoint(
            out / STEP_CHECKPOINTS_DIR / f"step-{training['step']:08d}",
            model,
            optimizer,
            scheduler,
            training=training,
            **meta,
        )
        prune_step_checkpoints(out / STEP_CHECKPOINTS_DIR, keep_last)


# --------------------------------------------------------------------------- step checkpoints


def step_checkpoints(out_dir: str | os.PathLike[str]) -> list[Path]:
    """The step checkpoints ``keep_last`` kept in ``out_dir``, oldest first."""
    directory = Path(out_dir) / STEP_CHECKPOINTS_DIR
    if not directory.is_dir():
        return []
    kept = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step-")]
    return sorted(kept, key=lambda p: p.name)


def prune_step_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (and leftovers of interrupted saves)."""
    kept = step_checkpoints(directory.parent)
    for old in kept[: max(len(kept) - keep, 0)]:
        shutil.rmtree(old)
