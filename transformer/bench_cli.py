"""The ``transformer bench`` subcommands: attention, torch-wrapper and compile.

:func:`add_bench_parser` registers them on the ``transformer`` command; each checks
``--out`` before any work, then runs its benchmark and turns a bad request into one
error line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformer.bench_candidates import _DTYPES, MODES, BenchError
from transformer.cli_common import nearest_existing


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(part) for part in text.replace(",", " ").split() if part]
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid list {text!r}") from None

    return parse


def _flatten(values: list[list[Any]] | None) -> tuple[Any, ...] | None:
    return None if values is None else tuple(v for group in values for v in group)


def add_bench_parser(subparsers: Any) -> None:
    """Register ``bench attention`` on the ``transformer`` command's subparsers."""
    bench = subparsers.add_parser(
        "bench", help="benchmark components", description="Benchmarks (never assert time)."
    )
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    p = sub.add_parser(
        "attention",
        help="time the attention kernels side by side",
        description="Every registered kernel, torch SDPA (on CUDA also pinned to each of "
        "its backends: torch-sdpa-flash, -efficient, -cudnn, -math) and "
        "torch.nn.MultiheadAttention; forward, backward and forward+backward, causal and "
        "not; prints a table (with % of the GPU's peak on CUDA), writes JSON and a plot "
        "to --out. FLOPs: 4*B*H*L*S*E forward (halved if causal), backward 2.5x.",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--kernels", type=_csv(str), nargs="+", help="names (default: all)")
    p.add_argument("--seq-lens", type=_csv(int), nargs="+", help="default 128 ... 8192")
    p.add_argument("--dtypes", type=_csv(str), nargs="+", help="fp32 bf16 (cpu), fp16 bf16 (cuda)")
    p.add_argument("--batch", type=int, default=4, help="B (default 4)")
    p.add_argument("--heads", type=int, default=8, help="H (default 8)")
    p.add_argument("--head-dim", type=int, default=64, help="E (default 64)")
    p.add_argument("--modes", type=_csv(str), nargs="+", help="fwd bwd fwd+bwd (default all)")
    p.add_argument(
        "--causal",
        choices=("both", "yes", "no"),
        default="both",
        help="time causal attention, full attention or both (default both)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs per kernel (median)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak TFLOP/s for the %% peak column (default on CUDA: the GPU's bf16 peak)",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="write JSON and PNG here")
    p.add_argument("--force", action="store_true", help="replace files of an earlier run in --out")
    p.set_defaults(func=_cmd_bench_attention)

    w = sub.add_parser(
        "torch-wrapper",
        help="time the 'torch' kernel against the raw torch SDPA it wraps (CPU, forward)",
        description="torch.utils.benchmark, side by side in one process: raw "
        "F.scaled_dot_product_attention, transformer.attention.torch_attention and the "
        "front door with kernel='torch', forward, no mask, causal and not; prints and "
        "writes the ratios to raw SDPA.",
    )
    w.add_argument("--seq-lens", type=_csv(int), nargs="+", help="L = S (default 256 2048)")
    w.add_argument("--batch", type=int, default=4, help="B (default 4)")
    w.add_argument("--heads", type=int, default=8, help="H (default 8)")
    w.add_argument("--head-dim", type=int, default=64, help="E (default 64)")
    w.add_argument(
        "--dtype", default="fp32", choices=sorted(_DTYPES), help="of q, k, v (default fp32)"
    )
    w.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    w.add_argument("--min-run-time", type=float, default=0.5, help="seconds per timing")
    w.add_argument("--out", default=None, metavar="DIR", help="write JSON here")
    w.add_argument("--force", action="store_true", help="replace files of an earlier run in --out")
    w.set_defaults(func=_cmd_bench_wrapper)

    c = sub.add_parser(
        "compile",
        help="compile the triton kernel for a GPU (none needed) and report its costs",
        description="Offline: compile the triton kernel's forward and backward kernels "
        "with every autotune config for an NVIDIA target, and report shared memory "
        "(against the target's limit), registers, spills and whether the matmuls use "
        "tensor cores. Static facts, nothing is timed. Needs triton and "
        "TRITON_INTERPRET unset; no GPU.",
    )
    c.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90)")
    c.add_argument("--dtypes", type=_csv(str), nargs="+", help="fp16 bf16 fp32 fp64 (default bf16)")
    c.add_argument("--head-dims", type=_csv(int), nargs="+", help="E values (default 64 128)")
    c.add_argument(
        "--causal",
        choices=("both", "yes", "no"),
        default="both",
        help="compile the causal variant, the full one or both (default both)",
    )
    c.add_argument("--seq-len", type=int, default=4096, help="L = S (default 4096)")
    c.add_argument("--batch", type=int, default=4, help="B (default 4)")
    c.add_argument("--heads", type=int, default=8, help="H (default 8)")
    c.add_argument(
        "--configs",
        choices=("all", "smallest"),
        default="all",
        help="every autotune config, or only the smallest tile (default all)",
    )
    c.add_argument("--out", default=None, metavar="DIR", help="write JSON here")
    c.add_argument("--force", action="store_true", help="replace files of an earlier run in --out")
    c.set_defaults(func=_cmd_bench_compile)


