"""Time the elementwise passes of one chunked-kernel tile, per score, on the CPU.

Standalone script (measures and reports; it never asserts time)::

    OMP_NUM_THREADS=1 python benchmarks/tile_passes.py [--rows 512] [--keys 2048] [--force]

The chunked kernel spends, between its gemms, a few passes over each ``(rows, keys)``
tile of scores. This times each candidate pass on one fp32 tile with
``torch.utils.benchmark`` and reports nanoseconds per score, so that a change to the
kernel's passes can be judged before it is made:

- the forward as the kernel does it (base-2 scores): row max, ``sub`` of the shift,
  ``exp2``, row sum; against torch's fused row softmax, in place;
- the backward's ``dS = P * (dP - delta)`` as ``sub_`` then ``mul_``, against torch's
  fused softmax backward, in place.

Writes ``benchmarks/results/cpu-tile-passes.json`` (``--out`` to change it).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch
from result_file import check_out, write_record
from torch.utils import benchmark

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (statement, what it stands for)
PASSES = {
    "amax": ("s.amax(-1, keepdim=True)", "forward: row max of the scores"),
    "sub_exp2": ("w.copy_(s).sub_(m).exp2_()", "forward: shift and exp2, in place (with a copy)"),
    "copy": ("w.copy_(s)", "the copy inside sub_exp2 and softmax_ (subtract it)"),
    "sum": ("p.sum(-1, keepdim=True)", "forward: row sum of the probabilities"),
    "softmax_": (
        "torch.ops.aten._softmax.out(w.copy_(s), -1, False, out=w)",
        "torch's fused row softmax, in place (with a copy)",
    ),
    "sub_mul": ("w.copy_(dp).sub_(d).mul_(p)", "backward: dS = P * (dP - delta) (with a copy)"),
    "softmax_backward_": (
        "torch.ops.aten._softmax_backward_data.out(w.copy_(dp), p, -1, torch.float32,"
        " grad_input=w)",
        "torch's fused softmax backward, in place (with a copy)",
    ),
}


def measure(rows: int, keys: int, min_run_time: float) -> dict[str, Any]:
    """Nanoseconds per score of each pass of :data:`PASSES` on a ``(1, rows, keys)`` tile."""
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(1, rows, keys, generator=gen) * 3  # scores
    m = s.amax(-1, keepdim=True)  # (1, rows, 1)
    p = torch.softmax(s, -1)
    dp = torch.randn(1, rows, keys, generator=gen)
    d = (dp * p).sum(-1, keepdim=True)  # (1, rows, 1)
    names = dict(torch=torch, s=s, m=m, p=p, dp=dp, d=d, w=torch.empty_like(s))
    per_score: dict[str, float] = {}
    for name, (stmt, _) in PASSES.items():
        timer = benchmark.Timer(stmt, globals=names, num_threads=torch.get_num_threads())
        per_score[name] = (
            timer.blocked_autorange(min_run_time=min_run_time).median * 1e9 / s.numel()
        )
    copy = per_score["copy"]
    return {
        "rows": rows,
        "keys": keys,
        "ns_per_score": {k: round(v, 3) for k, v in per_score.items()},
        "forward_online": round(
            per_score["amax"] + per_score["sub_exp2"] - copy + per_score["sum"], 3
        ),
        "forward_softmax": round(per_score["softmax_"] - copy, 3),
        "backward_sub_mul": round(per_score["sub_mul"] - copy, 3),
        "backward_softmax": round(per_score["softmax_backward_"] - copy, 3),
        "meaning": {k: v[1] for k, v in PASSES.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="query rows of the tile")
    parser.add_argument("--keys", type=int, default=2048, help="key columns of the tile")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per pass")
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu-tile-passes.json")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.keys < 1:
        parser.error(f"--rows and --keys must be >= 1, got {args.rows} and {args.keys}")
    check_out(parser, args.out, force=args.force)
    record = measure(args.rows, args.keys, args.min_run_time)
    record["environment"] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    print(json.dumps({k: v for k, v in record.items() if k != "meaning"}, indent=2))
    write_record(args.out, record)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
