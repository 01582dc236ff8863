"""Conformance suite of scaled dot-product attention (paper section 3.2.1, equation 1).

Every test that takes the ``kernel`` and ``device`` fixtures runs once per registered
kernel on every device where it is available (see ``conftest.py``), so a kernel
registered later is held to the same bar without a line changed here, and
``pytest spec_tests/test_attention.py --attention-kernel package.module:function``
runs this very suite against an outside function of torch's SDPA signature.

Two references: ``torch.nn.functional.scaled_dot_product_attention`` and
:func:`paper_attention` below, equation 1 written plainly in float64 from the paper,
independently of the package. Equivalence is checked in the forward pass and in the
gradients of query, key, value and a float mask.

Notation: B batch, H heads, L target/query length, S source/key length, E query/key
head dim (``d_k``), Ev value head dim (``d_v``).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import transformer
from transformer import attention as attention_module
from transformer.testing import assert_close, assert_error_within_reference

spec = functools.partial(pytest.mark.spec, component="attention")

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------
# The float64 paper-math reference and small helpers.
# --------------------------------------------------------------------------------------


def paper_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``softmax(Q K^T / sqrt(d_k) + mask) V`` in float64 (equation 1), written from the paper.

    Shapes: query ``(..., L, E)``, key ``(..., S, E)``, value ``(..., S, Ev)``; SDPA mask
    convention (bool True = may attend, float added). A row with no allowed key
    gives zeros, the package's guarantee; no code of the package is used.
    """
    q, k, v = query.double(), key.double(), value.double()
    if enable_gqa:
        # Each key/value head serves a contiguous group of query heads.
        group = q.size(-3) // k.size(-3)
        k = k.repeat_interleave(group, dim=-3)
        v = v.repeat_interleave(group, dim=-3)
    L, S = q.size(-2), k.size(-2)
    factor = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * factor  # (..., L, S)
    allowed = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if is_causal:
        rows = torch.arange(L, device=q.device)[:, None]
        cols = torch.arange(S, device=q.device)[None, :]
        allowed = allowed & (cols <= rows)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask.double()
            allowed = allowed & (attn_mask != NEG_INF)
    has_key = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~allowed, NEG_INF).masked_fill(~has_key, 0.0)
    weights = torch.softmax(scores, dim=-1) * has_key
    return torch.matmul(weights, v)  # (..., L, Ev)


