"""torch's attention-bias objects as ``attn_mask``: every kernel answers what torch answers.

``torch.nn.attention.bias.causal_upper_left(L, S)`` and ``causal_lower_right(L, S)``
build a ``CausalBias``: a ``torch.Tensor`` subclass whose data means nothing (its
storage is uninitialised) and whose ``variant`` and sizes say which causal mask it
stands for. torch's ``F.scaled_dot_product_attention`` recognises it through
``__torch_function__`` (``CausalBias._dispatch``): upper-left is ``is_causal=True``,
lower-right keeps ``j <= i + S - L``. A kernel that reads it as a plain float tensor adds
garbage to the scores; these tests hold every CPU kernel, and the default pick, to
torch's answer in the forward pass and in the gradients of query, key and value.

One departure, the package's zero-row rule: with ``causal_lower_right`` and ``L > S`` the
first ``L - S`` queries have no key; they give zeros and zero gradient, never NaN (torch
warns at construction that such rows "will produce NaNs"; on CPU it gives zeros).

Notation: B batch, H heads, L query length, S key length, E head dim, Ev value dim.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import bias as attn_bias

import transformer
from transformer import attention as attention_module
from transformer import kernel_registry
from transformer.testing import assert_close

spec = functools.partial(pytest.mark.spec, component="attention")

#: CPU kernels by name (Triton needs TRITON_INTERPRET and its own environment), then
#: ``None``: whatever ``kernel=None`` picks.
KERNELS: list[str | None] = [
    *(name for name in transformer.available_kernels("cpu") if name != "triton"),
    None,
]
KERNEL_IDS = [name or "default" for name in KERNELS]
VARIANTS = ["upper_left", "lower_right"]
SIZES = [(3, 5), (5, 3), (1, 7), (7, 7), (97, 130)]


def make_bias(variant: str, L: int, S: int) -> attn_bias.CausalBias:
    """torch's ``causal_upper_left(L, S)`` or ``causal_lower_right(L, S)``.

    torch warns when a lower-right bias has ``L > S`` (rows without keys); that case
    is what the zero-row tests are about, so the warning is expected and silenced.
    """
    make = attn_bias.causal_upper_left if variant == "upper_left" else attn_bias.causal_lower_right
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return make(L, S)


def allowed(variant: str, L: int, S: int) -> Tensor:
    """``(L, S)`` bool, written from torch's ``CausalVariant`` docs: may query i see key j?"""
    offset = 0 if variant == "upper_left" else S - L
    return torch.arange(S)[None, :] <= torch.arange(L)[:, None] + offset


def randn(*shape: int, seed: int) -> Tensor:
    """Seeded standard normal float64 tensor."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def forward_backward(
    fn: Callable[..., Tensor], *tensors: Tensor
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``fn(*tensors)`` and the gradients of every tensor for a seeded upstream gradient."""
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in tensors)
    out = fn(*leaves)
    upstream = randn(*out.shape, seed=4242)
    return out.detach(), torch.autograd.grad(out, leaves, upstream)


def assert_same(
    actual: tuple[Tensor, tuple[Tensor, ...]], expected: tuple[Tensor, tuple[Tensor, ...]]
) -> None:
    """Outputs and the gradients of query, key and value agree (float64 tolerances)."""
    assert_close(actual[0], expected[0], msg="output differs")
    for name, g, g_ref in zip(("query", "key", "value"), actual[1], expected[1], strict=True):
        assert_close(g, g_ref, msg=f"gradient of {name} differs")


