"""Training recipe: Adam and the learning-rate schedule (§5.3), label smoothing (§5.4), and runs.

Each recipe value is recomputed here from the paper's formula, independently of
``transformer.training``. The run tests use a tiny model (E=16, one layer each side,
dropout on, so the dropout RNG matters) on the built-in ``copy`` task and compare
whole runs: same seed, same metrics; a stopped and resumed run, the losses of an
uninterrupted one, bit for bit; mixed precision (bf16, and fp16 with torch's
``GradScaler``) against float32; two processes under ``DistributedDataParallel``
against one, also across a worker that torchrun restarts.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from transformer.averaging import average_checkpoints
from transformer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from transformer.cli import main
from transformer.data import make_batch, make_task, pad_sequences
from transformer.generate import beam_search
from transformer.model import ModelConfig, Seq2SeqTransformer
from transformer.precision import make_grad_scaler, optimizer_step
from transformer.testing import assert_close
from transformer.tokenizer import Tokenizer
from transformer.train_loop import STEP_CHECKPOINTS_DIR, step_checkpoints
from transformer.training import (
    TrainConfig,
    build_model,
    evaluate,
    inverse_sqrt_lr,
    make_optimizer,
    make_scheduler,
    plot_metrics,
    read_metrics,
    restore_rng_state,
    rng_state,
    sequence_loss,
    shard_batch,
    train,
    translate,
)

spec = functools.partial(pytest.mark.spec, component="training")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP contention costs seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def paper_lrate(step_num: int, d_model: int, warmup_steps: int) -> float:
    """§5.3 eq. 3, written out: d_model^-0.5 * min(step_num^-0.5, step_num * warmup_steps^-1.5)."""
    return (1.0 / math.sqrt(d_model)) * min(1.0 / math.sqrt(step_num), step_num / warmup_steps**1.5)


# --------------------------------------------------------------------------- §5.3


@spec(section="5.3", kind="equivalence")
@pytest.mark.parametrize("d_model, warmup", [(512, 40), (59, 7), (16, 1)])
def test_scheduler_gives_each_step_the_paper_learning_rate(d_model: int, warmup: int) -> None:
    """The k-th optimizer step runs with lrate = d_model^-0.5 * min(k^-0.5, k * warmup^-1.5) (§5.3 eq. 3)."""
    weight = nn.Parameter(torch.zeros(3))
    optimizer = make_optimizer(nn.ParameterList([weight]))
    scheduler = make_scheduler(optimizer, d_model, warmup)
    for step_num in range(1, 3 * warmup + 20):
        used = optimizer.param_groups[0]["lr"]  # the rate the coming step will use
        assert used == pytest.approx(paper_lrate(step_num, d_model, warmup), rel=1e-12)
        weight.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()


@spec(section="5.3", kind="equivalence")
def test_learning_rate_rises_linearly_to_warmup_then_decays_as_inverse_sqrt() -> None:
    """The rate peaks at step warmup with value (d_model * warmup)^-0.5, then falls as step^-0.5 (§5.3)."""
    d_model, warmup = 97, 13
    rates = [inverse_sqrt_lr(k, d_model, warmup) for k in range(1, 200)]
    assert max(rates) == pytest.approx((d_model * warmup) ** -0.5, rel=1e-12)
    assert rates.index(max(rates)) + 1 == warmup
    assert rates[4] / rates[0] == pytest.approx(5.0, rel=1e-12)  # linear warm-up
    assert rates[100 - 1] / rates[25 - 1] == pytest.approx(0.5, rel=1e-12)  # (25 / 100)^0.5
    assert inverse_sqrt_lr(100, d_model, warmup, scale=2.5) == pytest.approx(
        2.5 * paper_lrate(100, d_model, warmup), rel=1e-12
    )


@spec(section="5.3", kind="error")
def test_schedule_step_numbers_start_at_one() -> None:
    """step_num is 1-based in §5.3; step 0 raises ValueError rather than dividing by zero."""
    with pytest.raises(ValueError, match="step is 1-based, got 0"):
        inverse_sqrt_lr(0, 512, 4000)


@spec(section="5.3", kind="equivalence")
def test_optimizer_is_adam_with_the_paper_hyperparameters() -> None:
    """Adam with beta1 = 0.9, beta2 = 0.98, eps = 1e-9, no weight decay (§5.3)."""
    optimizer = make_optimizer(nn.Linear(3, 2))
    assert type(optimizer) is torch.optim.Adam
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.98)
    assert group["eps"] == 1e-9
    assert group["weight_decay"] == 0
    assert group["amsgrad"] is False


@spec(section="5.3", kind="equivalence")
def test_first_two_adam_steps_match_the_update_rule_written_out() -> None:
    """Two steps of optimizer + schedule equal Adam's bias-corrected update with the §5.3 values, in float64."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(7, dtype=torch.float64))
    grads = [torch.randn(7, dtype=torch.float64) for _ in range(2)]
    optimizer = make_optimizer(nn.ParameterList([weight]))
    scheduler = make_scheduler(optimizer, d_model=59, warmup=5)

    expected = weight.detach().clone()
    m = torch.zeros(7, dtype=torch.float64)
    v = torch.zeros(7, dtype=torch.float64)
    beta1, beta2, eps = 0.9, 0.98, 1e-9
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        expected -= paper_lrate(t, 59, 5) * m_hat / (v_hat.sqrt() + eps)

        weight.grad = g.clone()
        optimizer.step()
        scheduler.step()
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- §5.4


def smoothed_loss_reference(
    logits: torch.Tensor, targets: torch.Tensor, pad_id: int, eps: float
) -> torch.Tensor:
    """Label smoothing written out in float64: q = eps/V everywhere plus 1 - eps on the reference."""
    logits, V = logits.double(), logits.size(-1)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(targets.size(0)):
        for t in range(targets.size(1)):
            y = int(targets[b, t])
            if y == pad_id:
                continue
            q = torch.full((V,), eps / V, dtype=torch.float64)
            q[y] += 1.0 - eps
            log_p = logits[b, t] - torch.logsumexp(logits[b, t], dim=0)
            total = total - (q * log_p).sum()
            count += 1
    return total / count


@spec(section="5.4", kind="equivalence")
@pytest.mark.parametrize("eps", [0.1, 0.0, 0.37])
def test_label_smoothed_loss_matches_the_target_distribution_written_out(eps: float) -> None:
    """The loss is the cross-entropy against (1 - eps) one-hot + eps/V uniform, averaged over non-pad tokens (§5.4)."""
    torch.manual_seed(1)
    B, T, V, pad = 3, 7, 11, 0
    logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(1, V, (B, T))
    targets[0, 4:] = pad
    targets[2, 1:] = pad
    ours = sequence_loss(logits, targets, pad_id=pad, label_smoothing=eps)
    torch.testing.assert_close(ours, smoothed_loss_reference(logits, targets, pad, eps))


@spec(section="5.4", kind="masking")
def test_padded_target_positions_neither_count_nor_receive_gradient() -> None:
    """Logits at pad targets change neither the loss nor the mean's denominator, and get zero gradient."""
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 9, requires_grad=True)
    targets = torch.tensor([[4, 5, 6, 0, 0], [7, 0, 0, 0, 0]])
    loss = sequence_loss(logits, targets, pad_id=0, label_smoothing=0.1)
    loss.backward()
    assert logits.grad is not None
    pad_rows = targets == 0
    assert torch.count_nonzero(logits.grad[pad_rows]) == 0
    assert torch.count_nonzero(logits.grad[~pad_rows].abs().sum(-1)) == 4

    scrambled = logits.detach().clone()
    scrambled[pad_rows] = 1e4 * torch.randn(int(pad_rows.sum()), 9)
    again = sequence_loss(scrambled, targets, pad_id=0, label_smoothing=0.1)
    torch.testing.assert_close(again, loss.detach())


