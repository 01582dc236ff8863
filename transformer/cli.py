"""The ``transformer`` command: train, average, generate, evaluate, bench, demo.

Every subcommand is a thin layer over the library (:mod:`transformer.data`,
:mod:`transformer.tokenizer`, :mod:`transformer.training`); nothing below this module
knows about the command line. Bad input ends with one line on stderr,
``transformer: error: ...``, and a non-zero exit status, never a traceback
(set ``TRANSFORMER_DEBUG=1`` to see the traceback of an unexpected error).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import shutil
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

__all__ = ["build_parser", "main"]

PROG = "transformer"

# The embedded defaults of the demo and of `train`: a small model that learns the
# numbers task to >= 0.9 held-out exact match in about two minutes on 2 CPU cores.
# Measured: ~0.98 held-out exact match from 1200 steps on (2000 leave a margin for other
# seeds and thread counts); a rate twice the §5.3 one (lr_scale 2) diverges.
DEFAULT_TASK = "numbers"
DEFAULT_MODEL: dict[str, Any] = {
    "d_model": 64,
    "nhead": 4,
    "layers": 2,
    "dim_feedforward": 256,
    "dropout": 0.1,
}
DEFAULT_TRAIN: dict[str, Any] = {
    "steps": 2000,
    "batch_size": 64,
    "warmup": 200,
    "lr_scale": 1.0,
    "label_smoothing": 0.1,
    "clip_norm": 1.0,
    "seed": 0,
    "log_every": 10,
    "checkpoint_every": 500,
    "autocast": None,
    "keep_last": 0,
    "accumulate": 1,
    "batch_tokens": None,
}
DEFAULT_VOCAB = 1000
TINY_SET = 32
TINY_STEPS = 150
TINY_WARMUP = 20
TINY_LR_SCALE = 0.5
TINY_GOAL = 0.05
HELDOUT_GOAL = 0.9
# Hand-picked short inputs the demo decodes at the end: what a person types first.
DEMO_SHORT_INPUTS = ("0", "7", "42")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``transformer: error: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {_one_line(message)}\n")


class CLIError(Exception):
    """A user mistake the command reports in one line."""


_Number = TypeVar("_Number", int, float)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _checked_number(
    convert: Callable[[str], _Number], ok: Callable[[_Number], bool], what: str
) -> Callable[[str], _Number]:
    """An argparse ``type``: ``convert(text)`` if it parses and passes ``ok``, else an error."""

    def parse(text: str) -> _Number:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


_positive_int = _checked_number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _checked_number(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _checked_number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
_non_negative_float = _checked_number(
    float, lambda v: v >= 0 and math.isfinite(v), "a non-negative number"
)
_fraction = _checked_number(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


def _default(name: str, what: str) -> str:
    return f"{what} (default {DEFAULT_TRAIN[name]}, or the checkpoint's on --resume)"


# --------------------------------------------------------------------------- shared pieces


def _task_choices() -> list[str]:
    from transformer.data import task_names

    return task_names()


def _add_data_args(parser: argparse.ArgumentParser, *, required: bool) -> None:
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument(
        "--task",
        choices=_task_choices(),
        metavar="TASK",
        help=f"built-in task, one of: {', '.join(_task_choices())}",
    )
    source.add_argument(
        "--data", metavar="PATH.tsv", help="parallel corpus, one 'source<TAB>target' per line"
    )


def _resolve_checkpoint(path: str) -> Path:
    """Accept a run directory (with checkpoint/ inside) or the checkpoint directory itself."""
    run = Path(path)
    # checkpoint.old alone is what a save killed between its two renames leaves behind;
    # load_checkpoint falls back to it.
    if (run / "checkpoint").is_dir() or (run / "checkpoint.old").is_dir():
        return run / "checkpoint"
    if run.is_dir():
        return run
    raise CLIError(f"no checkpoint at {path}")


def _load(path: str) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, meta) of a checkpoint written by ``transformer train``."""
    from transformer.checkpoint import load_checkpoint
    from transformer.tokenizer import Tokenizer

    model, meta = load_checkpoint(_resolve_checkpoint(path))
    if not isinstance(meta.get("tokenizer"), str):
        raise CLIError(f"{path}: the checkpoint holds no tokenizer (not written by 'train')")
    tokenizer = Tokenizer.from_str(meta["tokenizer"])
    # A tokenizer from another run would map text to ids the embeddings do not have (or
    # to the wrong rows of those they do): refuse before decoding garbage.
    config = model.config
    if not tokenizer.vocab_size == config.src_vocab_size == config.tgt_vocab_size:
        raise CLIError(
            f"{path}: vocabulary mismatch: the stored tokenizer has {tokenizer.vocab_size} "
            f"tokens, the model's vocabularies have {config.src_vocab_size} (source) and "
            f"{config.tgt_vocab_size} (target)"
        )
    return model, tokenizer, meta


