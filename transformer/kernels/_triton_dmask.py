"""The gradient of a float mask that requires grad: a program owns a tile of ``dS``,
recomputed from the saved row statistics, summed over the mask's broadcast dims (see
:mod:`transformer.kernels._triton_kernels`).
"""

# Kernel parameters carry no annotations besides ``tl.constexpr``: triton.jit reads
# annotations to decide how to specialise arguments, so mypy's untyped-def check is off here.
# mypy: disable-error-code="no-untyped-def"

from __future__ import annotations

import triton
import triton.language as tl

from transformer.kernels._triton_backward import (
    _ds_tile,
    _load_row_block,
)
from transformer.kernels._triton_common import (
    _load_consts,
)

__all__ = [
    "_attn_bwd_dmask",
]


@triton.jit(do_not_specialize=["seed", "causal_offset"])
def _attn_bwd_dmask(
    Q,
    K,
    V,
    Mask,
    DOut,
    Stats,
    Delta,
    DMask,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qe,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_ke,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ve,
    stride_mb,
    stride_mh,
    stride_ml,
    stride_ms,
    stride_db,
    stride_dh,
    stride_dl,
    stride_de,
    H,
    L,
    S,
    causal_offset,
    Consts,
    seed,
    dropout_p,
    seq_bucket,
    BO,
    GB,
    GH,
    GROUP: tl.constexpr,
    E: tl.constexpr,
    EV: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    SUM_L: tl.constexpr,
    SUM_S: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One tile of the float mask's gradient, ``dMask = dS`` summed over the mask's broadcast dims.

    ``DMask`` is contiguous ``(GB, GH, GL, GS)``: the mask's own shape, folded like the
    scores ``(BO, H, L, S)``, where ``GB`` is ``1`` or ``BO``, ``GH`` is ``1`` or ``H``,
    ``GL`` is ``1`` (``SUM_L``) or ``L`` and ``GS`` is ``1`` (``SUM_S``) or ``S``. The
    program owns one ``(BLOCK_M, BLOCK_N)`` tile of it (a whole dim where that dim is
    summed) and loops over every (batch, head, query block, key block) that maps onto the
    tile, recomputing ``dS`` there (:func:`_ds_tile`) and adding it up on chip: no
    atomics, a fixed summation order (deterministic), and no buffer larger than the mask.
    """
    qk_scale, _, inv_keep, log2e, mask_floor = _load_consts(Consts)
    GL = 1 if SUM_L else L
    GS = 1 if SUM_S else S
    pid = tl.program_id(0)
    num_n = tl.cdiv(GS, BLOCK_N)
    num_m = tl.cdiv(GL, BLOCK_M)
    start_n0 = (pid % num_n) * BLOCK_N
    start_m0 = ((pid // num_n) % num_m) * BLOCK_M
    gbh = pid // (num_n * num_m)
    gb = gbh // GH
    gh = gbh % GH
    offs_e = tl.arange(0, BLOCK_E)
    offs_mb = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    # A summed dim runs over all its blocks; a kept one over this program's block only.
    m_hi = L if SUM_L else start_m0 + 1
    n_end = S if SUM_S else start_n0 + 1
    m_lo = start_m0
    if IS_CAUSAL:
        # Query rows i < start_n0 - causal_offset see no key of this program's columns.
        m_lo = tl.maximum(m_lo, (tl.maximum(start_n0 - causal_offset, 0) // BLOCK_M) * BLOCK_M)
    # Loop counters are plain ints under the interpreter: offsets are built on int64 bases.
    gb = gb.to(tl.int64)
    gh = gh.to(tl.int64)
    for db in range(0, BO // GB):
        b = gb + db
        for dh in range(0, H // GH):
            h = gh + dh
            bh = b * H + h
            kv_h = h // GROUP
            k_base = K + b * stride_kb + kv_h * stride_kh
            v_base = V + b * stride_vb + kv_h * stride_vh
            mask_base = Mask + b * stride_mb + h * stride_mh
            for start_m in range(m_lo, m_hi, BLOCK_M):
                rows = start_m + offs_mb
                q = tl.load(
                    Q + b * stride_qb + h * stride_qh
                    + rows[:, None] * stride_ql + offs_e[None, :] * stride_qe,
                    mask=(rows[:, None] < L) & (offs_e[None, :] < E),
                    other=0.0,
                )  # fmt: skip
                do, m_row, inv_l, delta = _load_row_block(
                    DOut + b * stride_db + h * stride_dh, Stats, Delta, bh, rows, L,
                    stride_dl, stride_de, EV, BLOCK_EV,
                )  # fmt: skip
                hi = n_end
                if IS_CAUSAL:
                    hi = tl.minimum(hi, tl.maximum(start_m + BLOCK_M + causal_offset, 0))
                for start_n in range(start_n0, hi, BLOCK_N):
                    ds = _ds_tile(
                        q, do, m_row, inv_l, delta, k_base, v_base, mask_base, rows, start_n, bh,
                        L, S,
                        causal_offset, qk_scale, inv_keep, log2e, mask_floor, seed, dropout_p,
                        stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms,
                        E, EV, BLOCK_E, BLOCK_EV, BLOCK_N, IS_CAUSAL, MASK_KIND,
                        HAS_DROPOUT, ACC_DTYPE, PRECISION,
                    )[0]  # fmt: skip
                    # Rows past L and keys past S hold dS = 0 (P = 0 there), so whole
                    # tiles may be added: a summed dim then folds its blocks onto one.
                    acc += ds
    base = DMask + gbh.to(tl.int64) * GL * GS
    rows = start_m0 + offs_mb
    cols = start_n0 + tl.arange(0, BLOCK_N)
    if SUM_L and SUM_S:
        tl.store(base, tl.sum(tl.sum(acc, 1), 0))
    elif SUM_L:
        tl.store(base + cols, tl.sum(acc, 0), mask=cols < S)
    elif SUM_S:
        tl.store(base + rows, tl.sum(acc, 1), mask=rows < L)
    else:
        offs = rows[:, None].to(tl.int64) * S + cols[None, :]
        tl.store(base + offs, acc, mask=(rows[:, None] < L) & (cols[None, :] < S))
