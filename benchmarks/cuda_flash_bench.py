"""Benchmark the Triton FlashAttention-2 kernel against torch's SDPA backends on a CUDA GPU.

Standalone script (not a test; it never asserts time)::

    python benchmarks/cuda_flash_bench.py [--seq-lens 1024 2048 ...] [--head-dims 64 128]

For every head dim, sequence length ``L = S`` and causal flag it times the forward pass,
the backward pass alone and forward + backward of

* ``triton``: this package's kernel (``kernel="triton"``, autotuned tiles);
* ``torch-flash``, ``torch-efficient``, ``torch-cudnn``, ``torch-math``: torch's
  ``scaled_dot_product_attention`` pinned to one backend with
  ``torch.nn.attention.sdpa_kernel`` (a backend that is missing or refuses the shape is
  recorded with its error, not fatal);

in bf16 with ``B * H = 32`` (B 4, H 8), and reports milliseconds, TFLOP/s and the
percentage of the device's dense bf16 peak. FLOPs follow FlashAttention-2's count:
forward ``4 * B * H * D * (allowed (query, key) pairs)`` (two matmuls, ``QK^T`` and
``PV``; causal counts the ``L (L + 1) / 2`` lower-triangular pairs), backward 2.5x that
(five matmuls: ``QK^T`` recomputed, ``dV``, ``dP``, ``dQ``, ``dK``).

Results go to ``benchmarks/results/<gpu-name>-triton.json``. Without CUDA (or without
triton) the script prints one line and exits with code 2. ``--cpu-dry-run`` runs the
whole script on the CPU instead (wall-clock timing, no triton needed; the ``triton``
rows then record the kernel's unavailability as their error), to check it end to end
before spending GPU time; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
try:
    import transformer  # noqa: F401
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, str(REPO))
# The GPUs' bf16 peaks and the SDPA backends' names are kept where the bench command has them.
from transformer.bench import SDPA_BACKENDS, peak_tflops  # noqa: E402

# Where the tensors live; a module constant so a dry run can point it elsewhere.
DEVICE = "cuda"

MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("triton", "torch-flash", "torch-efficient", "torch-cudnn", "torch-math")


def attention_flops(batch_heads: int, L: int, S: int, D: int, causal: bool, mode: str) -> float:
    """FLOPs of one call in FlashAttention-2's count (see the module docstring)."""
    # Top-left aligned causal mask: row i sees min(i + 1, S) keys.
    pairs = sum(min(i + 1, S) for i in range(L)) if causal else L * S
    forward = 4.0 * batch_heads * D * pairs
    return {"fwd": forward, "bwd": 2.5 * forward, "fwd+bwd": 3.5 * forward}[mode]