def _split_for(data: dict[str, Any]) -> Any:
    """The train/held-out split a run trained on, from its stored data description."""
    from transformer.data import make_task, read_tsv, split_heldout

    if "task" in data:
        return make_task(
            data["task"], seed=data["seed"], n_train=data["n_train"], n_heldout=data["n_heldout"]
        )
    return split_heldout(
        read_tsv(data["tsv"]), heldout_fraction=data["heldout_fraction"], seed=data["seed"]
    )


def _describe(data: dict[str, Any]) -> str:
    if "task" in data:
        return f"task {data['task']!r}, seed {data['seed']}"
    return f"{data['tsv']}, seed {data['seed']}"


def _max_len(args: argparse.Namespace, meta: dict[str, Any]) -> int:
    if args.max_len is not None:
        return int(args.max_len)
    # Room beyond the longest training target, so a model that goes on past it shows.
    return int(meta.get("max_target_len", 64)) + 8


# --------------------------------------------------------------------------- train


def _cmd_train(args: argparse.Namespace) -> int:
    from transformer.data import make_task, read_tsv, split_heldout
    from transformer.distributed import init_distributed
    from transformer.tokenizer import Tokenizer
    from transformer.training import TrainConfig, build_model, train

    out = _check_out_dir(args.out)
    saved: dict[str, Any] | None = None
    done = 0
    # torchrun --max-restarts starts every worker again after one fails: with the same
    # command line, but TORCHELASTIC_RESTART_COUNT > 0, so it goes on from the checkpoint.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    resume = args.resume or (
        restarted and any((out / name).is_dir() for name in ("checkpoint", "checkpoint.old"))
    )
    if not resume:
        _check_heads_divide_d_model(args)
        _check_fresh_run_dir(out, force=args.force, restarted=restarted)
    if resume:
        model, tokenizer, meta = _load(str(out / "checkpoint"))
        _check_same_architecture(model.config, args)
        done = int(meta["training"]["step"])
        if args.resume and args.steps is not None and args.steps <= done:
            raise CLIError(
                f"--steps {args.steps} is not beyond the checkpoint's step {done}: "
                f"--resume trains on to --steps, so ask for more than {done}"
            )
        data = meta["data"]
        asked = args.task or (args.data and os.path.abspath(args.data))
        if asked and asked not in (data.get("task"), data.get("tsv")):
            raise CLIError(
                f"--resume continues the run's own data ({_describe(data)}), not {asked}; "
                "drop --task/--data"
            )
        saved = meta["training"]["config"]
        split = _split_for(data)
    else:
        if args.task is None and args.data is None:
            raise CLIError("one of --task or --data is required")
        seed = DEFAULT_TRAIN["seed"] if args.seed is None else args.seed
        if args.task is not None:
            split = make_task(args.task, seed=seed, n_train=args.n_train, n_heldout=args.n_heldout)
            data = {
                "task": args.task,
                "seed": seed,
                "n_train": len(split.train),
                "n_heldout": len(split.heldout),
            }
        else:
            split = split_heldout(
                read_tsv(args.data), heldout_fraction=args.heldout_fraction, seed=seed
            )
            data = {
                "tsv": os.path.abspath(args.data),
                "seed": seed,
                "heldout_fraction": args.heldout_fraction,
            }
        tokenizer = Tokenizer.train(
            [text for pair in split.train for text in pair], vocab_size=args.vocab_size
        )
        config = model_config(
            tokenizer.vocab_size,
            d_model=args.d_model,
            nhead=args.heads,
            layers=args.layers,
            dim_feedforward=args.ff,
            dropout=args.dropout,
        )
        model = build_model(config, seed)
    train_config = TrainConfig(
        **{name: _setting(args, name, saved) for name in _TRAIN_SETTINGS},
        max_seconds=args.max_seconds,
    )
    device = _device(args.device)
    rank, world_size = init_distributed(device)
    lead = rank == 0
    if lead and resume:
        print(f"resuming from step {done} of {train_config.steps}", file=sys.stderr)
    if lead:
        print(
            f"training on {len(split.train)} examples ({_describe(data)}), "
            f"vocabulary {tokenizer.vocab_size}, {_n_params(model):,} parameters"
            + (f", {world_size} processes" if world_size > 1 else ""),
            file=sys.stderr,
        )
    try:
        result = train(
            model.to(device),
            tokenizer,
            split.train,
            out,
            train_config,
            resume=resume,
            progress=not args.no_progress,
            meta={"data": data},
        )
    finally:
        if world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if lead:
        print(
            f"step {result.step}: loss {result.final_loss:.4f}, {result.elapsed:.1f} s; "
            f"wrote {out / 'checkpoint'}, {out / 'metrics.jsonl'}, {out / 'loss.png'}"
        )
    return 0


