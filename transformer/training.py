"""Training and evaluation with the paper's recipe (§5.3 optimizer and schedule, §5.4).

* Optimizer (§5.3): Adam with beta1 = 0.9, beta2 = 0.98, eps = 1e-9.
* Learning rate (§5.3, eq. 3):
  ``lrate = d_model^-0.5 * min(step_num^-0.5, step_num * warmup_steps^-1.5)``, a linear
  warm-up followed by inverse square-root decay; ``lr_scale`` multiplies it (small models
  on small data like a larger rate than the paper's base model).
* Regularisation (§5.4): label smoothing eps_ls = 0.1 and dropout (inside the model).
* Optional gradient-norm clipping, which the paper does not use but tiny batches like.

``train`` is seeded and deterministic on CPU, and its checkpoint carries everything the
run's future depends on (weights, Adam moments, schedule step, RNG states, position in
the data stream), so ``resume=True`` continues a stopped run with the very losses the
uninterrupted run would have logged.

Evaluation compares a trained model with the untrained baseline of the same
architecture: exact-match accuracy and corpus BLEU (sacrebleu) on held-out examples,
decoding token by token with :mod:`transformer.generate`.

Notation: B batch, S source length, T target length, V vocabulary size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from transformer.checkpoint import load_checkpoint, save_checkpoint
from transformer.data import Batch, BucketBatcher, Pair, pad_sequences
from transformer.generate import beam_search, greedy_decode
from transformer.model import ModelConfig, Seq2SeqTransformer
from transformer.tokenizer import Tokenizer

__all__ = [
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "evaluate",
    "inverse_sqrt_lr",
    "make_optimizer",
    "make_scheduler",
    "plot_metrics",
    "read_metrics",
    "sequence_loss",
    "shard_batch",
    "train",
    "translate",
    "world",
]

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"

# Fields that shape the trajectory of a run: a resumed run must use the same values.
_TRAJECTORY_FIELDS = (
    "batch_size",
    "warmup",
    "lr_scale",
    "label_smoothing",
    "clip_norm",
    "seed",
    "autocast",
)
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    """How to train (§5.3, §5.4); the model's shape lives in ``ModelConfig``."""

    #: Total optimizer steps of the run (a resumed run continues up to this step).
    steps: int = 2000
    #: Sentence pairs per batch (the paper batches ~25k tokens; we count sentences).
    batch_size: int = 64
    #: ``warmup_steps`` of the §5.3 schedule (the paper: 4000).
    warmup: int = 400
    #: Factor on the §5.3 learning rate (1.0 is the paper's formula).
    lr_scale: float = 1.0
    #: eps_ls of §5.4 (0.1 in the paper); 0 trains on plain cross-entropy.
    label_smoothing: float = 0.1
    #: Clip the global gradient norm to this value; ``None`` does not clip (the paper).
    clip_norm: float | None = 1.0
    #: Seeds the dropout RNG and the data order (the caller seeds the initial weights).
    seed: int = 0
    #: Write one line to metrics.jsonl every this many steps.
    log_every: int = 10
    #: Save DIR/checkpoint every this many steps (and always at the end).
    checkpoint_every: int = 500
    #: Stop early after this many seconds of this call (the run stays resumable).
    max_seconds: float | None = None
    #: Mixed precision: run forward and loss under ``torch.autocast`` with this dtype
    #: ("bf16", also on CPU, or "fp16"); ``None`` trains in float32.
    autocast: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "warmup", "log_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr_scale, int | float) and self.lr_scale > 0):
            raise ValueError(f"TrainConfig.lr_scale must be positive, got {self.lr_scale!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(
                f"TrainConfig.label_smoothing must be in [0, 1), got {self.label_smoothing!r}"
            )
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(
                f"TrainConfig.clip_norm must be positive or None, got {self.clip_norm!r}"
            )
        if self.autocast is not None and self.autocast not in _AUTOCAST_DTYPES:
            raise ValueError(
                f"TrainConfig.autocast must be one of {sorted(_AUTOCAST_DTYPES)} or None, "
                f"got {self.autocast!r}"
            )
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(
                f"TrainConfig.max_seconds must be positive or None, got {self.max_seconds!r}"
            )


# --------------------------------------------------------------------------- recipe


