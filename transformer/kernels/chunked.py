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

Notation: B batch, H heads (Hq query heads, Hk key/value heads, ``g = Hq / Hk``), L
target/query length, S source/key length, E query/key head dim, Ev value head dim,
N the flattened ``(batch, key/value head)`` slices, c slices in a chunk, R = ``g * n``
matmul rows of a query block of ``n`` rows, w key columns of a tile.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor
from torch._guards import detect_fake_mode

from transformer.attention import reference_attention, register_kernel
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
#: Problems with fewer scores (N * g * L * S) run in the calling thread, where torch's
#: own threads parallelise each op; larger ones are split over worker threads.
PARALLEL_MIN_SCORES = 1 << 20

_NEG_INF = float("-inf")
# Scores are kept in base 2: exp(x) = exp2(x * log2(e)).
_LOG2E = 1.0 / math.log(2.0)
# Spreads tile numbers over the seed space so neighbouring tiles get unrelated streams.
_SEED_STRIDE = 0x9E3779B97F4A7C15
_POOL_LOCK = threading.Lock()
# (worker count, executor): one pool, rebuilt if torch's thread count changes.
_POOL: list[tuple[int, ThreadPoolExecutor]] = []


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 are accumulated in fp32 (FlashAttention's rule); fp32/fp64 stay as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass(frozen=True)
class _Unit:
    """A unit of work: slices ``n0:n1`` (chunk ``chunk``), query rows ``i0:i1`` (block ``qi``)."""

    chunk: int
    n0: int
    n1: int
    qi: int
    i0: int
    i1: int


@dataclass(frozen=True)
class _Problem:
    """What every tile needs; built once per call (shapes: see :func:`_layout`)."""

    q: Tensor  # (N, g, L, E)
    k: Tensor  # (N, S, E)
    v: Tensor  # (N, S, Ev)
    # (M, g', L', S'), each of g', L', S' full or 1 (broadcast); M is 1 or N slices.
    mask: Tensor | None
    # Index into the mask's first dim for each of the N slices; None when M == 1.
    mask_index: Tensor | None
    # Causal diagonal: query i may see keys j <= i + causal (0 = is_causal, S - L = a
    # lower-right CausalBias); None = not causal.
    causal: int | None
    scale: float
    dropout_p: float
    seed: int
    block_l: int
    block_s: int
    # Lowest float-mask value that stays finite once scaled into base 2, or None when
    # every mask value is at or above it, with no -inf or NaN (see _mask_floor).
    mask_floor: float | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask_floor", _mask_floor(self.mask, self.q.dtype))

    def key_blocks(self, i0: int, i1: int) -> list[tuple[int, int, int]]:
        """``(kj, j0, j1)`` of the key blocks that query rows ``i0:i1`` must visit.

        Under a causal diagonal ``d`` keys ``>= i1 + d`` are masked for every row of the
        block, so blocks holding only such keys are skipped (all of them for rows with
        no key, ``i1 + d <= 0``) and the last block ends at ``i1 + d``. Only the block
        holding the diagonal ``i0 + d : i1 + d`` needs a causal mask (see
        :func:`_scores`), and only the diagonal's upper triangle is computed in vain.
        """
        S = self.k.shape[1]
        end = S if self.causal is None else min(max(i1 + self.causal, 0), S)
        starts = range(0, end, self.block_s)
        return [(kj, j0, min(j0 + self.block_s, end)) for kj, j0 in enumerate(starts)]

    def cost(self, unit: _Unit) -> int:
        """Scores the unit computes: slices x query rows x keys visited."""
        keys = sum(j1 - j0 for _, j0, j1 in self.key_blocks(unit.i0, unit.i1))
        return (unit.n1 - unit.n0) * (unit.i1 - unit.i0) * keys

    def tile_buffer(self) -> Tensor:
        """Scratch for one tile's scores, reused across tiles (fresh pages are slow)."""
        N, g, L, _ = self.q.shape
        per_slice = g * min(self.block_l, L) * min(self.block_s, self.k.shape[1])
        return self.q.new_empty(min(N, _slices_per_chunk(per_slice)) * per_slice)


def _mask_floor(mask: Tensor | None, dtype: torch.dtype) -> float | None:
    """The value finite float-mask entries are raised to so that ``log2(e) * mask`` stays finite.

    Scores are kept in base 2, and ``log2(e) * finfo.min`` overflows to ``-inf``: a row
    masked with ``finfo.min`` would read as having no allowed key (a zero row) instead of
    torch's equal weights. Entries below about ``-2.4e38`` in fp32 (``finfo.max /
    log2(e)``, less a margin for the score added to them) are therefore raised to it,
    tile by tile, each element on its own (``-inf`` and NaN pass unchanged). Returns None,
    and tiles skip that, when no finite mask value lies below the floor.
    """
    if mask is None or not mask.is_floating_point() or mask.numel() == 0:
        return None
    floor = -torch.finfo(dtype).max / _LOG2E * (1.0 - 2.0**-10)
    return None if _finite_min(_unexpanded(mask)) >= floor else floor


def _unexpanded(t: Tensor) -> Tensor:
    """``t`` with each expanded (stride 0) dim narrowed to size 1: such a dim holds one value."""
    for dim in range(t.dim()):
        if t.stride(dim) == 0 and t.size(dim) > 1:
            t = t.narrow(dim, 0, 1)
    return t


def _finite_min(values: Tensor) -> float:
    """The least finite value of ``values`` (``+inf`` if none): ``-inf`` and NaN are ignored.

    Part by part through one small buffer, so no temporary of the mask's size is made
    (fresh pages cost more than the reduction: about 60 ms against 4 for a 16M-element
    mask, measured on the CPU).
    """
    flat = values.reshape(-1)
    step = 1 << 16
    buf = flat.new_empty(min(step, flat.numel()))
    lowest = flat.new_full((), math.inf)
    for i in range(0, flat.numel(), step):
        part = flat[i : i + step]
        out = buf[: part.numel()]
        torch.nan_to_num(part, nan=math.inf, posinf=math.inf, neginf=math.inf, out=out)
        lowest = torch.minimum(lowest, out.amin())
    return float(lowest.item())


def _slices_per_chunk(per_slice: int) -> int:
    """Slices batched into one tile so that it holds about :data:`TILE_ELEMENTS` scores."""
    return max(1, TILE_ELEMENTS // max(1, per_slice))


def _units(N: int, g: int, L: int, S: int, block_l: int, block_s: int) -> list[_Unit]:
    """The work units, chunk by chunk; they depend on the sizes only, not on thread count."""
    chunk = _slices_per_chunk(g * min(block_l, L) * min(block_s, S))
    return [
        _Unit(ci, n0, min(n0 + chunk, N), qi, i0, min(i0 + block_l, L))
        for ci, n0 in enumerate(range(0, N, chunk))
        for qi, i0 in enumerate(range(0, L, block_l))
    ]


def _tile_seed(seed: int, unit: _Unit, k_block: int) -> int:
    tile = (unit.chunk * 1_000_003 + unit.qi) * 1_000_003 + k_block + 1
    return (seed + tile * _SEED_STRIDE) % (2**63)


def _keep_mask(like: Tensor, p: float, seed: int) -> Tensor:
    """Dropout keep-mask (1 kept, 0 dropped) of one tile, the same in forward and backward."""
    gen = torch.Generator(device=like.device)
    gen.manual_seed(seed)
    return torch.empty_like(like).bernoulli_(1.0 - p, generator=gen)


def _mask_rows_cols(mask: Tensor, i0: int, i1: int, j0: int, j1: int) -> tuple[slice, slice]:
    """Row and column slices of a mask that may broadcast (size 1) over L or S."""
    rows = slice(i0, i1) if mask.size(-2) != 1 else slice(None)
    cols = slice(j0, j1) if mask.size(-1) != 1 else slice(None)
    return rows, cols


def _mask_tile(pb: _Problem, unit: _Unit, j0: int, j1: int) -> Tensor | None:
    """The mask of a tile, ``(c or 1, g', n', w')``: a view, copied only when per-slice."""
    if pb.mask is None:
        return None
    rows, cols = _mask_rows_cols(pb.mask, unit.i0, unit.i1, j0, j1)
    if pb.mask_index is None:
        return pb.mask[:, :, rows, cols]
    return pb.mask[pb.mask_index[unit.n0 : unit.n1], :, rows, cols]


def _scores(pb: _Problem, unit: _Unit, qb: Tensor, j0: int, j1: int, buf: Tensor) -> Tensor:
    """Masked scores of one tile in base 2, ``log2(e) * (scale * q k^T + mask)``, ``(c, R, w)``.

    ``qb`` is the unit's query block ``(c, R, E)``; the result is written into ``buf``.
    Forbidden positions are ``-inf``. Scores are kept in base 2 so that the softmax can
    use ``exp2``, which torch's CPU ops compute in half the time of ``exp``; the factor
    ``log2(e)`` rides on the gemm's ``alpha`` and the mask's ``add``, so it costs no pass.
    Every tile of both passes goes through here, so a test can count tiles by
    wrapping this function.
    """
    c, R = qb.shape[0], qb.shape[1]
    n, w = unit.i1 - unit.i0, j1 - j0
    s = buf[: c * R * w].view(c, R, w)
    k_tile = pb.k[unit.n0 : unit.n1, j0:j1].transpose(1, 2)  # (c, E, w)
    # beta=0: the buffer's old contents are ignored, NaN included.
    # E = 0 never reaches a tile: chunked_attention sends empty inputs to the reference.
    s.baddbmm_(qb, k_tile, beta=0.0, alpha=pb.scale * _LOG2E)  # (c, R, w)
    s4 = s.view(c, R // n, n, w)  # (c, g, n, w): broadcasts with the mask tile
    if pb.causal is not None and j1 - 1 > unit.i0 + pb.causal:
        # Query i0 + r may see key j0 + col iff col - r <= i0 + d - j0. Columns before
        # i0 + d + 1 are seen by every row, so only the diagonal's (n, w - c0) strip is
        # masked, never an (L, S) or a whole-tile mask.
        diagonal = unit.i0 + pb.causal - j0 + 1
        c0 = max(diagonal, 0)
        future = torch.ones(n, w - c0, dtype=torch.bool, device=s.device).triu_(diagonal - c0)
        s4[..., c0:].masked_fill_(future, _NEG_INF)
    tile = _mask_tile(pb, unit, j0, j1)
    if tile is not None:
        if tile.dtype == torch.bool:
            s4.masked_fill_(~tile, _NEG_INF)
        else:
            tile = tile.to(s.dtype)
            if pb.mask_floor is not None:
                tile = torch.where(tile == _NEG_INF, tile, tile.clamp(min=pb.mask_floor))
            s4.add_(tile, alpha=_LOG2E)
    return s


def _forward_units(pb: _Problem, units: list[_Unit], out: Tensor, stats: Tensor) -> None:
    """Softmax over the key blocks of each unit; writes its rows of ``out`` and ``stats``.

    A unit whose keys fit one key block takes the exact softmax in one go: row max
    ``m``, ``p = exp2(s - m)`` in place, ``l = rowsum(p)``, ``out = (p @ v) / l``: two
    gemms and four passes over the tile (max, subtract, exp2, sum). With more key
    blocks the same runs per tile and the tiles are merged by online softmax: when a
    row's max grows from ``m`` to ``m'``, what was summed so far (``l`` and ``p @ v``,
    both ``(R, .)``, never ``p``) scales by ``exp2(m - m')``. ``stats[0]`` is each row's
    final max (base 2, the scores' unit) and ``stats[1]`` its ``1 / l``; a row with no
    allowed key gets ``+inf`` and 0, so that the backward's ``exp2(s - m) / l`` is 0.
    """
    g, E = pb.q.shape[1], pb.q.shape[3]
    buf = pb.tile_buffer()
    keep_scale = 1.0 / (1.0 - pb.dropout_p)
    for u in units:
        c, n = u.n1 - u.n0, u.i1 - u.i0
        qb = pb.q[u.n0 : u.n1, :, u.i0 : u.i1].reshape(c, g * n, E)  # (c, R, E)
        blocks = pb.key_blocks(u.i0, u.i1)
        if not blocks:  # causal rows before the first key (lower-right, L > S)
            out[u.n0 : u.n1, :, u.i0 : u.i1] = 0.0
            stats[0, u.n0 : u.n1, :, u.i0 : u.i1] = math.inf
            stats[1, u.n0 : u.n1, :, u.i0 : u.i1] = 0.0
            continue
        m: Tensor | None = None  # running row max (c, R, 1); -inf: no allowed key yet
        shift = l = acc = qb  # assigned by the first key block
        for kj, j0, j1 in blocks:
            s = _scores(pb, u, qb, j0, j1, buf)
            m_tile = s.amax(dim=-1, keepdim=True)  # (c, R, 1)
            m_new = m_tile if m is None else torch.maximum(m, m_tile)
            # A row with no allowed key yet is shifted by 0: exp2(-inf - 0) = 0, not NaN.
            # (Skipping the shift where all maxima are small would save this pass, but
            # the test would couple the slices of a chunk: one slice's inf would change
            # another's rounding.)
            shift = m_new.masked_fill(m_new == _NEG_INF, 0.0)
            p = s.sub_(shift).exp2_()  # (c, R, w), unnormalised probabilities, <= 1
            l_tile = p.sum(dim=-1, keepdim=True)  # (c, R, 1)
            if pb.dropout_p > 0.0:
                # The sum is over all keys (dropout acts after normalisation); the kept
                # ones are scaled by keep_scale once, at the end.
                p.mul_(_keep_mask(p, pb.dropout_p, _tile_seed(pb.seed, u, kj)))
            v_tile = pb.v[u.n0 : u.n1, j0:j1]  # (c, w, Ev)
            if m is None:
                l, acc = l_tile, torch.bmm(p, v_tile)  # acc: (c, R, Ev)
            else:
                # Rescales what was summed under the old max; 0 where it was -inf
                # (nothing summed yet), whatever the new shift.
                alpha = (m - shift).exp2_()
                l = l.mul_(alpha).add_(l_tile)
                acc = acc.mul_(alpha).baddbmm_(p, v_tile)
            m = m_new
        empty = l == 0  # no allowed key in the whole row
        # Dropout's 1 / (1 - p) on every kept weight, applied once to the (R, Ev) result.
        acc = (
            acc.div_(l.masked_fill(empty, 1.0))
            if pb.dropout_p == 0.0
            else acc.mul_(keep_scale / l.masked_fill(empty, 1.0))
        )
        out[u.n0 : u.n1, :, u.i0 : u.i1] = acc.view(c, g, n, -1)
        # m = +inf makes the backward's exp2(s - m) exactly 0 on such rows.
        stats[0, u.n0 : u.n1, :, u.i0 : u.i1] = shift.masked_fill_(empty, math.inf).view(c, g, n)
        inv_l = l.reciprocal_().masked_fill_(empty, 0.0)
        stats[1, u.n0 : u.n1, :, u.i0 : u.i1] = inv_l.view(c, g, n)


@dataclass(frozen=True)
class _Grads:
    """Gradient accumulators of one worker: ``dq (N, g, L, E)``, ``dk_t (N, E, S)``,
    ``dv_t (N, Ev, S)`` (the key and value gradients transposed) and ``dmask``."""

    dq: Tensor
    dk_t: Tensor
    dv_t: Tensor
    dmask: Tensor | None


def _backward_units(
    pb: _Problem, units: list[_Unit], d_out: Tensor, delta: Tensor, stats: Tensor, grads: _Grads
) -> None:
    """FlashAttention-2's backward over the tiles of ``units``, adding into ``grads``.

    A tile's ``exp2(s - m)`` is ``l * P``: the row factor ``1 / l`` goes on the ``(R, .)``
    operands instead (``dO`` for ``dV``, ``Q`` for ``dK``, the finished ``dQ`` rows), so
    normalising costs no pass over the tile.

    ``dK`` and ``dV`` are accumulated transposed, ``dV^T += dO^T P`` and
    ``dK^T += scale * Q^T dS``: MKL runs those gemms at the speed of the others, while
    ``P^T dO`` (a transposed tile as the left operand) runs about a quarter slower, and
    they add straight into the accumulator instead of through a temporary.
    """
    g, E, Ev = pb.q.shape[1], pb.q.shape[3], pb.v.shape[2]
    buf, dp_buf = pb.tile_buffer(), pb.tile_buffer()
    keep_scale = 1.0 / (1.0 - pb.dropout_p)
    for u in units:
        c, n = u.n1 - u.n0, u.i1 - u.i0
        rows = (slice(u.n0, u.n1), slice(None), slice(u.i0, u.i1))
        qb = pb.q[rows].reshape(c, g * n, E)  # (c, R, E)
        dob = d_out[rows].reshape(c, g * n, Ev)  # (c, R, Ev)
        m_b = stats[0][rows].reshape(c, g * n, 1)
        inv_l = stats[1][rows].reshape(c, g * n, 1)
        q_t = (qb * inv_l).transpose(1, 2).contiguous()  # (c, E, R), Q / l
        do_t = (dob * inv_l).transpose(1, 2).contiguous()  # (c, Ev, R), dO / l
        delta_b = delta[rows].reshape(c, g * n, 1)
        dqb = qb.new_zeros(c, g * n, E)
        for kj, j0, j1 in pb.key_blocks(u.i0, u.i1):
            keys = (slice(u.n0, u.n1), slice(j0, j1))
            keys_t = (slice(u.n0, u.n1), slice(None), slice(j0, j1))
            s = _scores(pb, u, qb, j0, j1, buf)
            p = s.sub_(m_b).exp2_()  # (c, R, w): l * P
            dp = dp_buf[: p.numel()].view(p.shape)
            dp.baddbmm_(dob, pb.v[keys].transpose(1, 2), beta=0.0)  # dO V^T, (c, R, w)
            p_kept = p
            if pb.dropout_p > 0.0:
                keep = _keep_mask(p, pb.dropout_p, _tile_seed(pb.seed, u, kj))
                dp.mul_(keep).mul_(keep_scale)
                p_kept = p * keep
            grads.dv_t[keys_t].baddbmm_(do_t, p_kept, alpha=keep_scale)  # (c, Ev, w)
            ds = dp.sub_(delta_b).mul_(p)  # (c, R, w): l * dS
            if grads.dmask is not None:
                _add_mask_grad(pb, u, j0, j1, ds * inv_l, grads.dmask)
            dqb.baddbmm_(ds, pb.k[keys], alpha=pb.scale)  # (c, R, E)
            grads.dk_t[keys_t].baddbmm_(q_t, ds, alpha=pb.scale)  # (c, E, w)
        grads.dq[rows] += dqb.mul_(inv_l).view(c, g, n, E)


def _add_mask_grad(pb: _Problem, u: _Unit, j0: int, j1: int, ds: Tensor, dmask: Tensor) -> None:
    """``d(mask) += dS`` of one tile, summed over the dims the mask broadcasts over."""
    assert pb.mask is not None
    rows, cols = _mask_rows_cols(pb.mask, u.i0, u.i1, j0, j1)
    c, n = u.n1 - u.n0, u.i1 - u.i0
    ds4 = ds.view(c, -1, n, j1 - j0)  # (c, g, n, w)
    target = dmask[:, :, rows, cols]
    if pb.mask_index is None:
        target.add_(ds4.sum_to_size(target.shape))
    else:
        per_slice = ds4.sum_to_size((c, *target.shape[1:]))
        # Several slices may share one mask entry (a broadcast batch or heads dim).
        target.index_add_(0, pb.mask_index[u.n0 : u.n1], per_slice)


def _openmp_set_num_threads() -> Callable[[int], object] | None:
    """The OpenMP runtime's ``omp_set_num_threads`` that ATen's ops obey, or ``None``.

    OpenMP keeps the thread count of the next parallel region per thread (the
    ``nthreads-var`` ICV of the calling thread's task), and ATen's intra-op
    parallelism and MKL read it in the thread that runs the op; so a worker can make
    its own ops single-threaded with it. ``torch.set_num_threads`` cannot be used for
    that: it also stores a process-wide default (the count every new thread starts
    with, read by ``torch.get_num_threads`` elsewhere) and resizes a shared pool.
    torch does not expose the per-thread setter, so it is looked up in the OpenMP
    library the process has loaded (``None`` when ATen does not use OpenMP or the
    library cannot be found: the kernel then runs in the calling thread).
    """
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    candidates: list[str | None] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                name = os.path.basename(path)
                if name.startswith(("libgomp", "libiomp", "libomp")) and path not in candidates:
                    candidates.append(path)
    except OSError:  # no /proc (macOS, Windows): try the symbols already loaded
        pass
    candidates.append(None)
    for library in candidates:
        try:
            setter = ctypes.CDLL(library).omp_set_num_threads
        except (OSError, AttributeError):
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], None
        return cast(Callable[[int], object], setter)
    return None


_SET_THREAD_COUNT = _openmp_set_num_threads()


def _single_threaded_worker() -> None:
    """Worker thread start-up: make the ops this thread runs single-threaded, for it only."""
    assert _SET_THREAD_COUNT is not None
    # ATen initialises a thread's OpenMP count lazily, on its first parallel query,
    # from the process-wide default; trigger that first so it does not undo ours.
    torch.get_num_threads()
    _SET_THREAD_COUNT(1)


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if _POOL and _POOL[0][0] != workers:
            _POOL.pop()[1].shutdown(wait=False)
        if not _POOL:
            pool = ThreadPoolExecutor(
                workers, "chunked-attention", initializer=_single_threaded_worker
            )
            _POOL.append((workers, pool))
        return _POOL[0][1]


def _worker_count() -> int:
    """How many worker threads a large problem is split over: one per torch thread."""
    return torch.get_num_threads() if _SET_THREAD_COUNT is not None else 1


def _balanced_parts(
    units: list[_Unit], workers: int, cost: Callable[[_Unit], int]
) -> list[list[_Unit]]:
    """Split ``units`` over ``workers`` by cost, largest first onto the least loaded worker.

    Under a causal mask a query block's cost grows with its position, so a round-robin
    split leaves one worker with the longer blocks (1/8 more work at 16 blocks); this
    greedy split depends only on the sizes, and each part keeps the units' order.
    """
    loads = [0] * workers
    owner = [0] * len(units)
    for i in sorted(range(len(units)), key=lambda i: -cost(units[i])):
        w = loads.index(min(loads))
        owner[i] = w
        loads[w] += cost(units[i])
    return [[u for u, o in zip(units, owner, strict=True) if o == w] for w in range(workers)]


def _run(
    units: list[_Unit],
    scores: int,
    work: Callable[[list[_Unit], int], None],
    by_chunk: bool,
    cost: Callable[[_Unit], int],
) -> int:
    """Run ``work(units_of_worker, worker_index)`` on every unit; return the worker count.

    Small problems, and any problem under a ``TorchDispatchMode``, run in the calling
    thread. Large ones are split over one worker
    thread per torch thread, each running its ops single-threaded (without touching
    process-wide settings: see :func:`_openmp_set_num_threads`); with ``by_chunk`` a
    chunk of slices never straddles two workers (so they never add into the same rows),
    otherwise the caller gives every worker its own accumulators and the units are
    split by ``cost`` (the scores a unit computes).
    """
    workers = _worker_count()
    chunks = len({u.chunk for u in units})
    if by_chunk:
        workers = min(workers, chunks)
    # Dispatch modes are per thread too: under one (FlopCounterMode, a tracer) every op
    # runs in the calling thread, where the mode sees it.
    if (
        workers <= 1
        or scores < PARALLEL_MIN_SCORES
        or len(units) < 2
        or torch._C._len_torch_dispatch_stack() > 0
    ):
        work(units, 0)
        return 1
    if by_chunk:
        parts = [[u for u in units if u.chunk % workers == w] for w in range(workers)]
    else:
        parts = _balanced_parts(units, workers, cost)

    # Grad and inference mode are per thread: a worker builds no graph, and under the
    # caller's torch.inference_mode it must be in it too, or writing into the buffers
    # the caller made (inference tensors then) is refused. no_grad goes inside:
    # inference_mode(False) turns grad mode back on.
    inference = torch.is_inference_mode_enabled()

    def run_part(w: int) -> None:
        with torch.inference_mode(inference), torch.no_grad():
            work(parts[w], w)

    for future in [_pool(workers).submit(run_part, w) for w in range(workers)]:
        future.result()
    return workers


def _split_by_chunk(units: list[_Unit]) -> bool:
    """Can workers own whole chunks (no shared accumulators) and still share the work evenly?"""
    chunks = len({u.chunk for u in units})
    workers = _worker_count()
    return chunks % workers == 0 or chunks >= 4 * workers


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast disabled on ``device`` while the tiles run.

    Autocast is per thread: left on, the tile gemms of a call in the calling thread
    would run in low precision (and the in-place accumulations refuse their mixed
    dtypes), while the same call split over worker threads would not. The kernel does
    its own precision: fp16/bf16 inputs are computed in fp32.
    """
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    mask_index: Tensor | None,
    causal: int | None,
    scale: float,
    dropout_p: float,
    seed: int,
    block_l: int,
    block_s: int,
) -> tuple[Tensor, Tensor]:
    """Online-softmax forward pass over all units: ``(out, stats)``.

    Shapes: ``q (N, g, L, E)``, ``k (N, S, E)``, ``v (N, S, Ev)``, mask ``(M, g', L', S')``;
    returns ``out (N, g, L, Ev)`` and ``stats (2, N, g, L)``: each row's final score max
    (base 2) and ``1 / l``, its reciprocal softmax denominator.
    """
    pb = _Problem(q, k, v, mask, mask_index, causal, scale, dropout_p, seed, block_l, block_s)
    N, g, L, _ = q.shape
    S, Ev = k.shape[1], v.shape[2]
    out = q.new_empty(N, g, L, Ev)
    stats = q.new_empty(2, N, g, L)
    units = _units(N, g, L, S, block_l, block_s)
    with _autocast_off(q.device):
        _run(
            units,
            N * g * L * S,
            lambda part, w: _forward_units(pb, part, out, stats),
            False,
            pb.cost,
        )
    return out, stats


def _backward(
    pb: _Problem, d_out: Tensor, out: Tensor, stats: Tensor, want_dmask: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """FlashAttention-2's backward pass over all units: ``(dq, dk, dv, dmask)``.

    Shapes: ``d_out``/``out (N, g, L, Ev)``, ``stats (2, N, g, L)``; returns ``dq (N, g, L, E)``,
    ``dk (N, S, E)``, ``dv (N, S, Ev)`` and ``dmask`` of the mask's shape (or ``None``).
    """
    N, g, L, _ = pb.q.shape
    S = pb.k.shape[1]
    d_out = d_out.contiguous()
    # rowsum(dO * O) = rowsum(dP * P): the softmax backward's correction, dropout included.
    delta = (d_out * out).sum(dim=-1)  # (N, g, L)
    units = _units(N, g, L, S, pb.block_l, pb.block_s)
    by_chunk = _split_by_chunk(units)
    workers = _worker_count()
    mask = pb.mask

    def zeros(shared: _Grads | None) -> _Grads:
        # dq rows never overlap between workers; dk/dv/dmask may unless split by chunk.
        return _Grads(
            shared.dq if shared else torch.zeros_like(pb.q),
            shared.dk_t if shared and by_chunk else pb.k.new_zeros(N, pb.k.shape[2], S),
            shared.dv_t if shared and by_chunk else pb.v.new_zeros(N, pb.v.shape[2], S),
            torch.zeros(mask.shape, dtype=pb.q.dtype, device=pb.q.device)
            if want_dmask and mask is not None
            else None,
        )

    grads = [zeros(None)]
    grads += [zeros(grads[0]) for _ in range(1, workers)]

    def work(part: list[_Unit], w: int) -> None:
        _backward_units(pb, part, d_out, delta, stats, grads[w])

    with _autocast_off(pb.q.device):
        used = _run(units, N * g * L * S, work, by_chunk, pb.cost)
    total = grads[0]
    for extra in grads[1:used]:
        if not by_chunk:
            total.dk_t.add_(extra.dk_t)
            total.dv_t.add_(extra.dv_t)
        if total.dmask is not None and extra.dmask is not None:
            total.dmask.add_(extra.dmask)
    dmask = None if total.dmask is None or mask is None else total.dmask.to(mask.dtype)
    dk = total.dk_t.transpose(1, 2).contiguous()  # (N, S, E)
    dv = total.dv_t.transpose(1, 2).contiguous()  # (N, S, Ev)
    return total.dq, dk, dv, dmask


class _ChunkedAttention(torch.autograd.Function):
    """Eager mode: online-softmax attention; the backward recomputes tiles from saved rows.

    It saves only ``(q, k, v, out, stats)`` (and the mask), never an ``(L, S)`` tensor.

    Eager calls run the tile ops in the open (a ``TorchDispatchMode`` sees each one);
    compiled ones go through the custom operators below, which share the same code.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        mask_index: Tensor | None,
        causal: int | None,
        scale: float,
        dropout_p: float,
        seed: int,
        block_l: int,
        block_s: int,
    ) -> Tensor:
        """``q (N, g, L, E)``, ``k (N, S, E)``, ``v (N, S, Ev)``, mask ``(M, g', L', S')``."""
        config = (causal, scale, dropout_p, seed, block_l, block_s)
        out, stats = _forward(q, k, v, mask, mask_index, *config)
        ctx.save_for_backward(q, k, v, out, stats, mask, mask_index)
        ctx.config = config
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, d_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, stats, mask, mask_index = ctx.saved_tensors
        pb = _Problem(q, k, v, mask, mask_index, *ctx.config)
        want_dmask = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]
        dq, dk, dv, dmask = _backward(pb, d_out, out, stats, want_dmask)
        return dq, dk, dv, dmask, None, None, None, None, None, None, None


# Under torch.compile the kernel is two custom operators with an autograd formula:
# the compiler (fullgraph included) keeps each as one opaque op of known output shape
# instead of tracing the tile loops, the thread pool and the dropout seed, which it cannot.


@torch.library.custom_op(
    "transformer::chunked_attention_forward",
    mutates_args=(),
    tags=(torch.Tag.nondeterministic_seeded,),  # draws the dropout seed: never merge calls
)
def _forward_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    mask_index: Tensor | None,
    causal: int | None,
    scale: float,
    dropout_p: float,
    block_l: int,
    block_s: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_forward` plus the dropout seed it drew, a 0-dim int64 tensor (0 without dropout)."""
    seed = _draw_seed(dropout_p)
    out, stats = _forward(
        q, k, v, mask, mask_index, causal, scale, dropout_p, seed, block_l, block_s
    )
    return out, stats, torch.tensor(seed, dtype=torch.int64)


@_forward_op.register_fake
def _forward_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    mask_index: Tensor | None,
    causal: int | None,
    scale: float,
    dropout_p: float,
    block_l: int,
    block_s: int,
) -> tuple[Tensor, Tensor, Tensor]:
    N, g, L, _ = q.shape
    out = q.new_empty(N, g, L, v.shape[2])
    return out, q.new_empty(2, N, g, L), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("transformer::chunked_attention_backward", mutates_args=())
def _backward_op(
    d_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    stats: Tensor,
    seed: Tensor,
    mask: Tensor | None,
    mask_index: Tensor | None,
    causal: int | None,
    scale: float,
    dropout_p: float,
    block_l: int,
    block_s: int,
    want_dmask: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_backward`; ``dmask`` is empty ``(0,)`` unless ``want_dmask`` (ops return tensors)."""
    config = (causal, scale, dropout_p, int(seed.item()), block_l, block_s)
    pb = _Problem(q, k, v, mask, mask_index, *config)
    dq, dk, dv, dmask = _backward(pb, d_out, out, stats, want_dmask)
    return dq, dk, dv, q.new_empty(0) if dmask is None else dmask


@_backward_op.register_fake
def _backward_fake(
    d_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    stats: Tensor,
    seed: Tensor,
    mask: Tensor | None,
    mask_index: Tensor | None,
    causal: int | None,
    scale: float,
    dropout_p: float,
    block_l: int,
    block_s: int,
    want_dmask: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dmask = mask.new_empty(mask.shape) if want_dmask and mask is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    q, k, v, mask, mask_index, causal, scale, dropout_p, block_l, block_s = inputs
    out, stats, seed = output
    ctx.save_for_backward(q, k, v, out, stats, seed, mask, mask_index)
    ctx.config = (causal, scale, dropout_p, block_l, block_s)


def _op_backward(
    ctx: Any, d_out: Tensor, d_stats: Tensor | None, d_seed: Tensor | None
) -> tuple[Tensor | None, ...]:
    """Only ``out`` is differentiable: ``stats`` and the seed are the backward's own inputs."""
    q, k, v, out, stats, seed, mask, mask_index = ctx.saved_tensors
    want_dmask = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = _backward_op(
        d_out, q, k, v, out, stats, seed, mask, mask_index, *ctx.config, want_dmask
    )
    return dq, dk, dv, dmask if want_dmask else None, None, None, None, None, None, None


_forward_op.register_autograd(_op_backward, setup_context=_setup_context)


def _draw_seed(dropout_p: float) -> int:
    """The call's dropout seed: one draw from the global generator (``torch.manual_seed``)."""
    # On the CPU whatever the default device (a meta tensor holds no value to read).
    return int(torch.randint(0, 2**62, (1,), device="cpu").item()) if dropout_p > 0.0 else 0


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
        attn_mask = _unexpanded(attn_mask)
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
    if torch.compiler.is_compiling():
        out = _forward_op(
            q, k, v, mask, mask_index, causal, scale_factor, dropout_p, block_l, block_s
        )[0]  # (N, g, L, Ev)
    else:
        seed = _draw_seed(dropout_p)
        out = _ChunkedAttention.apply(
            q, k, v, mask, mask_index, causal, scale_factor, dropout_p, seed, block_l, block_s
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