def time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median time of ``fn`` in milliseconds: CUDA events per call (the CPU: wall clock)."""
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":
        times = []
        for _ in range(iters):
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_attention(provider: str, causal: bool) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``(q, k, v) -> out`` for ``provider``; torch backends are pinned inside the call."""
    if provider == "triton":
        import transformer

        def ours(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return transformer.scaled_dot_product_attention(
                q, k, v, is_causal=causal, kernel="triton"
            )

        return ours

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # "torch-flash" here is "torch-sdpa-flash" in the bench command's one table.
    backend_name = SDPA_BACKENDS["torch-sdpa-" + provider.removeprefix("torch-")]
    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        raise RuntimeError(f"SDPBackend.{backend_name} does not exist in torch {torch.__version__}")

    def theirs(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # The context manager is entered per call so that the backward pass, which runs
        # later, is the one of the backend picked here (autograd saved its function).
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return theirs


def bench_one(
    provider: str,
    batch: int,
    heads: int,
    L: int,
    D: int,
    causal: bool,
    dtype: torch.dtype,
    warmup: int,
    iters: int,
) -> dict[str, Any]:
    """Time the three modes of one configuration; errors (OOM, unsupported) are recorded."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    shape = (batch, heads, L, D)
    q, k, v = (
        torch.randn(shape, device=DEVICE, dtype=dtype, generator=gen).requires_grad_(True)
        for _ in range(3)
    )
    dout = torch.randn(shape, device=DEVICE, dtype=dtype, generator=gen)
    attn = make_attention(provider, causal)
    timings: dict[str, Any] = {}
    out = attn(q, k, v)
    timings["fwd"] = time_ms(lambda: attn(q, k, v), warmup, iters)
    # retain_graph: the same graph is differentiated again and again; grad() does not
    # accumulate into .grad, so every call does the same work.
    timings["bwd"] = time_ms(
        lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), warmup, iters
    )
    timings["fwd+bwd"] = time_ms(
        lambda: torch.autograd.grad(attn(q, k, v), (q, k, v), dout), warmup, iters
    )
    with torch.no_grad():
        reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        timings["max_abs_diff_vs_torch_default"] = (out.detach() - reference).abs().max().item()
    return timings


def slug(name: str) -> str:
    """A file-name-safe version of a GPU name: ``NVIDIA H100 80GB HBM3`` -> ``NVIDIA-H100-80GB-HBM3``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=4, help="B (B * H = 32 by default)")
    parser.add_argument("--heads", type=int, default=8, help="H")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument(
        "--math-max-len",
        type=int,
        default=8192,
        help="skip torch-math above this length (it stores B*H*L*L scores and runs out of memory)",
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device peak")
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="run on the CPU to check the script end to end (timings meaningless)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default: results/<gpu>-triton.json)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    args = parse_args(argv)
    if args.cpu_dry_run:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("cuda_flash_bench: no CUDA device; this benchmark needs a GPU", file=sys.stderr)
        return 2
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        if not args.cpu_dry_run:
            print("cuda_flash_bench: triton is not installed; pip install triton", file=sys.stderr)
            return 2
        triton_version = None
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu-dry-run"
    peak = args.peak_tflops or peak_tflops(name)
    dtype = torch.bfloat16
    causal_flags = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    results: list[dict[str, Any]] = []
    header = f"{'provider':<16}{'D':>5}{'L=S':>7}{'causal':>8}  " + "".join(
        f"{m + ' ms':>12}{m + ' TF/s':>13}" for m in MODES
    )
    print(
        f"{name} | peak bf16 {peak or 'unknown'} TFLOP/s | torch {torch.__version__} | triton {triton_version}"
    )
    print(header)
    sweep = itertools.product(args.head_dims, args.seq_lens, causal_flags, args.providers)
    for D, seq_len, causal, provider in sweep:
        row: dict[str, Any] = {
            "provider": provider,
            "head_dim": D,
            "seq_len": seq_len,
            "causal": causal,
            "batch": args.batch,
            "heads": args.heads,
        }
        results.append(row)
        prefix = f"{provider:<16}{D:>5}{seq_len:>7}{causal!s:>8}  "
        if provider == "torch-math" and seq_len > args.math_max_len:
            row["skipped"] = f"seq_len > --math-max-len {args.math_max_len}"
            print(prefix + "skipped: " + row["skipped"])
            continue
        try:
            timings = bench_one(
                provider, args.batch, args.heads, seq_len, D, causal, dtype, args.warmup, args.iters
            )
        except Exception as err:
            # Unsupported shape/backend, out of memory, a compile failure: recorded in
            # the report with its type, and the sweep goes on.
            first_line = (str(err).splitlines() or [""])[0][:200]
            row["error"] = f"{type(err).__name__}: {first_line}"
            print(prefix + "error: " + row["error"])
            continue
        finally:
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        row["max_abs_diff_vs_torch_default"] = timings["max_abs_diff_vs_torch_default"]
        line = prefix
        for mode in MODES:
            ms = timings[mode]
            flops = attention_flops(args.batch * args.heads, seq_len, seq_len, D, causal, mode)
            tflops = flops / (ms * 1e-3) / 1e12
            pct = None if peak is None else 100.0 * tflops / peak
            row[mode] = {"ms": ms, "tflops": tflops, "pct_of_peak": pct}
            line += f"{ms:>12.3f}{tflops:>13.1f}"
        print(line)

    out_path = args.out or RESULTS / f"{slug(name)}-triton.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": name,
        "peak_bf16_tflops": peak,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "triton": triton_version,
        "flops_count": "FlashAttention-2: fwd 4*B*H*D*pairs, bwd 2.5x fwd, causal pairs L(L+1)/2",
        "timing": f"median of {args.iters} calls after {args.warmup} warm-up calls, "
        + ("CUDA events" if DEVICE == "cuda" else "wall clock (CPU dry run)"),
        "results": results,
    }
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