def inverse_sqrt_lr(step: int, d_model: int, warmup: int, scale: float = 1.0) -> float:
    """Learning rate of optimizer step ``step`` (1-based), §5.3 eq. 3, times ``scale``.

    ``scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)``: grows linearly for
    the first ``warmup`` steps, then decays with the inverse square root of the step.
    """
    if step < 1:
        raise ValueError(f"inverse_sqrt_lr: step is 1-based, got {step}")
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def make_optimizer(model: nn.Module) -> torch.optim.Adam:
    """Adam with the paper's betas (0.9, 0.98) and eps 1e-9 (§5.3).

    The base lr is 1.0 so that the scheduler's factor *is* the learning rate.
    """
    return torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)


def make_scheduler(
    optimizer: torch.optim.Optimizer, d_model: int, warmup: int, scale: float = 1.0
) -> LambdaLR:
    """``LambdaLR`` giving the §5.3 rate: the k-th ``optimizer.step()`` uses ``lr(k)``.

    ``LambdaLR`` counts from 0 at construction, the paper's ``step_num`` from 1, hence
    the ``+ 1``; call ``scheduler.step()`` after each ``optimizer.step()``.
    """

    def factor(count: int) -> float:
        return inverse_sqrt_lr(count + 1, d_model, warmup, scale)

    return LambdaLR(optimizer, factor)


def sequence_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    pad_id: int,
    label_smoothing: float = 0.0,
    num_tokens: int | None = None,
) -> Tensor:
    """Mean token cross-entropy with label smoothing (§5.4), padding ignored.

    ``logits`` (B, T, V), ``targets`` (B, T). With smoothing eps the target
    distribution puts ``1 - eps + eps / V`` on the reference token and ``eps / V``
    on every other one (torch's ``label_smoothing``); positions where
    ``targets == pad_id`` contribute nothing, and the mean is over the other tokens.
    With ``num_tokens`` the sum is divided by it instead: a data-parallel shard divides
    by the global batch's token count, so the shards' losses add up to the batch mean.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"sequence_loss: expected logits (B, T, V) and targets (B, T), got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    flat_logits = logits.reshape(-1, logits.size(-1))  # (B*T, V)
    flat_targets = targets.reshape(-1)  # (B*T,)
    if num_tokens is None:
        return F.cross_entropy(
            flat_logits, flat_targets, ignore_index=pad_id, label_smoothing=label_smoothing
        )
    if num_tokens < 1:
        raise ValueError(f"sequence_loss: num_tokens must be at least 1, got {num_tokens}")
    total = F.cross_entropy(
        flat_logits,
        flat_targets,
        ignore_index=pad_id,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return total / num_tokens


def build_model(config: ModelConfig, seed: int) -> Seq2SeqTransformer:
    """A freshly initialised model of ``config``; the weights depend only on ``seed``.

    With the training seed this is exactly the model before its first step: the
    untrained baseline of the same architecture.
    """
    devices_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return Seq2SeqTransformer.from_config(config)
    finally:
        # Building a baseline must not shift the caller's random stream.
        torch.random.set_rng_state(devices_state)


# --------------------------------------------------------------------------- metrics


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order (an absent file has none)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(records: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Draw the training loss (and plain cross-entropy) and the learning rate to a PNG."""
    # The object-oriented API renders with Agg and never touches pyplot's global backend.
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] for r in records], label="training loss (label-smoothed)")
    if records and "nll" in records[0]:
        ax.plot(steps, [r["nll"] for r in records], label="cross-entropy", alpha=0.8)
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


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainResult:
    """What a call to :func:`train` did."""

    #: Optimizer steps done in total (counting those before a resume).
    step: int
    #: Mean training loss of the last logged window.
    final_loss: float
    #: Every metrics record of the run, earlier ones included after a resume.
    history: list[dict[str, Any]]
    #: Wall time of the whole run in seconds (summed over resumes).
    elapsed: float
    #: The run directory.
    out_dir: Path


def _rng_state() -> dict[str, Any]:
    """The RNG states training draws from, as JSON-serialisable lists."""
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.random.get_rng_state().tolist(),
        "python": [version, list(internal), gauss],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    """A resumed run must keep every setting that changes its trajectory."""
    ours = dataclasses.asdict(config)
    changed = [
        f"{k}: {saved.get(k)!r} -> {ours[k]!r}"
        for k in _TRAJECTORY_FIELDS
        if saved.get(k) != ours[k]
    ]
    if changed:
        raise ValueError(
            "cannot resume: the checkpoint was trained with other settings ("
            + "; ".join(changed)
            + ")"
        )


