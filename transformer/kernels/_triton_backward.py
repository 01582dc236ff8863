"""The FlashAttention-2 backward kernels: the ``D = rowsum(dO * O)`` pre-pass, ``dK``/``dV``
(a program owns a key block) and ``dQ`` (a program owns a query block), each recomputing
``P`` from the saved row statistics, and the row-block loads and ``dS`` tiles they share
with the mask-gradient kernel (see :mod:`transformer.kernels._triton_kernels`).
"""

# Kernel parameters carry no annotations besides ``tl.constexpr``: triton.jit reads
# annotations to decide how to specialise arguments, so mypy's untyped-def check is off here.
# mypy: disable-error-code="no-untyped-def"

from __future__ import annotations

import triton
import triton.language as tl

from transformer.kernels._triton_common import (
    _keep,
    _load_consts,
    _mask_log2,
    _mm,
    _offsets,
    _to,
)

__all__ = [
    "_attn_bwd_dkdv",
    "_attn_bwd_dq",
    "_bwd_preprocess",
    "_ds_tile",
    "_load_row_block",
]


@triton.jit
def _bwd_preprocess(
    Out,
    DOut,
    Delta,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_oe,
    stride_db,
    stride_dh,
    stride_dl,
    stride_de,
    H,
    L,
    EV: tl.constexpr,
    BLOCK_EV: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``D = rowsum(dO * O)``, which equals ``rowsum(P * dP)`` (FlashAttention-2, eq. for dS)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(L, BLOCK_M)
    start_m = (pid % num_m) * BLOCK_M
    bh = pid // num_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_ev = tl.arange(0, BLOCK_EV)
    ok = (offs_m[:, None] < L) & (offs_ev[None, :] < EV)
    o_base = Out + b * stride_ob + h * stride_oh
    do_base = DOut + b * stride_db + h * stride_dh
    o = tl.load(
        o_base + offs_m[:, None] * stride_ol + offs_ev[None, :] * stride_oe, mask=ok, other=0.0
    ).to(ACC_DTYPE)
    do = tl.load(
        do_base + offs_m[:, None] * stride_dl + offs_ev[None, :] * stride_de, mask=ok, other=0.0
    ).to(ACC_DTYPE)
    tl.store(Delta + bh.to(tl.int64) * L + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit(do_not_specialize=["seed", "causal_offset"])
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    Mask,
    DOut,
    Stats,
    Delta,
    DK,
    DV,
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
    stride_dkb,
    stride_dkh,
    stride_dks,
    stride_dke,
    stride_dvb,
    stride_dvh,
    stride_dvs,
    stride_dve,
    H,
    L,
    S,
    causal_offset,
    Consts,
    seed,
    dropout_p,
    seq_bucket,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One key block of one (batch, kv head): ``dK`` and ``dV``, summed over its query heads.

    Works on transposed tiles (keys x queries) so that ``dV += P^T dO`` and
    ``dK += dS^T Q`` need no transpose of ``P``; in fp32 the scores are computed as the
    forward computed them, then transposed, so that they round alike. Query rows past
    ``L`` and rows with no allowed key read ``m = +inf`` and so contribute ``P = 0``.
    Key rows past ``S`` compute garbage that is never stored and never mixes into other
    rows.
    """
    qk_scale, sm_scale, inv_keep, log2e, mask_floor = _load_consts(Consts)
    pid = tl.program_id(0)
    num_n = tl.cdiv(S, BLOCK_N)
    start_n = (pid % num_n) * BLOCK_N
    bhk = pid // num_n
    HK = H // GROUP
    b = (bhk // HK).to(tl.int64)
    kv_h = (bhk % HK).to(tl.int64)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    col_ok = offs_n < S
    k_ok = col_ok[:, None] & (offs_e[None, :] < E)
    v_ok = col_ok[:, None] & (offs_ev[None, :] < EV)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    k = tl.load(
        k_base + offs_n[:, None] * stride_ks + offs_e[None, :] * stride_ke, mask=k_ok, other=0.0
    )
    v = tl.load(
        v_base + offs_n[:, None] * stride_vs + offs_ev[None, :] * stride_ve, mask=v_ok, other=0.0
    )
    dk = tl.zeros([BLOCK_N, BLOCK_E], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_EV], dtype=ACC_DTYPE)
    # Query rows i < start_n - causal_offset never see this block under the causal mask.
    lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M if IS_CAUSAL else 0
    offs_mb = tl.arange(0, BLOCK_M)
    for g in range(GROUP):
        h = kv_h * GROUP + g
        bh = b * H + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DOut + b * stride_db + h * stride_dh
        mask_base = Mask + b * stride_mb + h * stride_mh
        for start_m in range(lo, L, BLOCK_M):
            rows = start_m + offs_mb
            row_ok = rows < L
            q = tl.load(
                q_base + rows[:, None] * stride_ql + offs_e[None, :] * stride_qe,
                mask=row_ok[:, None] & (offs_e[None, :] < E),
                other=0.0,
            )
            stats = Stats + bh * (2 * L) + rows
            m_row = tl.load(stats, mask=row_ok, other=float("inf"))
            inv_l = tl.load(stats + L, mask=row_ok, other=0.0)
            if PRECISION == "ieee":
                # fp32/fp64: the scores in the forward's orientation, then transposed.
                # K Q^T rounds differently from Q K^T, and at scores near 1e4 one ulp of
                # a score moves P = exp2(S - m) / l by about 1e-3, which dV = P^T dO would
                # carry. These dots run on FMA units (no tensor cores to lose).
                s_t = tl.trans(_mm(q, tl.trans(k), None, PRECISION, ACC_DTYPE))
            else:
                # 16-bit inputs: K Q^T keeps the long key block as the dot's M, which
                # Hopper's warpgroup tensor cores need (M >= 64); P is rounded to 16 bits
                # before dV = P^T dO anyway, an error of the same size.
                s_t = _mm(k, tl.trans(q), None, PRECISION, ACC_DTYPE)
            s_t = s_t * qk_scale  # (N, M)
            if IS_CAUSAL:
                s_t = tl.where(offs_n[:, None] <= rows[None, :] + causal_offset, s_t, float("-inf"))
            if MASK_KIND != 0:
                mask_t = tl.load(
                    mask_base
                    + _offsets(rows, stride_ml)[None, :]
                    + _offsets(offs_n, stride_ms)[:, None],
                    mask=row_ok[None, :] & col_ok[:, None],
                    other=0,
                )
                if MASK_KIND == 1:
                    s_t = tl.where(mask_t != 0, s_t, float("-inf"))
                else:
                    s_t = s_t + _mask_log2(mask_t, log2e, mask_floor, ACC_DTYPE)
            p_t = tl.exp2(s_t - m_row[None, :]) * inv_l[None, :]  # recomputed P^T, never stored
            do = tl.load(
                do_base + rows[:, None] * stride_dl + offs_ev[None, :] * stride_de,
                mask=row_ok[:, None] & (offs_ev[None, :] < EV),
                other=0.0,
            )
            dp_t = _mm(v, tl.trans(do), None, PRECISION, ACC_DTYPE)
            if HAS_DROPOUT:
                keep_t = _keep(seed, bh, rows[None, :], offs_n[:, None], L, S, dropout_p)
                p_drop_t = tl.where(keep_t, p_t * inv_keep, 0.0)
                dp_t = tl.where(keep_t, dp_t * inv_keep, 0.0)
            else:
                p_drop_t = p_t
            dv = _mm(_to(p_drop_t, do.dtype), do, dv, PRECISION, ACC_DTYPE)
            delta = tl.load(Delta + bh * L + rows, mask=row_ok, other=0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = _mm(_to(ds_t, q.dtype), q, dk, PRECISION, ACC_DTYPE)
    dk = dk * sm_scale
    dk_ptrs = DK + b * stride_dkb + kv_h * stride_dkh
    dk_ptrs += offs_n[:, None] * stride_dks + offs_e[None, :] * stride_dke
    dv_ptrs = DV + b * stride_dvb + kv_h * stride_dvh
    dv_ptrs += offs_n[:, None] * stride_dvs + offs_ev[None, :] * stride_dve
    tl.store(dk_ptrs, _to(dk, DK.dtype.element_ty), mask=k_ok)
    tl.store(dv_ptrs, _to(dv, DV.dtype.element_ty), mask=v_ok)


@triton.jit(do_not_specialize=["seed", "causal_offset"])
def _attn_bwd_dq(
    Q,
    K,
    V,
    Mask,
    DOut,
    Stats,
    Delta,
    DQ,
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
    stride_dqb,
    stride_dqh,
    stride_dql,
    stride_dqe,
    H,
    L,
    S,
    causal_offset,
    Consts,
    seed,
    dropout_p,
    seq_bucket,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One query block of one (batch, head): ``dQ = scale * sum_j dS_j K_j``.

    FlashAttention-2's dQ pass: the program owns its ``dQ`` tile in registers, loops
    over the key blocks its rows may see, recomputes ``P`` and ``dS`` for each tile and
    accumulates ``dS K`` on chip; nothing of size ``(L, S)`` is written.
    """
    qk_scale, sm_scale, inv_keep, log2e, mask_floor = _load_consts(Consts)
    pid = tl.program_id(0)
    num_m = tl.cdiv(L, BLOCK_M)
    start_m = (pid % num_m) * BLOCK_M
    bh = pid // num_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    kv_h = h // GROUP
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    mask_base = Mask + b * stride_mb + h * stride_mh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = offs_m < L
    q_ok = row_ok[:, None] & (offs_e[None, :] < E)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh
        + offs_m[:, None] * stride_ql + offs_e[None, :] * stride_qe,
        mask=q_ok,
        other=0.0,
    )  # fmt: skip
    do, m_row, inv_l, delta = _load_row_block(
        DOut + b * stride_db + h * stride_dh, Stats, Delta, bh.to(tl.int64), offs_m, L,
        stride_dl, stride_de, EV, BLOCK_EV,
    )  # fmt: skip
    dq = tl.zeros([BLOCK_M, BLOCK_E], dtype=ACC_DTYPE)
    # Keys right of the last row's diagonal are never seen: their blocks are skipped.
    hi = tl.maximum(tl.minimum(S, start_m + BLOCK_M + causal_offset), 0) if IS_CAUSAL else S
    for start_n in range(0, hi, BLOCK_N):
        ds, k_t = _ds_tile(
            q, do, m_row, inv_l, delta, k_base, v_base, mask_base, offs_m, start_n, bh, L, S,
            causal_offset, qk_scale, inv_keep, log2e, mask_floor, seed, dropout_p,
            stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms,
            E, EV, BLOCK_E, BLOCK_EV, BLOCK_N, IS_CAUSAL, MASK_KIND, HAS_DROPOUT,
            ACC_DTYPE, PRECISION,
        )  # fmt: skip
        dq = _mm(_to(ds, k_t.dtype), tl.trans(k_t), dq, PRECISION, ACC_DTYPE)
    dq = dq * sm_scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh
    dq_ptrs += offs_m[:, None] * stride_dql + offs_e[None, :] * stride_dqe
    tl.store(dq_ptrs, _to(dq, DQ.dtype.element_ty), mask=q_ok)


@triton.jit
def _load_row_block(
    do_base,
    Stats,
    Delta,
    bh,
    rows,
    L,
    stride_dl,
    stride_de,
    EV: tl.constexpr,
    BLOCK_EV: tl.constexpr,
):
    """``dO (M, EV)``, ``m (M,)``, ``1 / l (M,)``, ``D (M,)`` of a query block.

    Rows past ``L`` get ``m = +inf`` and ``1 / l = 0``, hence ``P = 0``.
    """
    offs_ev = tl.arange(0, BLOCK_EV)
    row_ok = rows < L
    do = tl.load(
        do_base + rows[:, None] * stride_dl + offs_ev[None, :] * stride_de,
        mask=row_ok[:, None] & (offs_ev[None, :] < EV),
        other=0.0,
    )
    stats = Stats + bh * (2 * L) + rows
    m_row = tl.load(stats, mask=row_ok, other=float("inf"))
    inv_l = tl.load(stats + L, mask=row_ok, other=0.0)
    delta = tl.load(Delta + bh * L + rows, mask=row_ok, other=0.0)
    return do, m_row, inv_l, delta


@triton.jit
def _ds_tile(
    q,
    do,
    m_row,
    inv_l,
    delta,
    k_base,
    v_base,
    mask_base,
    offs_m,
    start_n,
    bh,
    L,
    S,
    causal_offset,
    qk_scale,
    inv_keep,
    log2e,
    mask_floor,
    seed,
    dropout_p,
    stride_ks,
    stride_ke,
    stride_vs,
    stride_ve,
    stride_ml,
    stride_ms,
    E: tl.constexpr,
    EV: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The score gradient ``dS = P * (dP - D)`` of one (query block, key block) tile, and ``K^T``.

    ``P = exp2(S - m) / l`` is recomputed from the scores (FlashAttention-2, algorithm 2)
    and ``dP = dO V^T`` (dropout-masked and rescaled like ``P`` was); ``dS`` is the
    gradient of the natural-domain scores, hence also of an additive float mask.
    Returns ``dS (M, N)`` in ``ACC_DTYPE`` and the ``K^T (E, N)`` tile it loaded.
    """
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < S
    k_t = tl.load(
        k_base + cols[None, :] * stride_ks + offs_e[:, None] * stride_ke,
        mask=col_ok[None, :] & (offs_e[:, None] < E),
        other=0.0,
    )
    v_t = tl.load(
        v_base + cols[None, :] * stride_vs + offs_ev[:, None] * stride_ve,
        mask=col_ok[None, :] & (offs_ev[:, None] < EV),
        other=0.0,
    )
    s = _mm(q, k_t, None, PRECISION, ACC_DTYPE) * qk_scale
    # Keys past S must be masked here: exp2(0 - m) overflows for very negative m.
    allowed = col_ok[None, :]
    if IS_CAUSAL:
        allowed = allowed & (cols[None, :] <= offs_m[:, None] + causal_offset)
    s = tl.where(allowed, s, float("-inf"))
    if MASK_KIND != 0:
        mask_tile = tl.load(
            mask_base + _offsets(offs_m, stride_ml)[:, None] + _offsets(cols, stride_ms)[None, :],
            mask=(offs_m[:, None] < L) & col_ok[None, :],
            other=0,
        )
        if MASK_KIND == 1:
            s = tl.where(mask_tile != 0, s, float("-inf"))
        else:
            s = s + _mask_log2(mask_tile, log2e, mask_floor, ACC_DTYPE)
    p = tl.exp2(s - m_row[:, None]) * inv_l[:, None]
    dp = _mm(do, v_t, None, PRECISION, ACC_DTYPE)
    if HAS_DROPOUT:
        keep = _keep(seed, bh, offs_m[:, None], cols[None, :], L, S, dropout_p)
        dp = tl.where(keep, dp * inv_keep, 0.0)
    return p * (dp - delta[:, None]), k_t