# The files of a run directory, as ``train`` writes them.
_RUN_FILES = ("checkpoint", "checkpoint.old", "checkpoints", "metrics.jsonl", "loss.png")


def _check_heads_divide_d_model(args: argparse.Namespace) -> None:
    """Multi-head attention splits d_model into h heads (§3.2.2): --heads must divide it."""
    d_model = args.d_model if args.d_model is not None else DEFAULT_MODEL["d_model"]
    heads = args.heads if args.heads is not None else DEFAULT_MODEL["nhead"]
    if d_model % heads:

        def flag(name: str, value: int, given: int | None) -> str:
            return f"{name} {value}" + (" (the default)" if given is None else "")

        raise CLIError(
            f"{flag('--heads', heads, args.heads)} does not divide "
            f"{flag('--d-model', d_model, args.d_model)}: each head gets d_model / heads "
            "dimensions"
        )


def _check_out_dir(path: str, flag: str = "--out") -> Path:
    """``path`` as an output directory: refused up front if a file (not a directory) is there."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"{flag} {path}: a file is in the way (expected a directory)")
    return out


def _check_fresh_run_dir(out: Path, *, force: bool, restarted: bool) -> None:
    """A new run refuses a directory holding another run, unless ``--force`` replaces it.

    A torchrun restart is exempt: the failed first attempt may have logged metrics
    before its first checkpoint, and the restart starts that run again.
    """
    held = [name for name in _RUN_FILES if (out / name).exists()]
    if not held or restarted:
        return
    if not force:
        raise CLIError(
            f"--out {out} already holds a run ({', '.join(held)}): continue it with "
            "--resume or replace it with --force"
        )
    for name in held:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()


def _device(name: str) -> Any:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")
    # CUDA only: spec_tests/test_cli.py::test_train_on_cuda_* runs it on a GPU machine.
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # pragma: no cover
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def model_config(vocab_size: int, **overrides: Any) -> Any:
    """The ``ModelConfig`` of ``train`` and ``demo``: ``DEFAULT_MODEL`` with the given
    (non-``None``) overrides, one vocabulary shared by source and target (§3.4), pad id 0.
    """
    from transformer.model import ModelConfig
    from transformer.tokenizer import Tokenizer

    shape = {**DEFAULT_MODEL, **{k: v for k, v in overrides.items() if v is not None}}
    return ModelConfig(
        src_vocab_size=vocab_size,
        tgt_vocab_size=vocab_size,
        d_model=shape["d_model"],
        nhead=shape["nhead"],
        num_encoder_layers=shape["layers"],
        num_decoder_layers=shape["layers"],
        dim_feedforward=shape["dim_feedforward"],
        dropout=shape["dropout"],
        pad_id=Tokenizer.pad_id,
        share_embeddings=True,
    )


# TrainConfig fields settable by flags of the same name; an unset flag takes the stored
# value on --resume (the run goes on as it started) and the embedded default otherwise.
_TRAIN_SETTINGS = (
    "steps",
    "batch_size",
    "warmup",
    "lr_scale",
    "label_smoothing",
    "clip_norm",
    "seed",
    "log_every",
    "checkpoint_every",
    "autocast",
    "keep_last",
    "accumulate",
    "batch_tokens",
)


def _setting(args: argparse.Namespace, name: str, saved: dict[str, Any] | None) -> Any:
    value = getattr(args, name)
    if value is None:
        return saved.get(name, DEFAULT_TRAIN[name]) if saved is not None else DEFAULT_TRAIN[name]
    if name == "clip_norm" and value == 0:
        return None  # --clip-norm 0 switches clipping off
    return value


def _check_same_architecture(config: Any, args: argparse.Namespace) -> None:
    """On --resume the checkpoint fixes the architecture; conflicting flags are an error."""
    asked = {
        "d_model": args.d_model,
        "nhead": args.heads,
        "num_encoder_layers": args.layers,
        "dim_feedforward": args.ff,
        "dropout": args.dropout,
    }
    for key, value in asked.items():
        if value is not None and getattr(config, key) != value:
            raise CLIError(
                f"the checkpoint to resume has {key}={getattr(config, key)}, "
                f"but {value} was asked; resume keeps the checkpoint's architecture"
            )


def _n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- average


def _cmd_average(args: argparse.Namespace) -> int:
    from transformer.averaging import average_checkpoints

    out = _check_out_dir(args.out)
    if out.exists() and not args.force:
        raise CLIError(f"--out {out} already exists: replace it with --force")
    paths = [_resolve_checkpoint(path) for path in args.checkpoints]
    average_checkpoints(paths, out, force=args.force)
    print(f"averaged {len(paths)} checkpoints into {out}")
    return 0


# --------------------------------------------------------------------------- generate


def _cmd_generate(args: argparse.Namespace) -> int:
    """Greedy or beam search (``translate``), or sampling when a sampling flag is given."""
    sampling = (args.temperature, args.top_k, args.top_p) != (None, None, None)
    if sampling and args.beam_size > 1:
        # Checked before the checkpoint is read: beam search does not sample.
        raise CLIError("--beam-size cannot be combined with --temperature, --top-k or --top-p")
    model, tokenizer, meta = _load(args.checkpoint)
    max_len = _max_len(args, meta)
    _warn_unknown_input(tokenizer, args.text)
    if not sampling:
        from transformer.training import translate

        rows = translate(model, tokenizer, args.text, max_len=max_len, beam_size=args.beam_size)
        for row in rows:
            print(tokenizer.decode(row))
        return 0
    import torch

    from transformer.data import pad_sequences
    from transformer.generate import sample_decode

    src = pad_sequences(
        [tokenizer.encode(text) or [tokenizer.unk_id] for text in args.text], tokenizer.pad_id
    )
    out = sample_decode(
        model,
        src,
        max_len,
        tokenizer.bos_id,
        tokenizer.eos_id,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=torch.Generator().manual_seed(args.seed),
    )
    for row in out:
        print(tokenizer.decode(row))
    return 0


def _warn_unknown_input(tokenizer: Any, texts: Sequence[str]) -> None:
    """Say on stderr which inputs the model cannot read: empty, or holding unknown tokens."""
    for text in texts:
        ids = tokenizer.encode(text)
        if not ids:
            print(f"{PROG}: warning: input {text!r} is empty to the tokenizer", file=sys.stderr)
        elif tokenizer.unk_id in ids:
            unknown = sum(i == tokenizer.unk_id for i in ids)
            print(
                f"{PROG}: warning: input {text!r} has {unknown} of {len(ids)} tokens unknown "
                "to the checkpoint's tokenizer (not seen in training); the output is a guess",
                file=sys.stderr,
            )


def _print_by_length(trained: Any, untrained: Any, indent: str = "") -> None:
    """Exact match per input length, trained next to untrained."""
    base = {score.length: score for score in untrained.by_length}
    print(f"{indent}exact match by input length:")
    for score in trained.by_length:
        other = base.get(score.length)
        tail = f" (untrained {other.exact_match:.3f})" if other is not None else ""
        print(
            f"{indent}  length {score.length:>3}: {score.n:>5} examples, "
            f"exact match {score.exact_match:.3f}{tail}"
        )


# --------------------------------------------------------------------------- evaluate


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from transformer.data import make_task, read_tsv
    from transformer.training import build_model, evaluate

    model, tokenizer, meta = _load(args.checkpoint)
    data = meta.get("data", {})
    if args.data is not None:
        pairs = read_tsv(args.data)
        where = f"all {len(pairs)} pairs of {args.data}"
    elif args.task is not None and args.task != data.get("task"):
        pairs = list(make_task(args.task, seed=args.seed).heldout)
        where = f"{len(pairs)} held-out examples of task {args.task!r}"
    elif data:
        pairs = list(_split_for(data).heldout)
        where = f"{len(pairs)} held-out examples ({_describe(data)})"
    else:
        raise CLIError("the checkpoint does not say what it was trained on; pass --task or --data")
    if not pairs:
        raise CLIError("no held-out examples to evaluate")
    if args.limit is not None and args.limit < len(pairs):
        # The header names what was scored, not what was available.
        pairs = pairs[: args.limit]
        where = f"the first {args.limit} of {where}"
    max_len = _max_len(args, meta)
    seed = int(meta.get("training", {}).get("config", {}).get("seed", 0))
    baseline = build_model(model.config, seed)
    trained = evaluate(model, tokenizer, pairs, max_len=max_len, beam_size=args.beam_size)
    untrained = evaluate(baseline, tokenizer, pairs, max_len=max_len, beam_size=args.beam_size)
    step = meta.get("training", {}).get("step", "?")
    print(f"evaluated on {where}, beam size {args.beam_size}")
    print(f"{'model':<28}{'exact match':>12}{'BLEU':>8}")
    print(f"{f'trained (step {step})':<28}{trained.exact_match:>12.3f}{trained.bleu:>8.2f}")
    print(f"{'untrained baseline':<28}{untrained.exact_match:>12.3f}{untrained.bleu:>8.2f}")
    # BLEU on one- and two-word answers says little; exact match by length says more.
    _print_by_length(trained, untrained)
    return 0


# --------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from transformer.checkpoint import load_checkpoint
    from transformer.data import TASKS, make_task
    from transformer.tokenizer import Tokenizer
    from transformer.training import TrainConfig, build_model, evaluate, train, translate

    out = _check_out_dir(args.out)
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
        f"feed-forward {config.dim_feedforward}, {_n_params(model) / 1e6:.2f}M parameters"
    )
    progress = not args.no_progress

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
    _print_by_length(trained, baseline, indent="      ")
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


# --------------------------------------------------------------------------- parser


_CHECKPOINT_HELP = "run directory of 'transformer train', or its checkpoint/ directory"
_MAX_LEN_HELP = "longest output in tokens (default: the longest training target + 8)"

_COMMANDS = "train, average, generate, evaluate, bench, spec, conform, demo"


def _tasks_table() -> str:
    """One line per built-in task, for train's --help."""
    from transformer.data import TASKS

    width = max(len(name) for name in TASKS)
    return "\n".join(f"  {name:<{width}}  {TASKS[name].description}" for name in sorted(TASKS))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformer-spec")
    except PackageNotFoundError:  # pragma: no cover - a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The ``transformer`` argument parser with all subcommands."""
    parser = _Parser(
        prog=PROG,
        description="Attention Is All You Need, from scratch. Commands: "
        f"{_COMMANDS}; `{PROG} COMMAND --help` describes each.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}", help="print the version"
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="torch CPU threads, set before any work (default: $OMP_NUM_THREADS if set, "
        "else 1 on a machine with at most 2 cores, else torch's default); give it before "
        "the command",
    )
    # Not required by argparse: a bare `transformer` prints the command list (see main).
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a Seq2SeqTransformer with the paper's recipe",
        description=textwrap.fill(
            "Train with Adam (0.9, 0.98, 1e-9), warm-up then inverse-sqrt learning "
            "rate and label smoothing 0.1 (paper §5.3-5.4). Writes DIR/checkpoint/, "
            "DIR/metrics.jsonl and DIR/loss.png. SIGINT or SIGTERM saves the last completed "
            "step; --resume goes on from it.",
            width=78,
        )
        + "\n\nbuilt-in tasks (--task):\n"
        + _tasks_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_data_args(p, required=False)
    p.add_argument("--out", required=True, metavar="DIR", help="run directory")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in DIR/checkpoint (implied when torchrun restarts a worker)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the run DIR already holds (its checkpoint, metrics and plot); "
        "without it a new run refuses such a DIR",
    )
    # Unset run settings take the checkpoint's values on --resume, the defaults otherwise.
    p.add_argument("--steps", type=_positive_int, help=_default("steps", "total steps"))
    p.add_argument("--batch-size", type=_positive_int, help=_default("batch_size", "pairs"))
    p.add_argument("--warmup", type=_positive_int, help=_default("warmup", "§5.3 warm-up steps"))
    p.add_argument(
        "--lr-scale", type=_positive_float, help=_default("lr_scale", "factor on the §5.3 rate")
    )
    p.add_argument(
        "--label-smoothing", type=_fraction, help=_default("label_smoothing", "§5.4 eps_ls")
    )
    p.add_argument(
        "--clip-norm",
        type=_non_negative_float,
        help=_default("clip_norm", "gradient-norm clip, 0 disables"),
    )
    p.add_argument("--seed", type=_non_negative_int, help=_default("seed", "data, init, dropout"))
    p.add_argument("--max-seconds", type=_positive_float, default=None, help="stop after this")
    p.add_argument(
        "--autocast",
        choices=["bf16", "fp16"],
        help="mixed precision under torch.autocast (bf16 without a gradient scaler; fp16 "
        "with torch.amp.GradScaler, skipped steps logged); both work on CPU too",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="under torchrun each process takes the GPU of its LOCAL_RANK",
    )
    p.add_argument(
        "--keep-last",
        type=_non_negative_int,
        metavar="N",
        help=_default(
            "keep_last",
            "also keep the last N saves as DIR/checkpoints/step-XXXXXXXX/ for "
            "'transformer average' (§6.1); 0 keeps none",
        ),
    )
    p.add_argument(
        "--accumulate",
        type=_positive_int,
        metavar="K",
        help=_default("accumulate", "sum the gradients of K batches per optimizer step"),
    )
    p.add_argument(
        "--batch-tokens",
        type=_positive_int,
        metavar="N",
        help=_default(
            "batch_tokens",
            "batch by padded source and target token count, at most N each (§5.1), "
            "instead of --batch-size pairs",
        ),
    )
    p.add_argument("--log-every", type=_positive_int, help=_default("log_every", "steps"))
    p.add_argument(
        "--checkpoint-every", type=_positive_int, help=_default("checkpoint_every", "steps")
    )
    p.add_argument(
        "--d-model", type=_positive_int, default=None, help=f"default {DEFAULT_MODEL['d_model']}"
    )
    p.add_argument(
        "--heads", type=_positive_int, default=None, help=f"default {DEFAULT_MODEL['nhead']}"
    )
    p.add_argument(
        "--layers",
        type=_positive_int,
        default=None,
        help=f"encoder and decoder layers each (default {DEFAULT_MODEL['layers']})",
    )
    p.add_argument(
        "--ff",
        type=_positive_int,
        default=None,
        help=f"feed-forward width (default {DEFAULT_MODEL['dim_feedforward']})",
    )
    p.add_argument(
        "--dropout", type=_fraction, default=None, help=f"default {DEFAULT_MODEL['dropout']}"
    )
    p.add_argument(
        "--vocab-size",
        type=_positive_int,
        default=DEFAULT_VOCAB,
        help="BPE vocabulary size to learn (default %(default)s)",
    )
    p.add_argument("--n-train", type=_positive_int, default=None, help="task examples to train on")
    p.add_argument(
        "--n-heldout",
        type=_non_negative_int,
        default=None,
        help="task examples held out from training (default: the task's own)",
    )
    p.add_argument("--heldout-fraction", type=_fraction, default=0.1, help="for --data")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "average",
        help="average the weights of checkpoints of one architecture (paper §6.1)",
        description="Write to --out a checkpoint whose parameters and float buffers are the "
        "element-wise mean (in float64) of the given checkpoints', as the paper's base models "
        "average their last 5 checkpoints (§6.1). `train --keep-last N` keeps them in "
        "DIR/checkpoints/.",
    )
    p.add_argument(
        "checkpoints", nargs="+", metavar="CHECKPOINT_DIR", help="checkpoints (or run dirs)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_average)

    p = sub.add_parser(
        "generate",
        help="decode texts token by token with a trained checkpoint",
        description="Print one output line per input text: greedy decoding by default, beam "
        "search with --beam-size, or sampling with --temperature/--top-k/--top-p (reproducible "
        "with --seed).",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help=_CHECKPOINT_HELP)
    p.add_argument("text", nargs="+", help="source texts")
    p.add_argument("--beam-size", type=_positive_int, default=1, help="1 = greedy (default)")
    p.add_argument("--max-len", type=_positive_int, default=None, help=_MAX_LEN_HELP)
    p.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=None,
        help="sample with this temperature (1 = the model's distribution, 0 = greedy)",
    )
    p.add_argument(
        "--top-k", type=_positive_int, default=None, help="sample from the K most probable tokens"
    )
    p.add_argument(
        "--top-p",
        type=_checked_number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
        default=None,
        help="sample from the smallest set of tokens whose probability reaches P (nucleus)",
    )
    p.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="seed of the sampler's generator (default %(default)s): same seed, same output",
    )
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "evaluate",
        help="exact match and BLEU, trained vs untrained baseline",
        description="Score held-out examples (of the run's own data unless --task/--data is "
        "given; --data scores every pair of the file) against the untrained baseline of "
        "the same architecture.",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help=_CHECKPOINT_HELP)
    _add_data_args(p, required=False)
    p.add_argument("--seed", type=_non_negative_int, default=0, help="split seed for --task")
    p.add_argument("--beam-size", type=_positive_int, default=1, help="1 = greedy (default)")
    p.add_argument("--max-len", type=_positive_int, default=None, help=_MAX_LEN_HELP)
    p.add_argument("--limit", type=_positive_int, default=None, help="score the first N only")
    p.set_defaults(func=_cmd_evaluate)

    _add_optional_parsers(sub)

    p = sub.add_parser(
        "demo",
        help="train, plot, save, reload, generate and compare with the baseline",
        description=f"Train a small model on the {DEFAULT_TASK!r} task (about two minutes on "
        "2 CPU cores), plot the loss, save, reload from disk, generate token by token and "
        "compare with the untrained baseline; exits 0 when all three goals are met.",
    )
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="default %(default)s")
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=DEFAULT_TRAIN["steps"],
        help="steps of the main run (default %(default)s)",
    )
    p.add_argument("--seconds", type=_positive_float, default=None, help="cap on training time")
    p.add_argument(
        "--tiny-steps",
        type=_positive_int,
        default=TINY_STEPS,
        help="steps of the tiny-set overfitting check (default %(default)s)",
    )
    p.add_argument(
        "--seed", type=_non_negative_int, default=0, help="data, init, dropout (default 0)"
    )
    p.add_argument("--examples", type=_non_negative_int, default=8, help="outputs to show")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
    return parser


