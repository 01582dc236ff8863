"""Laws of scaled dot-product attention (paper section 3.2.1, equation 1), checked with hypothesis.

Every law runs once per kernel usable on the CPU (``transformer.available_kernels("cpu")``),
so a kernel registered later is held to the same laws without a line changed here. The
strategies draw awkward sizes on purpose: sequence lengths 1..300 (mostly small, to stay
fast, and often not a multiple of 16/32/64/128, so block kernels meet ragged edges), head
dims 1..80, zero to two leading batch dims with broadcast 1s, and masks with rows that
allow no key at all. The chunked kernel's blocks (512 rows and keys by default, more than
any drawn length) are drawn too, down to 8, so that its online softmax merges key blocks
and its query blocks split rows. Hypothesis draws sizes and seeds; tensors come from seeded
``torch.Generator`` s, which keeps examples cheap and reproducible.

Profiles (``ci``, ``dev``, ``thorough``) live in ``conftest.py``; ``HYPOTHESIS_PROFILE``
picks one.

Notation: B batch, H heads (Hq query heads, Hk key/value heads), L target length,
S source length, E query/key head dim, Ev value head dim.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import transformer
from transformer.kernels import chunked
from transformer.testing import assert_close

spec = functools.partial(pytest.mark.spec, component="attention", section="3.2.1", kind="property")

NEG_INF = float("-inf")
#: Most elements of the ``(..., L, S)`` score tensor one example may have (keeps examples fast).
SCORE_BUDGET = 60_000

#: Longest L and S run through a kernel interpreted on the CPU (Triton's interpreter runs
#: each tile in NumPy, about a thousand times slower than compiled code).
INTERPRETED_MAX_LEN = 40

KERNELS = [
    pytest.param(name, id=name, marks=[pytest.mark.triton] if name == "triton" else [])
    for name in transformer.available_kernels("cpu")
]


# --------------------------------------------------------------------------------------
# Float64 plain-math reference (independent of the package).
# --------------------------------------------------------------------------------------


def plain_weights(
    query: Tensor,
    key: Tensor,
    allowed: Tensor | None = None,
    additive: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """``softmax(Q K^T * scale + additive)`` over the ``allowed`` keys, in float64: ``(..., L, S)``.

    ``allowed`` (bool, True = may attend) and ``additive`` broadcast to ``(..., L, S)``;
    rows with no allowed key are zeros.
    """
    q, k = query.double(), key.double()
    factor = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * factor  # (..., L, S)
    if additive is not None:
        scores = scores + additive.double()
        finite = additive != NEG_INF
        allowed = finite if allowed is None else allowed & finite
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.expand(torch.broadcast_shapes(scores.shape, allowed.shape))
    has_key = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~allowed, NEG_INF).masked_fill(~has_key, 0.0)
    return torch.softmax(scores, dim=-1) * has_key


def plain_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    allowed: Tensor | None = None,
    additive: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """``softmax(Q K^T * scale + additive) V`` over the ``allowed`` keys, in float64; empty rows give 0.

    ``allowed`` (bool, True = may attend) and ``additive`` broadcast to ``(..., L, S)``.
    """
    weights = plain_weights(query, key, allowed, additive, scale)  # (..., L, S)
    return torch.matmul(weights, value.double())  # (..., L, Ev)


# --------------------------------------------------------------------------------------
# Strategies.
# --------------------------------------------------------------------------------------

# Mostly short sequences; one draw in four reaches up to 300, past several block sizes.
lengths = st.one_of(st.integers(1, 12), st.integers(1, 12), st.integers(1, 40), st.integers(1, 300))
head_dims = st.integers(1, 80)
# The chunked kernel's tile: its defaults, or (rows, keys) small enough to cut the drawn
# lengths into several blocks.
chunked_blocks = st.one_of(st.none(), st.tuples(st.integers(8, 64), st.integers(8, 64)))


@contextlib.contextmanager
def tiles(blocks: tuple[int, int] | None) -> Iterator[None]:
    """Within the block, the chunked kernel cuts its tiles to ``blocks`` (rows, keys)."""
    if blocks is None:
        yield
        return
    names = ("BLOCK_L", "BLOCK_S", "CAUSAL_BLOCK_L", "CAUSAL_BLOCK_S")
    saved = {name: getattr(chunked, name) for name in names}
    for name, size in zip(names, blocks * 2, strict=True):
        setattr(chunked, name, size)
    try:
        yield
    finally:
        for name, size in saved.items():
            setattr(chunked, name, size)


def randn(shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


@st.composite
def broadcast_variant(draw: st.DrawFn, batch: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that broadcasts to ``batch``: leading dims dropped, some dims set to 1."""
    drop = draw(st.integers(0, len(batch)))
    kept = batch[drop:]
    ones = draw(st.lists(st.booleans(), min_size=len(kept), max_size=len(kept)))
    return tuple(1 if one else n for n, one in zip(kept, ones, strict=True))


