"""The tiles of the chunked kernel: its work units, one tile's scores, and the forward and
backward passes over a list of units (the math of :mod:`transformer.kernels.chunked`).

Shapes and notation as in :mod:`transformer.kernels.chunked`: ``q (N, g, L, E)``,
``k (N, S, E)``, ``v (N, S, Ev)``, a mask ``(M, g', L', S')``; a tile holds ``(c, R, w)``
scores of ``c`` slices, ``R = g * n`` query rows and ``w`` keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "Grads",
    "Problem",
    "Unit",
    "backward_units",
    "forward_units",
    "scores",
    "unexpanded",
]

_NEG_INF = float("-inf")
# Scores are kept in base 2: exp(x) = exp2(x * log2(e)).
_LOG2E = 1.0 / math.log(2.0)
# Spreads tile numbers over the seed space so neighbouring tiles get unrelated streams.
_SEED_STRIDE = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class Unit:
    """A unit of work: slices ``n0:n1`` (chunk ``chunk``), query rows ``i0:i1`` (block ``qi``)."""

    chunk: int
    n0: int
    n1: int
    qi: int
    i0: int
    i1: int


@dataclass(frozen=True)
class Problem:
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
    # Scores a tile holds at most, about: slices are grouped into chunks up to it.
    tile_elements: int
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
        :func:`scores`), and only the diagonal's upper triangle is computed in vain.
        """
        S = self.k.shape[1]
        end = S if self.causal is None else min(max(i1 + self.causal, 0), S)
        starts = range(0, end, self.block_s)
        return [(kj, j0, min(j0 + self.block_s, end)) for kj, j0 in enumerate(starts)]

    def cost(self, unit: Unit) -> int:
        """Scores the unit computes: slices x query rows x keys visited."""
        keys = sum(j1 - j0 for _, j0, j1 in self.key_blocks(unit.i0, unit.i1))
        return (unit.n1 - unit.n0) * (unit.i1 - unit.i0) * keys

    def tile_buffer(self) -> Tensor:
        """Scratch for one tile's scores, reused across tiles (fresh pages are slow)."""
        N = self.q.shape[0]
        return self.q.new_empty(min(N, self.slices_per_chunk()) * self._scores_per_slice())

    def slices_per_chunk(self) -> int:
        """Slices batched into one tile so that it holds about ``tile_elements`` scores."""
        return max(1, self.tile_elements // max(1, self._scores_per_slice()))

    def _scores_per_slice(self) -> int:
        """Scores of one slice in a full tile: ``g`` heads x query rows x key columns."""
        _, g, L, _ = self.q.shape
        return g * min(self.block_l, L) * min(self.block_s, self.k.shape[1])

    def units(self) -> list[Unit]:
        """The work units, chunk by chunk; they depend on the sizes only, not on thread count."""
        N, L = self.q.shape[0], self.q.shape[2]
        chunk = self.slices_per_chunk()
        return [
            Unit(ci, n0, min(n0 + chunk, N), qi, i0, min(i0 + self.block_l, L))
            for ci, n0 in enumerate(range(0, N, chunk))
            for qi, i0 in enumerate(range(0, L, self.block_l))
        ]


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
    return None if _finite_min(unexpanded(mask)) >= floor else floor


def unexpanded(t: Tensor) -> Tensor:
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


def _tile_seed(seed: int, unit: Unit, k_block: int) -> int:
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


def _mask_tile(pb: Problem, unit: Unit, j0: int, j1: int) -> Tensor | None:
    """The mask of a tile, ``(c or 1, g', n', w')``: a view, copied only when per-slice."""
    if pb.mask is None:
        return None
    rows, cols = _mask_rows_cols(pb.mask, unit.i0, unit.i1, j0, j1)
    if pb.mask_index is None:
        return pb.mask[:, :, rows, cols]
    return pb.mask[pb.mask_index[unit.n0 : unit.n1], :, rows, cols]


def scores(pb: Problem, unit: Unit, qb: Tensor, j0: int, j1: int, buf: Tensor) -> Tensor:
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


def forward_units(pb: Problem, units: list[Unit], out: Tensor, stats: Tensor) -> None:
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
            s = scores(pb, u, qb, j0, j1, buf)
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
class Grads:
    """Gradient accumulators of one worker: ``dq (N, g, L, E)``, ``dk_t (N, E, S)``,
    ``dv_t (N, Ev, S)`` (the key and value gradients transposed) and ``dmask``."""

    dq: Tensor
    dk_t: Tensor
    dv_t: Tensor
    dmask: Tensor | None


def backward_units(
    pb: Problem, units: list[Unit], d_out: Tensor, delta: Tensor, stats: Tensor, grads: Grads
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
            s = scores(pb, u, qb, j0, j1, buf)
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


def _add_mask_grad(pb: Problem, u: Unit, j0: int, j1: int, ds: Tensor, dmask: Tensor) -> None:
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