# Subcommands that live in their own modules, each registered by `add_<name>_parser(sub)`;
# a module that is absent (a trimmed install) simply leaves its subcommand out.
_OPTIONAL_COMMANDS = {
    "bench": "transformer.bench",
    "spec": "transformer.specification",
    "conform": "transformer.conformance.cli",
}


def _add_optional_parsers(sub: Any) -> None:
    for name, module_name in _OPTIONAL_COMMANDS.items():
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        getattr(module, f"add_{name}_parser")(sub)


def default_threads() -> int | None:
    """The torch thread count the CLI uses without ``--threads``; ``None`` keeps torch's own.

    ``OMP_NUM_THREADS`` when the user set it; otherwise 1 on a machine with at most 2
    usable cores, where OpenMP threads spinning against other work cost far more than
    they gain (``train --steps 40``: 33.6 s with 2 threads on a busy 2-core machine,
    2.0 s with 1); otherwise torch's default (one thread per physical core).
    """
    configured = os.environ.get("OMP_NUM_THREADS", "").strip()
    if configured.isdigit() and int(configured) >= 1:
        return int(configured)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 1 if (cores or 1) <= 2 else None


def _apply_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` with ``--threads`` or :func:`default_threads`, before any work."""
    count = threads if threads is not None else default_threads()
    if count is not None:
        import torch

        torch.set_num_threads(count)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``transformer`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        sys.stderr.write(parser.format_help())
        parser.error(f"a command is required, one of: {_COMMANDS}")
    _apply_threads(args.threads)
    try:
        return int(args.func(args))
    except KeyboardInterrupt as err:
        return _report_interrupt(err)
    except Exception as err:
        if os.environ.get("TRANSFORMER_DEBUG"):
            raise
        print(f"{PROG}: error: {_describe_error(err)}", file=sys.stderr)
        return 1