@spec(section="5.4", kind="error")
def test_sequence_loss_rejects_mismatched_shapes() -> None:
    """Logits (B, T, V) and targets of another (B, T) raise ValueError naming both shapes."""
    with pytest.raises(ValueError, match=r"\(2, 5, 9\) and \(2, 4\)"):
        sequence_loss(torch.zeros(2, 5, 9), torch.zeros(2, 4, dtype=torch.long), pad_id=0)


@spec(section="5.4", kind="error")
@pytest.mark.parametrize("num_tokens", [0, -3])
def test_sequence_loss_rejects_a_token_count_below_one(num_tokens: int) -> None:
    """A shard divisor num_tokens below 1 raises ValueError naming it, instead of dividing by zero or flipping the loss's sign."""
    with pytest.raises(ValueError, match=f"num_tokens must be at least 1, got {num_tokens}"):
        sequence_loss(
            torch.zeros(1, 2, 5),
            torch.ones(1, 2, dtype=torch.long),
            pad_id=0,
            num_tokens=num_tokens,
        )


# --------------------------------------------------------------------------- config


@spec(section="extra", kind="error")
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "steps must be a positive integer"),
        ("batch_size", 2.5, "batch_size must be a positive integer"),
        ("warmup", True, "warmup must be a positive integer"),
        ("lr_scale", 0.0, "lr_scale must be positive"),
        ("label_smoothing", 1.0, r"label_smoothing must be in \[0, 1\)"),
        ("clip_norm", -1.0, "clip_norm must be positive or None"),
        ("max_seconds", 0, "max_seconds must be positive or None"),
        ("autocast", "fp8", r"autocast must be one of \['bf16', 'fp16'\] or None, got 'fp8'"),
        ("keep_last", -1, "keep_last must be a non-negative integer, got -1"),
        ("accumulate", 0, "accumulate must be a positive integer"),
        ("batch_tokens", 0, "batch_tokens must be a positive integer or None, got 0"),
    ],
)
def test_train_config_rejects_bad_values(field: str, value: object, message: str) -> None:
    """Each bad TrainConfig value raises ValueError naming the field."""
    with pytest.raises(ValueError, match=f"TrainConfig.{message}"):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- runs


@functools.cache
def _copy_data() -> tuple[Tokenizer, tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    split = make_task("copy", seed=0, n_train=96, n_heldout=7)
    tokenizer = Tokenizer.train([t for pair in split.train for t in pair], vocab_size=40)
    return tokenizer, split.train, split.heldout


def _tiny_config(vocab_size: int, **overrides: object) -> ModelConfig:
    fields: dict[str, object] = {
        "src_vocab_size": vocab_size,
        "tgt_vocab_size": vocab_size,
        "d_model": 16,
        "nhead": 2,
        "num_encoder_layers": 1,
        "num_decoder_layers": 1,
        "dim_feedforward": 24,
        "dropout": 0.1,
        "max_len": 64,
        "share_embeddings": True,
    }
    fields.update(overrides)
    return ModelConfig(**fields)  # type: ignore[arg-type]


def _run(  # type: ignore[no-untyped-def]
    out: Path,
    steps: int,
    *,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    dropout: float = 0.1,
    prepare: Callable[[Seq2SeqTransformer], object] | None = None,
    **overrides: object,
):
    """Train the tiny model on copy; a resume rebuilds everything from scratch like a new process.

    ``prepare`` gets the freshly built model before training (to plant a gradient hook).
    """
    tokenizer, train_pairs, _ = _copy_data()
    settings: dict[str, object] = {
        "steps": steps,
        "batch_size": 8,
        "warmup": 5,
        "lr_scale": 2.0,
        "seed": seed,
        "log_every": 3,
        "checkpoint_every": 1000,
    }
    settings.update(overrides)
    model = build_model(_tiny_config(tokenizer.vocab_size, dropout=dropout), seed)
    if prepare is not None:
        prepare(model)
    result = train(
        model,
        tokenizer,
        train_pairs,
        out,
        TrainConfig(**settings),  # type: ignore[arg-type]
        resume=resume,
        overwrite=overwrite,
        progress=False,
    )
    return model, result


def _curve(records: list[dict[str, object]]) -> list[tuple[object, ...]]:
    """What must repeat exactly: step, losses and rate (wall-time fields cannot)."""
    return [(r["step"], r["loss"], r["nll"], r["lr"]) for r in records]


@spec(section="extra", kind="equivalence")
def test_same_seed_gives_identical_metrics_and_weights(tmp_path: Path) -> None:
    """Two runs with one seed log the same losses and end with the same weights; another seed does not."""
    model_a, run_a = _run(tmp_path / "a", 12)
    model_b, run_b = _run(tmp_path / "b", 12)
    _, run_c = _run(tmp_path / "c", 12, seed=1)
    assert _curve(run_a.history) == _curve(run_b.history)
    for (name, a), b in zip(
        model_a.state_dict().items(), model_b.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert [r["loss"] for r in run_a.history] != [r["loss"] for r in run_c.history]


@spec(section="extra", kind="equivalence")
@pytest.mark.parametrize("stop", [6, 7])
def test_stopped_and_resumed_run_repeats_the_uninterrupted_run_bit_for_bit(
    tmp_path: Path, stop: int
) -> None:
    """Stop at step 6 (on the logging grid) or 7 (off it), resume: same losses, rates and final weights as one run."""
    full_model, full = _run(tmp_path / "full", 15)
    _, first = _run(tmp_path / "split", stop)
    assert first.step == stop
    resumed_model, resumed = _run(tmp_path / "split", 15, resume=True)
    assert resumed.step == 15
    assert _curve(resumed.history) == _curve(full.history)
    assert _curve(read_metrics(tmp_path / "split" / "metrics.jsonl")) == _curve(full.history)
    for (name, a), b in zip(
        full_model.state_dict().items(), resumed_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@spec(section="extra", kind="equivalence")
def test_run_stopped_by_time_limit_resumes_like_an_uninterrupted_run(tmp_path: Path) -> None:
    """A run cut short by max_seconds saves where it stopped; resuming it gives the uninterrupted losses."""
    _, full = _run(tmp_path / "full", 9)
    _, cut = _run(tmp_path / "cut", 9, max_seconds=1e-9)
    assert cut.step == 1
    _, resumed = _run(tmp_path / "cut", 9, resume=True)
    assert _curve(resumed.history) == _curve(full.history)


@spec(section="extra", kind="equivalence")
@pytest.mark.parametrize("damage", ["torn-line", "deleted"])
def test_resume_survives_a_torn_or_deleted_metrics_file(tmp_path: Path, damage: str) -> None:
    """A metrics.jsonl whose last line was torn (a process killed mid-append) is cut there on resume, and one that is gone starts afresh: either way the resumed records are the uninterrupted run's."""
    _, full = _run(tmp_path / "full", 12)
    _run(tmp_path / "split", 6)
    metrics = tmp_path / "split" / "metrics.jsonl"
    if damage == "torn-line":
        with open(metrics, "a", encoding="utf-8") as f:
            f.write('{"step": 9, "loss": 2.')
    else:
        metrics.unlink()
    _, resumed = _run(tmp_path / "split", 12, resume=True)
    kept = full.history if damage == "torn-line" else [r for r in full.history if r["step"] > 6]
    assert _curve(resumed.history) == _curve(kept)


@spec(section="extra", kind="error")
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_size", 4),
        ("warmup", 7),
        ("lr_scale", 3.0),
        ("label_smoothing", 0.3),
        ("clip_norm", 0.5),
        ("autocast", "bf16"),
        ("accumulate", 2),
        ("batch_tokens", 60),
    ],
)
def test_resume_with_other_trajectory_settings_is_refused(
    field: str, value: object, tmp_path: Path
) -> None:
    """Resuming with another value of any setting that shapes the trajectory (batch size, warm-up, learning-rate scale, label smoothing, clipping, autocast, accumulation, token batching) raises ValueError naming the setting and both values."""
    _run(tmp_path, 3)
    _, meta = load_checkpoint(tmp_path / "checkpoint")
    old = meta["training"]["config"][field]
    changed = rf"{field}: {re.escape(repr(old))} -> {re.escape(repr(value))}"
    with pytest.raises(ValueError, match=rf"cannot resume.*{changed}"):
        _run(tmp_path, 6, resume=True, **{field: value})


def _file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, by path relative to it, with its contents."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@spec(section="extra", kind="error")
def test_a_new_run_into_a_folder_holding_a_run_is_refused_and_the_run_left_as_it_was(
    tmp_path: Path,
) -> None:
    """train(resume=False) into the folder of a finished run (checkpoint, step checkpoints, metrics, plot) raises FileExistsError naming the folder, resume=True and overwrite=True, and every file of the old run keeps its bytes: a new run would truncate its metrics and mix its step checkpoints with the new run's."""
    _run(tmp_path, 6, checkpoint_every=3, keep_last=2)
    before = _file_bytes(tmp_path)
    assert {"metrics.jsonl", "loss.png"} <= set(before)
    assert any(name.startswith(STEP_CHECKPOINTS_DIR) for name in before)
    with pytest.raises(FileExistsError, match="already holds a run") as raised:
        _run(tmp_path, 3, seed=1)
    assert str(tmp_path) in str(raised.value)
    assert "resume=True" in str(raised.value) and "overwrite=True" in str(raised.value)
    assert _file_bytes(tmp_path) == before


@spec(section="extra", kind="property")
def test_overwrite_replaces_the_old_run_so_that_nothing_of_it_is_left(tmp_path: Path) -> None:
    """train(overwrite=True) into the folder of a 9-step run that kept step checkpoints leaves what the same 4-step run leaves in an empty folder: the same files, the same metrics records, no step checkpoint of the old run, a checkpoint at step 4."""
    _run(tmp_path / "old", 9, checkpoint_every=3, keep_last=3)
    _run(tmp_path / "old", 4, seed=1, overwrite=True)
    _run(tmp_path / "fresh", 4, seed=1)
    assert set(_file_bytes(tmp_path / "old")) == set(_file_bytes(tmp_path / "fresh"))
    old = read_metrics(tmp_path / "old" / "metrics.jsonl")
    assert _curve(old) == _curve(read_metrics(tmp_path / "fresh" / "metrics.jsonl"))
    assert step_checkpoints(tmp_path / "old") == []
    _, meta = load_checkpoint(tmp_path / "old" / "checkpoint")
    assert meta["training"]["step"] == 4


@spec(section="extra", kind="error")
@pytest.mark.parametrize(
    ("flags", "error", "message"),
    [
        ({"resume": True, "overwrite": True}, ValueError, "pass one of them"),
        ({"overwrite": "yes"}, TypeError, "overwrite must be a bool, got str"),
        ({"resume": 1}, TypeError, "resume must be a bool, got int"),
    ],
    ids=["resume and overwrite", "overwrite a str", "resume an int"],
)
def test_train_refuses_resume_with_overwrite_and_flags_that_are_not_bools(
    tmp_path: Path, flags: dict[str, object], error: type[Exception], message: str
) -> None:
    """resume=True continues the run in the folder and overwrite=True deletes it, so both together are a ValueError; a flag that is not a bool is a TypeError naming it. Both come before anything is written."""
    with pytest.raises(error, match=message):
        _run(tmp_path / "run", 2, **flags)  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()


@spec(section="extra", kind="error")
def test_resume_without_a_checkpoint_raises_file_not_found(tmp_path: Path) -> None:
    """--resume of a directory that holds no checkpoint raises FileNotFoundError naming it."""
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _run(tmp_path / "never", 3, resume=True)


@spec(section="extra", kind="shape")
def test_run_writes_metrics_jsonl_loss_plot_and_checkpoint(tmp_path: Path) -> None:
    """A run leaves metrics.jsonl (one record per log step), a PNG loss plot and checkpoint/."""
    _, result = _run(tmp_path, 10)
    lines = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [3, 6, 9, 10]  # every 3 steps, then the last
    for record in records:
        assert set(record) >= {"step", "loss", "nll", "lr", "tokens_per_s", "elapsed"}
        assert math.isfinite(record["loss"]) and record["tokens_per_s"] > 0
        # The logged rate is the one the step used: lr of its step number.
        assert record["lr"] == pytest.approx(2.0 * paper_lrate(record["step"], 16, 5))
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "checkpoint").is_dir()
    assert records == result.history


