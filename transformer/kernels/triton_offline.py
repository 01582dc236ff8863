"""Compile the ``"triton"`` kernel for a GPU that is not there, and read what it costs.

Triton lowers a kernel to PTX and then to a GPU binary (cubin) with the ``ptxas`` it
ships, without needing a GPU or a driver. This module does that for an NVIDIA target
(``arch`` 80 = A100, 90 = H100/H200, ...) and reports, per kernel and autotune config,
what decides whether the config can run and how fast it can be:

* ``shared_bytes``: shared memory per program, to compare with the target's
  :data:`SHARED_MEMORY_PER_BLOCK` (a config above it fails at launch with
  ``OutOfResources``, and the autotuner drops it);
* ``registers`` and ``stack_bytes``, read from the cubin with the ``cuobjdump`` triton
  ships: the per-thread stack frame, in local memory, is where ``ptxas`` puts the
  registers it spills (the kernels have no other stack use), so 0 means no spills;
* ``async_copies``: global-to-shared copies issued asynchronously (``cp.async``, or
  the Hopper TMA's ``cp.async.bulk``), the loads triton's software pipelining
  (``num_stages`` > 1) overlaps with the matmuls; 0 means every load stalls;
* ``matmul``: the instructions the ``tl.dot`` tiles became, with their input type:
  ``"wgmma.bf16"`` (Hopper's warpgroup tensor-core MMA), ``"mma.f16"`` (Ampere-style
  ``mma.sync``), ``"mma.f64"`` (fp64 MMA), ``"mma.tf32"`` (TF32: what fp32 must never
  become), or ``"fma"`` (plain fused multiply-adds: fp32 ``ieee`` dots).

It compiles what a launch would compile: the operands go through the same folding as
:func:`~transformer.kernels.triton_flash.triton_attention` and the same argument
builder, and triton specialises on them as at launch (dtypes, 16-byte alignment,
sizes). The tensors may live on the CPU; their values are never read.

This is a static report, not a benchmark: it proves the kernels build for the target
and fit on chip, and says nothing of their speed.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn.attention.bias import CausalBias  # imports triton too: needed here anyway

from transformer.kernels import triton_flash

__all__ = [
    "KERNELS",
    "REGISTERS_PER_BLOCK",
    "SHARED_MEMORY_PER_BLOCK",
    "KernelBuild",
    "OfflineCompileError",
    "compile_offline",
    "compile_report",
    "format_report",
]

#: Largest shared memory one program (thread block) may use, in bytes, per compute
#: capability: the opt-in maxima of NVIDIA's CUDA C++ Programming Guide (compute
#: capabilities table): 163 KB on 8.0/8.7, 99 KB on 8.6/8.9, 227 KB on 9.0.
SHARED_MEMORY_PER_BLOCK: dict[int, int] = {
    80: 163 * 1024,
    86: 99 * 1024,
    87: 163 * 1024,
    89: 99 * 1024,
    90: 227 * 1024,
}

#: 32-bit registers one program may hold, on every target above (64 K per block). A warp
#: is given registers in units of 256 (the allocation granularity of these targets).
REGISTERS_PER_BLOCK = 64 * 1024
_REGISTER_UNIT = 256

#: The kernels of one forward and backward pass, in launch order. The last one, the
#: float mask's gradient, runs only for a float ``attn_mask`` that requires grad.
KERNELS = ("attn_fwd", "bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_dmask")


class OfflineCompileError(RuntimeError):
    """Offline compilation cannot run here (no triton, the interpreter is on, bad arch)."""


@dataclass(frozen=True)
class KernelBuild:
    """One kernel compiled with one config for one target.

    ``error`` holds the compiler's message when the build failed; the cost fields are
    then ``None``.
    """

    kernel: str
    arch: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    shared_bytes: int | None
    registers: int | None
    stack_bytes: int | None
    async_copies: int | None
    matmul: str | None
    error: str | None = None

    @property
    def fits(self) -> bool:
        """Built, and its shared memory and registers fit one program's maxima on the target.

        A config that does not fit fails at launch with ``OutOfResources``.
        """
        if self.error is not None or self.shared_bytes is None or self.registers is None:
            return False
        per_warp = -(-self.registers * 32 // _REGISTER_UNIT) * _REGISTER_UNIT
        return (
            self.shared_bytes <= SHARED_MEMORY_PER_BLOCK[self.arch]
            and per_warp * self.num_warps <= REGISTERS_PER_BLOCK
        )

    @property
    def config(self) -> str:
        """``"128x64 w4 s3"``: BLOCK_M x BLOCK_N, warps, pipeline stages."""
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields, plus ``fits``."""
        return {**asdict(self), "fits": self.fits}


