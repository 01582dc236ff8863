"""What the ``transformer`` subcommands share: ``CLIError``, argument types and checks,
the data flags, and reading a run's checkpoint, data and scores back.

Kept apart from the commands so that ``train``, ``average``, ``generate``, ``evaluate``
and ``demo`` (and the top-level parser in :mod:`transformer.cli`) use one copy of each
rule and each message.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

PROG = "transformer"

CHECKPOINT_HELP = "run directory of 'transformer train', or its checkpoint/ directory"
MAX_LEN_HELP = "longest output in tokens (default: the longest training target + 8)"


class CLIError(Exception):
    """A user mistake the command reports in one line."""


_Number = TypeVar("_Number", int, float)


def one_line(text: object) -> str:
    """``text`` with every run of whitespace, newlines included, as one space."""
    return " ".join(str(text).split())


def checked_number(
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


positive_int = checked_number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = checked_number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = checked_number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
non_negative_float = checked_number(
    float, lambda v: v >= 0 and math.isfinite(v), "a non-negative number"
)
fraction = checked_number(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


def _task_choices() -> list[str]:
    from transformer.data import task_names

    return task_names()


def add_data_args(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """The mutually exclusive ``--task`` / ``--data`` flags of ``train`` and ``evaluate``."""
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


def check_out_dir(path: str, flag: str = "--out") -> Path:
    """``path`` as an output directory, refused up front if it cannot be one.

    Refused: a file (not a directory) at ``path``, or, for a folder still to be made,
    a file where one of its parents should be (``loss.png/sub``), which would otherwise
    fail the first write, after the work.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"{flag} {path}: a file is in the way (expected a directory)")
    base = nearest_existing(out)
    if not base.is_dir():
        raise CLIError(f"{flag} {path}: cannot be made, {base} is a file")
    return out


def nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its closest ancestor that does.

    An output folder can be made only when that ancestor is a directory: a file there
    (``notes.txt/sub``) would fail the write at the end of a run, so commands check
    this before any work.
    """
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


#: Marks a folder the demo wrote: a later demo may replace its files without --force.
#: ``train`` removes it from a folder it writes a run into: the run is then the user's.
DEMO_MARK = ".transformer-demo"
#: What a demo writes into its folder besides the mark (``tiny`` holds its tiny-set run).
DEMO_FILES = ("checkpoint", "checkpoint.old", "metrics.jsonl", "loss.png", "tiny")


def resolve_checkpoint(path: str) -> Path:
    """Accept a run directory (with checkpoint/ inside) or the checkpoint directory itself."""
    run = Path(path)
    # checkpoint.old alone is what a save killed between its two renames leaves behind;
    # load_checkpoint falls back to it.
    if (run / "checkpoint").is_dir() or (run / "checkpoint.old").is_dir():
        return run / "checkpoint"
    if run.is_dir():
        return run
    raise CLIError(f"no checkpoint at {path}")


def load_run(path: str) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, meta) of a checkpoint written by ``transformer train``."""
    from transformer.checkpoint import load_checkpoint
    from transformer.tokenizer import Tokenizer

    model, meta = load_checkpoint(resolve_checkpoint(path))
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


def file_digest(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, hex: what a run stores of the TSV it trained on."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_for(data: dict[str, Any]) -> Any:
    """The train/held-out split a run trained on, from its stored data description.

    A TSV is split again from the file; if the run stored the file's digest and the file
    has changed since, ``CLIError``: the split of another file would put pairs the run
    trained on among the held-out ones.
    """
    from transformer.data import make_task, read_tsv, split_heldout

    if "task" in data:
        return make_task(
            data["task"], seed=data["seed"], n_train=data["n_train"], n_heldout=data["n_heldout"]
        )
    stored = data.get("sha256")
    if stored is not None and os.path.exists(data["tsv"]) and file_digest(data["tsv"]) != stored:
        raise CLIError(
            f"{data['tsv']} has changed since the run trained on it: split again, its "
            "held-out pairs would include pairs the run trained on; restore the file, or "
            "train a new run on it"
        )
    return split_heldout(
        read_tsv(data["tsv"]), heldout_fraction=data["heldout_fraction"], seed=data["seed"]
    )


def describe_data(data: dict[str, Any]) -> str:
    """A run's stored data description as the commands name it to the user."""
    if "task" in data:
        return f"task {data['task']!r}, seed {data['seed']}"
    return f"{data['tsv']}, seed {data['seed']}"


def max_len_of(args: argparse.Namespace, meta: dict[str, Any], table: int) -> int:
    """``--max-len`` if given, else a bound derived from the checkpoint's training targets.

    ``table`` is the model's positional table size: a ``--max-len`` beyond it is refused
    naming the flag; the derived bound is capped by it.
    """
    if args.max_len is not None:
        if args.max_len > table:
            raise CLIError(
                f"--max-len {args.max_len} exceeds the model's positional table of {table} "
                "positions (max_len in its config)"
            )
        return int(args.max_len)
    # Room beyond the longest training target, so a model that goes on past it shows.
    return min(int(meta.get("max_target_len", 64)) + 8, table)


def n_params(model: Any) -> int:
    """The number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def print_by_length(trained: Any, untrained: Any, indent: str = "") -> None:
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
