"""``transformer conform``: run the conformance suite against a kernel and write the report.

Every argument is checked before the first case runs: the kernel must load, the device
exist, the dtypes be known, and the report folder must be one that can be made and
written and must not hold an earlier report (``--force`` replaces it).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Any

import torch

from transformer.cli_common import nearest_existing
from transformer.conformance.case import DTYPES, Kernel, Settings
from transformer.conformance.report import summary, write_report
from transformer.conformance.runner import (
    FAIL,
    FORWARD_ONLY,
    UNSUPPORTED,
    PropertyResult,
    load_kernel,
    run,
    selected,
)

__all__ = ["DEFAULT_DTYPES", "add_conform_parser"]

#: dtypes each tier runs unless ``--dtypes`` says otherwise.
DEFAULT_DTYPES: dict[str, tuple[str, ...]] = {
    "quick": ("fp32", "bf16"),
    "full": ("fp64", "fp32", "fp16", "bf16"),
    "thorough": ("fp64", "fp32", "fp16", "bf16"),
}


class ConformUsageError(ValueError):
    """A bad argument of ``transformer conform``, named by its flag."""


def _registered(name: str, device: str) -> Kernel:
    """The package's front door with ``kernel=name``, a kernel usable on ``device``."""
    from transformer.attention import available_kernels, scaled_dot_product_attention
    from transformer.kernel_registry import _KERNELS

    if name not in _KERNELS:
        raise ConformUsageError(f"--kernel: unknown kernel {name!r}; known: {sorted(_KERNELS)}")
    usable = available_kernels(device)
    if name not in usable:
        # Every case would be refused: a report of that kernel would say nothing of it.
        raise ConformUsageError(
            f"--kernel {name}: not available on {device} here (e.g. triton not installed); "
            f"available: {usable}"
        )
    return functools.partial(scaled_dot_product_attention, kernel=name)


def _settings(args: argparse.Namespace) -> Settings:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConformUsageError("--device cuda: torch sees no CUDA device here")
    names = args.dtypes or DEFAULT_DTYPES[args.tier]
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise ConformUsageError(f"--dtypes: unknown {unknown}; choose from {list(DTYPES)}")
    if args.memory_length < 1:
        raise ConformUsageError(
            f"--memory-length must be a positive length, got {args.memory_length}"
        )
    return Settings(args.tier, tuple(DTYPES[n] for n in names), args.device, args.memory_length)