@spec(section="extra", kind="shape")
def test_metrics_helpers_handle_absent_files_and_plot_any_records(tmp_path: Path) -> None:
    """read_metrics of an absent file is []; plot_metrics writes a PNG also for records without nll, with a zero loss (no log scale possible) and for no records at all."""
    assert read_metrics(tmp_path / "absent.jsonl") == []
    cases = {
        "no-nll": [{"step": 1, "loss": 2.0, "lr": 1e-3}, {"step": 2, "loss": 1.0, "lr": 2e-3}],
        "zero-loss": [
            {"step": 1, "loss": 0.5, "nll": 0.5, "lr": 1e-3},
            {"step": 2, "loss": 0.0, "nll": 0.0, "lr": 1e-3},
        ],
        "empty": [],
    }
    for name, records in cases.items():
        plot_metrics(records, tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@spec(section="extra", kind="equivalence")
def test_resuming_a_finished_run_trains_nothing_and_restores_its_plot(tmp_path: Path) -> None:
    """Resuming a run that already reached its steps takes no step, keeps its metrics (the final off-grid record included) and draws loss.png again if it was lost."""
    _, done = _run(tmp_path, 4)
    assert [r["step"] for r in done.history] == [3, 4]
    (tmp_path / "loss.png").unlink()
    _, again = _run(tmp_path, 4, resume=True)
    assert again.step == 4 and again.final_loss == done.final_loss
    assert _curve(again.history) == _curve(done.history)
    assert _curve(read_metrics(tmp_path / "metrics.jsonl")) == _curve(done.history)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@spec(section="extra", kind="error")
def test_non_finite_loss_stops_training_before_saving_weights(tmp_path: Path) -> None:
    """A NaN loss (here from a NaN weight) raises FloatingPointError naming the step, and no checkpoint of the broken weights is written."""
    tokenizer, train_pairs, _ = _copy_data()
    model = build_model(_tiny_config(tokenizer.vocab_size), 0)
    with torch.no_grad():
        model.transformer.encoder.layers[0].linear1.weight[0, 0] = float("nan")
    config = TrainConfig(steps=5, batch_size=8, warmup=5, log_every=1, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match="the loss is nan at step 1"):
        train(model, tokenizer, train_pairs, tmp_path, config, progress=False)
    assert not (tmp_path / "checkpoint").exists()
    assert read_metrics(tmp_path / "metrics.jsonl") == []


@spec(section="extra", kind="error")
def test_train_rejects_a_tokenizer_of_another_pad_id_and_an_empty_example_list(
    tmp_path: Path,
) -> None:
    """train raises ValueError when the model's pad_id is not the tokenizer's, and when it gets no examples."""
    tokenizer, train_pairs, _ = _copy_data()
    config = TrainConfig(steps=1, batch_size=8, warmup=1)
    other_pad = build_model(_tiny_config(tokenizer.vocab_size, pad_id=5), 0)
    with pytest.raises(ValueError, match="model pad_id 5 differs from the tokenizer's 0"):
        train(other_pad, tokenizer, train_pairs, tmp_path, config, progress=False)
    model = build_model(_tiny_config(tokenizer.vocab_size), 0)
    with pytest.raises(ValueError, match="got no training examples"):
        train(model, tokenizer, [], tmp_path, config, progress=False)


@spec(section="extra", kind="error")
def test_resume_of_a_checkpoint_without_training_state_or_from_another_world_size_is_refused(
    tmp_path: Path,
) -> None:
    """Resuming from a checkpoint that holds no training state, or that was written by another number of processes, raises ValueError saying which."""
    tokenizer, _, _ = _copy_data()
    model = build_model(_tiny_config(tokenizer.vocab_size), 0)
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer, 16, 5, 2.0)
    save_checkpoint(tmp_path / "bare" / "checkpoint", model, optimizer, scheduler)
    with pytest.raises(ValueError, match="holds no training state"):
        _run(tmp_path / "bare", 6, resume=True)

    _run(tmp_path / "run", 3)
    _, meta = load_checkpoint(tmp_path / "run" / "checkpoint", model, optimizer, scheduler)
    meta["training"]["rng"] *= 2  # as if written by two processes
    save_checkpoint(tmp_path / "run" / "checkpoint", model, optimizer, scheduler, **meta)
    with pytest.raises(ValueError, match=r"written by 2 process\(es\), this run has 1"):
        _run(tmp_path / "run", 6, resume=True)


