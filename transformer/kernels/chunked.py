"""Chunked attention: equation 1 (section 3.2.1) by online softmax, O(L + S) extra memory.

The ``(L, S)`` score matrix is never materialised, in the forward nor in the backward
pass. Queries are cut into blocks of ``block_l`` rows and keys into blocks of
``block_s`` columns; a tile is one (query block, key block) pair for a chunk of
``(batch, head)`` slices, computed with batched matmuls. Scores are kept in base 2,
``log2(e) * (scale * q k^T + mask)`` (the factor rides on the gemm's ``alpha``), so the
softmax exponentials are ``exp2``, which torch computes on the CPU in about half the
time of ``exp``. When a query block's keys fit one key block (``S <= block_s``, or
under a causal mask its keys up to the diagonal) its softmax is exact in one go: row
max ``m``, ``p = exp2(s - m)`` in place, ``l = rowsum(p)``, ``out = (p @ v) / l``.
Otherwise the forward pass keeps, per query row, a running max ``m`` and a running sum
``l`` (the online softmax of Milakov & Gimelshein 2018, as in FlashAttention),
rescaling the partial sums ``l`` and ``p @ v`` whenever the max grows.
The backward pass (a custom :class:`torch.autograd.Function`) saves only the inputs,
the output and two numbers per row, the final max ``m`` and ``1 / l``, and recomputes
each tile's probabilities ``P = exp2(S - m) / l`` (FlashAttention-2, Dao 2023,
algorithm 2, which saves ``m + log2(l)`` instead: at scores of magnitude ``|m|`` that
sum rounds by up to half an ulp of ``m``, which moves every ``P`` of the row, by a
factor ``l`` when ``|m|`` is 1e9, while ``S - m`` is exact next to the max)::

    dV += P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dO * O)),
    dQ += scale * dS K,   dK += scale * dS^T Q,   d(mask) = dS,

with ``dK`` and ``dV`` accumulated transposed (``dV^T += dO^T P``), the layout in
which these gemms run as fast as the others.

Causal masks are a diagonal offset ``d`` (query ``i`` sees keys ``j <= i + d``): 0 for
``is_causal`` and torch's ``causal_upper_left``, ``S - L`` for ``causal_lower_right``.
A tile whose keys all lie after its last query's last key is never computed, and a key
block is cut at the query block's diagonal end; only the diagonal's ``(n, n)`` strip of
a tile is masked, and no ``(L, S)`` causal mask is built.
Masks are read tile by tile from their broadcast view, never expanded to ``(..., L, S)``.
Grouped-query attention folds the ``g`` query heads of a key/value head into the rows
of one matmul, so key/value heads are never repeated in memory. Dropout draws each
tile's keep-mask from a generator seeded by (call seed, tile): the backward pass
regenerates exactly the forward's mask, and one ``torch.manual_seed`` makes a call
reproducible. fp16/bf16 inputs are computed in fp32 and the results rounded back.

Performance on CPU: a tile holds about :data:`TILE_ELEMENTS` scores so that the passes
over it stay in cache; large problems are split over worker threads, each running its
ops single-threaded (one fork per call instead of one OpenMP fork/join per small op,
which on a busy machine costs more than the op itself), the work balanced by the
scores each query block computes. A worker sets only its own OpenMP thread count,
never torch's process-wide one. The kernel is a pair of ``torch.library`` custom
operators, so ``torch.compile`` (``fullgraph=True`` too) keeps it as one opaque op
instead of tracing the tiles and the thread pool. It calls no fused attention op:
only gemms and elementwise/reduction ops.

This module holds the entry point, the layout and the tile-size settings; the tiles'
math is in :mod:`transformer.kernels._chunked_tiles`, the worker threads in
:mod:`transformer.kernels._chunked_threads` and the autograd function and custom
operators in :mod:`transformer.kernels._chunked_ops`.

Notation: B batch, H heads (Hq query heads, Hk key/value heads, ``g = Hq / Hk``), L
target/query length, S source/key length, E query/key head dim, Ev value head dim,
N the flattened ``(batch, key/value head)`` slices, c slices in a chunk, R = ``g * n``
matmul rows of a query block of ``n`` rows, w key columns of a tile.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch._guards import detect_fake_mode

from transformer.attention import reference_attention, register_kernel
from transformer.kernels._chunked_ops import ChunkedAttention, draw_seed, forward_op
from transformer.kernels._chunked_tiles import unexpanded
from transformer.masks import causal_offset, is_causal_bias

if TYPE_CHECKING:
    from torch.nn.attention.bias import CausalBias

__all__ = [
    "BLOCK_L",
    "BLOCK_S",
    "CAUSAL_BLOCK_L",
    "CAUSAL_BLOCK_S",
    "TILE_ELEMENTS",
    "chunked_attention",
]

#: Default query rows per tile; a module-level setting so tests can change it.
BLOCK_L = 512
#: Default key columns per tile.
BLOCK_S = 512
#: Defaults under ``is_causal``: fewer query rows per tile waste less of the diagonal
#: tiles (their upper triangle is computed, then masked). Both pairs were among the
#: fastest of sweeps on CPU (fp32, E 64, L = S = 2048 and 8192; see benchmarks/README.md):
#: 512 x 512 and 512 x 2048 measured alike, and 128 x 2048 beat 128 x 1024 under
#: is_causal once only the diagonal strip of a tile is masked.
CAUSAL_BLOCK_L = 128
CAUSAL_BLOCK_S = 2048
#: Scores per tile: slices are grouped until a tile holds about this many (4 MiB in fp32),
#: so short sequences still get matmuls batched over many slices. Larger tiles mean
#: fewer Python-level ops per score; 2 and 4 MiB measured alike, 4 MiB better causal.
TILE_ELEMENTS = 1 << 20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 are accumulated in fp32 (FlashAttention's rule); fp32/fp64 stay as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _layout(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, enable_gqa: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, tuple[int, ...]]:
    """Reshape to the kernel's layout; autograd undoes it (and sums broadcast gradients).

    Returns ``q (N, g, L, E)``, ``k (N, S, E)``, ``v (N, S, Ev)``, the mask as
    ``(M, g', L', S')`` (M = 1 when shared by all slices, else N; a broadcast L or S
    dim stays 1: never expanded), the mask row of each slice (or None), and the
    output's batch shape.
    """
    L, S, E, Ev = query.size(-2), key.size(-2), query.size(-1), value.size(-1)
    if enable_gqa:
        outer = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
        hq, hk = query.size(-3), key.size(-3)
        g = hq // hk
        batch: tuple[int, ...] = (*outer, hq)
        kv_batch: tuple[int, ...] = (*outer, hk)
    else:
        batch = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
        kv_batch, g = batch, 1
    N = math.prod(kv_batch)
    # Expanded views; reshape copies only where a batch dim really broadcasts.
    q = query.expand(*batch, L, E).reshape(N, g, L, E)  # (N, g, L, E)
    k = key.expand(*kv_batch, S, E).reshape(N, S, E)  # (N, S, E)
    v = value.expand(*kv_batch, S, Ev).reshape(N, S, Ev)  # (N, S, Ev)
    if attn_mask is None:
        return q, k, v, None, None, batch
    if not attn_mask.requires_grad:
        # An expanded dim holds one value: read it as a broadcast dim instead.
        attn_mask = unexpanded(attn_mask)
    # Leading 1s up to (*batch, L', S'), then the heads dim split into (Hk, g) or (1, 1).
    mask = attn_mask.reshape((1,) * (len(batch) + 2 - attn_mask.dim()) + tuple(attn_mask.shape))
    if enable_gqa and mask.size(-3) != 1:
        mask = mask.unflatten(-3, (batch[-1] // g, g))  # (*kv_batch', g, L', S')
    else:
        mask = mask.unsqueeze(-3)  # (*kv_batch', 1, L', S')
    lead = mask.shape[:-3]  # each dim is 1 or the kv_batch dim
    if math.prod(lead) == 1:
        return q, k, v, mask.reshape(1, *mask.shape[-3:]), None, batch  # (1, g', L', S')
    # Row of the (flattened) mask for each slice: a broadcast dim always reads row 0.
    index = torch.zeros((), dtype=torch.long, device=mask.device)
    for size, full in zip(lead, kv_batch, strict=True):
        along = torch.arange(full, device=mask.device) if size != 1 else index.new_zeros(full)
        index = (index.unsqueeze(-1) * size + along).reshape(-1)
    mask = mask.reshape(-1, *mask.shape[-3:])  # (M, g', L', S'); copies only a strided mask
    return q, k, v, mask, index.reshape(N), batch


def chunked_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | CausalBias | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    block_l: int | None = None,
    block_s: int | None = None,
) -> Tensor:
    """Equation 1 by online softmax over key and query blocks (section 3.2.1), O(L + S) memory.

    Same arguments and result as :func:`transformer.attention.reference_attention`
    (torch SDPA's signature), which were validated by the front door. Shapes: query
    ``(..., L, E)``, key ``(..., S, E)``, value ``(..., S, Ev)``, attn_mask
    broadcastable to ``(..., L, S)`` (bool True = may attend, float added; a float mask
    that requires grad gets one) or a torch ``CausalBias`` of size ``(L, S)``; returns
    ``(..., L, Ev)``, zeros on rows with no allowed key.

    A ``CausalBias`` is never materialised: like ``is_causal`` it becomes a causal
    diagonal ``d`` (query ``i`` sees keys ``j <= i + d``; 0 upper-left, ``S - L``
    lower-right) that skips whole tiles and masks the diagonal ones, so the extra
    memory stays O(L + S). Rows with no key (lower-right, ``L > S``) are zeros.

    Runs as two ``torch.library`` custom operators (forward, backward), so
    ``torch.compile(..., fullgraph=True)`` keeps the kernel as one op in its graph.

    Args:
        block_l: query rows per tile (default :data:`BLOCK_L`, :data:`CAUSAL_BLOCK_L`
            when causal); results do not depend on it beyond rounding (dropout
            masks do: they are drawn per tile).
        block_s: key columns per tile (default :data:`BLOCK_S`, :data:`CAUSAL_BLOCK_S`).
    """
    given_mask = attn_mask
    causal: int | None = 0 if is_causal else None
    if is_causal_bias(attn_mask):
        # Both apply when a caller passes both (the front door refuses the pair).
        offset = causal_offset(attn_mask)
        causal = offset if causal is None else min(causal, offset)
        attn_mask = None
    if block_l is None:
        block_l = CAUSAL_BLOCK_L if causal is not None else BLOCK_L
    if block_s is None:
        block_s = CAUSAL_BLOCK_S if causal is not None else BLOCK_S
    if block_l < 1 or block_s < 1:
        raise ValueError(f"block_l and block_s must be >= 1, got {block_l} and {block_s}")
    if query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        # Nothing to tile (a zero length, head dim or batch): the reference's answer
        # is the definition, and an empty mask has no layout to reshape into.
        return reference_attention(
            query, key, value, given_mask, dropout_p, is_causal, scale, enable_gqa
        )
    d_k = query.size(-1)
    # Like the reference: E = 0 gives empty (zero) dot products, and 1.0 avoids 1/0.
    scale_factor = (1.0 / math.sqrt(d_k) if d_k > 0 else 1.0) if scale is None else scale
    dtype = query.dtype
    work = _compute_dtype(dtype)
    q, k, v, mask, mask_index, batch = _layout(
        query.to(work), key.to(work), value.to(work), attn_mask, enable_gqa
    )
    tiling = (block_l, block_s, TILE_ELEMENTS)
    if torch.compiler.is_compiling():
        out = forward_op(q, k, v, mask, mask_index, causal, scale_factor, dropout_p, *tiling)[
            0
        ]  # (N, g, L, Ev)
    else:
        seed = draw_seed(dropout_p)
        out = ChunkedAttention.apply(
            q, k, v, mask, mask_index, causal, scale_factor, dropout_p, seed, *tiling
        )  # (N, g, L, Ev)
    return out.reshape(*batch, query.size(-2), value.size(-1)).to(dtype)  # (..., L, Ev)


def _available(device: torch.device) -> bool:
    """Every device with values, outside shape-only runs.

    On ``meta``, or under a ``FakeTensorMode``, the tensors hold no values: the call's
    dropout seed cannot be read and the per-tile generators cannot exist.
    """
    if device.type == "meta":
        return False
    # Under torch.compile the kernel is its custom operators, whose fake implementations
    # need no values; outside it an active FakeTensorMode means a shape-only run.
    return (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() == 0  # no mode active: cheap to ask first
        or detect_fake_mode() is None
    )


register_kernel("chunked", chunked_attention, is_available=_available, priority=10)
