"""The training loop: ``TrainConfig``, ``train`` and its step, the state a checkpoint carries.

``train`` is seeded and deterministic on CPU, and its checkpoint carries everything the
run's future depends on (weights, Adam moments, schedule step, the fp16 gradient
scaler, every RNG state of every rank, the position in the data stream and the open
metrics window), so ``resume=True`` continues a stopped run with the very losses the
uninterrupted run would have logged.

Imports the recipe (:mod:`transformer.recipe`), mixed precision
(:mod:`transformer.precision`), data parallelism (:mod:`transformer.distributed`), the
run's files (:mod:`transformer.run_files`), checkpoints and what a resume needs
(:mod:`transformer.resume`: stop requests, RNG states, step checkpoints); nothing of the CLI.

Notation: B batch, S source length, T target length, V vocabulary size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from transformer.data import Batch, BucketBatcher, Pair
from transformer.distributed import (
    any_rank,
    barrier,
    gather_objects,
    shard_batch,
    sum_over_ranks,
    world,
    wrap_data_parallel,
)
from transformer.model import ModelConfig, Seq2SeqTransformer
from transformer.precision import autocast, make_grad_scaler, optimizer_step
from transformer.recipe import make_optimizer, make_scheduler, sequence_loss
from transformer.resume import (
    STEP_CHECKPOINTS_DIR,
    TrainInterrupted,
    load_training_state,
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
    read_metrics_until_torn,
    remove_run_files,
    write_atomically,
)
from transformer.tokenizer import Tokenizer
from transformer.train_config import TrainConfig

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


def _new_window() -> dict[str, Any]:
    """The running sums of one metrics record: losses, steps, skipped steps, tokens."""
    return {"loss": 0.0, "nll": 0.0, "steps": 0, "skipped": 0, "tokens": 0}


# --------------------------------------------------------------------------- one step


def _forward_backward(
    net: nn.Module,
    batch: Batch,
    shard: Batch | None,
    *,
    config: TrainConfig,
    pad_id: int,
    device: torch.device,
    scaler: torch.amp.GradScaler,
    step_tokens: int | None = None,
) -> Tensor:
    """Forward and backward of this rank's share of ``batch``; its losses, (2,) float64.

    One process divides by its own token count (torch's mean, bit-stable); with several,
    each divides its summed loss by the global count, so the ranks' losses add up to
    the batch mean, and backpropagates ``world_size`` times that, since DDP averages
    the ranks' gradients. A rank that a small last batch leaves no row still runs
    rank 0's rows with weight 0: DDP's all-reduce needs every rank's backward.
    ``step_tokens``, when one step accumulates several batches, is the token count of
    all of them: each batch's summed loss is divided by it, so the gradients add up to
    those of the mean loss of one batch holding them all.
    """
    world_size = world()[1]
    part = shard if shard is not None else shard_batch(batch, 0, world_size, pad_id=pad_id)
    assert part is not None  # rank 0 always has a row
    src, tgt_in, tgt_out = part.src.to(device), part.tgt_in.to(device), part.tgt_out.to(device)
    if step_tokens is not None:
        divisor: int | None = step_tokens
    else:
        divisor = batch.n_tokens if world_size > 1 else None
    with autocast(device, config.autocast):
        logits = net(src, tgt_in)  # (B', T', V)
        loss = sequence_loss(
            logits,
            tgt_out,
            pad_id=pad_id,
            label_smoothing=config.label_smoothing,
            num_tokens=divisor,
        )
    weight = float(world_size) if shard is not None else 0.0
    scaler.scale(loss if weight == 1.0 else loss * weight).backward()
    with torch.no_grad():
        nll = sequence_loss(logits.detach().float(), tgt_out, pad_id=pad_id, num_tokens=divisor)
    losses = torch.stack([loss.detach().float(), nll]).double()  # (2,)
    return losses if shard is not None else torch.zeros_like(losses)


def _sync_gradients(net: nn.Module, *, last: bool) -> AbstractContextManager[Any]:
    """DDP's ``no_sync`` for every accumulated batch but the last one of a step.

    Gradients then add up locally and are all-reduced once per optimizer step, as
    ``DistributedDataParallel`` documents for accumulation, not once per batch.
    """
    if last or not isinstance(net, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return net.no_sync()


def _step_losses(
    net: nn.Module,
    batches: list[Batch],
    *,
    config: TrainConfig,
    pad_id: int,
    device: torch.device,
    scaler: torch.amp.GradScaler,
) -> Tensor:
    """Forward and backward of the ``accumulate`` batches of one step; their summed losses
    over all ranks, (2,) float64 on the CPU. The gradients are all-reduced once, after
    the last batch."""
    rank, world_size = world()
    step_tokens = sum(b.n_tokens for b in batches)
    summed: Tensor | None = None
    for i, batch in enumerate(batches):
        shard = shard_batch(batch, rank, world_size, pad_id=pad_id) if world_size > 1 else batch
        with _sync_gradients(net, last=i == len(batches) - 1):
            part = _forward_backward(
                net,
                batch,
                shard,
                config=config,
                pad_id=pad_id,
                device=device,
                scaler=scaler,
                step_tokens=step_tokens if len(batches) > 1 else None,
            )
        summed = part if summed is None else summed + part
    assert summed is not None  # accumulate >= 1
    return sum_over_ranks(summed).cpu()


# --------------------------------------------------------------------------- the loop


def _restore_run(
    out: Path,
    model: Seq2SeqTransformer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    batcher: BucketBatcher,
    config: TrainConfig,
) -> tuple[int, float, dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Load ``out/checkpoint`` into the run's parts; writes nothing (:func:`_trim_run_files` does).

    Returns the step, the elapsed seconds before this call, the open metrics window, the
    records to keep and the training state.
    """
    metrics_path = out / METRICS_FILE
    state = load_training_state(
        out / CHECKPOINT_DIR, model, optimizer, scheduler, scaler, batcher, config
    )
    step, elapsed_before = int(state["step"]), float(state["elapsed"])
    window = {**_new_window(), **state["window"]}
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


def _trim_run_files(
    out: Path, state: dict[str, Any], config: TrainConfig, previous: list[dict[str, Any]]
) -> None:
    """Cut metrics.jsonl back to the checkpoint a resume starts from (rank 0 alone)."""
    step = int(state["step"])
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / METRICS_FILE, "".join(_json_line(r) for r in previous))
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


def _agree_on_start(out: Path, resume: bool, step: int, failure: Exception | None) -> None:
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
    window = _new_window()
    step, elapsed_before = 0, 0.0
    previous: list[dict[str, Any]] = []
    restored: dict[str, Any] = {}
    failure: Exception | None = None
    if resume:
        try:
            step, elapsed_before, window, previous, restored = _restore_run(
                out, model, optimizer, scheduler, scaler, batcher, config
            )
        except Exception as error:  # re-raised below, once every rank knows
            failure = error
    _agree_on_start(out, resume, step, failure)
    if resume:
        if lead:
            _trim_run_files(out, restored, config, previous)
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
                f.write(_json_line(record))
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
                losses = _step_losses(
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
                    window = _new_window()
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


def _json_line(record: dict[str, Any]) -> str:
    """One metrics.jsonl line."""
    return json.dumps(record) + "\n"


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
