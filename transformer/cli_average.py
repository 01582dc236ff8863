"""The ``transformer average`` command: one checkpoint holding the mean of the weights of
checkpoints of one architecture, as the paper averages its last checkpoints.
"""

from __future__ import annotations

import argparse
from typing import Any

from transformer.cli_common import CLIError, check_out_dir, resolve_checkpoint


def _cmd_average(args: argparse.Namespace) -> int:
    from transformer.averaging import average_checkpoints

    out = check_out_dir(args.out)
    if out.exists() and not args.force:
        raise CLIError(f"--out {out} already exists: replace it with --force")
    paths = [resolve_checkpoint(path) for path in args.checkpoints]
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