def ours(kernel: str | None, bias: attn_bias.CausalBias, **kwargs: object) -> Callable[..., Tensor]:
    """The package's attention with ``attn_mask=bias`` on ``kernel``."""

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return transformer.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, kernel=kernel, **kwargs
        )

    return fn


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize(("L", "S"), SIZES, ids=[f"L{L}-S{S}" for L, S in SIZES])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_causal_bias_output_and_gradients_match_torch(
    kernel: str | None, variant: str, L: int, S: int
) -> None:
    """With attn_mask=causal_upper_left(L, S) or causal_lower_right(L, S), output and gradients of query, key and value equal torch's F.scaled_dot_product_attention with the same bias object (CausalBias._dispatch), for every CPU kernel and kernel=None."""
    bias = make_bias(variant, L, S)
    q, k, v = randn(2, 3, L, 8, seed=0), randn(2, 3, S, 8, seed=1), randn(2, 3, S, 5, seed=2)

    def theirs(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    assert_same(forward_backward(ours(kernel, bias), q, k, v), forward_backward(theirs, q, k, v))


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize(("L", "S"), [(5, 3), (6, 11)], ids=["L5-S3", "L6-S11"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_causal_bias_matches_torch_with_gqa_scale_and_broadcast_batch(
    kernel: str | None, variant: str, L: int, S: int
) -> None:
    """A CausalBias combined with enable_gqa=True (6 query heads over 2), an explicit scale and a key/value batch dim of 1 that broadcasts gives torch's output and gradients (torch broadcasts the batch dims of query, key and value)."""
    bias = make_bias(variant, L, S)
    q, k, v = randn(2, 6, L, 8, seed=3), randn(1, 2, S, 8, seed=4), randn(1, 2, S, 4, seed=5)

    def theirs(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # torch's CPU kernels size the batch from the query; broadcast key/value first.
        k, v = k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3, enable_gqa=True)

    mine = ours(kernel, bias, scale=0.3, enable_gqa=True)
    assert_same(forward_backward(mine, q, k, v), forward_backward(theirs, q, k, v))


@spec(section="torch", kind="masking")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_causal_bias_hides_its_masked_keys_under_dropout(kernel: str | None, variant: str) -> None:
    """With dropout_p > 0 and one torch.manual_seed, changing the key and value a query may not see under the bias leaves its output unchanged, as in torch, where dropout acts on the masked weights."""
    L, S = 6, 9
    bias = make_bias(variant, L, S)
    q, k, v = randn(2, L, 8, seed=6), randn(2, S, 8, seed=7), randn(2, S, 5, seed=8)
    j = L - 1  # hidden from the first queries under either variant, seen by the last
    k2, v2 = k.clone(), v.clone()
    k2[:, j], v2[:, j] = 100.0, -100.0

    def run(key: Tensor, value: Tensor) -> Tensor:
        torch.manual_seed(11)
        return ours(kernel, bias, dropout_p=0.3)(q, key, value)

    out, out2 = run(k, v), run(k2, v2)
    blind = ~allowed(variant, L, S)[:, j]  # (L,) queries that may not see key j
    assert blind.any() and not blind.all()
    assert_close(out2[:, blind], out[:, blind], msg="a key hidden by the bias changed the output")
    assert not torch.allclose(out2[:, ~blind], out[:, ~blind]), "the probe has no power"


@spec(section="torch", kind="masking")
@pytest.mark.parametrize(("L", "S"), [(5, 3), (9, 2), (4, 0)], ids=["L5-S3", "L9-S2", "L4-S0"])
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_lower_right_rows_without_keys_are_zero_with_zero_gradient(
    kernel: str | None, L: int, S: int
) -> None:
    """causal_lower_right(L, S) with L > S leaves queries i < L - S without a key: their output rows are exactly zero and their query gradients zero, and nothing is NaN (torch warns of NaNs there; the package's rule for rows without keys)."""
    bias = make_bias("lower_right", L, S)
    q, k, v = randn(2, 2, L, 8, seed=9), randn(2, 2, S, 8, seed=10), randn(2, 2, S, 5, seed=11)
    out, (dq, dk, dv) = forward_backward(ours(kernel, bias), q, k, v)
    empty = L - S
    for name, t in (("output", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), f"NaN in {name}"
    assert bool((out[..., :empty, :] == 0).all()), "a row without keys is not zero"
    assert bool((dq[..., :empty, :] == 0).all()), "a row without keys has a query gradient"
    if S > 0:
        assert bool((out[..., empty:, :] != 0).any()), "rows with keys must not be zeroed"


@spec(section="torch", kind="masking")
@pytest.mark.parametrize("variant", VARIANTS)
def test_front_door_hands_the_bias_object_to_the_kernel_unchanged(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The front door validates a CausalBias and passes the very object to the kernel as attn_mask (with is_causal=False), so a kernel can apply it natively instead of reading an (L, S) tensor."""
    seen: list[object] = []

    def recording(q: Tensor, k: Tensor, v: Tensor, **kwargs: object) -> Tensor:
        seen.append(kwargs)
        return attention_module.reference_attention(q, k, v, **kwargs)  # type: ignore[arg-type]

    entry = kernel_registry._Entry(recording, kernel_registry._always, -1)
    monkeypatch.setitem(kernel_registry._KERNELS, "recording", entry)
    bias = make_bias(variant, 3, 5)
    q, k = randn(3, 4, seed=12), randn(5, 4, seed=13)
    transformer.scaled_dot_product_attention(q, k, k, attn_mask=bias, kernel="recording")
    assert len(seen) == 1
    assert seen[0]["attn_mask"] is bias and seen[0]["is_causal"] is False  # type: ignore[index]


@spec(section="torch", kind="shape")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize(
    ("q_shape", "k_shape", "v_shape", "expected"),
    [((4, 8), (6, 8), (6, 3), (4, 3)), ((2, 3, 4, 8), (2, 3, 6, 8), (2, 3, 6, 7), (2, 3, 4, 7))],
    ids=["unbatched", "B2-H3"],
)
def test_causal_bias_output_has_query_rows_and_value_features(
    kernel: str | None,
    variant: str,
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    expected: tuple[int, ...],
) -> None:
    """With a CausalBias of size (L, S) the output is (..., L, Ev) in the query's dtype, unbatched or batched, as torch's SDPA returns; the bias itself broadcasts over the batch dims."""
    bias = make_bias(variant, q_shape[-2], k_shape[-2])
    q, k, v = randn(*q_shape, seed=14), randn(*k_shape, seed=15), randn(*v_shape, seed=16)
    out = transformer.scaled_dot_product_attention(q, k, v, attn_mask=bias, kernel=kernel)
    assert out.shape == expected
    assert out.dtype == q.dtype
    assert out.shape == F.scaled_dot_product_attention(q, k, v, attn_mask=bias).shape


@spec(section="torch", kind="error")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kernel", KERNELS, ids=KERNEL_IDS)
def test_causal_bias_with_is_causal_raises_value_error(kernel: str | None, variant: str) -> None:
    """A CausalBias together with is_causal=True raises ValueError naming both, as torch's CausalBias._dispatch raises ValueError("CausalBias should not be used with causal=True")."""
    bias = make_bias(variant, 3, 5)
    q, k = randn(3, 4, seed=17), randn(5, 4, seed=18)
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        F.scaled_dot_product_attention(q, k, k, attn_mask=bias, is_causal=True)
    with pytest.raises(ValueError, match=r"attn_mask is a CausalBias.*is_causal=True"):
        transformer.scaled_dot_product_attention(
            q, k, k, attn_mask=bias, is_causal=True, kernel=kernel
        )


@spec(section="torch", kind="error")
@pytest.mark.parametrize(
    ("bias_size", "L", "S"), [((3, 5), 4, 5), ((3, 5), 3, 6), ((5, 3), 3, 5)], ids=str
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_bias_of_other_sizes_raises_value_error_naming_both(
    variant: str, bias_size: tuple[int, int], L: int, S: int
) -> None:
    """A CausalBias whose (seq_len_q, seq_len_kv) is not the query's L and the key's S raises ValueError naming attn_mask, the bias's sizes and L and S, where torch would build a mask of the wrong shape or fail deep inside a kernel."""
    bias = make_bias(variant, *bias_size)
    q, k = randn(2, L, 4, seed=19), randn(2, S, 4, seed=20)
    expected = rf"attn_mask .*\({bias_size[0]}, {bias_size[1]}\).*L={L}.*S={S}"
    with pytest.raises(ValueError, match=expected):
        transformer.scaled_dot_product_attention(q, k, k, attn_mask=bias)