def randn(
    *shape: int, seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Tensor:
    """Seeded standard normal tensor, drawn on CPU so every device sees the same values."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def bool_mask(*shape: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """Random SDPA bool mask (True = may attend) with at least one allowed key per row."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(*shape, generator=gen) < 0.5
    keep = torch.randint(shape[-1], (*shape[:-1], 1), generator=gen)
    return mask.scatter(-1, keep, True).to(device)


def float_mask(
    *shape: int, seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Tensor:
    """Random additive mask: normal values with ``-inf`` where :func:`bool_mask` forbids."""
    allowed = bool_mask(*shape, seed=seed, device=device)
    values = randn(*shape, seed=seed + 1, device=device, dtype=dtype)
    return values.masked_fill(~allowed, NEG_INF)


def forward_backward(
    fn: Callable[..., Tensor], *tensors: Tensor, upstream_dtype: torch.dtype | None = None
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Output of ``fn(*tensors)`` and the gradients of every tensor for a fixed upstream gradient.

    The upstream gradient is a seeded random tensor rounded to ``upstream_dtype`` (default:
    the output's), so a float64 reference can be fed exactly what a float32 kernel saw.
    """
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in tensors)
    out = fn(*leaves)
    upstream = randn(*out.shape, seed=4242, dtype=upstream_dtype or out.dtype)
    upstream = upstream.to(device=out.device, dtype=out.dtype)
    grads = torch.autograd.grad(out, leaves, upstream)
    return out.detach(), grads


def assert_same_results(
    actual: tuple[Tensor, Sequence[Tensor]],
    expected: tuple[Tensor, Sequence[Tensor]],
    names: Sequence[str],
    *,
    scale: float = 1.0,
) -> None:
    """Compare an output and its gradients, naming the tensor that differs."""
    out, grads = actual
    out_ref, grads_ref = expected
    assert_close(out, out_ref.to(out.device), scale=scale, msg="output differs")
    for name, grad, grad_ref in zip(names, grads, grads_ref, strict=True):
        assert_close(grad, grad_ref.to(grad.device), scale=scale, msg=f"grad of {name} differs")


def kernel_fn(kernel: str, **kwargs: object) -> Callable[..., Tensor]:
    """``(q, k, v) -> out`` through the package front door with the kernel under test."""

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return transformer.scaled_dot_product_attention(q, k, v, kernel=kernel, **kwargs)  # type: ignore[arg-type]

    return fn


def qkv(
    q_shape: Sequence[int],
    k_shape: Sequence[int],
    v_shape: Sequence[int],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded query, key and value of the given shapes."""
    return (
        randn(*q_shape, seed=seed, device=device, dtype=dtype),
        randn(*k_shape, seed=seed + 1, device=device, dtype=dtype),
        randn(*v_shape, seed=seed + 2, device=device, dtype=dtype),
    )


# --------------------------------------------------------------------------------------
# Shapes.
# --------------------------------------------------------------------------------------


@spec(section="3.2.1", kind="shape")
def test_output_has_query_rows_and_value_features(kernel: str, device: torch.device) -> None:
    """Output is ``(..., L, Ev)`` for query ``(..., L, E)``, key ``(..., S, E)``, value ``(..., S, Ev)`` with Ev != E (§3.2.1: "values of dimension d_v")."""
    q, k, v = qkv((2, 3, 7, 12), (2, 3, 11, 12), (2, 3, 11, 5), device)
    out = transformer.scaled_dot_product_attention(q, k, v, kernel=kernel)
    assert out.shape == (2, 3, 7, 5)
    assert out.dtype == q.dtype
    assert out.device == q.device


@spec(section="torch", kind="shape")
@pytest.mark.parametrize(
    ("q_shape", "k_shape", "v_shape", "out_shape"),
    [
        ((2, 1, 7, 12), (1, 3, 11, 12), (3, 11, 5), (2, 3, 7, 5)),
        ((4, 7, 12), (11, 12), (11, 5), (4, 7, 5)),
        ((7, 12), (11, 12), (11, 5), (7, 5)),
        ((2, 2, 1, 7, 12), (2, 1, 3, 11, 12), (2, 1, 3, 11, 5), (2, 2, 3, 7, 5)),
    ],
    ids=["4d-broadcast", "3d-query-2d-kv", "unbatched", "5d"],
)
def test_batch_dims_broadcast_like_torch(
    kernel: str,
    device: torch.device,
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
) -> None:
    """Batch dims of query, key and value broadcast as in torch's SDPA, and each broadcast slice is equation 1 on that slice."""
    q, k, v = qkv(q_shape, k_shape, v_shape, device, dtype=torch.float64)
    ours = forward_backward(kernel_fn(kernel), q, k, v)
    assert ours[0].shape == out_shape
    assert_same_results(ours, forward_backward(paper_attention, q, k, v), "qkv")
    assert_same_results(ours, forward_backward(F.scaled_dot_product_attention, q, k, v), "qkv")


# --------------------------------------------------------------------------------------
# Equivalence with torch and with the float64 paper reference.
# --------------------------------------------------------------------------------------

EQUIVALENCE_SHAPES = [
    pytest.param((2, 3, 7, 12), (2, 3, 11, 12), (2, 3, 11, 12), id="B2-H3-L7-S11-E12"),
    pytest.param((1, 2, 1, 59), (1, 2, 97, 59), (1, 2, 97, 7), id="L1-S97-E59-Ev7"),
    pytest.param((2, 1, 97, 16), (2, 1, 33, 16), (2, 1, 33, 24), id="L97-S33-Ev24"),
    pytest.param((1, 1, 257, 59), (1, 1, 257, 59), (1, 1, 257, 59), id="L257-S257-E59"),
]


@spec(section="3.2.1", kind="equivalence")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(("q_shape", "k_shape", "v_shape"), EQUIVALENCE_SHAPES)
def test_matches_float64_paper_reference_forward_and_gradients(
    kernel: str,
    device: torch.device,
    dtype: torch.dtype,
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
) -> None:
    """Output and gradients of q, k, v equal equation 1 computed plainly in float64 (§3.2.1), at awkward sizes (L 1, 97, 257; E 59)."""
    q, k, v = qkv(q_shape, k_shape, v_shape, device, dtype=dtype, seed=1)
    ours = forward_backward(kernel_fn(kernel), q, k, v)
    exact = forward_backward(
        paper_attention, q.double(), k.double(), v.double(), upstream_dtype=dtype
    )
    assert_same_results(ours, exact, "qkv")


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(("q_shape", "k_shape", "v_shape"), EQUIVALENCE_SHAPES)
def test_matches_torch_sdpa_forward_and_gradients(
    kernel: str,
    device: torch.device,
    dtype: torch.dtype,
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
) -> None:
    """Output and gradients of q, k, v equal ``torch.nn.functional.scaled_dot_product_attention``'s."""
    q, k, v = qkv(q_shape, k_shape, v_shape, device, dtype=dtype, seed=2)
    ours = forward_backward(kernel_fn(kernel), q, k, v)
    assert_same_results(ours, forward_backward(F.scaled_dot_product_attention, q, k, v), "qkv")


# --------------------------------------------------------------------------------------
# Masks.
# --------------------------------------------------------------------------------------

# (B, H, L, S) = (2, 3, 5, 7); every mask below broadcasts to it.
MASK_SHAPES = [
    pytest.param((5, 7), id="L-S"),
    pytest.param((2, 1, 5, 7), id="B-1-L-S"),
    pytest.param((1, 7), id="1-S"),
    pytest.param((7,), id="S"),
    pytest.param((3, 1, 7), id="H-1-S"),
    pytest.param((2, 1, 1, 7), id="B-1-1-S-padding"),
    pytest.param((2, 3, 5, 7), id="B-H-L-S"),
]


@spec(section="3.2.3", kind="masking")
@pytest.mark.parametrize("mask_shape", MASK_SHAPES)
def test_bool_mask_broadcasts_and_matches_both_references(
    kernel: str, device: torch.device, mask_shape: tuple[int, ...]
) -> None:
    """A bool mask (True = may attend) of any shape broadcastable to (..., L, S) acts like its full expansion, as in torch's SDPA."""
    q, k, v = qkv((2, 3, 5, 12), (2, 3, 7, 12), (2, 3, 7, 6), device, seed=3)
    mask = bool_mask(*mask_shape, seed=4, device=device)
    ours = forward_backward(kernel_fn(kernel, attn_mask=mask), q, k, v)
    expanded = mask.expand(2, 3, 5, 7).contiguous()
    assert_same_results(
        ours, forward_backward(kernel_fn(kernel, attn_mask=expanded), q, k, v), "qkv"
    )
    assert_same_results(
        ours,
        forward_backward(
            functools.partial(paper_attention, attn_mask=mask),
            q.double(),
            k.double(),
            v.double(),
            upstream_dtype=q.dtype,
        ),
        "qkv",
    )
    # torch's SDPA rejects a 1-D mask although it broadcasts; compare with torch where it accepts.
    if mask.dim() >= 2:
        torch_fn = functools.partial(F.scaled_dot_product_attention, attn_mask=mask)
        assert_same_results(ours, forward_backward(torch_fn, q, k, v), "qkv")


@spec(section="3.2.3", kind="masking")
@pytest.mark.parametrize("mask_shape", MASK_SHAPES)
def test_float_mask_is_added_to_scores_with_gradient(
    kernel: str, device: torch.device, mask_shape: tuple[int, ...]
) -> None:
    """A float mask is added to the scores before the softmax; outputs and gradients of q, k, v and the mask match both references."""
    q, k, v = qkv((2, 3, 5, 12), (2, 3, 7, 12), (2, 3, 7, 6), device, seed=5)
    mask = float_mask(*mask_shape, seed=6, device=device)

    def ours_fn(q: Tensor, k: Tensor, v: Tensor, m: Tensor) -> Tensor:
        return transformer.scaled_dot_product_attention(q, k, v, attn_mask=m, kernel=kernel)

    def paper_fn(q: Tensor, k: Tensor, v: Tensor, m: Tensor) -> Tensor:
        return paper_attention(q, k, v, attn_mask=m)

    def torch_fn(q: Tensor, k: Tensor, v: Tensor, m: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    ours = forward_backward(ours_fn, q, k, v, mask)
    f64 = [t.double() for t in (q, k, v, mask)]
    names = ["query", "key", "value", "attn_mask"]
    assert_same_results(ours, forward_backward(paper_fn, *f64, upstream_dtype=q.dtype), names)
    if mask.dim() >= 2:  # torch's SDPA rejects 1-D masks
        assert_same_results(ours, forward_backward(torch_fn, q, k, v, mask), names)


@spec(section="3.2.3", kind="masking")
def test_float_mask_of_zeros_and_neg_inf_equals_bool_mask(
    kernel: str, device: torch.device
) -> None:
    """A float mask of 0 (allowed) and -inf (forbidden) gives the same result as the bool mask it encodes."""
    q, k, v = qkv((2, 2, 6, 8), (2, 2, 9, 8), (2, 2, 9, 8), device, seed=7)
    allowed = bool_mask(2, 1, 6, 9, seed=8, device=device)
    additive = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, NEG_INF)
    ours_bool = transformer.scaled_dot_product_attention(q, k, v, allowed, kernel=kernel)
    ours_float = transformer.scaled_dot_product_attention(q, k, v, additive, kernel=kernel)
    assert_close(ours_float, ours_bool)


@spec(section="3.2.3", kind="masking")
def test_masked_keys_are_ignored_whatever_their_values(kernel: str, device: torch.device) -> None:
    """Keys a bool mask forbids (False) have no influence, even with huge keys and values; the rest is attention over the allowed keys only."""
    q, k, v = qkv((1, 1, 4, 8), (1, 1, 10, 8), (1, 1, 10, 3), device, seed=9)
    allowed_cols = torch.tensor([0, 2, 3, 7, 9], device=device)
    mask = torch.zeros(10, dtype=torch.bool, device=device)
    mask[allowed_cols] = True
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[..., ~mask, :] = 1e4
    v_bad[..., ~mask, :] = 1e6
    masked = transformer.scaled_dot_product_attention(q, k_bad, v_bad, mask, kernel=kernel)
    subset = transformer.scaled_dot_product_attention(
        q, k[..., allowed_cols, :], v[..., allowed_cols, :], kernel=kernel
    )
    assert_close(masked, subset)


@spec(section="3.2.3", kind="masking")
def test_key_padding_mask_equals_attention_over_unpadded_prefix(
    kernel: str, device: torch.device
) -> None:
    """A (B, 1, 1, S) padding mask gives each batch element exactly the attention over its own unpadded keys."""
    lengths = [10, 4, 1]
    q, k, v = qkv((3, 2, 6, 12), (3, 2, 10, 12), (3, 2, 10, 5), device, seed=10)
    keep = torch.arange(10, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    padding = keep[:, None, None, :]  # (B, 1, 1, S)
    v_garbage = v.masked_fill(~keep[:, None, :, None], 1e6)
    out = transformer.scaled_dot_product_attention(q, k, v_garbage, padding, kernel=kernel)
    for b, n in enumerate(lengths):
        alone = transformer.scaled_dot_product_attention(
            q[b], k[b, :, :n], v[b, :, :n], kernel=kernel
        )
        assert_close(out[b], alone, msg=f"batch element {b} (length {n})")
        assert_close(out[b], paper_attention(q[b], k[b, :, :n], v[b, :, :n]).float())


# --------------------------------------------------------------------------------------
# Causal masking (section 3.2.3: "prevent leftward information flow").
# --------------------------------------------------------------------------------------

CAUSAL_SIZES = [
    pytest.param(5, 9, id="L5<S9"),
    pytest.param(7, 7, id="L7=S7"),
    pytest.param(9, 5, id="L9>S5"),
    pytest.param(1, 1, id="L1=S1"),
    pytest.param(97, 97, id="L97=S97"),
]


@spec(section="3.2.3", kind="masking")
@pytest.mark.parametrize(("L", "S"), CAUSAL_SIZES)
def test_is_causal_is_top_left_lower_triangular_like_torch(
    kernel: str, device: torch.device, L: int, S: int
) -> None:
    """``is_causal=True`` lets query i attend to keys 0..i (top-left aligned, also for L != S), in forward and gradients, like torch."""
    q, k, v = qkv((2, 2, L, 12), (2, 2, S, 12), (2, 2, S, 6), device, seed=11)
    ours = forward_backward(kernel_fn(kernel, is_causal=True), q, k, v)
    paper = functools.partial(paper_attention, is_causal=True)
    f64 = [t.double() for t in (q, k, v)]
    assert_same_results(ours, forward_backward(paper, *f64, upstream_dtype=q.dtype), "qkv")
    torch_fn = functools.partial(F.scaled_dot_product_attention, is_causal=True)
    assert_same_results(ours, forward_backward(torch_fn, q, k, v), "qkv")
    tril = torch.ones(L, S, dtype=torch.bool, device=device).tril()
    explicit = forward_backward(kernel_fn(kernel, attn_mask=tril), q, k, v)
    assert_same_results(ours, explicit, "qkv")


@spec(section="3.2.3", kind="masking")
@pytest.mark.parametrize(("L", "S"), [(6, 6), (4, 9), (9, 4)])
def test_causal_output_ignores_later_keys_and_values(
    kernel: str, device: torch.device, L: int, S: int
) -> None:
    """With ``is_causal=True``, changing key/value t changes no output row before t, and does change row t (§3.2.3 "preserve the auto-regressive property")."""
    q, k, v = qkv((1, 2, L, 8), (1, 2, S, 8), (1, 2, S, 8), device, seed=12)
    base = transformer.scaled_dot_product_attention(q, k, v, is_causal=True, kernel=kernel)
    for t in range(S):
        k2, v2 = k.clone(), v.clone()
        k2[..., t, :] += 3.0
        v2[..., t, :] += 5.0
        out = transformer.scaled_dot_product_attention(q, k2, v2, is_causal=True, kernel=kernel)
        assert_close(out[..., :t, :], base[..., :t, :], msg=f"rows before {t} saw key {t}")
        if t < L:
            assert not torch.allclose(out[..., t, :], base[..., t, :]), f"row {t} ignores key {t}"


@spec(section="3.2.3", kind="masking")
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize(("L", "S"), [(6, 6), (4, 9), (9, 4)])
def test_is_causal_with_attn_mask_applies_both(
    kernel: str, device: torch.device, mask_kind: str, L: int, S: int
) -> None:
    """``is_causal=True`` with an ``attn_mask`` applies both: a key must be allowed by each (torch rejects the pair, so it is compared with the intersected mask)."""
    q, k, v = qkv((2, 2, L, 8), (2, 2, S, 8), (2, 2, S, 5), device, seed=13)
    tril = torch.ones(L, S, dtype=torch.bool, device=device).tril()
    # Keep the diagonal (or the last key for rows past S) allowed so no row is left empty.
    keep = bool_mask(2, 1, L, S, seed=14, device=device)
    keep = keep | torch.eye(L, S, dtype=torch.bool, device=device)
    keep[..., S:, S - 1] = True
    if mask_kind == "bool":
        mask, intersected = keep, keep & tril
    else:
        values = randn(2, 1, L, S, seed=15, device=device)
        mask = values.masked_fill(~keep, NEG_INF)
        intersected = mask.masked_fill(~tril, NEG_INF)
    ours = forward_backward(kernel_fn(kernel, attn_mask=mask, is_causal=True), q, k, v)
    torch_fn = functools.partial(F.scaled_dot_product_attention, attn_mask=intersected)
    assert_same_results(ours, forward_backward(torch_fn, q, k, v), "qkv")
    paper = functools.partial(paper_attention, attn_mask=mask, is_causal=True)
    f64 = [t.double() for t in (q, k, v)]
    assert_same_results(ours, forward_backward(paper, *f64, upstream_dtype=q.dtype), "qkv")
    # The mask alone and causality alone both give something else: both really apply.
    mask_only = transformer.scaled_dot_product_attention(q, k, v, mask, kernel=kernel)
    causal_only = transformer.scaled_dot_product_attention(q, k, v, is_causal=True, kernel=kernel)
    assert not torch.allclose(ours[0], mask_only)
    assert not torch.allclose(ours[0], causal_only)


# --------------------------------------------------------------------------------------
# The scale 1/sqrt(d_k).
# --------------------------------------------------------------------------------------


@spec(section="3.2.1", kind="equivalence")
def test_default_scale_is_one_over_sqrt_head_dim(kernel: str, device: torch.device) -> None:
    """With ``scale=None`` the scores are divided by sqrt(d_k) = sqrt(E) (§3.2.1: "We scale the dot products by 1/sqrt(d_k)")."""
    E = 59
    q, k, v = qkv((2, 6, E), (2, 9, E), (2, 9, 4), device, dtype=torch.float64, seed=16)
    scores = q @ k.transpose(-2, -1)  # (B, L, S)
    expected = torch.softmax(scores / math.sqrt(E), dim=-1) @ v
    unscaled = torch.softmax(scores, dim=-1) @ v
    # The check has power: forgetting 1/sqrt(d_k) changes the result by far more than the tolerance.
    assert (expected - unscaled).abs().max() > 0.1
    out = transformer.scaled_dot_product_attention(q, k, v, kernel=kernel)
    assert_close(out, expected)


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("scale", [0.3, 2.0, 1e-3])
def test_explicit_scale_multiplies_scores_like_torch(
    kernel: str, device: torch.device, scale: float
) -> None:
    """An explicit ``scale`` replaces 1/sqrt(E) as the factor on Q K^T, as in torch's SDPA, in forward and gradients."""
    q, k, v = qkv((2, 2, 5, 10), (2, 2, 8, 10), (2, 2, 8, 3), device, seed=17)
    ours = forward_backward(kernel_fn(kernel, scale=scale), q, k, v)
    torch_fn = functools.partial(F.scaled_dot_product_attention, scale=scale)
    assert_same_results(ours, forward_backward(torch_fn, q, k, v), "qkv")
    paper = functools.partial(paper_attention, scale=scale)
    f64 = [t.double() for t in (q, k, v)]
    assert_same_results(ours, forward_backward(paper, *f64, upstream_dtype=q.dtype), "qkv")


@spec(section="3.2.1", kind="equivalence")
def test_zero_scale_averages_the_values(kernel: str, device: torch.device) -> None:
    """With ``scale=0`` every score is equal, so each output row is the mean of the values."""
    q, k, v = qkv((2, 3, 5, 10), (2, 3, 8, 10), (2, 3, 8, 4), device, seed=18)
    out = transformer.scaled_dot_product_attention(q, k, v, scale=0.0, kernel=kernel)
    assert_close(out, v.mean(dim=-2, keepdim=True).expand_as(out))


# --------------------------------------------------------------------------------------
# Rows with no key to attend to: zeros, zero gradients, never NaN.
# --------------------------------------------------------------------------------------


def _empty_row_masks(device: torch.device) -> Iterator[tuple[str, Tensor, bool]]:
    """``(name, mask, is_causal)`` whose rows (batch 0, row 1) and (batch 1, row 3) allow no key."""
    allowed = bool_mask(2, 1, 5, 7, seed=19, device=device)
    allowed[0, :, 1] = False
    allowed[1, :, 3] = False
    yield "bool all-False rows", allowed, False
    additive = randn(2, 1, 5, 7, seed=20, device=device).masked_fill(~allowed, NEG_INF)
    yield "float all -inf rows", additive, False
    # Causal + mask: row 1 may see keys 0..1 only, and the mask forbids exactly those.
    causal_empty = torch.ones(2, 1, 5, 7, dtype=torch.bool, device=device)
    causal_empty[0, :, 1, :2] = False
    causal_empty[1, :, 3, :4] = False
    yield "is_causal intersected with bool mask", causal_empty, True


@spec(section="extra", kind="masking")
def test_rows_with_no_allowed_key_give_zeros_and_zero_gradient(
    kernel: str, device: torch.device
) -> None:
    """A query row with no key it may attend to yields a zero output row and zero gradient, never NaN; the other rows are unaffected (SPEC §1)."""
    q, k, v = qkv((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 6), device, seed=21)
    for name, mask, causal in _empty_row_masks(device):

        def ours_fn(q: Tensor, k: Tensor, v: Tensor, m: Tensor = mask, c: bool = causal) -> Tensor:
            return transformer.scaled_dot_product_attention(
                q, k, v, attn_mask=m, is_causal=c, kernel=kernel
            )

        out, (gq, gk, gv) = forward_backward(ours_fn, q, k, v)
        for label, t in (("output", out), ("grad q", gq), ("grad k", gk), ("grad v", gv)):
            assert torch.isfinite(t).all(), f"{name}: {label} has NaN/inf"
        for b, row in ((0, 1), (1, 3)):
            assert torch.equal(out[b, :, row], torch.zeros_like(out[b, :, row])), name
            assert torch.equal(gq[b, :, row], torch.zeros_like(gq[b, :, row])), name
        paper = functools.partial(paper_attention, attn_mask=mask, is_causal=causal)
        f64 = [t.double() for t in (q, k, v)]
        expected = forward_backward(paper, *f64, upstream_dtype=q.dtype)
        assert_same_results((out, (gq, gk, gv)), expected, "qkv")


@spec(section="extra", kind="masking")
def test_fully_masked_float_mask_row_gets_zero_mask_gradient(
    kernel: str, device: torch.device
) -> None:
    """The gradient of a float mask is finite everywhere and zero on a row of all -inf (no NaN leaks into the mask's gradient)."""
    q, k, v = qkv((1, 2, 4, 8), (1, 2, 6, 8), (1, 2, 6, 8), device, seed=22)
    mask = float_mask(1, 2, 4, 6, seed=23, device=device)
    mask[0, 1, 2] = NEG_INF

    def ours_fn(q: Tensor, k: Tensor, v: Tensor, m: Tensor) -> Tensor:
        return transformer.scaled_dot_product_attention(q, k, v, attn_mask=m, kernel=kernel)

    _, grads = forward_backward(ours_fn, q, k, v, mask)
    g_mask = grads[3]
    assert torch.isfinite(g_mask).all()
    assert torch.equal(g_mask[0, 1, 2], torch.zeros_like(g_mask[0, 1, 2]))


@spec(section="extra", kind="shape")
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_empty_key_sequence_gives_zeros(kernel: str, device: torch.device, causal: bool) -> None:
    """With S = 0 there is no key to attend to, so the output is ``(..., L, Ev)`` zeros with zero query gradient."""
    q, k, v = qkv((2, 3, 5, 8), (2, 3, 0, 8), (2, 3, 0, 6), device, seed=24)
    out, (gq, gk, gv) = forward_backward(kernel_fn(kernel, is_causal=causal), q, k, v)
    assert out.shape == (2, 3, 5, 6)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(gq, torch.zeros_like(gq))
    assert gk.shape == k.shape and gv.shape == v.shape


# --------------------------------------------------------------------------------------
# Grouped-query attention.
# --------------------------------------------------------------------------------------


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize(("hq", "hk"), [(6, 2), (4, 1), (3, 3)])
def test_enable_gqa_equals_repeated_key_value_heads_and_torch(
    kernel: str, device: torch.device, hq: int, hk: int
) -> None:
    """``enable_gqa=True`` equals attention with each key/value head repeated (repeat_interleave) for its query-head group, and torch's ``enable_gqa``."""
    q, k, v = qkv((2, hq, 5, 8), (2, hk, 7, 8), (2, hk, 7, 6), device, seed=25)
    mask = bool_mask(5, 7, seed=26, device=device)
    ours = forward_backward(kernel_fn(kernel, attn_mask=mask, enable_gqa=True), q, k, v)
    group = hq // hk

    def repeated(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k = k.repeat_interleave(group, dim=-3)
        v = v.repeat_interleave(group, dim=-3)
        return transformer.scaled_dot_product_attention(q, k, v, mask, kernel=kernel)

    assert_same_results(ours, forward_backward(repeated, q, k, v), "qkv")
    torch_fn = functools.partial(F.scaled_dot_product_attention, attn_mask=mask, enable_gqa=True)
    assert_same_results(ours, forward_backward(torch_fn, q, k, v), "qkv")


# --------------------------------------------------------------------------------------
# Dropout on the attention weights.
# --------------------------------------------------------------------------------------


@spec(section="torch", kind="equivalence")
def test_dropout_zero_is_deterministic(kernel: str, device: torch.device) -> None:
    """With ``dropout_p=0`` two calls on the same input give bit-identical outputs."""
    q, k, v = qkv((2, 2, 9, 8), (2, 2, 13, 8), (2, 2, 13, 8), device, seed=27)
    first = transformer.scaled_dot_product_attention(q, k, v, dropout_p=0.0, kernel=kernel)
    second = transformer.scaled_dot_product_attention(q, k, v, dropout_p=0.0, kernel=kernel)
    assert torch.equal(first, second)


@spec(section="torch", kind="equivalence")
def test_dropout_is_reproducible_under_manual_seed(kernel: str, device: torch.device) -> None:
    """With ``dropout_p > 0``, the same ``torch.manual_seed`` gives the same output, and a dropped output differs from the undropped one."""
    q, k, v = qkv((2, 2, 9, 8), (2, 2, 13, 8), (2, 2, 13, 8), device, seed=28)
    torch.manual_seed(1234)
    first = transformer.scaled_dot_product_attention(q, k, v, dropout_p=0.5, kernel=kernel)
    torch.manual_seed(1234)
    second = transformer.scaled_dot_product_attention(q, k, v, dropout_p=0.5, kernel=kernel)
    assert torch.equal(first, second)
    undropped = transformer.scaled_dot_product_attention(q, k, v, kernel=kernel)
    assert not torch.allclose(first, undropped)


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("p", [0.25, 0.6])
def test_dropout_keeps_expectation_and_drops_with_probability_p(
    kernel: str, device: torch.device, p: float
) -> None:
    """Dropout on the attention weights is unbiased (weights kept are scaled by 1/(1-p)) and drops each weight with probability p.

    One query row is repeated N times, so the N output rows are independent draws of
    ``sum_j W_j m_j v_j / (1-p)`` with ``m_j ~ Bernoulli(1-p)``: their mean must be the
    undropped output within 6 standard errors, and their variance
    ``p/(1-p) * sum_j W_j^2 v_j^2`` within 15%. Both bounds are judged from the
    samples themselves, so any kernel's random stream passes if it is a fair one.
    """
    N, S, E = 8192, 8, 8
    q_row, k, v = qkv(
        (1, 1, 1, E), (1, 1, S, E), (1, 1, S, 4), device, dtype=torch.float64, seed=29
    )
    q = q_row.expand(1, 1, N, E).contiguous()
    torch.manual_seed(0)
    samples = transformer.scaled_dot_product_attention(q, k, v, dropout_p=p, kernel=kernel)[0, 0]
    weights = torch.softmax(q_row @ k.transpose(-2, -1) / math.sqrt(E), dim=-1)[0, 0, 0]  # (S,)
    exact = weights @ v[0, 0]  # (Ev,)
    mean, std = samples.mean(dim=0), samples.std(dim=0)
    assert (mean - exact).abs().le(6 * std / math.sqrt(N) + 1e-12).all(), (mean, exact)
    predicted_var = p / (1 - p) * (weights[:, None] ** 2 * v[0, 0] ** 2).sum(dim=0)
    assert torch.allclose(std**2, predicted_var, rtol=0.15), (std**2, predicted_var)


# --------------------------------------------------------------------------------------
# Low precision: judged against the reference math's own error in that dtype.
# --------------------------------------------------------------------------------------


@spec(section="extra", kind="equivalence")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_low_precision_error_within_twice_reference_error(
    kernel: str, device: torch.device, dtype: torch.dtype, causal: bool
) -> None:
    """In fp16/bf16 the error against float64 math is at most 2x the error of the reference kernel run in the same dtype, forward and gradients (FlashAttention's rule)."""
    q, k, v = qkv((2, 3, 33, 40), (2, 3, 47, 40), (2, 3, 47, 24), device, dtype=dtype, seed=30)
    mask = float_mask(2, 1, 33, 47, seed=31, device=device, dtype=dtype)

    def run(name: str) -> Callable[..., Tensor]:
        return kernel_fn(name, attn_mask=mask, is_causal=causal)

    ours = forward_backward(run(kernel), q, k, v)
    ref_low = forward_backward(run("reference"), q, k, v)
    paper = functools.partial(paper_attention, attn_mask=mask, is_causal=causal)
    exact = forward_backward(paper, *(t.double() for t in (q, k, v)), upstream_dtype=dtype)
    assert_error_within_reference(ours[0], ref_low[0], exact[0], msg="output")
    for name, g, g_ref, g_exact in zip("qkv", ours[1], ref_low[1], exact[1], strict=True):
        assert g.dtype == dtype
        assert_error_within_reference(g, g_ref, g_exact, msg=f"grad of {name}")


# --------------------------------------------------------------------------------------
# Bad input: ValueError/TypeError naming the argument and what was seen.
# --------------------------------------------------------------------------------------


def _t(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.zeros(*shape, dtype=dtype)


@spec(section="extra", kind="error")
def test_mismatched_head_dims_raise_value_error() -> None:
    """Query and key with different head dims E raise ValueError naming both shapes."""
    with pytest.raises(ValueError, match=r"query.*\(2, 5, 8\).*key.*\(2, 7, 6\)"):
        transformer.scaled_dot_product_attention(_t(2, 5, 8), _t(2, 7, 6), _t(2, 7, 6))


@spec(section="extra", kind="error")
def test_key_value_length_mismatch_raises_value_error() -> None:
    """Key and value with different sequence lengths S raise ValueError naming both shapes."""
    with pytest.raises(ValueError, match=r"key.*\(2, 7, 8\).*value.*\(2, 6, 8\)"):
        transformer.scaled_dot_product_attention(_t(2, 5, 8), _t(2, 7, 8), _t(2, 6, 8))


@spec(section="extra", kind="error")
def test_batch_dims_that_do_not_broadcast_raise_value_error() -> None:
    """Batch dims of query, key and value that do not broadcast raise ValueError with the shapes seen."""
    with pytest.raises(ValueError, match=r"broadcast.*\(2, 3, 5, 8\).*\(2, 4, 7, 8\)"):
        transformer.scaled_dot_product_attention(_t(2, 3, 5, 8), _t(2, 4, 7, 8), _t(2, 4, 7, 8))


@spec(section="extra", kind="error")
@pytest.mark.parametrize("mask_shape", [(5, 6), (4, 5, 7), (2, 2, 5, 7), (7, 5)])
def test_mask_of_wrong_shape_raises_value_error(mask_shape: tuple[int, ...]) -> None:
    """A mask that does not broadcast to (..., L, S) raises ValueError naming attn_mask and its shape."""
    shape_text = str(mask_shape).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=rf"attn_mask.*{shape_text}"):
        transformer.scaled_dot_product_attention(
            _t(2, 3, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 8), attn_mask=_t(*mask_shape)
        )


@spec(section="extra", kind="error")
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.int32])
def test_integer_mask_raises_naming_attn_mask_and_dtype(dtype: torch.dtype) -> None:
    """An integer attn_mask (neither bool nor float) is rejected with an error naming attn_mask and the dtype."""
    with pytest.raises((ValueError, TypeError), match=rf"attn_mask.*{dtype}"):
        transformer.scaled_dot_product_attention(
            _t(2, 5, 8), _t(2, 7, 8), _t(2, 7, 8), attn_mask=_t(5, 7, dtype=dtype)
        )


@spec(section="extra", kind="error")
@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_outside_unit_interval_raises_value_error(p: float) -> None:
    """``dropout_p`` outside [0, 1) raises ValueError naming dropout_p and the value."""
    with pytest.raises(ValueError, match=rf"dropout_p.*\[0, 1\).*{p}"):
        transformer.scaled_dot_product_attention(_t(2, 5, 8), _t(2, 7, 8), _t(2, 7, 8), dropout_p=p)


@spec(section="extra", kind="error")
def test_unknown_kernel_raises_value_error_listing_known_kernels() -> None:
    """An unknown kernel name raises ValueError that names it and lists the registered kernels."""
    with pytest.raises(ValueError, match=r"unknown kernel 'no-such-kernel'.*'reference'.*'torch'"):
        transformer.scaled_dot_product_attention(
            _t(2, 5, 8), _t(2, 7, 8), _t(2, 7, 8), kernel="no-such-kernel"
        )


@spec(section="extra", kind="error")
def test_non_tensor_query_raises_type_error() -> None:
    """A query that is not a tensor raises TypeError naming query and the type seen."""
    with pytest.raises(TypeError, match=r"query must be a torch.Tensor, got list"):
        transformer.scaled_dot_product_attention([[0.0] * 8] * 5, _t(7, 8), _t(7, 8))  # type: ignore[arg-type]


@spec(section="extra", kind="error")
@pytest.mark.parametrize("name", ["query", "key", "value"])
def test_integer_inputs_raise_naming_the_argument(name: str) -> None:
    """An integer query, key or value is rejected with an error naming the argument and its dtype."""
    args = {"query": _t(2, 5, 8), "key": _t(2, 7, 8), "value": _t(2, 7, 8)}
    args[name] = args[name].long()
    with pytest.raises((TypeError, ValueError), match=rf"{name}.*torch.int64"):
        transformer.scaled_dot_product_attention(**args)


@spec(section="extra", kind="error")
@pytest.mark.parametrize(("hq", "hk"), [(6, 4), (4, 8)])
def test_gqa_with_non_dividing_heads_raises_value_error(hq: int, hk: int) -> None:
    """``enable_gqa=True`` with key/value heads that do not divide the query heads raises ValueError naming both head counts."""
    with pytest.raises(ValueError, match=rf"enable_gqa.*query heads {hq}.*key heads {hk}"):
        transformer.scaled_dot_product_attention(
            _t(2, hq, 5, 8), _t(2, hk, 7, 8), _t(2, hk, 7, 8), enable_gqa=True
        )


@spec(section="extra", kind="error")
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {
                "key": torch.zeros(2, 7, 8, device="meta"),
                "value": torch.zeros(2, 7, 8, device="meta"),
            },
            "query, key and value must be on one device, got query cpu, key meta, value meta",
        ),
        (
            {"attn_mask": torch.ones(5, 7, dtype=torch.bool, device="meta")},
            "attn_mask is on meta but query is on cpu",
        ),
    ],
    ids=["key-value", "mask"],
)
def test_inputs_on_another_device_raise_naming_both_devices(
    kwargs: dict[str, Tensor], match: str
) -> None:
    """Key/value or a mask on another device than the query (here torch's "meta" device) raise ValueError naming the devices, before any kernel runs."""
    args = {"query": _t(2, 5, 8), "key": _t(2, 7, 8), "value": _t(2, 7, 8), **kwargs}
    with pytest.raises(ValueError, match=re.escape(match)):
        transformer.scaled_dot_product_attention(**args)


@spec(section="extra", kind="error")
def test_gqa_without_a_heads_dimension_raises_value_error() -> None:
    """``enable_gqa=True`` with 2-D inputs (no heads dimension to group) raises ValueError naming the three shapes."""
    with pytest.raises(ValueError, match=r"needs a heads dimension .*query \(5, 8\), key \(7, 8\)"):
        transformer.scaled_dot_product_attention(_t(5, 8), _t(7, 8), _t(7, 8), enable_gqa=True)


# --------------------------------------------------------------------------------------
# The kernel registry.
# --------------------------------------------------------------------------------------


@pytest.fixture
def registered_names() -> Iterator[list[str]]:
    """Names the test registers; removed from the registry afterwards, so no other test sees them."""
    names: list[str] = []
    yield names
    for name in names:
        attention_module._KERNELS.pop(name, None)


@spec(section="extra", kind="equivalence")
def test_registered_kernel_is_listed_and_dispatched_to(registered_names: list[str]) -> None:
    """A kernel added with ``register_kernel`` is listed by ``available_kernels`` and receives the validated arguments when named."""
    calls: list[dict[str, object]] = []
    sentinel = torch.full((2, 5, 3), 7.0)

    def toy(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        calls.append({"attn_mask": attn_mask, "is_causal": is_causal, "scale": scale})
        return sentinel

    registered_names.append("toy-spec-kernel")
    transformer.register_kernel("toy-spec-kernel", toy)
    assert "toy-spec-kernel" in transformer.available_kernels("cpu")
    mask = torch.ones(5, 7, dtype=torch.bool)
    out = transformer.scaled_dot_product_attention(
        _t(2, 5, 8),
        _t(2, 7, 8),
        _t(2, 7, 3),
        mask,
        is_causal=True,
        scale=0.5,
        kernel="toy-spec-kernel",
    )
    assert out is sentinel
    assert len(calls) == 1
    seen_mask = calls[0]["attn_mask"]
    assert isinstance(seen_mask, Tensor) and torch.equal(seen_mask, mask)
    assert calls[0]["is_causal"] is True and calls[0]["scale"] == 0.5
    # Priority -1 (the default) keeps a user kernel from being picked implicitly.
    transformer.scaled_dot_product_attention(_t(2, 5, 8), _t(2, 7, 8), _t(2, 7, 3))
    assert len(calls) == 1


@spec(section="extra", kind="equivalence")
def test_kernel_unavailable_on_device_is_not_listed(registered_names: list[str]) -> None:
    """A kernel whose ``is_available`` says no for a device is not listed there, and naming it raises ValueError."""
    registered_names.append("nowhere-spec-kernel")
    transformer.register_kernel(
        "nowhere-spec-kernel", attention_module.reference_attention, is_available=lambda d: False
    )
    assert "nowhere-spec-kernel" not in transformer.available_kernels("cpu")
    with pytest.raises(ValueError, match=r"'nowhere-spec-kernel' is not available on device cpu"):
        transformer.scaled_dot_product_attention(
            _t(2, 5, 8), _t(2, 7, 8), _t(2, 7, 8), kernel="nowhere-spec-kernel"
        )


@spec(section="extra", kind="error")
def test_registering_a_non_callable_raises_type_error(registered_names: list[str]) -> None:
    """``register_kernel`` with a non-callable raises TypeError and registers nothing."""
    registered_names.append("not-callable")
    with pytest.raises(TypeError, match=r"fn must be callable, got int"):
        transformer.register_kernel("not-callable", 3)  # type: ignore[arg-type]
    assert "not-callable" not in transformer.available_kernels("cpu")


@spec(section="extra", kind="error")
@pytest.mark.parametrize("name", ["", 3, None], ids=["empty", "int", "None"])
def test_registering_under_a_name_that_is_not_a_string_raises_type_error(name: object) -> None:
    """``register_kernel`` with an empty or non-string name raises TypeError quoting it, and the registry is unchanged."""
    before = transformer.available_kernels("cpu")
    with pytest.raises(TypeError, match=re.escape(f"name must be a non-empty str, got {name!r}")):
        transformer.register_kernel(name, attention_module.reference_attention)  # type: ignore[arg-type]
    assert transformer.available_kernels("cpu") == before


@spec(section="extra", kind="equivalence")
def test_builtin_kernels_are_available_on_cpu() -> None:
    """The "reference" and "torch" kernels are always available on CPU."""
    names = transformer.available_kernels("cpu")
    assert {"reference", "torch"} <= set(names)
