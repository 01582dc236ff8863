"""The FlashAttention-2 forward kernel: one program per (query block, batch*head), online
softmax over the key blocks, ``O`` and each row's ``m`` and ``1 / l`` stored (see
:mod:`transformer.kernels._triton_kernels`).
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
    "_attn_fwd",
    "_fwd_inner",
]


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    mask_base,
    offs_m,
    offs_e,
    offs_ev,
    lo,
    hi,
    bh,
    L,
    S,
    causal_offset,
    qk_scale,
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
    CHECK_BOUNDS: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online softmax over key blocks ``lo .. hi`` (section 3 of FlashAttention-2).

    ``CHECK_BOUNDS`` is off for blocks fully inside ``S`` and fully below the causal
    diagonal, so the common blocks skip the masking work.
    """
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = cols < S
        # K^T tile (E, N): loading it transposed saves a transpose before the dot. The
        # loads of full blocks carry no sequence mask (and no head-dim mask when E is a
        # power of two), which keeps the hot loop free of predication.
        k_ptrs = k_base + cols[None, :] * stride_ks + offs_e[:, None] * stride_ke
        v_ptrs = v_base + cols[:, None] * stride_vs + offs_ev[None, :] * stride_ve
        if CHECK_BOUNDS:
            k_t = tl.load(k_ptrs, mask=kv_ok[None, :] & (offs_e[:, None] < E), other=0.0)
            v = tl.load(v_ptrs, mask=kv_ok[:, None] & (offs_ev[None, :] < EV), other=0.0)
        else:
            if E == BLOCK_E:
                k_t = tl.load(k_ptrs)
            else:
                k_t = tl.load(k_ptrs, mask=offs_e[:, None] < E, other=0.0)
            if EV == BLOCK_EV:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=offs_ev[None, :] < EV, other=0.0)
        s = _mm(q, k_t, None, PRECISION, ACC_DTYPE) * qk_scale
        if CHECK_BOUNDS:
            allowed = kv_ok[None, :]
            if IS_CAUSAL:
                allowed = allowed & (cols[None, :] <= offs_m[:, None] + causal_offset)
            s = tl.where(allowed, s, float("-inf"))
        if MASK_KIND != 0:
            mask_tile = tl.load(
                mask_base
                + _offsets(offs_m, stride_ml)[:, None]
                + _offsets(cols, stride_ms)[None, :],
                mask=(offs_m[:, None] < L) & kv_ok[None, :],
                other=0,
            )
            if MASK_KIND == 1:
                s = tl.where(mask_tile != 0, s, float("-inf"))
            else:
                s = s + _mask_log2(mask_tile, log2e, mask_floor, ACC_DTYPE)
        # A row whose keys so far are all masked keeps m = -inf; exponentiate against 0
        # there so that exp2(-inf - -inf) never produces NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        # l sums the undropped P: dropout acts on the normalised weights (torch's order).
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _keep(seed, bh, offs_m[:, None], cols[None, :], L, S, dropout_p)
            p = tl.where(keep, p, 0.0)
        acc = _mm(_to(p, v.dtype), v, acc, PRECISION, ACC_DTYPE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed", "causal_offset"])
def _attn_fwd(
    Q,
    K,
    V,
    Mask,
    Out,
    Stats,
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
    stride_ob,
    stride_oh,
    stride_ol,
    stride_oe,
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
    """One query block of one (batch, head): ``O = softmax(Q K^T * scale + mask) V``."""
    # A 1-D grid (query blocks fastest) has no 65535 limit on batch*heads and runs the
    # blocks that share one K/V side by side, which is kind to the L2 cache.
    qk_scale, _, inv_keep, log2e, mask_floor = _load_consts(Consts)
    pid = tl.program_id(0)
    num_m = tl.cdiv(L, BLOCK_M)
    start_m = (pid % num_m) * BLOCK_M
    bh = pid // num_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    kv_h = h // GROUP
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    mask_base = Mask + b * stride_mb + h * stride_mh
    o_base = Out + b * stride_ob + h * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    row_ok = offs_m < L
    q = tl.load(
        q_base + offs_m[:, None] * stride_ql + offs_e[None, :] * stride_qe,
        mask=row_ok[:, None] & (offs_e[None, :] < E),
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], dtype=ACC_DTYPE)

    if IS_CAUSAL:
        # Row i sees keys 0 .. i + causal_offset. Blocks right of the last row's diagonal
        # are skipped (all of them for rows that see no key: the row gets l = 0);
        # blocks left of the first row's diagonal need no mask.
        hi = tl.maximum(tl.minimum(S, start_m + BLOCK_M + causal_offset), 0)
        full_end = (tl.maximum(tl.minimum(S, start_m + 1 + causal_offset), 0) // BLOCK_N) * BLOCK_N
    else:
        hi = S
        full_end = (S // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, offs_e, offs_ev,
        0, full_end, bh, L, S, causal_offset, qk_scale, log2e, mask_floor, seed, dropout_p,
        stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms,
        E, EV, BLOCK_E, BLOCK_EV, BLOCK_N, False, IS_CAUSAL, MASK_KIND, HAS_DROPOUT,
        ACC_DTYPE, PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, offs_e, offs_ev,
        full_end, hi, bh, L, S, causal_offset, qk_scale, log2e, mask_floor, seed, dropout_p,
        stride_ks, stride_ke, stride_vs, stride_ve, stride_ml, stride_ms,
        E, EV, BLOCK_E, BLOCK_EV, BLOCK_N, True, IS_CAUSAL, MASK_KIND, HAS_DROPOUT,
        ACC_DTYPE, PRECISION,
    )  # fmt: skip

    # l == 0 exactly when the row has no allowed key: output 0, m = +inf and 1 / l = 0.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        out = out * inv_keep
    m_out = tl.where(empty, float("inf"), m_i)
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    tl.store(
        o_base + offs_m[:, None] * stride_ol + offs_ev[None, :] * stride_oe,
        _to(out, Out.dtype.element_ty),
        mask=row_ok[:, None] & (offs_ev[None, :] < EV),
    )
    stats = Stats + bh.to(tl.int64) * (2 * L) + offs_m
    tl.store(stats, m_out, mask=row_ok)
    tl.store(stats + L, inv_l, mask=row_ok)
