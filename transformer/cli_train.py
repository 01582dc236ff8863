"""The ``transformer train`` command: a fresh run or a ``--resume``, its flags, and the
checks on the run directory and the device made before any training starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from transformer.cli_common import (
    DEMO_MARK,
    CLIError,
    add_data_args,
    check_out_dir,
    describe_data,
    file_digest,
    fraction,
    load_run,
    n_params,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    split_for,
)
from transformer.cli_config import (
    DEFAULT_MODEL,
    DEFAULT_TRAIN,
    DEFAULT_VOCAB,
    TRAIN_SETTINGS,
    check_heads_divide_d_model,
    check_same_architecture,
    model_config,
    train_setting,
)
from transformer.run_files import held_run_files, remove_run_files


def _cmd_train(args: argparse.Namespace) -> int:
    from transformer.data import make_task, read_tsv, split_heldout
    from transformer.distributed import init_distributed
    from transformer.tokenizer import SPECIAL_TOKENS, Tokenizer
    from transformer.train_loop import check_examples_fit
    from transformer.training import TrainConfig, build_model, train

    out = check_out_dir(args.out)
    device = _device(args.device)  # before any work
    if args.batch_tokens is not None and args.batch_size is not None:
        raise CLIError(
            f"--batch-tokens {args.batch_tokens} and --batch-size {args.batch_size}: a batch "
            "is counted in tokens or in pairs, give one of them"
        )
    smallest = len(SPECIAL_TOKENS) + 1
    if args.vocab_size < smallest:
        raise CLIError(
            f"--vocab-size must be at least {smallest} (the special tokens and one more), "
            f"got {args.vocab_size}"
        )
    saved: dict[str, Any] | None = None
    done = 0
    replaced: list[str] = []
    # torchrun --max-restarts starts every worker again after one fails: with the same
    # command line, but TORCHELASTIC_RESTART_COUNT > 0, so it goes on from the checkpoint,
    # or starts again where the first attempt failed before its first one. Only a run this
    # job started: a first attempt refused because --out held another run fails too, and
    # its restart must not take that run over.
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 and ELASTIC_JOB_VAR in os.environ and os.environ.get("RANK", "0") == "0":
        # A job's first attempt: a mark already there was left by another job (one that
        # crashed, under the same --rdzv_id); kept, it would let this job's restarts
        # take over that run.
        (out / ELASTIC_MARK).unlink(missing_ok=True)
    restarted = attempt > 0 and _started_here(out)
    resume = args.resume or (
        restarted and any((out / name).is_dir() for name in ("checkpoint", "checkpoint.old"))
    )
    if not resume:
        check_heads_divide_d_model(args)
        replaced = _check_fresh_run_dir(out, force=args.force, restarted=restarted)
    if resume:
        model, tokenizer, meta = load_run(str(out / "checkpoint"))
        check_same_architecture(model.config, args)
        done = int(meta["training"]["step"])
        if args.resume and args.steps is not None and args.steps <= done:
            raise CLIError(
                f"--steps {args.steps} is not beyond the checkpoint's step {done}: "
                f"--resume trains on to --steps, so ask for more than {done}"
            )
        data = meta.get("data")
        if not isinstance(data, dict):
            raise CLIError(
                f"--resume: the run in {out} records no training data (it was not written "
                "by `transformer train`); resume it with transformer.train(..., resume=True)"
            )
        asked = args.task or (args.data and os.path.abspath(args.data))
        if asked and asked not in (data.get("task"), data.get("tsv")):
            raise CLIError(
                f"--resume continues the run's own data ({describe_data(data)}), not {asked}; "
                "drop --task/--data"
            )
        saved = meta["training"]["config"]
        split = split_for(data)
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
                "sha256": file_digest(args.data),
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
        **{name: train_setting(args, name, saved) for name in TRAIN_SETTINGS},
        max_seconds=args.max_seconds,
    )
    rank, world_size = init_distributed(device)
    lead = rank == 0
    if lead and replaced:  # rank 0 alone writes the run, so it alone clears what it replaces
        # train() checks this again before its first step; here it must hold before the
        # old run is deleted.
        encoded = [(tokenizer.encode(s), tokenizer.encode(t)) for s, t in split.train]
        check_examples_fit(encoded, split.train, model.config.max_len)
        remove_run_files(out, replaced)
    if lead:
        # The run written here is the user's: a later demo must ask before replacing it.
        (out / DEMO_MARK).unlink(missing_ok=True)
    if lead and not restarted and ELASTIC_JOB_VAR in os.environ:
        out.mkdir(parents=True, exist_ok=True)
        (out / ELASTIC_MARK).write_text(os.environ[ELASTIC_JOB_VAR], encoding="utf-8")
    if lead and resume:
        print(f"resuming from step {done} of {train_config.steps}", file=sys.stderr)
    if lead:
        print(
            f"training on {len(split.train)} examples ({describe_data(data)}), "
            f"vocabulary {tokenizer.vocab_size}, {n_params(model):,} parameters"
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
            # A restart before the first checkpoint replaces what its failed attempt
            # logged; every other fresh run's folder was checked (or cleared) above.
            overwrite=not resume,
            progress=not args.no_progress,
            meta={"data": data},
        )
    finally:
        if world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if lead:
        (out / ELASTIC_MARK).unlink(missing_ok=True)  # the job's run is complete
        print(
            f"step {result.step}: loss {result.final_loss:.4f}, {result.elapsed:.1f} s; "
            f"wrote {out / 'checkpoint'}, {out / 'metrics.jsonl'}, {out / 'loss.png'}"
        )
    return 0


#: Set by torchrun in every worker: the rendezvous id of the job (``--rdzv-id``; a fresh
#: one for each ``--standalone`` job).
ELASTIC_JOB_VAR = "TORCHELASTIC_RUN_ID"
#: Written by rank 0 of a torchrun job into the folder of the run it starts, holding the
#: job's id, and removed when the run completes: a restart of that job (and only of it)
#: continues the run there.
ELASTIC_MARK = ".torchrun-job"


def _started_here(out: Path) -> bool:
    """Did this torchrun job start the run in ``out`` (its id is in :data:`ELASTIC_MARK`)?"""
    job = os.environ.get(ELASTIC_JOB_VAR)
    mark = out / ELASTIC_MARK
    return job is not None and mark.is_file() and mark.read_text(encoding="utf-8") == job


def _check_fresh_run_dir(out: Path, *, force: bool, restarted: bool) -> list[str]:
    """A new run refuses a directory holding another run, unless ``--force`` replaces it.

    Returns the run files ``--force`` replaces; they are deleted only once every other
    argument has been checked and the data read, so a refused command loses nothing.
    A torchrun restart is exempt: the failed first attempt may have logged metrics
    before its first checkpoint, and the restart starts that run again.
    """
    held = held_run_files(out)
    if not held or restarted:
        return []
    if not force:
        raise CLIError(
            f"--out {out} already holds a run ({', '.join(held)}): continue it with "
            "--resume or replace it with --force"
        )
    return held


def _device(name: str) -> Any:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")
    # CUDA only: spec_tests/test_cli.py::test_train_on_cuda_* runs it on a GPU machine.
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # pragma: no cover
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def _default(name: str, what: str) -> str:
    return f"{what} (default {DEFAULT_TRAIN[name]}, or the checkpoint's on --resume)"


def _tasks_table() -> str:
    """One line per built-in task, for train's --help."""
    from transformer.data import TASKS

    width = max(len(name) for name in TASKS)
    return "\n".join(f"  {name:<{width}}  {TASKS[name].description}" for name in sorted(TASKS))