@spec(section="5.4", kind="equivalence")
def test_logged_nll_is_the_unsmoothed_loss_and_smoothing_raises_the_floor(tmp_path: Path) -> None:
    """With eps_ls = 0 the logged loss equals the cross-entropy; with 0.1 it is larger (§5.4 smoothing)."""
    _, plain = _run(tmp_path / "plain", 6, label_smoothing=0.0)
    _, smooth = _run(tmp_path / "smooth", 6, label_smoothing=0.1)
    assert all(r["loss"] == pytest.approx(r["nll"], rel=1e-6) for r in plain.history)
    assert all(r["loss"] > r["nll"] for r in smooth.history)


@spec(section="extra", kind="equivalence")
def test_build_model_is_deterministic_per_seed_and_leaves_the_callers_rng_alone() -> None:
    """build_model(config, seed) gives the same weights for the same seed and leaves the caller's RNG alone."""
    config = _tiny_config(40)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = build_model(config, 5), build_model(config, 5), build_model(config, 6)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))


@spec(section="extra", kind="equivalence")
def test_evaluate_scores_exact_match_and_bleu_against_the_references() -> None:
    """Outputs equal to the references score exact match 1.0 and BLEU 100; replacing 3 of 7 references scores exact match 4/7 and a BLEU below 100."""
    tokenizer, _, heldout = _copy_data()
    model = build_model(_tiny_config(tokenizer.vocab_size), 0)
    with torch.no_grad():
        # One content token always wins: every output is that token repeated, never empty
        # (sacrebleu scores empty hypotheses 0 even against empty references).
        model.output.bias[tokenizer.vocab_size - 1] = 1e4
    sources = [s for s, _ in heldout]
    outputs = [tokenizer.decode(ids) for ids in translate(model, tokenizer, sources, max_len=12)]
    assert len(outputs) == 7 and all(outputs)
    perfect = evaluate(model, tokenizer, list(zip(sources, outputs, strict=True)), max_len=12)
    assert perfect.exact_match == 1.0 and perfect.outputs == outputs
    assert perfect.bleu == pytest.approx(100.0)
    wrong = [f"{o} zz" if i in (0, 3, 6) else o for i, o in enumerate(outputs)]
    partial = evaluate(model, tokenizer, list(zip(sources, wrong, strict=True)), max_len=12)
    assert partial.exact_match == pytest.approx(4 / 7)
    assert partial.bleu < 100.0


@spec(section="extra", kind="equivalence")
def test_translate_with_beams_returns_beam_search_rows_up_to_eos() -> None:
    """translate(beam_size=3) gives, for each source, beam_search's best hypothesis of the padded batch up to its first <eos>."""
    tokenizer, _, heldout = _copy_data()
    model = build_model(_tiny_config(tokenizer.vocab_size), 3)
    model.eval()
    sources = [s for s, _ in heldout]
    got = translate(model, tokenizer, sources, max_len=10, beam_size=3)
    src = pad_sequences([tokenizer.encode(s) for s in sources], tokenizer.pad_id)
    rows = beam_search(model, src, 10, tokenizer.bos_id, tokenizer.eos_id, beam_size=3).tolist()
    expected = []
    for row in rows:
        ends = [i for i, t in enumerate(row) if t in (tokenizer.eos_id, tokenizer.pad_id)]
        expected.append(row[: ends[0]] if ends else row)
    assert got == expected
    assert len(got) == len(sources)


@spec(section="extra", kind="error")
def test_translate_and_evaluate_reject_bad_requests() -> None:
    """translate with beam_size below 1 and evaluate with no examples raise ValueError saying so."""
    tokenizer, _, _ = _copy_data()
    model = build_model(_tiny_config(tokenizer.vocab_size), 0)
    with pytest.raises(ValueError, match="beam_size must be at least 1, got 0"):
        translate(model, tokenizer, ["a b"], max_len=5, beam_size=0)
    with pytest.raises(ValueError, match="evaluate: got no examples"):
        evaluate(model, tokenizer, [], max_len=5)


# --------------------------------------------------------------------------- data parallel


@spec(section="extra", kind="shape")
def test_shards_partition_the_global_batch_rows_and_drop_only_padding() -> None:
    """3 ranks get rows r, r+3, ... of a 7-row batch; the columns they drop are padding in all their rows."""
    rows = [([5] * n, [6] * (8 - n)) for n in (1, 7, 2, 3, 1, 4, 2)]
    batch = make_batch(rows, pad_id=0, bos_id=1, eos_id=2)
    seen = []
    for rank in range(3):
        shard = shard_batch(batch, rank, 3, pad_id=0)
        assert shard is not None and shard.n_tokens == batch.n_tokens
        index = list(range(rank, 7, 3))
        seen += index
        for name in ("src", "tgt_in", "tgt_out"):
            part, whole = getattr(shard, name), getattr(batch, name)[index]
            assert torch.equal(part, whole[:, : part.size(1)])
            assert torch.count_nonzero(whole[:, part.size(1) :]) == 0
    assert sorted(seen) == list(range(7))
    assert shard_batch(make_batch(rows[:1], pad_id=0, bos_id=1, eos_id=2), 1, 2, pad_id=0) is None


@spec(section="extra", kind="error")
@pytest.mark.parametrize("rank", [-1, 3])
def test_shard_of_a_rank_outside_the_world_raises(rank: int) -> None:
    """shard_batch with a rank outside [0, world_size) raises ValueError naming the range and the rank."""
    batch = make_batch([([5, 6], [7])], pad_id=0, bos_id=1, eos_id=2)
    with pytest.raises(ValueError, match=rf"rank must be in \[0, 3\), got {rank}"):
        shard_batch(batch, rank, 3, pad_id=0)


@spec(section="5.4", kind="equivalence")
def test_shard_losses_over_the_global_token_count_sum_to_the_batch_mean() -> None:
    """Each shard's summed loss divided by the global token count adds up to the whole batch's mean loss."""
    torch.manual_seed(4)
    logits = torch.randn(5, 6, 13, dtype=torch.float64)
    targets = torch.randint(1, 13, (5, 6))
    targets[1, 2:] = 0
    targets[4, 5:] = 0
    whole = sequence_loss(logits, targets, pad_id=0, label_smoothing=0.1)
    n = int((targets != 0).sum())
    parts = [
        sequence_loss(logits[r::2], targets[r::2], pad_id=0, label_smoothing=0.1, num_tokens=n)
        for r in range(2)
    ]
    torch.testing.assert_close(parts[0] + parts[1], whole)


@spec(section="extra", kind="equivalence")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_autocast_training_gives_finite_losses_near_fp32(tmp_path: Path, dtype: str) -> None:
    """Under torch.autocast on CPU (bf16 alone, fp16 with torch.amp.GradScaler) the run trains with finite losses within 3% of the float32 run's, and skips no step.

    Dropout is off: dropout masks drawn on a low-precision tensor differ from the
    float32 ones, and the comparison is about precision.
    """
    _, full = _run(tmp_path / "fp32", 6, log_every=1, dropout=0.0)
    _, low = _run(tmp_path / dtype, 6, log_every=1, dropout=0.0, autocast=dtype)
    assert all(math.isfinite(r["loss"]) for r in low.history)
    for a, b in zip(full.history, low.history, strict=True):
        assert abs(a["loss"] - b["loss"]) < 0.03 * a["loss"], (a["step"], a["loss"], b["loss"])
    assert [r["loss"] for r in full.history] != [r["loss"] for r in low.history]  # it ran low
    assert [r["skipped_steps"] for r in low.history] == [0] * 6


