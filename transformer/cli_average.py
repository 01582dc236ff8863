"""The ``transformer average`` command: one checkpoint holding the mean of the weights of
checkpoints of one architecture, as the paper averages its last checkpoints.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Any

from transformer.cli_common import CLIError, check_out_dir, resolve_checkpoint


def _cmd_average(args: argparse.Namespace) -> int:
    from transformer.averaging import average_checkpoints

    out = check_out_dir(args.out)
    if out.exists() and not args.force:
        raise CLIError(f"--out {out} already exists: replace it with --force")
    paths = [resolve_checkpoint(path) for path in args.checkpoints]
    # A checkpoint named twice (a glob that overlaps, a pasted list) weighs twice: said
    # on stderr, since a weighted mean may be what was meant.
    counts = Counter(path.resolve() for path in paths)
    for path, n in counts.items():
        if n > 1:
            print(
                f"warning: checkpoint {path} is given {n} times: it counts {n} times in the mean",
                file=sys.stderr,
            )
    # --force replaces a checkpoint directory, nothing else: not a run directory (its
    # checkpoints/, metrics and the user's files would go), never one holding an input.
    target = out.resolve()
    for path in paths:
        if target == path.resolve() or target in path.resolve().parents:
            raise CLIError(f"--out {args.out} holds the input checkpoint {path}: choose another")
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise CLIError(
            f"--out {args.out} holds files but no checkpoint (no manifest.json), so --force "
            "does not replace it: choose a new or empty folder, or a checkpoint"
        )
    out = target  # a name such as "." becomes one the checkpoint writer can swap in place
    average_checkpoints(paths, out, force=args.force)
    print(f"averaged {len(paths)} checkpoints into {out}")
    return 0


def add_average_parser(subparsers: Any) -> None:
    """Register ``transformer average`` on the CLI's subparsers."""
    p = subparsers.add_parser(
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