@st.composite
def batch_shapes(draw: st.DrawFn, max_numel: int, max_dims: int = 2) -> tuple[int, ...]:
    """Zero to ``max_dims`` leading dims of size 1..3 whose product is at most ``max_numel``."""
    dims: list[int] = []
    for _ in range(draw(st.integers(0, max_dims))):
        size = draw(st.integers(1, 3))
        if math.prod(dims) * size <= max_numel:
            dims.append(size)
    return tuple(dims)


@dataclass
class Problem:
    """One drawn attention call: tensors, masks in both forms and the expected shapes."""

    query: Tensor  # (..., L, E)
    key: Tensor  # (..., S, E)
    value: Tensor  # (..., S, Ev)
    attn_mask: Tensor | None  # SDPA convention, broadcasts to (..., L, S)
    is_causal: bool
    scale: float | None
    batch: tuple[int, ...]
    # The chunked kernel's (query rows, keys) per tile for this call; None: its defaults.
    blocks: tuple[int, int] | None = None

    @property
    def L(self) -> int:
        return self.query.size(-2)

    @property
    def S(self) -> int:
        return self.key.size(-2)

    def allowed(self) -> Tensor:
        """``(..., L, S)`` bool: which keys each query row may attend to (mask and causal)."""
        allowed = torch.ones((*self.batch, self.L, self.S), dtype=torch.bool)
        if self.attn_mask is not None:
            m = self.attn_mask
            allowed = allowed & (m if m.dtype == torch.bool else m != NEG_INF)
        if self.is_causal:
            allowed = allowed & torch.ones(self.L, self.S, dtype=torch.bool).tril()
        return allowed


@st.composite
def masks(
    draw: st.DrawFn, shape: tuple[int, ...], kind: str, seed: int, dtype: torch.dtype
) -> Tensor:
    """A random SDPA mask of ``shape`` (bool or float) with some rows allowing no key."""
    gen = torch.Generator().manual_seed(seed)
    density = draw(st.sampled_from([0.1, 0.5, 0.9]))
    allowed = torch.rand(shape, generator=gen) < density
    if draw(st.booleans()):
        empty_rows = torch.rand((*shape[:-1], 1), generator=gen) < 0.3
        allowed = allowed & ~empty_rows
    if kind == "bool":
        return allowed
    return randn(shape, seed + 1, dtype).masked_fill(~allowed, NEG_INF)