def _out_refused(args: argparse.Namespace, command: str, written: list[str]) -> bool:
    """True, after one error line, when ``--out`` cannot take the files ``written`` (glob
    patterns): a file in the way, a folder that cannot be made, or files of an earlier
    run there without ``--force``. Checked before any work."""
    if args.out is None:
        return False
    out = Path(args.out)
    problem = None
    if out.exists() and not out.is_dir():
        problem = f"--out {args.out}: a file is in the way (expected a directory)"
    else:
        existing = nearest_existing(out)
        if not existing.is_dir():
            problem = f"--out {args.out}: cannot be made, {existing} is a file"
        elif out.is_dir() and not args.force:
            old = sorted({p.name for pattern in written for p in out.glob(pattern)})
            if old:
                problem = (
                    f"--out {args.out} already holds {', '.join(old)}; pass --force to replace them"
                )
    if problem is None:
        return False
    print(f"transformer bench {command}: error: {problem}", file=sys.stderr)
    return True


def _cmd_bench_attention(args: argparse.Namespace) -> int:
    # Looked up on transformer.bench when the command runs: that module imports this one
    # for add_bench_parser, and the function it exports is the one that runs.
    from transformer import bench

    written = [f"attention-{args.device}.json", f"attention-{args.device}.png"]
    if _out_refused(args, "attention", written):
        return 2
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    try:
        bench.run_attention_bench(
            device=args.device,
            kernels=_flatten(args.kernels),
            seq_lens=bench.DEFAULT_SEQ_LENS if args.seq_lens is None else _flatten(args.seq_lens),
            dtypes=_flatten(args.dtypes),
            batch=args.batch,
            heads=args.heads,
            head_dim=args.head_dim,
            modes=_flatten(args.modes) or MODES,
            causal=causal,
            repeats=args.repeats,
            peak_tflops=args.peak_tflops,
            out=args.out,
        )
    except BenchError as err:
        print(f"transformer bench attention: error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_bench_wrapper(args: argparse.Namespace) -> int:
    from transformer import bench  # at run time, as in _cmd_bench_attention

    if _out_refused(args, "torch-wrapper", ["torch-wrapper-cpu.json"]):
        return 2
    try:
        bench.run_wrapper_bench(
            seq_lens=(256, 2048) if args.seq_lens is None else (_flatten(args.seq_lens) or ()),
            batch=args.batch,
            heads=args.heads,
            head_dim=args.head_dim,
            dtype=args.dtype,
            rounds=args.rounds,
            min_run_time=args.min_run_time,
            out=args.out,
        )
    except BenchError as err:
        print(f"transformer bench torch-wrapper: error: {err}", file=sys.stderr)
        return 2
    return 0


def _compile_flags_error(
    args: argparse.Namespace, dtypes: tuple[str, ...], head_dims: tuple[int, ...]
) -> str:
    """What is wrong with the flags of ``bench compile``, naming each flag ("" if nothing)."""
    from transformer.kernels import triton_flash, triton_offline

    known = sorted(triton_offline._REPORT_DTYPES)
    targets = sorted(triton_offline.SHARED_MEMORY_PER_BLOCK)
    problems = []
    if args.arch not in targets:
        problems.append(f"--arch must be one of {targets}, got {args.arch}")
    unknown = [d for d in dtypes if d not in known]
    if unknown:
        problems.append(f"--dtypes: unknown dtype(s) {unknown}; choose from {known}")
    bad_dims = [e for e in head_dims if not 1 <= e <= triton_flash.MAX_HEAD_DIM]
    if bad_dims:
        problems.append(
            f"--head-dims must be within 1..{triton_flash.MAX_HEAD_DIM}, got {bad_dims}"
        )
    sizes = {"--seq-len": args.seq_len, "--batch": args.batch, "--heads": args.heads}
    problems += [f"{flag} must be >= 1, got {value}" for flag, value in sizes.items() if value < 1]
    return "; ".join(problems)


def _cmd_bench_compile(args: argparse.Namespace) -> int:
    dtypes = _flatten(args.dtypes) or ("bf16",)
    head_dims = _flatten(args.head_dims) or (64, 128)
    problem = _compile_flags_error(args, dtypes, head_dims)
    if problem:
        print(f"transformer bench compile: error: {problem}", file=sys.stderr)
        return 2
    if _out_refused(args, "compile", [f"compile-sm{args.arch}-triton*.json"]):
        return 2
    from transformer.kernels.triton_offline import OfflineCompileError, compile_report

    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    try:
        compile_report(
            arch=args.arch,
            dtypes=dtypes,
            head_dims=head_dims,
            causal=causal,
            seq_len=args.seq_len,
            batch=args.batch,
            heads=args.heads,
            configs=args.configs,
            out=args.out,
        )
    except (ValueError, OfflineCompileError) as err:
        print(f"transformer bench compile: error: {err}", file=sys.stderr)
        return 2
    return 0