class _OfflineDriver:
    """The few driver calls a triton JIT warm-up makes, answered for an absent GPU.

    The device id is unique per arch, so triton's per-device binders and kernel caches
    never mix an offline target with a real GPU in the same process.
    """

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.device = f"offline-sm{arch}"

    def get_current_device(self) -> str:
        return self.device

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target


@contextmanager
def _offline_target(arch: int) -> Iterator[None]:
    from triton.runtime import driver

    # DriverConfig has no public getter that leaves "no driver yet" alone (its `active`
    # property creates the default driver, which fails without a GPU), so the previous
    # value is read and restored through the attribute set_active writes.
    previous = getattr(driver, "_active", None)
    driver.set_active(_OfflineDriver(arch))
    try:
        yield
    finally:
        driver._active = previous


def _cuobjdump_resources(cubin: bytes) -> tuple[int | None, int | None]:
    """``(registers, stack bytes)`` per thread of the one function in ``cubin``."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        report = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-res-usage", path],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    regs = re.search(r"\bREG:(\d+)", report)
    stack = re.search(r"\bSTACK:(\d+)", report)
    return (int(regs.group(1)) if regs else None, int(stack.group(1)) if stack else None)


# The copy itself, not its commit_group / wait_group bookkeeping.
_ASYNC_COPY = re.compile(r"^\s*(?:@%p\d+\s+)?cp\.async\.(?:bulk\.[\w.:]*|c[ag]\.shared)", re.M)
_MMA_INSTRUCTION = re.compile(r"\b(wgmma\.mma_async|mma\.sync)((?:\.\w+)+)")
_MMA_TYPES = frozenset({"f16", "bf16", "tf32", "f32", "f64", "e4m3", "e5m2", "s8", "u8"})


def _matmul_kind(ptx: str) -> str:
    """``"wgmma.bf16"``, ``"mma.f64"``, ... (instruction, input type), or ``"fma"``.

    The input type is the second type in the instruction's name: PTX writes the
    accumulator's first (``mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32``).
    """
    kinds = set()
    for op, suffix in _MMA_INSTRUCTION.findall(ptx):
        types = [t for t in suffix.split(".") if t in _MMA_TYPES]
        name = "wgmma" if op.startswith("wgmma") else "mma"
        kinds.add(f"{name}.{types[1]}" if len(types) > 1 else name)
    return "+".join(sorted(kinds)) or "fma"


def _record_launches(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | CausalBias | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """The (kernel, args, meta) of every launch of one forward and, if wanted, backward."""
    offset = 0
    bias = triton_flash._causal_bias(attn_mask)
    if bias is not None:
        offset = triton_flash._bias_offset(bias, query.size(-2), key.size(-2), is_causal)
        attn_mask, is_causal = None, True
    folded = triton_flash._folded(query, key, value, attn_mask, enable_gqa)
    if folded is None:
        raise ValueError("compile_offline: the problem is empty (a size is 0); nothing to tile")
    q4, k4, v4, mask, batch = folded
    L, S = q4.size(2), k4.size(2)
    sm_scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    seed = 2**32 if dropout_p > 0.0 else 0  # an int64 seed, as triton_flash._new_seed draws
    mask4 = triton_flash._fold_mask(mask, batch, L, S)
    problem = triton_flash._Problem(
        q4, k4, v4, mask4, dropout_p, is_causal, sm_scale, seed, causal_offset=offset
    )
    problem.recorded = []
    with torch.no_grad():
        out, lse = problem.forward(q4, k4, v4)
        needs = (query.requires_grad, key.requires_grad, value.requires_grad)
        dmask_shape = None
        if mask is not None and mask.requires_grad:
            dmask_shape = triton_flash._mask_grad_shape(mask.shape, batch)
        if any(needs) or dmask_shape is not None:
            problem.backward(q4, k4, v4, out, lse, torch.empty_like(out), needs, dmask_shape)
    return problem.recorded


def compile_offline(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | CausalBias | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    arch: int = 90,
    configs: Literal["all", "smallest"] = "all",
    kernels: Sequence[str] = KERNELS,
) -> list[KernelBuild]:
    """Compile every kernel one ``"triton"`` attention call would launch, for ``arch``.

    Arguments are those of :func:`transformer.scaled_dot_product_attention` (shapes:
    query ``(..., L, E)``, key ``(..., S, E)``, value ``(..., S, Ev)``, mask
    broadcastable to ``(..., L, S)`` or a torch ``CausalBias``); the backward kernels
    are compiled when an input ``requires_grad``, as autograd would run them (the mask
    gradient pass when a float mask does). ``configs="all"`` compiles each
    config the autotuner would time for this call (its list after its pruning by dot
    precision), ``"smallest"`` only the last, smallest one, the fallback that must fit.
    ``kernels`` filters by name (:data:`KERNELS`).

    Returns one :class:`KernelBuild` per kernel and config, in launch order. A config
    the compiler rejects is returned with its ``error``, not raised.

    Raises:
        OfflineCompileError: triton is missing, ``TRITON_INTERPRET=1`` is set (the
            kernels are then interpreter functions, with nothing to compile), or
            ``arch`` is not in :data:`SHARED_MEMORY_PER_BLOCK`.
        ValueError: an empty problem, or what the kernel itself rejects.
    """
    if arch not in SHARED_MEMORY_PER_BLOCK:
        raise OfflineCompileError(
            f"compile_offline: arch must be one of {sorted(SHARED_MEMORY_PER_BLOCK)}, got {arch}"
        )
    if configs not in ("all", "smallest"):
        raise ValueError(f"compile_offline: configs must be 'all' or 'smallest', got {configs!r}")
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        raise ValueError(f"compile_offline: unknown kernels {unknown}; choose from {KERNELS}")
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise OfflineCompileError("compile_offline needs triton installed") from err
    if triton_flash._interpreting():
        raise OfflineCompileError(
            "compile_offline cannot run with TRITON_INTERPRET=1: the kernels are then "
            "interpreter functions; unset it in this process"
        )
    module = triton_flash._kernels()
    builds = []
    launches = _record_launches(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
    )
    with _offline_target(arch):
        for name, args, meta in launches:
            if name not in kernels:
                continue
            tuned = getattr(module, name + "_tuned", None)
            if tuned is None:  # a fixed-tile kernel: its own meta holds the tile
                options = [(dict[str, Any](), 4, 3)]
            else:
                # The autotuner's own list through its own pruning hook: exactly the
                # configs it would time for this call.
                candidates = tuned.early_config_prune(tuned.configs, {}, **meta)
                chosen = candidates if configs == "all" else candidates[-1:]
                options = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in chosen]
            for tile, warps, stages in options:
                builds.append(_build(module, name, args, {**meta, **tile}, warps, stages, arch))
    return builds


def _build(
    module: Any,
    name: str,
    args: tuple[Any, ...],
    meta: dict[str, Any],
    num_warps: int,
    num_stages: int,
    arch: int,
) -> KernelBuild:
    fields: dict[str, Any] = {
        "kernel": name,
        "arch": arch,
        "block_m": int(meta["BLOCK_M"]),
        "block_n": int(meta.get("BLOCK_N", 0)),
        "num_warps": num_warps,
        "num_stages": num_stages,
    }
    try:
        compiled = getattr(module, name).warmup(
            *args, grid=(1,), **meta, num_warps=num_warps, num_stages=num_stages
        )
    except Exception as err:  # the compiler's own errors have no common base class
        message = " ".join(str(err).split())[:500] or type(err).__name__
        return KernelBuild(
            **fields,
            shared_bytes=None,
            registers=None,
            stack_bytes=None,
            async_copies=None,
            matmul=None,
            error=f"{type(err).__name__}: {message}",
        )
    registers, stack = _cuobjdump_resources(compiled.asm["cubin"])
    return KernelBuild(
        **fields,
        shared_bytes=int(compiled.metadata.shared),
        registers=registers,
        stack_bytes=stack,
        async_copies=len(_ASYNC_COPY.findall(compiled.asm["ptx"])),
        matmul=_matmul_kind(compiled.asm["ptx"]),
    )


# --------------------------------------------------------------------------------------
# The report behind `transformer bench compile`.
# --------------------------------------------------------------------------------------

_REPORT_DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}


def compile_report(
    *,
    arch: int = 90,
    dtypes: Sequence[str] = ("bf16",),
    head_dims: Sequence[int] = (64, 128),
    causal: Sequence[bool] = (False, True),
    seq_len: int = 4096,
    batch: int = 4,
    heads: int = 8,
    configs: Literal["all", "smallest"] = "all",
    out: str | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Compile a training step's kernels for GPU ``arch`` over a grid of problems, offline.

    For each dtype, head dim ``E`` and causal flag, :func:`compile_offline` on
    ``(batch, heads, seq_len, E)`` inputs that require grad (forward and backward
    kernels). Returns the report (target, limits, versions and one row per build),
    prints it as a table through ``log`` and writes
    ``compile-sm<arch>-triton<version>.json`` to directory ``out`` when given.

    Raises:
        ValueError: an unknown dtype, a size below 1 or a head dim outside 1..256.
        OfflineCompileError: as :func:`compile_offline`.
    """
    unknown = [d for d in dtypes if d not in _REPORT_DTYPES]
    if unknown:
        raise ValueError(f"unknown dtype(s) {unknown}; choose from {sorted(_REPORT_DTYPES)}")
    for name, value in (("seq_len", seq_len), ("batch", batch), ("heads", heads)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    bad_dims = [e for e in head_dims if not 1 <= e <= triton_flash.MAX_HEAD_DIM]
    if bad_dims:
        raise ValueError(f"head dims must be within 1..{triton_flash.MAX_HEAD_DIM}, got {bad_dims}")
    rows: list[dict[str, Any]] = []
    for dtype_name in dtypes:
        for e in head_dims:
            # Never read: only shape, dtype and alignment reach the compiler.
            shape = (batch, heads, seq_len, e)
            dtype = _REPORT_DTYPES[dtype_name]
            q, k, v = (torch.empty(shape, dtype=dtype).requires_grad_() for _ in range(3))
            for is_causal in causal:
                for b in compile_offline(q, k, v, is_causal=is_causal, arch=arch, configs=configs):
                    rows.append(
                        {"dtype": dtype_name, "head_dim": e, "causal": is_causal, **b.as_dict()}
                    )
    import triton

    report = {
        "what": "offline compile report: shared memory, registers, stack (spills), "
        "asynchronous copies and matmul instructions per kernel and autotune config; "
        "no GPU was used and nothing was timed",
        "target": f"sm_{arch}",
        "shared_memory_limit_bytes": SHARED_MEMORY_PER_BLOCK[arch],
        "registers_per_block": REGISTERS_PER_BLOCK,
        "triton": triton.__version__,
        "torch": torch.__version__,
        "shape": {"batch": batch, "heads": heads, "seq_len": seq_len},
        "rows": rows,
    }
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        name = f"compile-sm{arch}-triton{triton.__version__}.json"
        (path / name).write_text(json.dumps(report, indent=2) + "\n")
    if log is not None:
        log(format_report(report))
    return report


def format_report(report: dict[str, Any]) -> str:
    """:func:`compile_report`'s rows as a plain-text table."""
    limit = report["shared_memory_limit_bytes"]
    head = (
        f"{'kernel':<14} {'dtype':<5} {'E':>4} {'causal':<6} {'config':<14} "
        f"{'shared KiB':>10} {'fits':<4} {'regs':>4} {'stack B':>7} {'async':>5} {'matmul':<10}"
    )
    lines = [
        f"triton {report['triton']} -> {report['target']} "
        f"(shared memory limit {limit // 1024} KiB per program); static, not timed",
        head,
        "-" * len(head),
    ]
    for r in report["rows"]:
        config = f"{r['block_m']}x{r['block_n']} w{r['num_warps']} s{r['num_stages']}"
        left = (
            f"{r['kernel']:<14} {r['dtype']:<5} {r['head_dim']:>4} {r['causal']!s:<6} {config:<14}"
        )
        if r["error"] is not None:
            lines.append(f"{left} error: {r['error'][:80]}")
            continue
        lines.append(
            f"{left} {r['shared_bytes'] / 1024:>10.1f} {'yes' if r['fits'] else 'NO':<4} "
            f"{r['registers']:>4} {r['stack_bytes']:>7} {r['async_copies']:>5} {r['matmul']:<10}"
        )
    return "\n".join(lines)