def _plant_inf_gradient(at_step: int) -> Callable[[Seq2SeqTransformer], object]:
    """A ``prepare`` for ``_run``: one weight's gradient is inf in the backward of step ``at_step``."""

    def prepare(model: Seq2SeqTransformer) -> object:
        calls = 0
        weight = model.transformer.encoder.layers[0].linear1.weight

        def hook(grad: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return torch.full_like(grad, math.inf) if calls == at_step else grad

        return weight.register_hook(hook)

    return prepare


@spec(section="extra", kind="error")
def test_fp16_step_with_an_inf_gradient_is_skipped_logged_and_halves_the_scale(
    tmp_path: Path,
) -> None:
    """With fp16 autocast an inf gradient at step 3 makes torch.amp.GradScaler skip that update: metrics.jsonl counts it in skipped_steps, the §5.3 schedule does not advance, the saved scale is halved, and the losses stay finite."""
    _, run = _run(
        tmp_path, 5, log_every=1, dropout=0.0, autocast="fp16", prepare=_plant_inf_gradient(3)
    )
    assert [r["skipped_steps"] for r in run.history] == [0, 0, 1, 0, 0]
    assert all(math.isfinite(r["loss"]) for r in run.history)
    # Step 4 runs with the rate of schedule step 3: the skipped update took no step of it.
    assert [r["lr"] for r in run.history] == pytest.approx(
        [2.0 * paper_lrate(k, 16, 5) for k in (1, 2, 3, 3, 4)], rel=1e-12
    )
    _, meta = load_checkpoint(tmp_path / "checkpoint")
    scaler_state = meta["training"]["grad_scaler"]
    assert scaler_state["scale"] == 2.0**16 * scaler_state["backoff_factor"]
    assert scaler_state["_growth_tracker"] == 2  # clean steps since the skipped one


@spec(section="extra", kind="error")
def test_grad_scaler_step_leaves_weights_unchanged_on_an_inf_gradient() -> None:
    """optimizer_step under an enabled GradScaler returns False and changes no weight when a gradient is inf (torch's skip rule), and returns True and updates with finite ones."""
    weight = nn.Parameter(torch.ones(3))
    optimizer = make_optimizer(nn.ParameterList([weight]))
    scaler = make_grad_scaler(torch.device("cpu"), "fp16")
    assert scaler.is_enabled()
    scaler.scale((weight * torch.tensor([1.0, math.inf, 1.0])).sum()).backward()
    assert not optimizer_step(optimizer, scaler, [weight], clip_norm=1.0)
    assert torch.equal(weight.detach(), torch.ones(3))
    assert scaler.get_scale() == 2.0**15
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(weight.sum()).backward()
    assert optimizer_step(optimizer, scaler, [weight], clip_norm=1.0)
    assert not torch.equal(weight.detach(), torch.ones(3))
    unscaled = make_grad_scaler(torch.device("cpu"), "bf16")
    assert not unscaled.is_enabled()  # bf16 keeps float32's exponent range: no scaler


@spec(section="extra", kind="equivalence")
def test_stopped_and_resumed_fp16_run_restores_the_grad_scaler(tmp_path: Path) -> None:
    """An fp16 run whose step 3 was skipped, stopped at 5 and resumed to 8, logs the uninterrupted losses and ends with its GradScaler state (halved scale, growth tracker)."""
    settings: dict[str, object] = {"log_every": 1, "autocast": "fp16"}
    _run(tmp_path / "full", 8, prepare=_plant_inf_gradient(3), **settings)
    _run(tmp_path / "split", 5, prepare=_plant_inf_gradient(3), **settings)
    _, resumed = _run(tmp_path / "split", 8, resume=True, **settings)
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert _curve(resumed.history) == _curve(full)
    assert [r["skipped_steps"] for r in resumed.history] == [r["skipped_steps"] for r in full]
    states = [
        load_checkpoint(tmp_path / name / "checkpoint")[1]["training"]["grad_scaler"]
        for name in ("full", "split")
    ]
    assert states[0] == states[1] and states[0]["_growth_tracker"] == 5


@spec(section="extra", kind="equivalence")
def test_rng_states_round_trip_through_json(tmp_path: Path) -> None:
    """rng_state() captures torch's CPU generator, Python's random and NumPy's global one as JSON; restore_rng_state of the decoded JSON repeats the very same draws of all three."""
    import numpy as np

    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)  # noqa: NPY002
    saved = json.loads(json.dumps(rng_state()))
    assert {"torch", "python", "numpy"} <= set(saved)

    def draws() -> tuple[list[float], list[float], list[float]]:
        return (
            torch.rand(5).tolist(),
            [random.random() for _ in range(5)],
            np.random.rand(5).tolist(),  # noqa: NPY002
        )

    first = draws()
    assert draws() != first
    restore_rng_state(saved)
    assert draws() == first


# `transformer train` arguments of the tiny copy run the process tests share.
_CLI_RUN = ["train", "--task", "copy", "--n-train", "64", "--n-heldout", "4", "--batch-size", "8"]
_CLI_RUN += ["--d-model", "16", "--heads", "2", "--layers", "1", "--ff", "24", "--no-progress"]