def add_train_parser(subparsers: Any) -> None:
    """Register ``transformer train`` on the CLI's subparsers."""
    p = subparsers.add_parser(
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
    add_data_args(p, required=False)
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
    p.add_argument("--steps", type=positive_int, help=_default("steps", "total steps"))
    p.add_argument("--batch-size", type=positive_int, help=_default("batch_size", "pairs"))
    p.add_argument("--warmup", type=positive_int, help=_default("warmup", "§5.3 warm-up steps"))
    p.add_argument(
        "--lr-scale", type=positive_float, help=_default("lr_scale", "factor on the §5.3 rate")
    )
    p.add_argument(
        "--label-smoothing", type=fraction, help=_default("label_smoothing", "§5.4 eps_ls")
    )
    p.add_argument(
        "--clip-norm",
        type=non_negative_float,
        help=_default("clip_norm", "gradient-norm clip, 0 disables"),
    )
    p.add_argument("--seed", type=non_negative_int, help=_default("seed", "data, init, dropout"))
    p.add_argument("--max-seconds", type=positive_float, default=None, help="stop after this")
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
        type=non_negative_int,
        metavar="N",
        help=_default(
            "keep_last",
            "also keep the last N saves as DIR/checkpoints/step-XXXXXXXX/ for "
            "'transformer average' (§6.1); 0 keeps none",
        ),
    )
    p.add_argument(
        "--accumulate",
        type=positive_int,
        metavar="K",
        help=_default("accumulate", "sum the gradients of K batches per optimizer step"),
    )
    p.add_argument(
        "--batch-tokens",
        type=positive_int,
        metavar="N",
        help=_default(
            "batch_tokens",
            "batch by padded source and target token count, at most N each (§5.1), "
            "instead of --batch-size pairs",
        ),
    )
    p.add_argument("--log-every", type=positive_int, help=_default("log_every", "steps"))
    p.add_argument(
        "--checkpoint-every", type=positive_int, help=_default("checkpoint_every", "steps")
    )
    p.add_argument(
        "--d-model", type=positive_int, default=None, help=f"default {DEFAULT_MODEL['d_model']}"
    )
    p.add_argument(
        "--heads", type=positive_int, default=None, help=f"default {DEFAULT_MODEL['nhead']}"
    )
    p.add_argument(
        "--layers",
        type=positive_int,
        default=None,
        help=f"encoder and decoder layers each (default {DEFAULT_MODEL['layers']})",
    )
    p.add_argument(
        "--ff",
        type=positive_int,
        default=None,
        help=f"feed-forward width (default {DEFAULT_MODEL['dim_feedforward']})",
    )
    p.add_argument(
        "--dropout", type=fraction, default=None, help=f"default {DEFAULT_MODEL['dropout']}"
    )
    p.add_argument(
        "--vocab-size",
        type=positive_int,
        default=DEFAULT_VOCAB,
        help="BPE vocabulary size to learn (default %(default)s)",
    )
    p.add_argument("--n-train", type=positive_int, default=None, help="task examples to train on")
    p.add_argument(
        "--n-heldout",
        type=non_negative_int,
        default=None,
        help="task examples held out from training (default: the task's own)",
    )
    p.add_argument("--heldout-fraction", type=fraction, default=0.1, help="for --data")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
