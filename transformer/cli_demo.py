"""The ``transformer demo`` command: train a small model on a built-in task, plot, save,
reload, generate, compare with the untrained baseline, and check the three goals.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

from transformer.cli_common import (
    DEMO_FILES,
    DEMO_MARK,
    CLIError,
    check_out_dir,
    n_params,
    non_negative_int,
    positive_float,
    positive_int,
    print_by_length,
)
from transformer.cli_config import DEFAULT_TASK, DEFAULT_TRAIN, DEFAULT_VOCAB, model_config
from transformer.run_files import held_run_files, remove_run_files

TINY_SET = 32
TINY_STEPS = 150
TINY_WARMUP = 20
TINY_LR_SCALE = 0.5
TINY_GOAL = 0.05
HELDOUT_GOAL = 0.9
# Hand-picked short inputs the demo decodes at the end: what a person types first.
DEMO_SHORT_INPUTS = ("0", "7", "42")


def _cmd_demo(args: argparse.Namespace) -> int:
    from transformer.checkpoint import load_checkpoint
    from transformer.data import TASKS, make_task
    from transformer.tokenizer import Tokenizer
    from transformer.training import TrainConfig, build_model, evaluate, train, translate

    out = check_out_dir(args.out)
    held, tiny_held = held_run_files(out), held_run_files(out / "tiny")
    # Only the mark says a demo wrote the folder; even then, run files a demo never
    # writes (checkpoints/ of a train run) are someone else's.
    by_a_demo = (out / DEMO_MARK).exists()
    foreign = [name for name in held if not (by_a_demo and name in DEMO_FILES)]
    foreign += [f"tiny/{name}" for name in tiny_held if not by_a_demo]
    if foreign and not args.force:
        raise CLIError(
            f"--out {out} already holds run files that no earlier demo wrote "
            f"({', '.join(foreign)}): choose another --out, or replace them with --force"
        )
    seed = args.seed
    task = TASKS[DEFAULT_TASK]
    split = make_task(task.name, seed=seed)
    tokenizer = Tokenizer.train([t for pair in split.train for t in pair], vocab_size=DEFAULT_VOCAB)
    config = model_config(tokenizer.vocab_size)
    data = {
        "task": task.name,
        "seed": seed,
        "n_train": len(split.train),
        "n_heldout": len(split.heldout),
    }
    model = build_model(config, seed)
    print(f"transformer demo: task {task.name!r} ({task.description}), seed {seed}")
    print(
        f"  data: {len(split.train)} training / {len(split.heldout)} held-out examples "
        f"(disjoint), BPE vocabulary {tokenizer.vocab_size} tokens"
    )
    print(
        f"  model: d_model {config.d_model}, {config.nhead} heads, "
        f"{config.num_encoder_layers}+{config.num_decoder_layers} layers, "
        f"feed-forward {config.dim_feedforward}, {n_params(model) / 1e6:.2f}M parameters"
    )
    progress = not args.no_progress
    # Every check has passed: clear what this run replaces, and mark the folder as a demo's.
    remove_run_files(out, held)
    remove_run_files(out / "tiny", tiny_held)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARK).write_text("written by `transformer demo`; a later demo replaces the run\n")

    # Goal 1: memorise a tiny set. Smoothing would put a floor under the loss (§5.4),
    # and dropout would keep it noisy, so both are off for this check only.
    tiny = split.train[:TINY_SET]
    print(f"\n[1/4] overfitting a tiny set of {len(tiny)} examples (no smoothing, no dropout)")
    tiny_model = build_model(dataclasses.replace(config, dropout=0.0), seed)
    tiny_run = train(
        tiny_model,
        tokenizer,
        tiny,
        out / "tiny",
        TrainConfig(
            steps=args.tiny_steps,
            batch_size=TINY_SET,
            warmup=TINY_WARMUP,
            lr_scale=TINY_LR_SCALE,
            label_smoothing=0.0,
            seed=seed,
            log_every=10,
            checkpoint_every=args.tiny_steps,
        ),
        progress=progress,
        meta={"data": {**data, "n_train": TINY_SET}},
    )
    tiny_loss = tiny_run.history[-1]["nll"]
    print(f"      loss {tiny_loss:.4f} after {tiny_run.step} steps ({tiny_run.elapsed:.1f} s)")

    # Main run: the paper's recipe on the training split.
    steps = args.steps
    print(
        f"\n[2/4] training on {len(split.train)} examples: {steps} steps"
        + (f", at most {args.seconds:g} s" if args.seconds else "")
    )
    run = train(
        model,
        tokenizer,
        split.train,
        out,
        TrainConfig(
            steps=steps,
            batch_size=DEFAULT_TRAIN["batch_size"],
            warmup=DEFAULT_TRAIN["warmup"],
            lr_scale=DEFAULT_TRAIN["lr_scale"],
            seed=seed,
            log_every=10,
            checkpoint_every=max(steps // 4, 1),
            max_seconds=args.seconds,
        ),
        progress=progress,
        meta={"data": data},
    )
    last = run.history[-1]
    print(
        f"      step {run.step}: loss {last['loss']:.4f} (label-smoothed), "
        f"cross-entropy {last['nll']:.4f}, {run.elapsed:.1f} s, "
        f"{run.step * DEFAULT_TRAIN['batch_size'] / max(run.elapsed, 1e-9):.0f} examples/s"
    )
    print(f"      wrote {out / 'metrics.jsonl'}, {out / 'loss.png'}, {out / 'checkpoint'}/")

    print(f"\n[3/4] reloading {out / 'checkpoint'} from disk, decoding token by token (greedy)")
    reloaded, meta = load_checkpoint(out / "checkpoint")
    reloaded_tokenizer = Tokenizer.from_str(meta["tokenizer"])
    max_len = int(meta["max_target_len"]) + 8
    heldout = list(split.heldout)
    sources = [s for s, _ in heldout]
    t0 = time.perf_counter()
    in_memory_ids = translate(model, tokenizer, sources, max_len=max_len)
    reloaded_ids = translate(reloaded, reloaded_tokenizer, sources, max_len=max_len)
    same = sum(a == b for a, b in zip(in_memory_ids, reloaded_ids, strict=True))
    for src, tgt in heldout[: args.examples]:
        got = reloaded_tokenizer.decode(reloaded_ids[sources.index(src)])
        mark = "ok  " if got == tgt else "MISS"
        print(f"      {mark} {src:>6} -> {got}" + ("" if got == tgt else f"   (expected: {tgt})"))

    print("\n[4/4] scoring held-out examples: trained vs untrained baseline (same architecture)")
    trained = evaluate(reloaded, reloaded_tokenizer, heldout, max_len=max_len)
    baseline = evaluate(build_model(config, seed), tokenizer, heldout, max_len=max_len)
    print(f"      {'model':<22}{'exact match':>12}{'BLEU':>8}")
    print(f"      {'trained':<22}{trained.exact_match:>12.3f}{trained.bleu:>8.2f}")
    print(f"      {'untrained baseline':<22}{baseline.exact_match:>12.3f}{baseline.bleu:>8.2f}")
    print_by_length(trained, baseline, indent="      ")
    print(f"      ({time.perf_counter() - t0:.1f} s of decoding)")
    # What people type first: short inputs, which are a small share of the data.
    short = list(DEMO_SHORT_INPUTS)
    short_out = translate(reloaded, reloaded_tokenizer, short, max_len=max_len)
    print(
        "      short inputs: "
        + ", ".join(
            f"{text} -> {reloaded_tokenizer.decode(ids)}"
            for text, ids in zip(short, short_out, strict=True)
        )
    )

    goals = [
        (
            tiny_loss < TINY_GOAL,
            f"near-zero loss on a tiny training set: {tiny_loss:.4f} < {TINY_GOAL} "
            f"({len(tiny)} examples, {tiny_run.step} steps)",
        ),
        (
            trained.exact_match >= HELDOUT_GOAL and trained.exact_match > baseline.exact_match,
            f"trained beats the untrained baseline on {len(heldout)} held-out examples: "
            f"exact match {trained.exact_match:.3f} >= {HELDOUT_GOAL} vs "
            f"{baseline.exact_match:.3f}, BLEU {trained.bleu:.1f} vs {baseline.bleu:.1f}",
        ),
        (
            same == len(heldout),
            f"reloaded model generates the in-memory model's tokens, token by token: "
            f"{same}/{len(heldout)} held-out outputs identical",
        ),
    ]
    print("\nGoals")
    for number, (ok, text) in enumerate(goals, start=1):
        print(f"  [{'x' if ok else ' '}] {number}. {text}")
    return 0 if all(ok for ok, _ in goals) else 1


def add_demo_parser(subparsers: Any) -> None:
    """Register ``transformer demo`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "demo",
        help="train, plot, save, reload, generate and compare with the baseline",
        description=f"Train a small model on the {DEFAULT_TASK!r} task (about two minutes on "
        "2 CPU cores), plot the loss, save, reload from disk, generate token by token and "
        "compare with the untrained baseline; exits 0 when all three goals are met.",
    )
    p.add_argument(
        "--out",
        default="runs/demo",
        metavar="DIR",
        help="default %(default)s; an earlier demo's folder is replaced, a training run "
        "only with --force",
    )
    p.add_argument("--force", action="store_true", help="replace a training run already in --out")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=DEFAULT_TRAIN["steps"],
        help="steps of the main run (default %(default)s)",
    )
    p.add_argument("--seconds", type=positive_float, default=None, help="cap on training time")
    p.add_argument(
        "--tiny-steps",
        type=positive_int,
        default=TINY_STEPS,
        help="steps of the tiny-set overfitting check (default %(default)s)",
    )
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="data, init, dropout (default 0)"
    )
    p.add_argument("--examples", type=non_negative_int, default=8, help="outputs to show")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