def _cli_train(
    out: Path,
    *extra: str,
    launcher: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    argv = [*launcher] if launcher else [sys.executable]
    argv += ["-m", "transformer", *_CLI_RUN, "--out", str(out), *extra]
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def _finish(process: subprocess.Popen[str]) -> None:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stdout + stderr


_DDP_SETTINGS = ("--steps", "3", "--dropout", "0", "--log-every", "1")


@pytest.mark.slow
@spec(section="extra", kind="equivalence")
def test_two_processes_with_half_batches_take_the_one_process_step(tmp_path: Path) -> None:
    """torchrun with 2 gloo processes (half of each batch each) ends with the weights of 1 process on whole batches.

    Compared with fp32 tolerances after 3 Adam steps, except the attention key biases,
    whose true gradient is zero.
    """
    torchrun = Path(sys.executable).with_name("torchrun")
    _finish(_cli_train(tmp_path / "one", *_DDP_SETTINGS))
    launcher = (str(torchrun), "--standalone", "--nproc_per_node=2")
    _finish(_cli_train(tmp_path / "two", *_DDP_SETTINGS, launcher=launcher))
    _assert_two_processes_took_the_one_process_step(tmp_path / "one", tmp_path / "two")


def _assert_two_processes_took_the_one_process_step(run_one: Path, run_two: Path) -> None:
    """Weights and logged losses of the 2-process run equal the 1-process run's (fp32 tolerances)."""
    one, _ = load_checkpoint(run_one / "checkpoint")
    two, meta = load_checkpoint(run_two / "checkpoint")
    assert len(meta["training"]["rng"]) == 2  # both ranks' RNG states were saved
    start = build_model(one.config, 0)
    E = one.config.d_model
    for (name, a), b, s in zip(
        one.state_dict().items(),
        two.state_dict().values(),
        start.state_dict().values(),
        strict=True,
    ):
        if name.endswith("weight") and "norm" not in name:
            assert not torch.equal(a, s), name  # the step moved it: the comparison is not vacuous
        if name.endswith("in_proj_bias"):
            # The key bias has zero gradient in exact math (softmax ignores a shift shared by
            # all keys of a query), so Adam normalises rounding noise there: skip [E, 2E).
            a, b = torch.cat([a[:E], a[2 * E :]]), torch.cat([b[:E], b[2 * E :]])
        assert_close(b, a, msg=name)
    losses_one = [r["loss"] for r in read_metrics(run_one / "metrics.jsonl")]
    losses_two = [r["loss"] for r in read_metrics(run_two / "metrics.jsonl")]
    assert len(losses_one) == 3
    assert losses_two == pytest.approx(losses_one, rel=1e-5)


def _worker_pids(launcher_pid: int) -> list[int]:
    """Process ids of the `transformer` workers a torchrun process started (its children, from /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid"
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        if parent == launcher_pid and b"transformer" in cmdline:
            pids.append(int(stat.parent.name))
    return sorted(pids)


@pytest.mark.slow
@spec(section="extra", kind="equivalence")
def test_worker_killed_under_torchrun_max_restarts_resumes_to_the_uninterrupted_curve(
    tmp_path: Path,
) -> None:
    """SIGKILL one of 2 workers after a checkpoint: torchrun --max-restarts=1 starts both again, they resume from the last checkpoint (TORCHELASTIC_RESTART_COUNT > 0) and the run logs the losses of an uninterrupted 2-process run, bit for bit.

    Dropout is on, so the restored RNG state of each rank matters.
    """
    if not Path("/proc/self/stat").exists():
        pytest.skip("finding torchrun's workers needs /proc")
    torchrun = Path(sys.executable).with_name("torchrun")
    settings = ("--steps", "60", "--log-every", "2", "--checkpoint-every", "4")
    launcher = (str(torchrun), "--standalone", "--nproc_per_node=2")
    _finish(_cli_train(tmp_path / "full", *settings, launcher=launcher))

    run = tmp_path / "restarted"
    process = _cli_train(run, *settings, launcher=(*launcher, "--max-restarts=1"))
    deadline = time.monotonic() + 300
    # Past the checkpoint of step 4 (saved before the record of step 6 is written).
    while _last_logged_step(run / "metrics.jsonl") < 6 and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    workers = _worker_pids(process.pid)
    assert len(workers) == 2, workers
    killed_at = _last_logged_step(run / "metrics.jsonl")
    os.kill(workers[-1], signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stdout + stderr
    assert killed_at < 60  # the kill hit a running job
    assert stderr.count("training on") == 2, stderr  # rank 0 started twice: one restart

    def curve(name: str) -> list[tuple[int, float, float, float]]:
        records = read_metrics(tmp_path / name / "metrics.jsonl")
        return [(r["step"], r["loss"], r["nll"], r["lr"]) for r in records]

    assert curve("restarted") == curve("full")
    _, meta = load_checkpoint(run / "checkpoint")
    assert meta["training"]["step"] == 60 and len(meta["training"]["rng"]) == 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


_REFUSED_RANK_1 = """
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, sys.argv[1])
from test_training import _run

dist.init_process_group(
    "gloo", init_method=sys.argv[2], rank=1, world_size=2, timeout=timedelta(seconds=60)
)
try:
    _run(Path(sys.argv[3]), 3)
except FileExistsError as refusal:
    print(refusal)
else:
    print("rank 1 trained into a folder holding a run")
finally:
    dist.destroy_process_group()  # before exit: gloo aborts if its group outlives main
