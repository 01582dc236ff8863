"""The training loop: ``train``, and the state a checkpoint carries for it.

``train`` is seeded and deterministic on CPU, and its checkpoint carries everything the
run's future depends on (weights, Adam moments, schedule step, the fp16 gradient
scaler, every RNG state of every rank, the position in the data stream and the open
metrics window), so ``resume=True`` continues a stopped run with the very losses the
uninterrupted run would have logged.

Imports one step (:mod:`transformer.train_step`), how a run starts
(:mod:`transformer.run_start`: afresh or from its checkpoint, the ranks agreeing), the
recipe (:mod:`transformer.recipe`), mixed precision (:mod:`transformer.precision`), data
parallelism (:mod:`transformer.distributed`), the run's files
(:mod:`transformer.run_files`), checkpoints and what a resume needs
(:mod:`transformer.resume`: stop requests, RNG states, step checkpoints); nothing of the CLI.

Notation: B batch, S source length, T target length, V vocabulary size.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transformer.data import BucketBatcher, Pair
from transformer.distributed import (
    any_rank,
    barrier,
    gather_objects,
    world,
    wrap_data_parallel,
)
from transformer.model import ModelConfig, Seq2SeqTransformer
from transformer.precision import make_grad_scaler, optimizer_step
from transformer.recipe import make_optimizer, make_scheduler
from transformer.resume import (
    STEP_CHECKPOINTS_DIR,
    TrainInterrupted,
    restore_rng_state,
    rng_state,
    save_training_state,
    step_checkpoints,
    stop_requests,
)
from transformer.run_files import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    PLOT_FILE,
    held_run_files,
    plot_metrics,
    read_metrics,
    remove_run_files,
    write_atomically,
)
from transformer.run_start import agree_on_start, json_line, new_window, restore_run, trim_run_files
from transformer.tokenizer import Tokenizer
from transformer.train_config import TrainConfig
from transformer.train_step import step_losses

__all__ = [
    "STEP_CHECKPOINTS_DIR",
    "TrainConfig",
    "TrainInterrupted",
    "TrainResult",
    "restore_rng_state",
    "rng_state",
    "step_checkpoints",
    "train",
]


@dataclass(frozen=True)
class TrainResult:
    """What a call to :func:`train` did."""

    #: Training steps done in total (counting those before a resume).
    step: int
    #: Mean training loss of the last logged window.
    final_loss: float
    #: Every metrics record of the run, earlier ones included after a resume.
    history: list[dict[str, Any]]
    #: Wall time of the whole run in seconds (summed over resumes).
    elapsed: float
    #: The run directory.
    out_dir: Path


def check_examples_fit(
    encoded: Sequence[tuple[Sequence[int], Sequence[int]]],
    examples: Sequence[Pair],
    max_len: int,
) -> None:
    """``ValueError`` naming the first example longer than the positional table ``max_len``.

    ``encoded`` holds the token ids of ``examples``; a target gains BOS (or EOS), so it
    needs one position more than its ids. Checked before the first step: such an example
    would otherwise stop the run at the step that draws it, maybe hours in.
    """
    for i, (src_ids, tgt_ids) in enumerate(encoded):
        side, length = max(
            ("source", len(src_ids)), ("target", len(tgt_ids) + 1), key=lambda x: x[1]
        )
        if length > max_len:
            text = examples[i][0 if side == "source" else 1]
            raise ValueError(
                f"train: example {i + 1} ({side} {text[:40]!r}...) needs {length} positions, "
                f"beyond the model's positional table of {max_len} (max_len); shorten or "
                "drop it"
            )


def train(
    model: Seq2SeqTransformer,
    tokenizer: Tokenizer,
    examples: Sequence[Pair],
    out_dir: str | os.PathLike[str],
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` on ``examples`` with the paper's recipe, writing the run to ``out_dir``.

    Writes ``out_dir/metrics.jsonl`` (one JSON object per logged step: ``step``,
    ``loss`` (mean label-smoothed loss since the last record), ``nll`` (the same
    without smoothing), ``lr``, ``skipped_steps`` (steps since the last record whose
    update the fp16 gradient scaler skipped for an inf/NaN gradient; always 0 without
    fp16), ``tokens_per_s``, ``elapsed``), ``out_dir/loss.png`` and
    ``out_dir/checkpoint/`` every ``checkpoint_every`` steps and at the end; ``meta``
    is stored in the checkpoint beside the tokenizer and the training state. A skipped
    step consumes its batch but not a step of the §5.3 schedule. With ``keep_last`` N
    each save is also written to ``out_dir/checkpoints/step-XXXXXXXX/`` and only the
    newest N of those stay (:func:`step_checkpoints` lists them; average them with
    :func:`~transformer.averaging.average_checkpoints`, §6.1). With ``accumulate`` K a
    step sums the gradients of K batches, each loss divided by the token count of all K,
    and logs their summed loss: the step and loss of one batch holding the K.

    With ``resume=True`` the model, optimizer, schedule, gradient scaler, RNG states and
    data position are restored from ``out_dir/checkpoint`` and the run goes on to
    ``config.steps``; on CPU the losses then equal those of a run that was never
    interrupted. A new run (``resume=False``) refuses an ``out_dir`` that already holds
    a run's files (:data:`~transformer.run_files.RUN_FILES`: its checkpoints, metrics
    or plot) with :class:`FileExistsError`, before any work: its metrics would be
    truncated and its step checkpoints mixed with the new run's. ``overwrite=True``
    deletes those files first and writes the new run in their place.

    Data parallel: inside an initialised ``torch.distributed`` group (``torchrun``) the
    model runs under ``DistributedDataParallel``; every process draws the same global
    batch and keeps its share (:func:`~transformer.distributed.shard_batch`), so a step
    equals the one-process step on the whole batch up to float rounding; only rank 0
    logs, plots and saves (with every rank's RNG state).

    SIGINT (Ctrl-C) or SIGTERM lets the current step finish, saves the checkpoint of that
    step (the same atomic save) and raises :class:`TrainInterrupted`; a second signal
    stops at once, saving nothing more.
    """
    rank = world()[0]
    lead = rank == 0
    out = Path(out_dir)
    for name, flag in (("resume", resume), ("overwrite", overwrite)):
        if not isinstance(flag, bool):
            raise TypeError(f"train: {name} must be a bool, got {type(flag).__name__}")
    if resume and overwrite:
        raise ValueError(
            "train: resume=True continues the run in out_dir and overwrite=True replaces "
            "it; pass one of them"
        )
    ckpt_dir = out / CHECKPOINT_DIR
    metrics_path = out / METRICS_FILE
    model_config: ModelConfig = model.config
    pad_id = model_config.pad_id
    device = next(model.parameters()).device
    # Rank 0 alone writes the run, so its view of out_dir decides (another node may not
    # even see the folder); every rank learns it, so that all of them refuse together
    # instead of the others waiting for rank 0 in their first collective.
    replaced = held_run_files(out) if lead and not resume else []
    if any_rank(bool(replaced) and not overwrite, device):
        found = ", ".join(replaced) if lead else "as rank 0 found"
        raise FileExistsError(
            f"train: out_dir {out} already holds a run ({found}): continue it with "
            "resume=True or replace it with overwrite=True"
        )
    if pad_id != tokenizer.pad_id:
        raise ValueError(f"model pad_id {pad_id} differs from the tokenizer's {tokenizer.pad_id}")
    encoded = [(tokenizer.encode(s), tokenizer.encode(t)) for s, t in examples]
    if not encoded:
        raise ValueError("train: got no training examples")
    check_examples_fit(encoded, examples, model_config.max_len)
    batcher = BucketBatcher(
        encoded,
        config.batch_size,
        pad_id=pad_id,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        seed=config.seed,
        batch_tokens=config.batch_tokens,
    )
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer, model_config.d_model, config.warmup, config.lr_scale)
    scaler = make_grad_scaler(device, config.autocast)
    params = [p for p in model.parameters() if p.requires_grad]
    # The loss plot's title names the task when the caller says what the data is.
    task_name = ((meta or {}).get("data") or {}).get("task")
    run_meta = {
        **(meta or {}),
        "tokenizer": tokenizer.to_str(),
        "max_target_len": max(len(t) for _, t in encoded),
    }

    # The running window of the current metrics record survives a resume, so records
    # straddling the stop are the same as in an uninterrupted run.
    window = new_window()
    step, elapsed_before = 0, 0.0
    previous: list[dict[str, Any]] = []
    restored: dict[str, Any] = {}
    failure: Exception | None = None
    if resume:
        try:
            step, elapsed_before, window, previous, restored = restore_run(
                out, model, optimizer, scheduler, scaler, batcher, config
            )
        except Exception as error:  # re-raised below, once every rank knows
            failure = error
    agree_on_start(out, resume, step, failure)
    if resume:
        if lead:
            trim_run_files(out, restored, config, previous)
    else:
        # Each rank its own dropout stream; rank 0's is the one-process run's.
        torch.manual_seed(config.seed + rank)
        random.seed(config.seed + rank)
        np.random.seed(config.seed + rank)  # noqa: NPY002
        if lead:
            out.mkdir(parents=True, exist_ok=True)
            remove_run_files(out, replaced)
            write_atomically(metrics_path, "")
    # DDP broadcasts rank 0's weights: every rank starts from the same model.
    net = wrap_data_parallel(model, device)
    barrier(device)

    def checkpoint() -> None:
        rng_states = gather_objects(rng_state())
        if lead:
            training_state = {
                "step": step,
                "elapsed": elapsed_before + (time.perf_counter() - start),
                "config": dataclasses.asdict(config),
                "rng": rng_states,
                "loader": batcher.state_dict(),
                "window": window,
                "grad_scaler": scaler.state_dict(),
            }
            # Only the saves an uninterrupted run makes (the grid and the last step) join
            # the step checkpoints: the off-grid save of a stop is for resuming alone.
            on_grid = step % config.checkpoint_every == 0 or step == config.steps
            save_training_state(
                out,
                model,
                optimizer,
                scheduler,
                training_state,
                keep_last=config.keep_last if on_grid else 0,
                meta=run_meta,
            )
        barrier(device)

    def flush(lr: float) -> dict[str, Any]:
        """Append the record of the current window to metrics.jsonl and the progress bar."""
        now = time.perf_counter()
        record = {
            "step": step,
            "loss": window["loss"] / window["steps"],
            "nll": window["nll"] / window["steps"],
            "lr": lr,
            "skipped_steps": window["skipped"],
            "tokens_per_s": window["tokens"] / max(now - window_start, 1e-9),
            "elapsed": elapsed_before + (now - start),
        }
        if lead:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json_line(record))
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
            )
        return record

    last_loss = previous[-1]["loss"] if previous else math.nan
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    model.train()
    start = time.perf_counter()
    window_start = start
    bar = _progress_bar(config.steps, step, enabled=progress and lead)
    signals: list[int] = []
    try:
        with stop_requests() as signals:
            while step < config.steps:
                batches = [next(batcher) for _ in range(config.accumulate)]
                step_tokens = sum(b.n_tokens for b in batches)
                optimizer.zero_grad(set_to_none=True)
                losses = step_losses(
                    net, batches, config=config, pad_id=pad_id, device=device, scaler=scaler
                )
                if not torch.isfinite(losses).all():
                    raise FloatingPointError(
                        f"train: the loss is {losses[0].item()} at step {step + 1}; lower "
                        "--lr-scale or enable --clip-norm"
                    )
                lr = optimizer.param_groups[0]["lr"]
                if optimizer_step(optimizer, scaler, params, config.clip_norm):
                    scheduler.step()
                else:
                    window["skipped"] += 1
                step += 1
                window["loss"] += losses[0].item()
                window["nll"] += losses[1].item()
                window["steps"] += 1
                window["tokens"] += step_tokens

                # A time limit or a signal stops every rank after the same step.
                stop = any_rank(
                    bool(signals)
                    or (
                        config.max_seconds is not None
                        and time.perf_counter() - start >= config.max_seconds
                    ),
                    device,
                )
                last = step == config.steps or stop
                bar.update(1)
                if step % config.log_every == 0:
                    last_loss = flush(lr)["loss"]
                    window = new_window()
                    window_start = time.perf_counter()
                if step % config.checkpoint_every == 0 or last:
                    # Saved before an off-grid flush: the window is what an uninterrupted run holds.
                    checkpoint()
                    if last and window["steps"]:
                        last_loss = flush(lr)["loss"]
                    if lead:
                        plot_metrics(read_metrics(metrics_path), out / PLOT_FILE, task=task_name)
                if stop:
                    break
            if lead and not (out / PLOT_FILE).exists() and previous:
                # A resume of a finished run trains nothing: still leave the plot behind.
                plot_metrics(previous, out / PLOT_FILE, task=task_name)
    finally:
        bar.close()
        torch.use_deterministic_algorithms(deterministic_before)
    if signals and step < config.steps:
        raise TrainInterrupted(signals[0], step, config.steps, ckpt_dir)
    barrier(device)
    history = read_metrics(metrics_path)
    return TrainResult(
        step=step,
        final_loss=float(last_loss),
        history=history,
        elapsed=elapsed_before + (time.perf_counter() - start),
        out_dir=out,
    )


def _progress_bar(total: int, initial: int, *, enabled: bool) -> Any:
    """A tqdm bar on stderr (steps, loss, lr, tokens/s), or a silent stand-in."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        desc="train",
    )
