"""Scaled dot-product attention (paper section 3.2.1, equation 1): the conformance suite and the front door.

The conformance suite of :mod:`transformer.conformance` (the very cases ``transformer
conform`` and ``pytest --attention-kernel`` run on an outside kernel) is collected here
for every kernel of the registry on every device where it is available: each of its
properties (default scale, equation 1 in forward and gradients, causal alignment, torch's
attention-bias objects, masks, GQA, decode shapes, strided inputs, dropout, determinism,
no L x S matrix, and this package's extensions) is one test, its cases parametrized.
The kernels are called through :func:`transformer.scaled_dot_product_attention`, the
front door users call.

The tests below pin what only the front door and the registry do: validation of bad
input, dispatch by name, and two laws of masking not phrased as equivalence.

Notation: B batch, H heads, L target/query length, S source/key length, E query/key
head dim (``d_k``), Ev value head dim (``d_v``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import Tensor

import transformer
from transformer import attention as attention_module
from transformer import kernel_registry
from transformer.conformance.plugin import ConformanceSuite, KernelUnderTest
from transformer.testing import assert_close, assert_error_within_reference

spec = functools.partial(pytest.mark.spec, component="attention")


#: What a kernel of ours does not claim, and why: strict xfails (the check must see it).
NOT_PROMISED = {
    "reference": (("no-score-matrix", "equation 1 written plainly holds the L x S matrix"),),
}


def registered_kernels(config: pytest.Config) -> list[KernelUnderTest]:
    """Every registered kernel on every device where it is available, through the front door."""
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    found = []
    for device in devices:
        for name in transformer.available_kernels(device):
            marks: list[object] = [pytest.mark.triton] if name == "triton" else []
            if device == "cuda":
                marks.append(pytest.mark.cuda)
            call = functools.partial(transformer.scaled_dot_product_attention, kernel=name)
            # Under the interpreter every Triton program runs in NumPy: keep its cases short
            # and in fp32 (its low-precision paths are held to the bound in its own suite).
            interpreted = name == "triton" and device == "cpu"
            length = 256 if interpreted else None
            dtypes = ("fp32",) if interpreted else None
            promised = NOT_PROMISED.get(name, ())
            found.append(
                KernelUnderTest(name, call, device, tuple(marks), promised, length, dtypes)
            )
    return found


test_attention_conformance = ConformanceSuite(
    registered_kernels, spec_component="attention", strict_errors=True
)


def randn(
    *shape: int, seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Tensor:
    """Seeded standard normal tensor, drawn on CPU so every device sees the same values."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


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
# Two laws of masking (section 3.2.3).
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Autocast.
# --------------------------------------------------------------------------------------


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "fp32-query-bf16-keys"])
def test_autocast_casts_the_inputs_as_it_does_for_torch_sdpa(
    kernel: str, device: torch.device, mixed: bool
) -> None:
    """Under ``torch.autocast`` (bf16) torch's SDPA casts query, key and value to bf16, so fp32 inputs, or an fp32 query with bf16 keys and values, give a bf16 output; every kernel does the same, within twice torch's own autocast error of the float64 result, with a float mask."""
    q, k, v = qkv((2, 2, 9, 8), (2, 2, 13, 8), (2, 2, 13, 8), device, seed=21)
    mask = randn(9, 13, seed=24, device=device)
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask.double()
    )
    if mixed:
        k, v = k.bfloat16(), v.bfloat16()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = transformer.scaled_dot_product_attention(q, k, v, mask, kernel=kernel)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_error_within_reference(out, expected, exact)


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
        kernel_registry._KERNELS.pop(name, None)


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