"""


@spec(section="extra", kind="error")
def test_every_rank_refuses_a_folder_holding_a_run_not_rank_0_alone(tmp_path: Path) -> None:
    """In a 2-process gloo group (this process rank 0, a child rank 1) train(resume=False) into a folder holding a run raises FileExistsError on both ranks: rank 0 alone looks at the folder (it alone writes), and rank 1 learns its answer instead of waiting for it in DistributedDataParallel's first broadcast until the group times out."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available here")
    _run(tmp_path, 3)
    before = _file_bytes(tmp_path)
    init = f"tcp://127.0.0.1:{_free_port()}"
    child = subprocess.Popen(
        [sys.executable, "-c", _REFUSED_RANK_1, str(Path(__file__).parent), init, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    dist.init_process_group(
        "gloo", init_method=init, rank=0, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        with pytest.raises(FileExistsError, match="already holds a run"):
            _run(tmp_path, 3)
    finally:
        dist.destroy_process_group()
        stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr
    assert "already holds a run (as rank 0 found)" in stdout
    assert _file_bytes(tmp_path) == before


_RESUMING_RANK_1 = """
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, sys.argv[1])
from test_training import _run

shared, own, resume = Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5] == "resume"


def group(init):
    dist.init_process_group(
        "gloo", init_method=init, rank=1, world_size=2, timeout=timedelta(seconds=60)
    )


group(sys.argv[2])
try:
    _run(shared, 3)  # the two-process run rank 0 will resume
finally:
    dist.destroy_process_group()
group(sys.argv[6])
try:
    _run(own, 6, resume=resume)  # this rank's own, empty folder: not the run rank 0 sees
except Exception as error:
    print(type(error).__name__, error)
else:
    print("rank 1 trained on")
finally:
    dist.destroy_process_group()
"""


@spec(section="extra", kind="error")
@pytest.mark.parametrize(
    ("rank_1", "says"),
    [
        ("resume", "FileNotFoundError cannot resume: no checkpoint"),
        ("fresh", "RuntimeError train: the ranks do not see the same run"),
    ],
    ids=["rank-1-cannot-resume", "rank-1-starts-afresh"],
)
def test_ranks_that_do_not_see_the_same_run_all_stop_before_training(
    rank_1: str, says: str, tmp_path: Path
) -> None:
    """In a 2-process gloo group whose rank 0 resumes a two-process run, a rank 1 that reads another (empty) folder stops every rank with an error naming the cause, before any step and with rank 0's run left as it was: a rank 1 that cannot load a checkpoint raises FileNotFoundError and rank 0 a RuntimeError naming rank 1, instead of waiting for it in the first collective until the group times out; a rank 1 that starts afresh beside a rank 0 resuming at step 3 makes both raise, instead of training on from different steps with different optimizer states."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available here")
    shared, own = tmp_path / "shared", tmp_path / "own"
    inits = [f"tcp://127.0.0.1:{_free_port()}" for _ in range(2)]
    child = subprocess.Popen(
        [
            *(sys.executable, "-c", _RESUMING_RANK_1, str(Path(__file__).parent), inits[0]),
            *(str(shared), str(own), rank_1, inits[1]),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )

    def group(init: str) -> None:
        dist.init_process_group(
            "gloo", init_method=init, rank=0, world_size=2, timeout=timedelta(seconds=60)
        )

    try:
        group(inits[0])
        try:
            _run(shared, 3)
        finally:
            dist.destroy_process_group()
        before = _file_bytes(shared)
        group(inits[1])
        expected = "rank 1 could not resume" if rank_1 == "resume" else "do not see the same run"
        try:
            with pytest.raises(RuntimeError, match=expected):
                _run(shared, 6, resume=True)
        finally:
            dist.destroy_process_group()
    finally:
        stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr
    assert says in stdout, stdout
    assert _file_bytes(shared) == before
    assert not own.exists() or not any(own.iterdir())


@spec(section="extra", kind="equivalence")
@pytest.mark.parametrize("accumulate", ["1", "2"], ids=["one-batch-steps", "accumulate-2"])
def test_gloo_run_with_this_process_as_rank_0_takes_the_one_process_step(
    accumulate: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two gloo processes, this one rank 0 (`transformer.cli.main` in-process) and a child rank 1, end on half batches with the weights and losses of one process on whole batches, also when each step accumulates 2 batches (DDP's no_sync on the first); only rank 0 prints.

    The in-process twin of the torchrun test above: the data-parallel code of `train`
    (DistributedDataParallel's initial broadcast and bucketed gradient all-reduce, the
    summed losses, gathered RNG states, stop vote) runs in the default suite. torchrun's environment (MASTER_ADDR/PORT, WORLD_SIZE, RANK) is set by hand.
    """
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available here")
    settings = (*_DDP_SETTINGS, "--accumulate", accumulate)
    assert main([*_CLI_RUN, *settings, "--out", str(tmp_path / "one")]) == 0
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    child = _cli_train(tmp_path / "two", *settings, env={**rendezvous, "RANK": "1"})
    for name, value in {**rendezvous, "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    # A child that dies before joining fails the test in a minute, not torch's thirty.
    monkeypatch.setattr(dist.distributed_c10d, "default_pg_timeout", timedelta(seconds=60))
    capsys.readouterr()
    try:
        status = main([*_CLI_RUN, *settings, "--out", str(tmp_path / "two")])
    finally:
        if dist.is_initialized():  # main destroys its group; this is for a failure inside
            dist.destroy_process_group()
        stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr
    assert status == 0
    assert stdout == ""  # rank 1 neither prints its summary nor writes files
    assert "2 processes" in capsys.readouterr().err
    _assert_two_processes_took_the_one_process_step(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
@spec(section="extra", kind="equivalence")
def test_training_killed_at_random_moments_resumes_to_the_uninterrupted_curve(
    tmp_path: Path,
) -> None:
    """SIGKILL a training process 5 times at seeded random moments: the checkpoint always loads, and --resume ends with the uninterrupted losses."""
    settings = ("--steps", "60", "--log-every", "2", "--checkpoint-every", "3", "--warmup", "10")
    _finish(_cli_train(tmp_path / "full", *settings))
    run = tmp_path / "killed"
    metrics = run / "metrics.jsonl"
    rng = random.Random(7)
    kills, resumes = 0, 0
    while kills < 5:
        resume = (run / "checkpoint").exists() or (run / "checkpoint.old").exists()
        base = 0
        if resume:
            _, meta = load_checkpoint(run / "checkpoint")  # never damaged, whenever the kill hit
            base = meta["training"]["step"]
            assert 0 < base < 60
            resumes += 1
        started = time.time_ns()
        process = _cli_train(run, *settings, *(("--resume",) if resume else ()))
        # Wait until this process has passed a checkpoint step (every 3rd; logs every 2nd),
        # then kill it a random moment later: mid-step, mid-log or mid-save.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            fresh = metrics.exists() and metrics.stat().st_mtime_ns > started
            if fresh and _last_logged_step(metrics) > base + 3:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if process.poll() is not None:
            break  # finished before the kill: nothing left to interrupt
        process.send_signal(signal.SIGKILL)
        process.communicate()
        kills += 1
    _finish(_cli_train(run, *settings, "--resume"))

    def curve(name: str) -> list[tuple[float, float, float]]:
        return [
            (r["loss"], r["nll"], r["lr"]) for r in read_metrics(tmp_path / name / "metrics.jsonl")
        ]

    assert kills >= 3 and resumes >= 3
    assert curve("killed") == curve("full")


def _last_logged_step(path: Path) -> int:
    """Step of the last complete record of metrics.jsonl (0 when there is none yet)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


@spec(section="extra", kind="equivalence")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_the_last_completed_step_and_resume_goes_on_from_it(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGINT or SIGTERM after the first logged step (long before the first scheduled checkpoint) saves that step's checkpoint and exits 128 + signal; --resume goes on from it to the uninterrupted losses."""
    settings = ("--log-every", "1", "--checkpoint-every", "1000", "--warmup", "10")
    run = tmp_path / "stopped"
    process = _cli_train(run, *settings, "--steps", "1000")
    deadline = time.monotonic() + 120
    while _last_logged_step(run / "metrics.jsonl") < 1 and process.poll() is None:
        assert time.monotonic() < deadline, "no step was logged"
        time.sleep(0.01)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    _, meta = load_checkpoint(run / "checkpoint")
    stopped = meta["training"]["step"]
    assert 1 <= stopped < 1000
    assert f"interrupted by {signum.name} at step {stopped} of 1000" in stderr
    assert "--resume" in stderr

    total = stopped + 3
    resumed = _cli_train(run, *settings, "--resume", "--steps", str(total))
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    assert f"resuming from step {stopped} of {total}" in stderr
    _finish(_cli_train(tmp_path / "full", *settings, "--steps", str(total)))
    assert _curve(read_metrics(run / "metrics.jsonl")) == _curve(
        read_metrics(tmp_path / "full" / "metrics.jsonl")
    )


@spec(section="extra", kind="shape")
def test_loss_plot_is_titled_with_the_task_and_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss plot a run writes carries a title naming the task (from the run's data) and the run's directory."""
    from matplotlib.axes import Axes

    titles: list[str] = []
    set_title = Axes.set_title

    def spy(self: Axes, label: str, *args: object, **kwargs: object) -> object:
        titles.append(label)  # the title the figure really gets
        return set_title(self, label, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Axes, "set_title", spy)
    tokenizer, train_pairs, _ = _copy_data()
    model = build_model(_tiny_config(tokenizer.vocab_size), 0)
    config = TrainConfig(steps=2, batch_size=4, warmup=1, log_every=1, checkpoint_every=2)
    train(
        model,
        tokenizer,
        train_pairs,
        tmp_path / "myrun",
        config,
        progress=False,
        meta={"data": {"task": "copy"}},
    )
    assert (tmp_path / "myrun" / "loss.png").exists()
    assert titles, "no title was set on the loss plot"
    assert all("copy" in title and "myrun" in title for title in titles), titles


# --------------------------------------------------------------------------- checkpoint averaging


def _saved_tiny_model(path: Path, seed: int, **overrides: object) -> Seq2SeqTransformer:
    """A freshly initialised tiny model of seed ``seed``, saved at ``path``."""
    tokenizer, _, _ = _copy_data()
    model = build_model(_tiny_config(tokenizer.vocab_size, **overrides), seed)
    save_checkpoint(path, model, tokenizer=tokenizer.to_str())
    return model


@spec(section="extra", kind="equivalence")
def test_averaging_copies_of_one_checkpoint_returns_it_bit_for_bit(tmp_path: Path) -> None:
    """The mean of N copies of one checkpoint, taken in float64 and cast back, is that checkpoint exactly (§6.1 averaging)."""
    model = _saved_tiny_model(tmp_path / "a", seed=3)
    averaged = average_checkpoints([tmp_path / "a"] * 5, tmp_path / "mean")
    reloaded, meta = load_checkpoint(tmp_path / "mean")
    for name, tensor in model.state_dict().items():
        assert torch.equal(averaged.state_dict()[name], tensor), name
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert meta["averaged_from"] == [str(tmp_path / "a")] * 5
    assert "training" not in meta


@spec(section="extra", kind="equivalence")
def test_averaging_two_checkpoints_gives_the_elementwise_mean_of_their_weights(
    tmp_path: Path,
) -> None:
    """Every parameter and float buffer of the averaged checkpoint is (a + b) / 2 of the two inputs (§6.1 averaging)."""
    a = _saved_tiny_model(tmp_path / "a", seed=1)
    b = _saved_tiny_model(tmp_path / "b", seed=2)
    average_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "mean")
    reloaded, _ = load_checkpoint(tmp_path / "mean")
    differ = 0
    for name, tensor in reloaded.state_dict().items():
        wa, wb = a.state_dict()[name], b.state_dict()[name]
        expected = ((wa.double() + wb.double()) / 2).to(wa.dtype)
        assert torch.equal(tensor, expected), name
        differ += int(not torch.equal(wa, wb))
    assert differ > 0  # the two seeds really gave two models


@spec(section="extra", kind="error")
def test_averaging_checkpoints_of_another_architecture_is_refused_naming_the_first_mismatch(
    tmp_path: Path,
) -> None:
    """A checkpoint whose architecture differs from the first one's raises CheckpointError naming it and the field (§6.1 averaging)."""
    _saved_tiny_model(tmp_path / "a", seed=1)
    _saved_tiny_model(tmp_path / "b", seed=2)
    _saved_tiny_model(tmp_path / "wide", seed=3, dim_feedforward=32)
    _saved_tiny_model(tmp_path / "deep", seed=4, num_decoder_layers=2)
    paths = [tmp_path / n for n in ("a", "b", "wide", "deep")]
    with pytest.raises(CheckpointError, match=r"architecture mismatch: \S*wide holds .*dim_feed"):
        average_checkpoints(paths, tmp_path / "mean")
    assert not (tmp_path / "mean").exists()


@spec(section="extra", kind="error")
def test_averaging_checkpoints_whose_tokenizers_differ_is_refused(tmp_path: Path) -> None:
    """Two checkpoints of one architecture whose tokenizers differ (the same tokens, but those of "a" and "b" under each other's ids) raise CheckpointError naming the second: averaging would mix the embedding rows of different tokens (§6.1 averages checkpoints of one run)."""
    tokenizer, _, _ = _copy_data()
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    token = {i: t for t, i in vocab.items()}
    first, second = token[tokenizer.encode("a")[0]], token[tokenizer.encode("b")[0]]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    other = Tokenizer.from_str(json.dumps(spec))
    assert other.vocab_size == tokenizer.vocab_size and other.encode("a") != tokenizer.encode("a")
    _saved_tiny_model(tmp_path / "a", seed=1)
    model = build_model(_tiny_config(other.vocab_size), 2)
    save_checkpoint(tmp_path / "b", model, tokenizer=other.to_str())
    with pytest.raises(CheckpointError, match=r"\S*b has another tokenizer than \S*a"):
        average_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "mean")
    assert not (tmp_path / "mean").exists()


@spec(section="extra", kind="error")
def test_averaging_refuses_an_existing_output_unless_forced_and_an_empty_list(
    tmp_path: Path,
) -> None:
    """An existing output raises FileExistsError unless force=True; no inputs raise ValueError."""
    _saved_tiny_model(tmp_path / "a", seed=1)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        average_checkpoints([tmp_path / "a"], tmp_path / "taken")
    average_checkpoints([tmp_path / "a"], tmp_path / "taken", force=True)
    load_checkpoint(tmp_path / "taken")
    with pytest.raises(ValueError, match="got no checkpoints"):
        average_checkpoints([], tmp_path / "none")


@spec(section="extra", kind="shape")
def test_keep_last_keeps_the_newest_step_checkpoints_beside_the_checkpoint(tmp_path: Path) -> None:
    """keep_last=2 with a save every 3 steps of 12 leaves DIR/checkpoints/step-00000009 and step-00000012, each loadable (§6.1 averaging)."""
    model, _ = _run(tmp_path, 12, checkpoint_every=3, keep_last=2)
    kept = step_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step-00000009", "step-00000012"]
    assert [p.parent for p in kept] == [tmp_path / STEP_CHECKPOINTS_DIR] * 2
    last, meta = load_checkpoint(kept[-1])
    assert meta["training"]["step"] == 12
    for name, tensor in model.state_dict().items():
        assert torch.equal(last.state_dict()[name], tensor), name
    _run(tmp_path / "none", 3)
    assert step_checkpoints(tmp_path / "none") == []


@spec(section="extra", kind="equivalence")
def test_keep_last_after_a_shorter_run_is_extended_keeps_what_one_long_run_keeps(
    tmp_path: Path,
) -> None:
    """A run of 7 steps (saving every 3, keep_last=3) extended by resume to 12 keeps the step checkpoints of one uninterrupted 12-step run (6, 9, 12): the old last step 7, off the grid, leaves the rotation instead of pushing out step 6."""
    _run(tmp_path / "once", 12, checkpoint_every=3, keep_last=3)
    _run(tmp_path / "twice", 7, checkpoint_every=3, keep_last=3)
    assert [p.name for p in step_checkpoints(tmp_path / "twice")][-1] == "step-00000007"
    _run(tmp_path / "twice", 12, resume=True, checkpoint_every=3, keep_last=3)
    names = [p.name for p in step_checkpoints(tmp_path / "twice")]
    assert names == [p.name for p in step_checkpoints(tmp_path / "once")]
    assert names == ["step-00000006", "step-00000009", "step-00000012"]


@spec(section="extra", kind="property")
def test_resuming_with_another_checkpoint_every_keeps_the_step_checkpoints_already_kept(
    tmp_path: Path,
) -> None:
    """The step checkpoints a run kept before its stop stay when the resumed run saves on another grid (every 2 steps to 4, then every 3 to 7): 2 and 4, then 6 and the final 7, for keep_last=4 (§6.1 averages them)."""
    _run(tmp_path, 4, checkpoint_every=2, keep_last=4)
    _run(tmp_path, 7, resume=True, checkpoint_every=3, keep_last=4)
    names = [p.name for p in step_checkpoints(tmp_path)]
    assert names == ["step-00000002", "step-00000004", "step-00000006", "step-00000007"]


@spec(section="extra", kind="property")
def test_resuming_with_another_log_every_keeps_the_records_already_logged(tmp_path: Path) -> None:
    """The records a run logged before its checkpoint stay in metrics.jsonl when the resumed run logs on another grid (every 2 steps, then every 3): steps 2 and 4, then 6 and 9 after the resume at 4."""
    _run(tmp_path, 4, log_every=2)
    _run(tmp_path, 9, resume=True, log_every=3)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2, 4, 6, 9]


@spec(section="extra", kind="error")
def test_an_example_longer_than_the_positional_table_is_refused_before_the_first_step(
    tmp_path: Path,
) -> None:
    """An example whose target (plus BOS) needs more positions than the model's positional table raises ValueError naming the example, before any step is taken or any file written (it used to stop the run at the step that drew it)."""
    tokenizer, train_pairs, _ = _copy_data()
    model = build_model(_tiny_config(tokenizer.vocab_size, max_len=12), 0)
    long_pair = ("a b", " ".join(["a"] * 40))
    config = TrainConfig(steps=3, batch_size=4, warmup=1, log_every=1, checkpoint_every=1)
    with pytest.raises(
        ValueError, match=r"example 3 \(target 'a a a.*beyond the model's positional table of 12"
    ):
        train(model, tokenizer, [*train_pairs[:2], long_pair], tmp_path, config, progress=False)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- accumulation


def _one_step_state(
    out: Path, *, batch_size: int, accumulate: int
) -> tuple[dict[str, object], torch.optim.Optimizer]:
    """One step on the first 12 copy pairs with dropout 0: (its metrics record, its optimizer)."""
    tokenizer, train_pairs, _ = _copy_data()
    model = build_model(_tiny_config(tokenizer.vocab_size, dropout=0.0), 0)
    config = TrainConfig(
        steps=1,
        batch_size=batch_size,
        accumulate=accumulate,
        warmup=5,
        log_every=1,
        clip_norm=None,
    )
    result = train(model, tokenizer, train_pairs[:12], out, config, progress=False)
    reloaded = build_model(_tiny_config(tokenizer.vocab_size, dropout=0.0), 0)
    optimizer = make_optimizer(reloaded)
    load_checkpoint(out / "checkpoint", reloaded, optimizer)
    return result.history[-1], optimizer


@spec(section="5.3", kind="equivalence")
def test_accumulating_k_batches_of_b_takes_the_step_of_one_batch_of_k_times_b(
    tmp_path: Path,
) -> None:
    """With dropout 0, accumulate=3 over batches of 4 pairs gives the loss and Adam moments (so the §5.3 step) of one batch of all 12."""
    big_record, big = _one_step_state(tmp_path / "big", batch_size=12, accumulate=1)
    acc_record, acc = _one_step_state(tmp_path / "acc", batch_size=4, accumulate=3)
    assert acc_record["loss"] == pytest.approx(big_record["loss"], rel=1e-6)
    assert acc_record["nll"] == pytest.approx(big_record["nll"], rel=1e-6)
    big_state, acc_state = big.state_dict()["state"], acc.state_dict()["state"]
    assert big_state.keys() == acc_state.keys()
    for index in big_state:
        for moment in ("exp_avg", "exp_avg_sq"):
            assert_close(
                acc_state[index][moment], big_state[index][moment], msg=f"{index} {moment}"
            )
        assert float(acc_state[index]["step"]) == 1.0