# --------------------------------------------------------------------------- data parallel


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default ``torch.distributed`` group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_batch(batch: Batch, rank: int, world_size: int, *, pad_id: int) -> Batch | None:
    """Rows ``rank, rank + world_size, ...`` of a global batch, like ``DistributedSampler``.

    Every process draws the same global batch from the same seeded stream and keeps its
    own strided share, with columns that are padding in every kept row cut off; ``None``
    when a small last batch leaves this rank no row. ``n_tokens`` stays the global
    batch's count: it is the divisor that makes the shards' summed losses the batch mean.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_batch: rank must be in [0, {world_size}), got {rank}")
    rows = torch.arange(rank, batch.src.size(0), world_size)
    if rows.numel() == 0:
        return None

    def trim(ids: Tensor) -> Tensor:
        used = (ids != pad_id).any(dim=0).nonzero()
        return ids[:, : int(used.max()) + 1] if used.numel() else ids

    return Batch(
        src=trim(batch.src[rows]),  # (B / world, S')
        tgt_in=trim(batch.tgt_in[rows]),  # (B / world, T')
        tgt_out=trim(batch.tgt_out[rows]),  # (B / world, T')
        n_tokens=batch.n_tokens,
    )


def _all_reduce_grads(params: Sequence[nn.Parameter]) -> None:
    """Sum the gradients of all processes in one collective (each rank's loss is its share)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (total parameters,)
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def _gather(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _any_rank(flag: bool, world_size: int) -> bool:
    """True on every rank when it is true on one (ranks must stop at the same step)."""
    if world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


# --------------------------------------------------------------------------- the loop


def _read_metrics_until_torn(path: Path) -> list[dict[str, Any]]:
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


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def train(
    model: Seq2SeqTransformer,
    tokenizer: Tokenizer,
    examples: Sequence[Pair],
    out_dir: str | os.PathLike[str],
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` on ``examples`` with the paper's recipe, writing the run to ``out_dir``.

    Writes ``out_dir/metrics.jsonl`` (one JSON object per logged step: ``step``,
    ``loss`` (mean label-smoothed loss since the last record), ``nll`` (the same
    without smoothing), ``lr``, ``tokens_per_s``, ``elapsed``), ``out_dir/loss.png`` and
    ``out_dir/checkpoint/`` every ``checkpoint_every`` steps and at the end; ``meta``
    is stored in the checkpoint beside the tokenizer and the training state.

    With ``resume=True`` the model, optimizer, schedule, RNG states and data position
    are restored from ``out_dir/checkpoint`` and the run goes on to ``config.steps``;
    on CPU the losses then equal those of a run that was never interrupted.

    Data parallel: inside an initialised ``torch.distributed`` group (``torchrun``) every
    process draws the same global batch, keeps its share (:func:`shard_batch`) and the
    gradients are summed, so a step equals the one-process step on the whole batch up to
    float rounding; only rank 0 logs, plots and saves (with every rank's RNG state).
    """
    rank, world_size = world()
    lead = rank == 0
    out = Path(out_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    metrics_path = out / METRICS_FILE
    model_config: ModelConfig = model.config
    pad_id = model_config.pad_id
    device = next(model.parameters()).device
    if pad_id != tokenizer.pad_id:
        raise ValueError(f"model pad_id {pad_id} differs from the tokenizer's {tokenizer.pad_id}")
    encoded = [(tokenizer.encode(s), tokenizer.encode(t)) for s, t in examples]
    if not encoded:
        raise ValueError("train: got no training examples")
    batcher = BucketBatcher(
        encoded,
        config.batch_size,
        pad_id=pad_id,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        seed=config.seed,
    )
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer, model_config.d_model, config.warmup, config.lr_scale)
    params = [p for p in model.parameters() if p.requires_grad]
    run_meta = {
        **(meta or {}),
        "tokenizer": tokenizer.to_str(),
        "max_target_len": max(len(t) for _, t in encoded),
    }

    # The running window of the current metrics record survives a resume, so records
    # straddling the stop are the same as in an uninterrupted run.
    window = {"loss": 0.0, "nll": 0.0, "steps": 0, "tokens": 0}
    step, elapsed_before = 0, 0.0
    previous: list[dict[str, Any]] = []
    if resume:
        # A save killed between its two renames leaves the complete old one as .old.
        if not ckpt_dir.exists() and not ckpt_dir.with_name(CHECKPOINT_DIR + ".old").exists():
            raise FileNotFoundError(f"cannot resume: no checkpoint at {ckpt_dir}")
        _, saved = load_checkpoint(ckpt_dir, model, optimizer, scheduler)
        state = saved.get("training")
        if not isinstance(state, dict):
            raise ValueError(f"cannot resume: {ckpt_dir} holds no training state")
        _check_resumable(state["config"], config)
        rng_states = state["rng"]
        if len(rng_states) != world_size:
            raise ValueError(
                f"cannot resume: the checkpoint was written by {len(rng_states)} process(es), "
                f"this run has {world_size}"
            )
        step, elapsed_before = int(state["step"]), float(state["elapsed"])
        window = dict(state["window"])
        batcher.load_state_dict(state["loader"])
        _set_rng_state(rng_states[rank])
        # Drop records written after the checkpoint and an off-grid record of the stop,
        # which a run going on past it would not have; a run with no step left to take
        # ends there, so it keeps that final record as an uninterrupted run would.
        finished = step >= config.steps
        previous = [
            r
            for r in _read_metrics_until_torn(metrics_path)
            if r["step"] <= step and (r["step"] % config.log_every == 0 or finished)
        ]
        if lead:
            out.mkdir(parents=True, exist_ok=True)
            _write_atomically(metrics_path, "".join(json.dumps(r) + "\n" for r in previous))
    else:
        # Each rank its own dropout stream; rank 0's is the one-process run's.
        torch.manual_seed(config.seed + rank)
        random.seed(config.seed + rank)
        if world_size > 1:
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)  # every rank starts from rank 0's weights
        if lead:
            out.mkdir(parents=True, exist_ok=True)
            _write_atomically(metrics_path, "")
    _barrier(world_size)

    def checkpoint() -> None:
        rng_states = _gather(_rng_state(), world_size)
        if lead:
            training_state = {
                "step": step,
                "elapsed": elapsed_before + (time.perf_counter() - start),
                "config": dataclasses.asdict(config),
                "rng": rng_states,
                "loader": batcher.state_dict(),
                "window": window,
            }
            save_checkpoint(
                ckpt_dir, model, optimizer, scheduler, training=training_state, **run_meta
            )
        _barrier(world_size)

    def flush(lr: float) -> dict[str, Any]:
        """Append the record of the current window to metrics.jsonl and the progress bar."""
        now = time.perf_counter()
        record = {
            "step": step,
            "loss": window["loss"] / window["steps"],
            "nll": window["nll"] / window["steps"],
            "lr": lr,
            "tokens_per_s": window["tokens"] / max(now - window_start, 1e-9),
            "elapsed": elapsed_before + (now - start),
        }
        if lead:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
            )
        return record

    last_loss = previous[-1]["loss"] if previous else math.nan
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    autocast_dtype = _AUTOCAST_DTYPES.get(config.autocast or "")
    model.train()
    start = time.perf_counter()
    window_start = start
    bar = _progress_bar(config.steps, step, enabled=progress and lead)
    try:
        while step < config.steps:
            batch = next(batcher)
            shard = shard_batch(batch, rank, world_size, pad_id=pad_id) if world_size > 1 else batch
            optimizer.zero_grad(set_to_none=True)
            losses = torch.zeros(2, dtype=torch.float64)  # (smoothed, plain) of this step
            if shard is not None:
                src, tgt_in, tgt_out = (
                    shard.src.to(device),
                    shard.tgt_in.to(device),
                    shard.tgt_out.to(device),
                )
                # One process divides by its own token count (torch's mean, bit-stable);
                # a shard by the global count, so the shards' losses sum to the mean.
                divisor = batch.n_tokens if world_size > 1 else None
                with _autocast(device, autocast_dtype):
                    logits = model(src, tgt_in)  # (B, T, V)
                    loss = sequence_loss(
                        logits,
                        tgt_out,
                        pad_id=pad_id,
                        label_smoothing=config.label_smoothing,
                        num_tokens=divisor,
                    )
                loss.backward()
                with torch.no_grad():
                    nll = sequence_loss(
                        logits.detach().float(), tgt_out, pad_id=pad_id, num_tokens=divisor
                    )
                losses = torch.stack([loss.detach(), nll]).double().cpu()
            if world_size > 1:
                _all_reduce_grads(params)
                dist.all_reduce(losses)
            if not torch.isfinite(losses).all():
                raise FloatingPointError(
                    f"train: the loss is {losses[0].item()} at step {step + 1}; lower "
                    "--lr-scale or enable --clip-norm"
                )
            if config.clip_norm is not None:
                nn.utils.clip_grad_norm_(params, config.clip_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            window["loss"] += losses[0].item()
            window["nll"] += losses[1].item()
            window["steps"] += 1
            window["tokens"] += batch.n_tokens

            timed_out = _any_rank(
                config.max_seconds is not None
                and time.perf_counter() - start >= config.max_seconds,
                world_size,
            )
            last = step == config.steps or timed_out
            bar.update(1)
            if step % config.log_every == 0:
                last_loss = flush(lr)["loss"]
                window = {"loss": 0.0, "nll": 0.0, "steps": 0, "tokens": 0}
                window_start = time.perf_counter()
            if step % config.checkpoint_every == 0 or last:
                # Saved before an off-grid flush: the window is what an uninterrupted run holds.
                checkpoint()
                if last and window["steps"]:
                    last_loss = flush(lr)["loss"]
                if lead:
                    plot_metrics(read_metrics(metrics_path), out / PLOT_FILE)
            if timed_out:
                break
        if lead and not (out / PLOT_FILE).exists() and previous:
            # A resume of a finished run trains nothing: still leave the plot behind.
            plot_metrics(previous, out / PLOT_FILE)
    finally:
        bar.close()
        torch.use_deterministic_algorithms(deterministic_before)
    _barrier(world_size)
    history = read_metrics(metrics_path)
    return TrainResult(
        step=step,
        final_loss=float(last_loss),
        history=history,
        elapsed=elapsed_before + (time.perf_counter() - start),
        out_dir=out,
    )


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``dtype`` on ``device``, or no context for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def translate(
    model: Seq2SeqTransformer,
    tokenizer: Tokenizer,
    sources: Sequence[str],
    *,
    max_len: int,
    beam_size: int = 1,
    batch_size: int = 128,
) -> list[list[int]]:
    """Generated token ids of each source, token by token (greedy or beam search, §6.1).

    Sources are batched in input order; each result stops before its ``<eos>``.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    was_training = model.training
    model.eval()
    results: list[list[int]] = []
    try:
        for start in range(0, len(sources), batch_size):
            chunk = sources[start : start + batch_size]
            src = pad_sequences(
                [tokenizer.encode(s) or [tokenizer.unk_id] for s in chunk], tokenizer.pad_id
            )
            if beam_size == 1:
                out = greedy_decode(model, src, max_len, tokenizer.bos_id, tokenizer.eos_id)
            else:
                out = beam_search(
                    model, src, max_len, tokenizer.bos_id, tokenizer.eos_id, beam_size=beam_size
                )
            for row in out.tolist():
                ids: list[int] = []
                for token in row:
                    if token in (tokenizer.eos_id, tokenizer.pad_id):
                        break
                    ids.append(token)
                results.append(ids)
    finally:
        model.train(was_training)
    return results


@dataclass(frozen=True)
class EvalResult:
    """Scores of one model on held-out pairs."""

    #: Fraction of outputs equal to the reference, in [0, 1].
    exact_match: float
    #: Corpus BLEU (sacrebleu, 0..100).
    bleu: float
    #: Number of examples scored.
    n: int
    #: The decoded outputs, in the order of the pairs.
    outputs: list[str]


def evaluate(
    model: Seq2SeqTransformer,
    tokenizer: Tokenizer,
    pairs: Sequence[Pair],
    *,
    max_len: int,
    beam_size: int = 1,
) -> EvalResult:
    """Exact-match accuracy and corpus BLEU of ``model``'s outputs on ``pairs``."""
    import sacrebleu

    if not pairs:
        raise ValueError("evaluate: got no examples")
    ids = translate(model, tokenizer, [s for s, _ in pairs], max_len=max_len, beam_size=beam_size)
    outputs = [tokenizer.decode(x) for x in ids]
    references = [t for _, t in pairs]
    exact = sum(o == r for o, r in zip(outputs, references, strict=True)) / len(pairs)
    bleu = float(sacrebleu.corpus_bleu(outputs, [references]).score)
    return EvalResult(exact_match=exact, bleu=bleu, n=len(pairs), outputs=outputs)