@st.composite
def problems(
    draw: st.DrawFn,
    *,
    mask_kinds: Sequence[str] = ("none", "bool", "float"),
    causal: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> Problem:
    """A random attention call: sizes, broadcast batch dims, mask, causal flag, scale."""
    L, S = draw(lengths), draw(lengths)
    E, Ev = draw(head_dims), draw(head_dims)
    batch = draw(batch_shapes(max(1, SCORE_BUDGET // (L * S))))
    seed = draw(st.integers(0, 2**16))
    q_batch = draw(broadcast_variant(batch))
    k_batch = draw(broadcast_variant(batch))
    v_batch = draw(broadcast_variant(batch))
    # The output batch is what the three broadcast to (a dropped or 1 dim may shrink it).
    out_batch = tuple(torch.broadcast_shapes(q_batch, k_batch, v_batch))
    kind = draw(st.sampled_from(mask_kinds))
    mask = None
    if kind != "none":
        mask_shape = (*draw(broadcast_variant(out_batch)), L, S)
        if draw(st.booleans()):
            mask_shape = mask_shape[-1:] if draw(st.booleans()) else (1, S)  # key-only masks
        mask = draw(masks(mask_shape, kind, seed + 3, dtype))
    return Problem(
        query=randn((*q_batch, L, E), seed, dtype),
        key=randn((*k_batch, S, E), seed + 1, dtype),
        value=randn((*v_batch, S, Ev), seed + 2, dtype),
        attn_mask=mask,
        is_causal=draw(st.booleans()) if causal is None else causal,
        # Explicit scales around 1/sqrt(E) keep scores unit-sized, as the paper's scaling
        # intends; arbitrary scales are the subject of the scale law (in float64).
        scale=draw(st.one_of(st.none(), st.floats(0.1, 2.0).map(lambda f: f / math.sqrt(E)))),
        batch=out_batch,
        blocks=draw(chunked_blocks),
    )


# --------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------


def forward_backward(
    fn: Callable[..., Tensor], tensors: Sequence[Tensor], upstream: Tensor
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``fn(*tensors)`` and the gradients of every tensor for the upstream gradient ``upstream``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype), allow_unused=True)
    return out.detach(), tuple(
        torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)
    )


def ours(kernel: str, p: Problem) -> Callable[..., Tensor]:
    """``(q, k, v[, float mask]) -> out`` through the package front door."""

    def fn(q: Tensor, k: Tensor, v: Tensor, *mask: Tensor) -> Tensor:
        with tiles(p.blocks):
            return transformer.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask[0] if mask else p.attn_mask,
                is_causal=p.is_causal,
                scale=p.scale,
                kernel=kernel,
            )

    return fn


def differentiable(p: Problem) -> list[Tensor]:
    """The tensors whose gradients are compared: q, k, v and a float mask."""
    tensors = [p.query, p.key, p.value]
    if p.attn_mask is not None and p.attn_mask.is_floating_point():
        tensors.append(p.attn_mask)
    return tensors


def sized_for(kernel: str, p: Problem) -> Problem:
    """``p`` cut to :data:`INTERPRETED_MAX_LEN` queries and keys when ``kernel`` is interpreted.

    Keeps the Triton kernel's run under ``TRITON_INTERPRET=1`` (``tox -e triton``) short;
    prefixes of q, k, v and the mask are a valid problem of the same kind.
    """
    interpreted = kernel == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    if not interpreted or max(p.L, p.S) <= INTERPRETED_MAX_LEN:
        return p
    L, S = min(p.L, INTERPRETED_MAX_LEN), min(p.S, INTERPRETED_MAX_LEN)
    mask = p.attn_mask
    if mask is not None:
        mask = mask[..., :S]
        if mask.dim() >= 2 and mask.size(-2) > 1:
            mask = mask[..., :L, :]
    return dataclasses.replace(
        p,
        query=p.query[..., :L, :],
        key=p.key[..., :S, :],
        value=p.value[..., :S, :],
        attn_mask=mask,
    )


def assert_results_close(
    actual: tuple[Tensor, Sequence[Tensor]],
    expected: tuple[Tensor, Sequence[Tensor]],
    what: str,
    grad_scale: float = 1.0,
    grad_slack: Sequence[Tensor | None] = (),
) -> None:
    """Compare output and gradients (q, k, v, mask), gradients with tolerance x ``grad_scale``.

    ``grad_slack``: per gradient, an elementwise bound of rounding error that the shared
    tolerance does not model (``None``: none); each difference is first reduced by it.
    """
    names = ["query", "key", "value", "attn_mask"]
    assert_close(actual[0], expected[0], msg=f"output differs from {what}")
    slack = [*grad_slack, *[None] * (len(names) - len(grad_slack))]
    for name, grad, grad_ref, bound in zip(names, actual[1], expected[1], slack, strict=False):
        if bound is not None:
            diff = grad.double() - grad_ref.double()
            grad = grad_ref.double() + diff.sign() * (diff.abs() - bound).clamp(min=0.0)
            grad = grad.to(actual[1][0].dtype)
        assert_close(
            grad, grad_ref, scale=grad_scale, msg=f"gradient of {name} differs from {what}"
        )


#: The unit roundoff of fp32 (half the distance from 1 to the next float).
FP32_UNIT_ROUNDOFF = 2.0**-24


def cancellation_bounds(p: Problem, upstream: Tensor) -> list[Tensor | None]:
    """Rounding bounds of the q, k, (v,) and mask gradients from the cancellation in ``dS``.

    ``dS = P * (dP - D)`` with ``dP = dO V^T`` and ``D = rowsum(dP * P)``, which
    FlashAttention-2 computes as ``rowsum(dO * O)``: two fp32 dot products over the
    ``Ev`` value features that cancel wherever ``P`` is nearly one-hot (with one key,
    ``dS`` is exactly 0). A correct fp32 kernel leaves each such difference off by about
    ``u * sqrt(Ev)`` times the sum of the magnitudes of the terms,
    ``P * (|dO| |V|^T + |dO| . (P |V|))``; a key's (or query's) gradient sums those
    over query rows (over keys), broadcast batch rows included, and independent
    roundings add root-sum-square. The shared fixed tolerance does not see this:
    a key shared by 3 x 140 query rows with a gradient of exactly 0 took 2.6e-5 from
    the chunked kernel against an atol of 2e-5. No slack for the value gradient
    (``P^T dO`` cancels nothing).
    """
    q, k, v = p.query.double(), p.key.double(), p.value.double()
    additive = p.attn_mask if p.attn_mask is not None and p.attn_mask.is_floating_point() else None
    weights = plain_weights(q, k, p.allowed(), additive, p.scale)  # (..., L, S)
    scale = 1.0 / math.sqrt(q.size(-1)) if p.scale is None else p.scale
    d_out, v_abs = upstream.double().abs(), v.abs()  # (..., L, Ev), (..., S, Ev)
    terms = d_out @ v_abs.transpose(-2, -1) + (d_out * (weights @ v_abs)).sum(-1, keepdim=True)
    per_ds = FP32_UNIT_ROUNDOFF * math.sqrt(v.size(-1)) * weights * terms  # (..., L, S)
    sq = per_ds.square()
    dq = (scale**2 * sq @ k.square()).sum_to_size(q.shape).sqrt()  # (..., L, E)
    dk = (scale**2 * sq.transpose(-2, -1) @ q.square()).sum_to_size(k.shape).sqrt()  # (..., S, E)
    bounds: list[Tensor | None] = [dq, dk, None]
    if additive is not None:
        bounds.append(sq.sum_to_size(additive.shape).sqrt())  # (mask shape)
    return bounds


# --------------------------------------------------------------------------------------
# Laws.
# --------------------------------------------------------------------------------------


@spec()
@pytest.mark.parametrize("kernel", KERNELS)
@given(p=problems())
def test_every_kernel_equals_float64_math_and_torch_sdpa(kernel: str, p: Problem) -> None:
    """Every kernel gives equation 1's output and gradients (q, k, v, float mask) in fp32 within the shared tolerances of a float64 plain-math reference and of torch's SDPA (gradients also within fp32's rounding bound of the cancellation in dS), for any sizes, broadcast batch dims, masks, causal flag and scale (§3.2.1)."""
    p = sized_for(kernel, p)
    upstream = randn((*p.batch, p.L, p.value.size(-1)), 99)
    allowed = p.allowed()
    has_key = allowed.any(dim=-1, keepdim=True)  # (..., L, 1)
    got = forward_backward(ours(kernel, p), differentiable(p), upstream)
    assert got[0].shape == (*p.batch, p.L, p.value.size(-1))

    def reference(q: Tensor, k: Tensor, v: Tensor, *mask: Tensor) -> Tensor:
        return plain_attention(q, k, v, allowed, mask[0] if mask else None, p.scale)

    f64 = [t.double() for t in differentiable(p)]
    exact = forward_backward(reference, f64, upstream.double())
    # Gradients x2: the gradient of a key or value shared through broadcast batch dims sums
    # over up to 9 x 300 query rows, one fp32 rounding each (the output sums over S only);
    # plus the rounding of dS's cancellation, which grows with the values' magnitudes.
    slack = cancellation_bounds(p, upstream)
    assert_results_close(got, exact, "float64 math", grad_scale=2.0, grad_slack=slack)

    # torch's SDPA run in float64, on every torch version: causal folded into the mask, the
    # mask made full-shape (torch rejects 1-D masks), empty rows given every key and then
    # ignored through a zero upstream gradient (older torch returns NaN there). In float64
    # because torch's own fp32 result carries fp32 rounding too; two fp32 results may
    # differ by twice the shared tolerance that each one meets against the exact value.
    def torch_sdpa(q: Tensor, k: Tensor, v: Tensor, *mask: Tensor) -> Tensor:
        m = mask[0] if mask else p.attn_mask
        full = (*p.batch, p.L, p.S)
        if m is None or m.dtype == torch.bool:
            m = allowed | ~has_key
        else:
            m = m.expand(full).masked_fill(~allowed, NEG_INF).masked_fill(~has_key, 0.0)
        # torch sizes the output from the query's batch dims: give all three the full batch.
        q, k, v = (t.expand(*p.batch, *t.shape[-2:]) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=p.scale)
        return out * has_key

    torch_result = forward_backward(torch_sdpa, f64, upstream.double())
    assert_results_close(
        got, torch_result, "torch SDPA (float64)", grad_scale=2.0, grad_slack=slack
    )


@spec()
@pytest.mark.parametrize("kernel", KERNELS)
@given(p=problems(causal=False, dtype=torch.float64), data=st.data())
def test_permuting_keys_with_values_leaves_output_unchanged(
    kernel: str, p: Problem, data: st.DataObject
) -> None:
    """Permuting the keys together with their values (and the mask's key axis) leaves the output unchanged and permutes the key/value gradients alike: attention is a weighted set sum over keys (§3.2.1)."""
    p = sized_for(kernel, p)
    perm = torch.tensor(data.draw(st.permutations(range(p.S))), dtype=torch.long)
    upstream = randn((*p.batch, p.L, p.value.size(-1)), 98, torch.float64)
    mask = p.attn_mask
    permuted = dataclasses.replace(
        p,
        key=p.key[..., perm, :],
        value=p.value[..., perm, :],
        attn_mask=None if mask is None else mask[..., perm],
    )
    out, (_, dk, dv) = forward_backward(ours(kernel, p), [p.query, p.key, p.value], upstream)
    out_p, (_, dk_p, dv_p) = forward_backward(
        ours(kernel, permuted), [permuted.query, permuted.key, permuted.value], upstream
    )
    assert_close(out_p, out)
    assert_close(dk_p, dk[..., perm, :])
    assert_close(dv_p, dv[..., perm, :])


@spec()
@pytest.mark.parametrize("kernel", KERNELS)
@given(p=problems(mask_kinds=("float",), dtype=torch.float64), data=st.data())
def test_adding_a_constant_to_a_float_mask_row_leaves_output_unchanged(
    kernel: str, p: Problem, data: st.DataObject
) -> None:
    """Adding a per-row constant to a float mask leaves the output unchanged: softmax is shift invariant (§3.2.1)."""
    p = sized_for(kernel, p)
    assert p.attn_mask is not None
    shift = data.draw(st.floats(-20.0, 20.0))
    rows = randn((*p.attn_mask.shape[:-1], 1), 97, torch.float64) * shift  # one constant per row
    shifted = dataclasses.replace(p, attn_mask=p.attn_mask + rows)
    base = ours(kernel, p)(p.query, p.key, p.value)
    assert_close(ours(kernel, shifted)(p.query, p.key, p.value), base)


@spec()
@pytest.mark.parametrize("kernel", KERNELS)
@given(
    p=problems(dtype=torch.float64),
    c=st.floats(-4.0, 4.0),
    s=st.one_of(st.none(), st.floats(0.01, 2.0)),
)
def test_scaling_query_by_c_equals_multiplying_scale_by_c(
    kernel: str, p: Problem, c: float, s: float | None
) -> None:
    """Attention of (c * Q) with scale s equals attention of Q with scale c * s (s defaulting to 1/sqrt(E)): the scores are (Q K^T) * scale (§3.2.1)."""
    p = sized_for(kernel, p)
    scaled_q = dataclasses.replace(p, query=p.query * c, scale=s)
    s_times_c = c * (1.0 / math.sqrt(p.query.size(-1)) if s is None else s)
    scaled_s = dataclasses.replace(p, scale=s_times_c)
    assert_close(
        ours(kernel, scaled_q)(scaled_q.query, p.key, p.value),
        ours(kernel, scaled_s)(p.query, p.key, p.value),
    )


@spec(section="3.2.3")
@pytest.mark.parametrize("kernel", KERNELS)
@given(p=problems(causal=True, dtype=torch.float64), data=st.data())
def test_causal_output_at_row_i_ignores_keys_after_i(
    kernel: str, p: Problem, data: st.DataObject
) -> None:
    """With ``is_causal=True``, changing keys and values after position t changes no output row up to t, whatever the mask (§3.2.3 "preserve the auto-regressive property")."""
    p = sized_for(kernel, p)
    t = data.draw(st.integers(0, p.S - 1))
    later = torch.arange(p.S) > t
    k2 = p.key.masked_fill(later[:, None], 0.0) + later[:, None] * 7.0
    v2 = p.value.masked_fill(later[:, None], 0.0) - later[:, None] * 11.0
    base = ours(kernel, p)(p.query, p.key, p.value)
    changed = ours(kernel, p)(p.query, k2, v2)
    rows = min(t + 1, p.L)
    assert_close(changed[..., :rows, :], base[..., :rows, :])


@spec()
@pytest.mark.parametrize("kernel", KERNELS)
@given(p=problems(mask_kinds=("bool", "float")), data=st.data())
def test_rows_with_no_allowed_key_are_exactly_zero_with_zero_gradient(
    kernel: str, p: Problem, data: st.DataObject
) -> None:
    """A query row whose mask allows no key gives an exactly zero output row, an exactly zero query gradient, and no NaN anywhere (our guarantee where plain softmax gives NaN)."""
    p = sized_for(kernel, p)
    assert p.attn_mask is not None
    # Make sure at least one row is empty: blank out one query row of the mask.
    row = data.draw(st.integers(0, p.L - 1))
    mask = p.attn_mask.expand((*p.attn_mask.shape[:-2], p.L, p.S)).clone()
    mask[..., row, :] = False if mask.dtype == torch.bool else NEG_INF
    p = dataclasses.replace(p, attn_mask=mask)
    empty = ~p.allowed().any(dim=-1)  # (..., L)
    upstream = randn((*p.batch, p.L, p.value.size(-1)), 96)
    out, grads = forward_backward(ours(kernel, p), differentiable(p), upstream)
    assert out.isfinite().all()
    assert all(g.isfinite().all() for g in grads), "a gradient has NaN/inf"
    assert torch.count_nonzero(out[empty]) == 0
    # A broadcast query sums its gradient over batch entries whose row may not be empty.
    if p.query.shape[:-2] == p.batch:
        assert torch.count_nonzero(grads[0][empty]) == 0


@st.composite
def gqa_problems(draw: st.DrawFn) -> tuple[Problem, int]:
    """A problem with a heads dim: query ``(B?, Hq, L, E)``, key/value ``(B?, Hk, S, E|Ev)``; and the group size."""
    kv_heads, groups = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    L = draw(lengths)
    S = draw(st.integers(1, max(1, min(300, SCORE_BUDGET // (L * kv_heads * groups)))))
    E, Ev = draw(head_dims), draw(head_dims)
    lead = draw(st.sampled_from([(), (1,), (2,)]))
    seed = draw(st.integers(0, 2**16))
    kind = draw(st.sampled_from(["none", "bool", "float"]))
    # Float64: the law is an identity, so fp32 rounding of a different summation order
    # (a kernel may handle groups natively) is not what it is about.
    dtype = torch.float64
    batch = (*lead, kv_heads * groups)
    # The mask may vary by query head (and batch): a kernel must map it to the right head.
    mask_shape = (*draw(broadcast_variant(batch)), L, S)
    mask = None if kind == "none" else draw(masks(mask_shape, kind, seed + 3, dtype))
    p = Problem(
        query=randn((*lead, kv_heads * groups, L, E), seed, dtype),
        key=randn((*lead, kv_heads, S, E), seed + 1, dtype),
        value=randn((*lead, kv_heads, S, Ev), seed + 2, dtype),
        attn_mask=mask,
        is_causal=draw(st.booleans()),
        scale=None,
        batch=batch,
        blocks=draw(chunked_blocks),
    )
    return p, groups


@spec()
@pytest.mark.parametrize("kernel", KERNELS)
@given(drawn=gqa_problems())
def test_grouped_query_attention_equals_repeated_key_value_heads(
    kernel: str, drawn: tuple[Problem, int]
) -> None:
    """``enable_gqa=True`` equals repeating each key/value head for its group of query heads (torch's ``repeat_interleave`` layout), in output and gradients of q, k, v, with masks shared by all heads or one per query head."""
    p, groups = drawn
    p = sized_for(kernel, p)
    upstream = randn((*p.batch, p.L, p.value.size(-1)), 95, torch.float64)

    def gqa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with tiles(p.blocks):
            return transformer.scaled_dot_product_attention(
                q, k, v, p.attn_mask, is_causal=p.is_causal, enable_gqa=True, kernel=kernel
            )

    def repeated(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_rep = k.repeat_interleave(groups, dim=-3)  # (..., Hq, S, E)
        v_rep = v.repeat_interleave(groups, dim=-3)  # (..., Hq, S, Ev)
        with tiles(p.blocks):
            return transformer.scaled_dot_product_attention(
                q, k_rep, v_rep, p.attn_mask, is_causal=p.is_causal, kernel=kernel
            )

    qkv = [p.query, p.key, p.value]
    assert_results_close(
        forward_backward(gqa, qkv, upstream),
        forward_backward(repeated, qkv, upstream),
        "repeated heads",
    )


@spec(kind="equivalence")
@given(
    shapes=st.lists(
        st.lists(st.sampled_from([0, 1, 2, 3]), min_size=0, max_size=4).map(tuple),
        min_size=1,
        max_size=3,
    )
)
def test_front_door_broadcast_agrees_with_torch_broadcast_shapes(
    shapes: list[tuple[int, ...]],
) -> None:
    """The front door's shape broadcast (a fast stand-in for ``torch.broadcast_shapes``) gives torch's broadcast shape, and ``None`` exactly where torch raises, for shapes with 0, 1 and other sizes."""
    from transformer.attention_checks import _broadcast

    try:
        want: tuple[int, ...] | None = tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        want = None
    assert _broadcast(*shapes) == want
