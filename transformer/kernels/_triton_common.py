"""Pieces shared by the Triton kernels: dots in a chosen precision, casts, offsets, the
mask in log2 units, and the dropout keep-mask (see :mod:`transformer.kernels._triton_kernels`
for the algorithm and the conventions every kernel follows).

Imports :mod:`triton` at the top: only :mod:`transformer.kernels._triton_kernels` imports
this module, lazily.
"""

# Kernel parameters carry no annotations besides ``tl.constexpr``: triton.jit reads
# annotations to decide how to specialise arguments, so mypy's untyped-def check is off here.
# mypy: disable-error-code="no-untyped-def"

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton's interpreter (3.9) gets two bf16 operations wrong: it multiplies bf16 tiles as
# their raw uint16 bits, and it rounds fp32 -> bf16 towards zero (a bias that adds up in
# dV = P^T dO). Under it, bf16 dot operands are widened to fp32 and casts round to nearest
# even on the bits, as a GPU does. Read once, like triton.jit reads TRITON_INTERPRET.
_INTERPRETER_BF16_FIXES = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

__all__ = [
    "_INTERPRETER_BF16_FIXES",
    "_dropout_keep_mask_kernel",
    "_keep",
    "_load_consts",
    "_mask_log2",
    "_mm",
    "_offsets",
    "_to",
]


@triton.jit
def _mm(a, b, acc, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``acc + a @ b`` accumulated in ``ACC_DTYPE`` (``acc`` may be ``None``)."""
    if _INTERPRETER_BF16_FIXES and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)


@triton.jit
def _to(x, dtype: tl.constexpr):
    """``x.to(dtype)``, rounding to nearest even also under the interpreter (see above)."""
    if _INTERPRETER_BF16_FIXES and dtype == tl.bfloat16:
        # Round the fp32 bits at bit 16 (ties to even); the truncating cast is then exact.
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _load_consts(Consts):
    """``(qk_scale, sm_scale, 1 / (1 - dropout_p), log2(e), mask_floor)`` in the accumulator dtype.

    They come through memory rather than as float arguments because triton passes a
    Python float as fp32, which would cap the float64 path at fp32 accuracy.
    ``mask_floor`` is the lowest float-mask value whose log2-domain value is finite
    (see :func:`_mask_log2`).
    """
    return (
        tl.load(Consts), tl.load(Consts + 1), tl.load(Consts + 2), tl.load(Consts + 3),
        tl.load(Consts + 4),
    )  # fmt: skip


@triton.jit
def _offsets(index, stride):
    """``index * stride`` in int64: in a mask's ``(L, S)`` plane the last row's offset
    ``(L - 1) * S`` alone passes 2^31 from L = S = 46342 on, where int32 would wrap and
    read outside the mask.
    """
    return index.to(tl.int64) * stride


@triton.jit
def _mask_log2(mask_tile, log2e, mask_floor, ACC_DTYPE: tl.constexpr):
    """A float mask tile in the log2 domain, ``log2(e) * mask``, finite where the mask is.

    ``log2(e) * finfo.min`` overflows to ``-inf``, which would turn a row masked with
    ``finfo.min`` into a row with no allowed key (zeros) instead of torch's equal
    weights: finite entries below ``mask_floor`` are raised to it first. ``-inf`` and NaN
    pass unchanged.
    """
    x = mask_tile.to(ACC_DTYPE)
    x = tl.where((x < mask_floor) & (x != float("-inf")), mask_floor, x)
    return x * log2e


@triton.jit
def _keep(seed, bh, rows, cols, L, S, dropout_p):
    """Dropout keep-mask of the (rows x cols) tile of head ``bh``; rows/cols broadcast."""
    offsets = (bh.to(tl.int64) * L + rows.to(tl.int64)) * S + cols.to(tl.int64)
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit(do_not_specialize=["seed"])
def _dropout_keep_mask_kernel(
    Out,
    L,
    S,
    seed,
    dropout_p,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Write the keep-mask the attention kernels use, as uint8 ``(BH, L, S)`` (for tests)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(seed, bh, rows[:, None], cols[None, :], L, S, dropout_p)
    offs = (bh.to(tl.int64) * L + rows[:, None]) * S + cols[None, :]
    tl.store(Out + offs, keep.to(tl.uint8), mask=(rows[:, None] < L) & (cols[None, :] < S))
