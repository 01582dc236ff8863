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

The kernels live in :mod:`~transformer.kernels._triton_forward`,
:mod:`~transformer.kernels._triton_backward` (pre-pass, ``dK``/``dV``, ``dQ``) and
:mod:`~transformer.kernels._triton_dmask`, on the pieces of
:mod:`~transformer.kernels._triton_common`; this module holds their autotuning configs
and the names :mod:`transformer.kernels.triton_flash` launches.
"""

# Kernel parameters carry no annotations besides ``tl.constexpr``: triton.jit reads
# annotations to decide how to specialise arguments, so mypy's untyped-def check is off here.
# mypy: disable-error-code="no-untyped-def"

from __future__ import annotations

import triton
import triton.language as tl  # noqa: F401  (triton_flash reads its dtypes from here)

from transformer.kernels._triton_backward import (
    _attn_bwd_dkdv,
    _attn_bwd_dq,
    _bwd_preprocess,
)
from transformer.kernels._triton_common import (
    _dropout_keep_mask_kernel,
)
from transformer.kernels._triton_dmask import (
    _attn_bwd_dmask,
)
from transformer.kernels._triton_forward import (
    _attn_fwd,
)

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