def _check_report_dir(report: str | None, force: bool) -> Path | None:
    if report is None:
        return None
    out = Path(report)
    if out.exists() and not out.is_dir():
        raise ConformUsageError(f"--report: {out} exists and is not a directory")
    # The report is written after the run: refuse now a folder that cannot be made there.
    existing = nearest_existing(out)
    if not existing.is_dir():
        raise ConformUsageError(f"--report: {out} cannot be made: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConformUsageError(f"--report: {out} cannot be written: {existing} is not writable")
    old = [p.name for p in (out / "conformance.md", out / "conformance.json") if p.exists()]
    if old and not force:
        raise ConformUsageError(
            f"--report: {out} already holds {', '.join(old)}; pass --force to replace them"
        )
    return out


def _progress(result: PropertyResult) -> None:
    line = f"  {result.prop.section:<10} {result.prop.name:<26} {result.status:<11}"
    line += f" {len(result.results):>3} cases"
    refused = result.count(UNSUPPORTED) + result.count(FORWARD_ONLY)
    if refused and refused < len(result.results):
        line += f" ({len(result.results) - refused} answered, {refused} refused)"
    bad = result.first(FAIL)
    why = result.first(UNSUPPORTED) or result.first(FORWARD_ONLY)
    if bad is not None:
        line += f"  {bad.detail.splitlines()[0][:110]}"
    elif why is not None and why.detail:
        line += f"  refused: {why.detail.splitlines()[0][:100]}"
    print(line, flush=True)


def cmd_conform(args: argparse.Namespace) -> int:
    """Run the suite as the parsed arguments say; 1 when a core or memory property fails."""
    if (args.target is None) == (args.kernel is None):
        raise ConformUsageError("give either TARGET (package.module:function) or --kernel NAME")
    settings = _settings(args)
    out = _check_report_dir(args.report, args.force)
    if args.properties:
        from transformer.conformance.registry import PROPERTIES

        unknown = [n for n in args.properties if n not in PROPERTIES]
        if unknown:
            raise ConformUsageError(f"--properties: unknown {unknown}; known: {list(PROPERTIES)}")
    if args.kernel is not None:
        kernel = _registered(args.kernel, settings.device)
        target = f"transformer (kernel={args.kernel!r})"
    else:
        # As `python -m` and pytest do: a module in the current folder is importable.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            kernel, target = load_kernel(args.target), args.target
        except ValueError as err:
            raise ConformUsageError(f"TARGET: {err}") from None
    count = len(selected(args.properties))
    print(f"conformance of {target}: {count} properties, tier {settings.tier}, {settings.device}")
    report = run(
        kernel,
        settings,
        target=target,
        properties=args.properties,
        progress=None if args.quiet else _progress,
    )
    if report.interrupted is not None:
        print(
            f"interrupted while running {report.interrupted}; the summary and any report "
            "cover only what finished before"
        )
    print(f"{summary(report)} ({report.seconds:.1f} s)")
    failures = report.failures()
    if failures:
        print(f"start here: {failures[0].prop.name}: {failures[0].prop.statement}")
        first = failures[0].first(FAIL)
        if first is not None:
            # The whole message, case included: without --report it is nowhere else.
            print("\n".join(f"    {line.strip()}" for line in first.detail.splitlines()))
    code = report.exit_code(strict=args.strict)
    if code and args.strict and not report.exit_code():
        print(
            "exit status 1 under --strict: a property outside core and memory FAILs or is "
            "UNSUPPORTED (see the lines above)"
        )
    if out is not None:
        md, js = write_report(report, out)
        print(f"wrote {md} and {js}")
    return 130 if report.interrupted is not None else code


def add_conform_parser(subparsers: Any) -> None:
    """Register ``transformer conform`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "conform",
        help="check an attention kernel against torch SDPA's semantics, with a report",
        description="Run the attention conformance suite against TARGET, any function with "
        "the signature of torch.nn.functional.scaled_dot_product_attention, and print one "
        "line per property: PASS, FAIL (case, worst element, error against its bound) or "
        "UNSUPPORTED (the kernel raised NotImplementedError, TypeError or ValueError). "
        "Exit status 1 when a core or memory property fails (--strict: also any other "
        "FAIL or UNSUPPORTED).",
    )
    p.add_argument(
        "target",
        nargs="?",
        metavar="TARGET",
        help="package.module:function, e.g. torch.nn.functional:scaled_dot_product_attention",
    )
    p.add_argument(
        "--kernel",
        metavar="NAME",
        help="instead of TARGET: one of this package's kernels "
        "(reference, chunked, torch, triton), through transformer.scaled_dot_product_attention",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default %(default)s")
    p.add_argument(
        "--dtypes",
        nargs="+",
        metavar="DTYPE",
        help=f"from {list(DTYPES)}; default by tier: "
        + "; ".join(f"{t} {' '.join(d)}" for t, d in DEFAULT_DTYPES.items()),
    )
    p.add_argument(
        "--tier",
        choices=list(DEFAULT_DTYPES),
        default="full",
        help="sizes: quick (small, "
        "about a minute), full (adds lengths past 2 x 512), thorough (longer still); "
        "default %(default)s",
    )
    p.add_argument(
        "--memory-length",
        type=int,
        default=2048,
        metavar="N",
        help="L = S of the memory cases: above your kernel's largest fixed tile (default %(default)s)",
    )
    p.add_argument("--report", metavar="DIR", help="write DIR/conformance.md and .json")
    p.add_argument("--force", action="store_true", help="replace a report already in DIR")
    p.add_argument("--strict", action="store_true", help="also fail on UNSUPPORTED and extensions")
    p.add_argument("--properties", nargs="+", metavar="NAME", help="run only these properties")
    p.add_argument("--quiet", action="store_true", help="no line per property")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        return cmd_conform(args)
    except ConformUsageError as err:
        print(f"transformer conform: error: {err}", file=sys.stderr)
        return 2