def _report_interrupt(err: KeyboardInterrupt) -> int:
    """Ctrl-C: one stderr line and 130; a run that saved its step says where (128 + signal)."""
    # Only `train` raises TrainInterrupted, so its module is loaded when it is raised.
    loop = sys.modules.get("transformer.train_loop")
    if loop is not None and isinstance(err, loop.TrainInterrupted):
        print(
            f"{PROG}: interrupted by {signal.Signals(err.signum).name} at step {err.step} "
            f"of {err.total}; saved {err.checkpoint}, continue with --resume",
            file=sys.stderr,
        )
        return 128 + err.signum
    print(f"{PROG}: interrupted", file=sys.stderr)
    return 130


_SHOWN_DIFFERENCES = 3


def _summarise_mismatch(text: str) -> str:
    """An 'architecture mismatch' message cut to its first differences and a count."""
    head, paren, rest = text.partition(" (")
    if "architecture mismatch" not in head or not paren or not rest.endswith(")"):
        return text
    items = rest[:-1].split("; ")
    if len(items) <= _SHOWN_DIFFERENCES:
        return text
    shown = "; ".join(items[:_SHOWN_DIFFERENCES])
    return f"{head} ({shown}; and {len(items) - _SHOWN_DIFFERENCES} more, {len(items)} in all)"


def _describe_error(err: Exception) -> str:
    if isinstance(err, OSError) and err.filename is not None:
        return _one_line(f"{err.filename}: {err.strerror or err}")
    text = _summarise_mismatch(_one_line(err)) or type(err).__name__
    return text if isinstance(err, CLIError | ValueError) else f"{type(err).__name__}: {text}"
