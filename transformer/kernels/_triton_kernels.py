"""The ``@triton.jit`` kernels of the FlashAttention-2 kernel (imported lazily, needs triton).

This module imports :mod:`triton` at the top, so only
:mod:`transformer.kernels.triton_flash` imports it, and only when the ``"triton"``
kernel is first called. That keeps ``import transformer`` fast and working without
triton, and lets ``TRITON_INTERPRET=1`` (read by ``triton.jit`` when a kernel is
*decorated*) be set any time before that first call.

Algorithm: FlashAttention-2 (Dao, 2023), i.e. equation 1 of "Attention Is All You Need"
(section 3.2.1) computed tile by tile without ever storing the ``(L, S)`` score matrix:

* forward: one program per (query block, batch*head). It streams key/value blocks
  through an *online softmax* (running row max ``m`` and row sum ``l``, rescaling the
  accumulator when the max grows) and stores ``O`` and two numbers per row, its final
  max ``m`` and ``1 / l`` (FlashAttention-2 stores ``LSE = m + log(l)`` instead, whose
  rounding at large ``|m|`` moves every recomputed ``P`` of the row: by a factor
  ``l`` at ``|m| = 1e9``, while ``S - m`` is exact next to the max).
* backward (FlashAttention-2, algorithm 2): ``P`` is *recomputed* blockwise from
  ``Q``, ``K``, ``m`` and ``1 / l`` (``P = exp(S - m) / l``), never stored. With
  ``D = rowsum(dO * O)`` (a pre-pass), ``dV = P^T dO``, ``dP = dO V^T``,
  ``dS = P * (dP - D)``, ``dQ = scale * dS K`` and ``dK = scale * dS^T Q``. One kernel
  owns a key block and loops over query blocks (``dK``, ``dV``); another owns a query
  block and loops over key blocks (``dQ``); each keeps its accumulators on chip, so no
  atomics are needed, the result is deterministic and no ``(L, S)`` buffer exists.
  Only a float mask that requires grad adds a pass: it owns tiles of the mask's
  gradient ``dS`` (summed over the mask's broadcast dims), recomputing ``dS`` for them.

Conventions shared by every kernel:

* tensors are 4-D ``(Bo, H, seq, dim)`` given by pointer + strides, so broadcast
  (stride 0) and non-contiguous inputs need no copy; query head ``h`` reads key/value
  head ``h // GROUP`` (grouped-query attention without repeating K/V);
* scores live in the log2 domain: ``qk_scale = scale * log2(e)``, so ``exp2`` replaces
  ``exp``; ``m`` is stored in that domain and is ``+inf`` (with ``1 / l = 0``) for a
  row with no allowed key, which makes every recomputed ``P`` of that row exactly ``0``
  (zero output and zero gradients instead of NaN); ``Stats`` holds ``m`` then ``1 / l``,
  ``(Bo*H, 2, L)``;
* ``MASK_KIND``: 0 no mask, 1 bool mask (loaded as uint8, nonzero = may attend),
  2 float mask (added to the scores);
* ``IS_CAUSAL`` with the runtime ``causal_offset``: query ``i`` may attend key ``j``
  iff ``j <= i + causal_offset`` (0: ``is_causal``'s top-left mask; ``S - L``: torch's
  ``causal_lower_right``); key blocks no row of a query block may see are skipped, and
  a row that sees no key gets ``l = 0``;
* dropout keeps an element when ``rand(seed, offset) >= p`` with the Philox counter
  ``offset = (bh * L + row) * S + col`` (int64); the forward and every backward kernel
  evaluate the very same expression, so they agree on every kept element.
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


# --------------------------------------------------------------------------------------
# Small shared pieces.
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Backward.
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Autotuned launchers for real GPUs (the interpreter uses one small fixed config).
# --------------------------------------------------------------------------------------

# Re-tune per head dims, sequence-length bucket (next power of two of max(L, S)) and
# variant; triton adds the tensors' dtypes to the key itself.
_TUNE_KEY = ["E", "EV", "seq_bucket", "IS_CAUSAL", "MASK_KIND", "HAS_DROPOUT", "GROUP"]


def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
        for m, n, w, st in shapes
    ]


# (BLOCK_M, BLOCK_N, num_warps, num_stages), for fp16/bf16, whose dots run on tensor cores
# (wgmma on sm_90, mma on sm_80). The last one, 32 x 32, is the fallback that fits every
# head dim on sm_80 and sm_90; bigger ones that do not fit a GPU (e.g. at head dim 256)
# fail at launch and the autotuner drops them. `transformer bench compile` reports each
# config's shared memory, registers and spills, without a GPU.
FWD_CONFIGS = _configs(
    [
        (128, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (128, 32, 4, 4),
        (64, 64, 4, 3),
        (64, 32, 4, 4),
        (32, 32, 4, 2),
    ]
)
BWD_DKDV_CONFIGS = _configs(
    [
        (32, 128, 8, 3),
        (64, 128, 8, 3),
        (32, 64, 4, 3),
        (64, 64, 4, 3),
        (32, 32, 4, 2),
    ]
)
BWD_DQ_CONFIGS = _configs(
    [
        (128, 32, 8, 3),
        (128, 64, 8, 3),
        (64, 32, 4, 3),
        (64, 64, 4, 3),
        (32, 32, 4, 2),
    ]
)
# The mask gradient holds a (BLOCK_M, BLOCK_N) accumulator besides the dQ pass's tiles;
# it runs only for a float mask that requires grad.
BWD_DMASK_CONFIGS = _configs(
    [
        (64, 64, 4, 3),
        (128, 64, 8, 3),
        (64, 32, 4, 3),
        (32, 32, 4, 2),
    ]
)
# fp32 (IEEE products) and fp64 dots have no fast tensor-core path (fp32 runs on FMA
# units, fp64 on fp64 MMA): the tiles above gain nothing there, spill up to tens of KB
# of registers, take minutes to compile and, in fp64 at head dim 256, fit no GPU's
# shared memory. These small tiles, single-stage where memory is tight, are their whole
# list; 16 x 16 in one stage fits every head dim up to 256 on sm_80 and sm_90.
FULL_PRECISION_CONFIGS = _configs([(32, 32, 4, 2), (32, 16, 4, 1), (16, 16, 4, 1)])

TENSOR_CORE_CONFIGS = {
    "attn_fwd": FWD_CONFIGS,
    "attn_bwd_dkdv": BWD_DKDV_CONFIGS,
    "attn_bwd_dq": BWD_DQ_CONFIGS,
    "attn_bwd_dmask": BWD_DMASK_CONFIGS,
}


def _tuned(kernel: str, fn, extra_key: tuple[str, ...] = ()):
    # One autotuner holds both lists (its cache key includes the dtypes); triton's
    # early_config_prune hook, handed the configs in the order given, keeps the
    # tensor-core head or the full-precision tail for each call's dot precision.
    head = TENSOR_CORE_CONFIGS[kernel]

    def prune(configs, named_args, **meta):
        return configs[len(head) :] if meta["PRECISION"] == "ieee" else configs[: len(head)]

    configs = head + FULL_PRECISION_CONFIGS
    return triton.autotune(
        configs, key=[*_TUNE_KEY, *extra_key], prune_configs_by={"early_config_prune": prune}
    )(fn)


attn_fwd_tuned = _tuned("attn_fwd", _attn_fwd)
attn_bwd_dkdv_tuned = _tuned("attn_bwd_dkdv", _attn_bwd_dkdv)
attn_bwd_dq_tuned = _tuned("attn_bwd_dq", _attn_bwd_dq)
attn_bwd_dmask_tuned = _tuned("attn_bwd_dmask", _attn_bwd_dmask, ("SUM_L", "SUM_S"))

attn_fwd = _attn_fwd
attn_bwd_dkdv = _attn_bwd_dkdv
attn_bwd_dq = _attn_bwd_dq
attn_bwd_dmask = _attn_bwd_dmask
bwd_preprocess = _bwd_preprocess
dropout_keep_mask_kernel = _dropout_keep_mask_kernel
