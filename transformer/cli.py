"""The ``transformer`` command: its parser, :func:`main`, error reporting and threads.

Each subcommand lives in a module of its own and registers its flags there:
``train`` in :mod:`transformer.cli_train`, ``average`` in :mod:`transformer.cli_average`,
``generate`` and ``evaluate`` in :mod:`transformer.cli_decode`, ``demo`` in
:mod:`transformer.cli_demo` (``bench``, ``spec`` and ``conform`` in theirs, when
installed); :mod:`transformer.cli_common` and :mod:`transformer.cli_config` hold what
they share. Every subcommand is a thin layer over the library (:mod:`transformer.data`,
:mod:`transformer.tokenizer`, :mod:`transformer.training`); nothing below these modules
knows about the command line. Bad input ends with one line on stderr,
``transformer: error: ...``, and a non-zero exit status, never a traceback
(set ``TRANSFORMER_DEBUG=1`` to see the traceback of an unexpected error).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

# The ``NAME as NAME`` imports are re-exports: callers reach them as transformer.cli.NAME,
# where they lived before the subcommands had modules of their own. Patching one here
# does not reach the code that uses it; patch it in its own module.
from transformer.cli_average import _cmd_average as _cmd_average
from transformer.cli_average import add_average_parser
from transformer.cli_common import PROG, CLIError, one_line, positive_int
from transformer.cli_config import DEFAULT_MODEL as DEFAULT_MODEL
from transformer.cli_config import DEFAULT_TASK as DEFAULT_TASK
from transformer.cli_config import DEFAULT_TRAIN as DEFAULT_TRAIN
from transformer.cli_config import DEFAULT_VOCAB as DEFAULT_VOCAB
from transformer.cli_config import model_config as model_config
from transformer.cli_decode import _cmd_evaluate as _cmd_evaluate
from transformer.cli_decode import _cmd_generate as _cmd_generate
from transformer.cli_decode import add_evaluate_parser, add_generate_parser
from transformer.cli_demo import DEMO_SHORT_INPUTS as DEMO_SHORT_INPUTS
from transformer.cli_demo import HELDOUT_GOAL as HELDOUT_GOAL
from transformer.cli_demo import TINY_GOAL as TINY_GOAL
from transformer.cli_demo import TINY_LR_SCALE as TINY_LR_SCALE
from transformer.cli_demo import TINY_SET as TINY_SET
from transformer.cli_demo import TINY_STEPS as TINY_STEPS
from transformer.cli_demo import TINY_WARMUP as TINY_WARMUP
from transformer.cli_demo import _cmd_demo as _cmd_demo
from transformer.cli_demo import add_demo_parser
from transformer.cli_train import _cmd_train as _cmd_train
from transformer.cli_train import add_train_parser

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``transformer: error: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {one_line(message)}\n")


_COMMANDS = "train, average, generate, evaluate, bench, spec, conform, demo"


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
        type=positive_int,
        default=None,
        metavar="N",
        help="torch CPU threads, set before any work (default: $OMP_NUM_THREADS if set, "
        "else 1 on a machine with at most 2 cores, else torch's default); give it before "
        "the command",
    )
    # Not required by argparse: a bare `transformer` prints the command list (see main).
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(sub)
    add_average_parser(sub)
    add_generate_parser(sub)
    add_evaluate_parser(sub)
    _add_optional_parsers(sub)
    add_demo_parser(sub)
    return parser


# Subcommands whose modules a trimmed install may leave out, each registered by
# `add_<name>_parser(sub)`; a module that is absent simply leaves its subcommand out.
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
        code = int(args.func(args))
        # With stdout a pipe, output waits in a buffer: a reader that has gone shows at
        # this flush, where the handler below sees it, not at the interpreter's exit.
        sys.stdout.flush()
        return code
    except KeyboardInterrupt as err:
        return _report_interrupt(err)
    except BrokenPipeError:
        # The reader went away (`transformer generate ... | head -1`): stop quietly, as a
        # program killed by SIGPIPE does; stdout goes to devnull so that the flush at
        # exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
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
        return one_line(f"{err.filename}: {err.strerror or err}")
    text = _summarise_mismatch(one_line(err)) or type(err).__name__
    return text if isinstance(err, CLIError | ValueError) else f"{type(err).__name__}: {text}"
