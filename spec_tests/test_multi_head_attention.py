"""Spec of multi-head attention (paper section 3.2.2) against ``torch.nn.MultiheadAttention``.

``MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O`` with
``head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)``. Our :class:`transformer.MultiheadAttention`
is held to torch's module: the same weights (copied with ``load_state_dict`` in either
direction, after filling every parameter with seeded random values so that zero-initialised
biases cannot hide a bug) give the same outputs, attention weights and gradients of the
inputs and of every parameter, over torch's option grid and mask conventions (bool
``True`` = masked out; float added).

Where the package departs from torch on purpose, the tests pin the
departure: a query row with no key left gives zeros (torch gives NaN), and bad input
raises ``ValueError``/``TypeError`` where torch asserts.

Notation: B batch, L target length, S source length, E embed_dim, H num_heads,
D head_dim = E / H.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from transformer import MultiheadAttention
from transformer.masks import module_mask_to_sdpa
from transformer.testing import assert_close, assert_error_within_reference

spec = functools.partial(pytest.mark.spec, component="multi_head_attention")

NEG_INF = float("-inf")
# Awkward on purpose: E = 12 split in H = 3 heads of D = 4; L != S; kdim/vdim != E.
E, H, D = 12, 3, 4
B, L, S = 2, 7, 5
KDIM, VDIM = 5, 9
# torch warns when a bool and a float mask are mixed; mixing them is what those tests check.
MIXED_MASKS_WARNING = "ignore:Support for mismatched key_padding_mask and attn_mask"


# --------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Seeded standard normal tensor."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def randomize_(module: nn.Module, seed: int) -> None:
    """Fill every parameter with seeded normal values (torch's init zeroes the biases).

    Standard deviation ``1/sqrt(fan_in)`` keeps activations near unit size, as a trained
    model's are, so the fixed fp32 tolerances stay meaningful.
    """
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(module.named_parameters())):
            std = p.shape[-1] ** -0.5
            p.copy_(randn(*p.shape, seed=seed + i, dtype=p.dtype) * std)


def make_pair(
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    from_torch: bool = True,
    **options: object,
) -> tuple[MultiheadAttention, nn.MultiheadAttention]:
    """``(ours, theirs)`` with identical random weights, copied torch -> ours or ours -> torch."""
    ours = MultiheadAttention(E, H, dtype=dtype, **options)
    theirs = nn.MultiheadAttention(E, H, dtype=dtype, **options)
    if from_torch:
        randomize_(theirs, seed)
        ours.load_state_dict(theirs.state_dict(), strict=True)
    else:
        randomize_(ours, seed)
        theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def inputs(
    dtype: torch.dtype,
    *,
    batch_first: bool = False,
    batched: bool = True,
    kdim: int = E,
    vdim: int = E,
    seed: int = 100,
) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded query ``(L, B, E)``, key ``(S, B, kdim)``, value ``(S, B, vdim)`` in the module's layout."""

    def layout(n: int, f: int, s: int) -> Tensor:
        if not batched:
            return randn(n, f, seed=s, dtype=dtype)
        shape = (B, n, f) if batch_first else (n, B, f)
        return randn(*shape, seed=s, dtype=dtype)

    return layout(L, E, seed), layout(S, kdim, seed + 1), layout(S, vdim, seed + 2)


def bool_module_mask(*shape: int, seed: int) -> Tensor:
    """Random module-convention bool mask (True = masked out) that never masks key 0.

    Key 0 stays free so that any two such masks combined still leave every query row a
    key (torch gives NaN for a row without one, see the tests of empty rows).
    """
    gen = torch.Generator().manual_seed(seed)
    masked = torch.rand(*shape, generator=gen) < 0.4
    masked[..., 0] = False
    return masked


def float_module_mask(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Random additive mask: normal values, ``-inf`` where :func:`bool_module_mask` masks."""
    return randn(*shape, seed=seed + 1, dtype=dtype).masked_fill(
        bool_module_mask(*shape, seed=seed), NEG_INF
    )


def run(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    self_attention: bool = False,
    mask_grads: bool = True,
    **kwargs: object,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor | None]]:
    """Forward and backward with fixed upstream gradients for the output and the weights.

    Returns ``(output, weights, grads)`` where ``grads`` maps ``"query"``, ``"key"``,
    ``"value"``, every parameter name and (with ``mask_grads``) every float mask passed in
    ``kwargs`` to its gradient; a mask the call does not use has gradient ``None``. With
    ``self_attention`` the query tensor is passed as key and value too (torch and ours
    both take their packed-projection path then).
    """
    module.zero_grad(set_to_none=True)
    leaves = {
        "query": query.detach().clone().requires_grad_(True),
        "key": key.detach().clone().requires_grad_(True),
        "value": value.detach().clone().requires_grad_(True),
    }
    masks = {}
    for name, m in kwargs.items():
        if mask_grads and isinstance(m, Tensor) and m.is_floating_point():
            masks[name] = m.detach().clone().requires_grad_(True)
    call = {**kwargs, **masks}
    if self_attention:
        q = leaves["query"]
        out, weights = module(q, q, q, **call)
        leaves = {"query": q}
    else:
        out, weights = module(leaves["query"], leaves["key"], leaves["value"], **call)
    loss = (out * randn(*out.shape, seed=7, dtype=out.dtype)).sum()
    if weights is not None:
        loss = loss + (weights * randn(*weights.shape, seed=8, dtype=weights.dtype)).sum()
    loss.backward()
    grads = {name: t.grad for name, t in leaves.items()}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    missing = [name for name, g in grads.items() if g is None]
    assert not missing, f"no gradient reached {missing}"
    grads.update({name: t.grad for name, t in masks.items()})
    return out.detach(), None if weights is None else weights.detach(), grads


def assert_same_run(
    ours: tuple[Tensor, Tensor | None, dict[str, Tensor | None]],
    theirs: tuple[Tensor, Tensor | None, dict[str, Tensor | None]],
    *,
    scale: float = 1.0,
) -> None:
    """Compare output, weights and every gradient, naming the tensor that differs."""
    assert_close(ours[0], theirs[0], scale=scale, msg="output differs")
    if theirs[1] is None:
        assert ours[1] is None
    else:
        assert ours[1] is not None
        assert_close(ours[1], theirs[1], scale=scale, msg="attention weights differ")
    assert ours[2].keys() == theirs[2].keys()
    for name, grad in theirs[2].items():
        mine = ours[2][name]
        if grad is None or mine is None:
            assert grad is None and mine is None, f"gradient of {name}: ours {mine}, torch {grad}"
        else:
            assert_close(mine, grad, scale=scale, msg=f"gradient of {name} differs")


def out_proj_bias(module: MultiheadAttention) -> Tensor:
    """The detached ``out_proj.bias`` of a module built with ``bias=True``."""
    bias = module.out_proj.bias
    assert bias is not None
    return bias.detach()


def option_grid() -> Iterator[object]:
    """Every combination of bias, add_bias_kv, add_zero_attn and kdim/vdim."""
    for bias, bias_kv, zero_attn, kv in itertools.product(
        (True, False), (False, True), (False, True), (False, True)
    ):
        options = {"bias": bias, "add_bias_kv": bias_kv, "add_zero_attn": zero_attn}
        if kv:
            options.update(kdim=KDIM, vdim=VDIM)
        ident = "-".join(
            name
            for name, on in (
                ("bias" if bias else "nobias", True),
                ("biaskv", bias_kv),
                ("zeroattn", zero_attn),
                ("kvdim", kv),
            )
            if on
        )
        yield pytest.param(options, id=ident)


OPTIONS = list(option_grid())
DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]


# --------------------------------------------------------------------------------------
# Shapes.
# --------------------------------------------------------------------------------------


@spec(section="torch", kind="shape")
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("average", [True, False], ids=["averaged", "per-head"])
def test_output_and_weight_shapes_match_torch(
    batched: bool, batch_first: bool, average: bool
) -> None:
    """Output is shaped like the query and weights are (B, L, S) averaged or (B, H, L, S) per head (no B when unbatched), with kdim/vdim != E, as in torch."""
    ours, theirs = make_pair(kdim=KDIM, vdim=VDIM, batch_first=batch_first)
    q, k, v = inputs(torch.float64, batch_first=batch_first, batched=batched, kdim=KDIM, vdim=VDIM)
    out, weights = ours(q, k, v, average_attn_weights=average)
    ref_out, ref_weights = theirs(q, k, v, average_attn_weights=average)
    assert out.shape == (*q.shape[:-1], E) == ref_out.shape
    expected = ((B,) if batched else ()) + ((L, S) if average else (H, L, S))
    assert weights is not None
    assert tuple(weights.shape) == expected == tuple(ref_weights.shape)
    assert_close(out, ref_out)
    assert_close(weights, ref_weights)


@spec(section="torch", kind="shape")
def test_need_weights_false_returns_none_for_weights() -> None:
    """With ``need_weights=False`` the second return value is ``None``, as in torch."""
    ours, theirs = make_pair()
    q, k, v = inputs(torch.float64)
    out, weights = ours(q, k, v, need_weights=False)
    ref_out, ref_weights = theirs(q, k, v, need_weights=False)
    assert weights is None and ref_weights is None
    assert_close(out, ref_out)


@spec(section="3.2.2", kind="shape")
@pytest.mark.parametrize(
    "options", [{"add_bias_kv": True}, {"add_zero_attn": True}], ids=["biaskv", "zeroattn"]
)
def test_extra_key_of_bias_kv_or_zero_attn_adds_a_weight_column(options: dict[str, bool]) -> None:
    """``add_bias_kv`` / ``add_zero_attn`` append one key, so the weights have S + 1 columns, as in torch."""
    ours, theirs = make_pair(**options)
    q, k, v = inputs(torch.float64)
    weights = ours(q, k, v)[1]
    assert weights is not None
    assert weights.shape == (B, L, S + 1) == theirs(q, k, v)[1].shape


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
def test_unbatched_input_equals_batch_of_one(batch_first: bool) -> None:
    """An unbatched (L, E) input gives the batch-of-one result without its batch dim, and both equal torch.nn.MultiheadAttention's unbatched output and weights."""
    ours, theirs = make_pair(batch_first=batch_first)
    q, k, v = inputs(torch.float64, batched=False)
    kpm = bool_module_mask(S, seed=3)
    out, weights = ours(q, k, v, key_padding_mask=kpm)
    expected, expected_weights = theirs(q, k, v, key_padding_mask=kpm)
    assert expected_weights is not None
    assert_close(out, expected)
    assert_close(weights, expected_weights)
    bdim = 0 if batch_first else 1
    out1, weights1 = ours(
        q.unsqueeze(bdim), k.unsqueeze(bdim), v.unsqueeze(bdim), key_padding_mask=kpm[None]
    )
    assert weights is not None and weights1 is not None
    assert_close(out, out1.squeeze(bdim))
    assert_close(weights, weights1.squeeze(0))


# --------------------------------------------------------------------------------------
# Equivalence with torch: forward and gradients over the option grid.
# --------------------------------------------------------------------------------------


@spec(section="3.2.2", kind="equivalence")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("options", OPTIONS)
def test_matches_torch_forward_and_gradients_over_option_grid(
    options: dict[str, object], batch_first: bool, need_weights: bool, dtype: torch.dtype
) -> None:
    """With torch's random weights copied in, output, weights and the gradients of query, key, value and every parameter equal torch.nn.MultiheadAttention's, for every bias/add_bias_kv/add_zero_attn/kdim/vdim/batch_first combination (§3.2.2)."""
    ours, theirs = make_pair(dtype, seed=11, batch_first=batch_first, **options)
    kdim, vdim = ours.kdim, ours.vdim
    q, k, v = inputs(dtype, batch_first=batch_first, kdim=kdim, vdim=vdim)
    # average_attn_weights follows batch_first so that both values meet every option.
    kwargs = {"need_weights": need_weights, "average_attn_weights": batch_first}
    assert_same_run(run(ours, q, k, v, **kwargs), run(theirs, q, k, v, **kwargs))


@spec(section="3.2.2", kind="equivalence")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize("options", [{}, {"add_bias_kv": True, "add_zero_attn": True}])
def test_self_attention_matches_torch_forward_and_gradients(
    options: dict[str, bool], need_weights: bool, dtype: torch.dtype
) -> None:
    """Self-attention (query is key is value, the packed in_proj path) equals torch in output, weights and all gradients (§3.2.2, §3.2.3 "self-attention layers")."""
    ours, theirs = make_pair(dtype, seed=12, **options)
    q, _, _ = inputs(dtype)
    kwargs = {"need_weights": need_weights, "self_attention": True}
    assert_same_run(run(ours, q, q, q, **kwargs), run(theirs, q, q, q, **kwargs))


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("options", OPTIONS)
def test_state_dict_keys_and_shapes_equal_torch(options: dict[str, object]) -> None:
    """``state_dict`` keys (in order) and tensor shapes are torch's for every option combination, so checkpoints load strictly both ways."""
    ours = MultiheadAttention(E, H, **options)
    theirs = nn.MultiheadAttention(E, H, **options)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    assert {n: t.shape for n, t in ours_sd.items()} == {n: t.shape for n, t in theirs_sd.items()}
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("from_torch", [True, False], ids=["torch-to-ours", "ours-to-torch"])
@pytest.mark.parametrize(
    "options", [{}, {"kdim": KDIM, "vdim": VDIM, "add_bias_kv": True}], ids=["packed", "separate"]
)
def test_load_state_dict_works_in_both_directions(
    from_torch: bool, options: dict[str, object]
) -> None:
    """Weights copied with ``load_state_dict`` from torch to ours or from ours to torch give the same outputs and weights."""
    ours, theirs = make_pair(seed=13, from_torch=from_torch, **options)
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    q, k, v = inputs(torch.float64, kdim=ours.kdim, vdim=ours.vdim)
    assert_same_run(run(ours, q, k, v), run(theirs, q, k, v))


# --------------------------------------------------------------------------------------
# Masks (torch's module convention: bool True = masked out; float added).
# --------------------------------------------------------------------------------------


def mask_cases() -> Iterator[object]:
    bool_2d = bool_module_mask(L, S, seed=20)
    bool_3d = bool_module_mask(B * H, L, S, seed=21)
    float_2d = float_module_mask(L, S, seed=22)
    float_3d = float_module_mask(B * H, L, S, seed=23)
    kpm_bool = bool_module_mask(B, S, seed=24)
    kpm_float = float_module_mask(B, S, seed=25)
    yield pytest.param({"attn_mask": bool_2d}, id="bool-L-S")
    yield pytest.param({"attn_mask": bool_3d}, id="bool-BH-L-S")
    yield pytest.param({"attn_mask": float_2d}, id="float-L-S")
    yield pytest.param({"attn_mask": float_3d}, id="float-BH-L-S")
    yield pytest.param({"key_padding_mask": kpm_bool}, id="kpm-bool")
    yield pytest.param({"key_padding_mask": kpm_float}, id="kpm-float")
    yield pytest.param({"attn_mask": bool_2d, "key_padding_mask": kpm_bool}, id="both-bool")
    yield pytest.param({"attn_mask": float_3d, "key_padding_mask": kpm_float}, id="both-float")
    yield pytest.param(
        {"attn_mask": float_2d, "key_padding_mask": kpm_bool}, id="float-and-kpm-bool"
    )


@spec(section="torch", kind="masking")
@pytest.mark.filterwarnings(MIXED_MASKS_WARNING)
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize(
    "options", [{}, {"add_bias_kv": True, "add_zero_attn": True}], ids=["plain", "extra-keys"]
)
@pytest.mark.parametrize("masks", list(mask_cases()))
def test_masks_match_torch_forward_and_gradients(
    masks: dict[str, Tensor], options: dict[str, bool], need_weights: bool
) -> None:
    """Bool (True = masked out) and float (added) attn_mask of shape (L, S) or (B*H, L, S) and key_padding_mask (B, S), alone or together, give torch's output, weights and gradients (float masks included), also with the extra keys of add_bias_kv/add_zero_attn."""
    ours, theirs = make_pair(seed=14, **options)
    q, k, v = inputs(torch.float64)
    kwargs = {**masks, "need_weights": need_weights}
    assert_same_run(run(ours, q, k, v, **kwargs), run(theirs, q, k, v, **kwargs))


@spec(section="torch", kind="masking")
@pytest.mark.filterwarnings(MIXED_MASKS_WARNING)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize("with_kpm", [False, True], ids=["causal-only", "causal-and-kpm"])
@pytest.mark.parametrize("mask_dtype", ["bool", "float"])
def test_is_causal_hint_with_causal_mask_matches_torch(
    mask_dtype: str, with_kpm: bool, need_weights: bool, dtype: torch.dtype
) -> None:
    """``is_causal=True`` with a causal attn_mask is torch's hint: same output, weights and gradients as torch, and as passing the mask alone."""
    ours, theirs = make_pair(dtype, seed=15)
    q, _, _ = inputs(dtype)
    upper = torch.ones(L, L, dtype=torch.bool).triu(1)  # True above the diagonal = future
    causal = (
        upper
        if mask_dtype == "bool"
        else torch.zeros(L, L, dtype=dtype).masked_fill(upper, NEG_INF)
    )
    kwargs: dict[str, object] = {"attn_mask": causal, "need_weights": need_weights}
    if with_kpm:
        kwargs["key_padding_mask"] = bool_module_mask(B, L, seed=26)
    k = v = q + 0.5 * randn(*q.shape, seed=27, dtype=dtype)  # L == S, cross-attention inputs
    # The hint may drop the mask (as torch does), so the mask gets no gradient to compare.
    hinted = run(ours, q, k, v, is_causal=True, mask_grads=False, **kwargs)
    assert_same_run(hinted, run(theirs, q, k, v, is_causal=True, mask_grads=False, **kwargs))
    assert_same_run(hinted, run(ours, q, k, v, mask_grads=False, **kwargs))


@spec(section="3.2.3", kind="masking")
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize("mask_dtype", ["bool", "float"])
def test_causal_mask_output_at_i_ignores_keys_and_values_after_i(
    mask_dtype: str, need_weights: bool
) -> None:
    """Under a causal attn_mask, changing key and value t changes no output row before t and does change row t (§3.2.3 "preserve the auto-regressive property")."""
    ours, _ = make_pair(seed=16)
    q = randn(L, B, E, seed=30)
    k, v = randn(L, B, E, seed=31), randn(L, B, E, seed=32)
    upper = torch.ones(L, L, dtype=torch.bool).triu(1)
    mask = (
        upper
        if mask_dtype == "bool"
        else torch.zeros(L, L, dtype=torch.float64).masked_fill(upper, NEG_INF)
    )
    kwargs = {"attn_mask": mask, "need_weights": need_weights, "is_causal": True}
    base = ours(q, k, v, **kwargs)[0]
    for t in range(L):
        k2, v2 = k.clone(), v.clone()
        k2[t:] += 3.0
        v2[t:] += 5.0
        out = ours(q, k2, v2, **kwargs)[0]
        assert_close(out[:t], base[:t], msg=f"rows before {t} changed")
        assert not torch.allclose(out[t], base[t]), f"row {t} ignored key {t}"


@spec(section="torch", kind="error")
def test_is_causal_without_attn_mask_raises_value_error() -> None:
    """``is_causal=True`` without attn_mask raises ValueError (torch raises RuntimeError: the flag is only a hint about attn_mask)."""
    ours, theirs = make_pair()
    q, k, v = inputs(torch.float64)
    with pytest.raises(ValueError, match=r"is_causal=True is a hint .* needs attn_mask"):
        ours(q, k, v, is_causal=True)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        theirs(q, k, v, is_causal=True)


# --------------------------------------------------------------------------------------
# Rows with no key left (the package's guarantee; torch gives NaN).
# --------------------------------------------------------------------------------------


@spec(section="extra", kind="masking")
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
@pytest.mark.parametrize("mask_dtype", ["bool", "float"])
def test_fully_padded_batch_element_gives_zero_attention_and_zero_gradients(
    mask_dtype: str, need_weights: bool
) -> None:
    """A batch element whose keys are all padded gets attention output 0 (so the module output is out_proj.bias), zero weights and zero input gradients, never NaN; the other elements equal torch's."""
    ours, theirs = make_pair(seed=17)
    q, k, v = inputs(torch.float64)
    padded = torch.zeros(B, S, dtype=torch.bool)
    padded[1] = True  # batch element 1 has no key left
    if mask_dtype == "float":
        kpm: Tensor = torch.zeros(B, S, dtype=torch.float64).masked_fill(padded, NEG_INF)
    else:
        kpm = padded
    out, weights, grads = run(ours, q, k, v, key_padding_mask=kpm, need_weights=need_weights)
    assert out.isfinite().all()
    assert all(g.isfinite().all() for g in grads.values()), "a gradient has NaN/inf"
    assert_close(out[:, 1], out_proj_bias(ours).expand(L, E))
    for name in ("query", "key", "value"):
        assert torch.count_nonzero(grads[name][:, 1]) == 0, f"grad of {name} for the empty element"
    if weights is not None:
        assert torch.count_nonzero(weights[1]) == 0
    # The element that has keys equals torch's (torch gives NaN for element 1 only).
    ref_out, ref_weights = theirs(q[:, :1], k[:, :1], v[:, :1], key_padding_mask=kpm[:1])
    assert_close(out[:, :1], ref_out)
    if weights is not None:
        assert_close(weights[:1], ref_weights)


@spec(section="extra", kind="masking")
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
def test_fully_masked_attn_mask_row_gives_zeros_without_bias(need_weights: bool) -> None:
    """A query row that a bool attn_mask cuts off from every key gives an exact zero output row with bias=False and finite gradients everywhere."""
    ours, _ = make_pair(seed=18, bias=False)
    q, k, v = inputs(torch.float64)
    mask = bool_module_mask(L, S, seed=28)
    mask[3] = True  # query 3 sees no key
    out, _, grads = run(ours, q, k, v, attn_mask=mask, need_weights=need_weights)
    assert torch.count_nonzero(out[3]) == 0
    assert torch.count_nonzero(grads["query"][3]) == 0
    assert torch.count_nonzero(out[:3]) > 0
    assert all(g.isfinite().all() for g in grads.values()), "a gradient has NaN/inf"


# --------------------------------------------------------------------------------------
# Heads are learned projections (§3.2.2), never slices of the embedding.
# --------------------------------------------------------------------------------------


@spec(section="3.2.2", kind="equivalence")
@pytest.mark.parametrize("block", ["query", "key", "value"])
def test_head_output_depends_on_off_diagonal_block_of_its_projection(block: str) -> None:
    """Head 0 uses the weights of its W^Q / W^K / W^V that read input features outside its own D-slice, which would be inert if heads sliced the embedding (§3.2.2 "linearly project ... with different, learned linear projections")."""
    ours, _ = make_pair(seed=19)
    assert ours.in_proj_weight is not None
    q, k, v = inputs(torch.float64)
    offset = {"query": 0, "key": E, "value": 2 * E}[block]
    # Rows of head 0 in this block; columns = input features outside head 0's slice 0..D.
    off_diagonal = (slice(offset, offset + D), slice(D, E))
    grads = run(ours, q, k, v)[2]
    assert grads["in_proj_weight"][off_diagonal].abs().max() > 1e-3
    out, weights = ours(q, k, v, average_attn_weights=False)
    with torch.no_grad():
        ours.in_proj_weight[off_diagonal] += 1.0
    out2, weights2 = ours(q, k, v, average_attn_weights=False)
    assert weights is not None and weights2 is not None
    assert (out2 - out).abs().max() > 1e-3
    if block != "value":
        # W^Q and W^K of head 0 shape head 0's scores only.
        assert (weights2[:, 0] - weights[:, 0]).abs().max() > 1e-3
        assert_close(weights2[:, 1:], weights[:, 1:])


@spec(section="3.2.2", kind="equivalence")
def test_head_attention_depends_on_features_outside_its_slice() -> None:
    """Changing only the query features of heads 1..H-1's slices changes head 0's attention weights: each head sees a learned projection of the whole query (§3.2.2)."""
    ours, _ = make_pair(seed=21)
    q, k, v = inputs(torch.float64)
    q2 = q.clone()
    q2[..., D:] += randn(*q2[..., D:].shape, seed=29)
    w1 = ours(q, k, v, average_attn_weights=False)[1]
    w2 = ours(q2, k, v, average_attn_weights=False)[1]
    assert w1 is not None and w2 is not None
    assert (w1[:, 0] - w2[:, 0]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------
# Errors: ValueError/TypeError where torch asserts or fails deep inside.
# --------------------------------------------------------------------------------------


@spec(section="3.2.2", kind="error")
def test_embed_dim_not_divisible_by_num_heads_raises_value_error_naming_both() -> None:
    """``embed_dim`` not divisible by ``num_heads`` raises ValueError naming both values (torch asserts; §3.2.2 d_k = d_model / h)."""
    with pytest.raises(ValueError, match=r"divisible by num_heads.*embed_dim=10.*num_heads=3"):
        MultiheadAttention(10, 3)


@spec(section="torch", kind="error")
@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((0, 2), ValueError, r"embed_dim must be a positive int, got 0"),
        ((12, 0), ValueError, r"num_heads must be a positive int, got 0"),
        ((12, 2.0), TypeError, r"num_heads must be an int, got float 2\.0"),
        ((12, 3, 1.5), ValueError, r"dropout must be in \[0, 1\], got 1\.5"),
        ((8, 2, "x"), TypeError, r"dropout must be a real number in \[0, 1\], got str 'x'"),
        ((8, 2, 0.0, "yes"), TypeError, r"bias must be a bool, got str 'yes'"),
        ((8, 2, 0.0, True, False, False, 4.0), TypeError, r"kdim must be an int, got float"),
        ((8, 2, 0.0, True, False, False, None, 0), ValueError, "vdim must be a positive int"),
        (
            (8, 2, 0.0, True, False, False, None, None, False, None, torch.int64),
            TypeError,
            r"dtype must be a real floating point dtype, got torch\.int64",
        ),
    ],
    ids=[
        "embed_dim-0",
        "num_heads-0",
        "num_heads-float",
        "dropout-1.5",
        "dropout-str",
        "bias-str",
        "kdim-float",
        "vdim-0",
        "dtype-int64",
    ],
)
def test_bad_constructor_arguments_raise_with_message(
    args: tuple[object, ...], error: type[Exception], match: str
) -> None:
    """Bad constructor arguments raise ValueError (out of range) or TypeError (wrong type, e.g. ``dropout="x"``, where torch fails with an unrelated comparison error) naming the argument and the value seen."""
    with pytest.raises(error, match=match):
        MultiheadAttention(*args)


@spec(section="torch", kind="equivalence")
def test_constructor_and_forward_signatures_equal_torchs() -> None:
    """``MultiheadAttention``'s constructor and ``forward`` take ``torch.nn.MultiheadAttention``'s argument names in its order with its defaults (``inspect.signature`` of the installed torch); ``forward`` adds only the keyword-only ``cache=None`` after them, so every call written for torch binds the same way."""

    def params(fn: object) -> list[tuple[str, object]]:
        return [(n, p.default) for n, p in inspect.signature(fn).parameters.items()]  # type: ignore[arg-type]

    assert params(MultiheadAttention.__init__) == params(torch.nn.MultiheadAttention.__init__)
    assert params(MultiheadAttention.forward) == [
        *params(torch.nn.MultiheadAttention.forward),
        ("cache", None),
    ]
    cache = inspect.signature(MultiheadAttention.forward).parameters["cache"]
    assert cache.kind is inspect.Parameter.KEYWORD_ONLY


@spec(section="torch", kind="error")
def test_nested_tensor_query_raises_type_error_asking_for_padding_and_a_mask() -> None:
    """A NestedTensor query/key/value raises TypeError naming it and asking for a padded tensor with a key padding mask (we have no nested-tensor path)."""
    mha = MultiheadAttention(8, 2, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: nested tensors are a prototype
        nested = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(2, 8)])
    with pytest.raises(TypeError, match=r"query is a NestedTensor.*key padding mask"):
        mha(nested, nested, nested)


@spec(section="torch", kind="error")
def test_forward_flags_that_are_not_bools_raise_type_error_naming_them() -> None:
    """``need_weights``, ``average_attn_weights`` and ``is_causal`` must be bools; anything else raises TypeError naming the flag and the value."""
    mha = MultiheadAttention(8, 2)
    x = torch.randn(3, 1, 8)
    for flag in ("need_weights", "average_attn_weights", "is_causal"):
        with pytest.raises(TypeError, match=rf"{flag} must be a bool, got str 'no'"):
            mha(x, x, x, **{flag: "no"})


def _bad_call(case: str) -> dict[str, object]:
    """Keyword arguments of a forward call that is wrong in exactly one way."""
    q, k, v = inputs(torch.float32)
    call: dict[str, object] = {"query": q, "key": k, "value": v}
    bad: dict[str, object] = {
        "query-list": {"query": q.tolist()},
        "query-int": {"query": q.long()},
        "value-int": {"value": v.int()},
        "query-fp64": {"query": q.double()},
        "query-4d": {"query": q[None]},
        "key-2d": {"key": k[:, 0]},
        "query-features": {"query": q[..., :-1]},
        "value-features": {"value": v[..., :-1]},
        "key-value-lengths": {"value": v[:-1]},
        "batch-sizes": {"key": k[:, :1], "value": v[:, :1]},
        "kpm-int": {"key_padding_mask": torch.zeros(B, S, dtype=torch.long)},
        "kpm-not-tensor": {"key_padding_mask": [[0] * S] * B},
        "kpm-3d": {"key_padding_mask": torch.zeros(B, 1, S, dtype=torch.bool)},
        "kpm-shape": {"key_padding_mask": torch.zeros(B, S - 1, dtype=torch.bool)},
        "unbatched-kpm-shape": {
            "query": q[:, 0],
            "key": k[:, 0],
            "value": v[:, 0],
            "key_padding_mask": torch.zeros(S - 1, dtype=torch.bool),
        },
        "attn-mask-int": {"attn_mask": torch.zeros(L, S, dtype=torch.int32)},
        "attn-mask-4d": {"attn_mask": torch.zeros(1, 1, L, S, dtype=torch.bool)},
        "attn-mask-shape": {"attn_mask": torch.zeros(L, S + 1, dtype=torch.bool)},
        "attn-mask-3d-shape": {"attn_mask": torch.zeros(H, L, S, dtype=torch.bool)},
    }[case]
    return {**call, **bad}


BAD_FORWARD_CASES = [
    ("query-list", TypeError, r"query must be a torch\.Tensor, got list"),
    ("query-int", TypeError, r"query must be a floating point tensor, got dtype torch\.int64"),
    ("value-int", TypeError, r"value must be a floating point tensor, got dtype torch\.int32"),
    (
        "query-fp64",
        ValueError,
        r"query, key and value must have the module's dtype torch\.float32, got query torch\.float64",
    ),
    (
        "query-4d",
        ValueError,
        r"query must be 3-D \(batched\) or 2-D \(unbatched\), got shape \(1, 7, 2, 12\)",
    ),
    ("key-2d", ValueError, r"key must be 3-D like query \(7, 2, 12\), got \(5, 12\)"),
    ("query-features", ValueError, r"query has 11 features in shape \(7, 2, 11\), expected 12"),
    ("value-features", ValueError, r"value has 11 features in shape \(5, 2, 11\), expected 12"),
    (
        "key-value-lengths",
        ValueError,
        r"key and value must agree in sequence and batch dims, got key \(5, 2, 12\), value \(4, 2, 12\)",
    ),
    ("batch-sizes", ValueError, r"query batch size 2 differs from key batch size 1"),
    ("kpm-int", ValueError, r"key_padding_mask must be bool .* got dtype torch\.int64"),
    ("kpm-not-tensor", TypeError, r"key_padding_mask must be a torch\.Tensor or None, got list"),
    ("kpm-3d", ValueError, r"key_padding_mask must be 2-D for a 3-D query, got shape \(2, 1, 5\)"),
    ("kpm-shape", ValueError, r"key_padding_mask must have shape \(2, 5\), got \(2, 4\)"),
    ("unbatched-kpm-shape", ValueError, r"key_padding_mask must have shape \(5,\), got \(4,\)"),
    ("attn-mask-int", ValueError, r"attn_mask must be bool .* got dtype torch\.int32"),
    ("attn-mask-4d", ValueError, r"attn_mask must be 2-D or 3-D, got shape \(1, 1, 7, 5\)"),
    (
        "attn-mask-shape",
        ValueError,
        r"attn_mask must have shape \(L, S\) = \(7, 5\) or \(B\*num_heads, L, S\) = \(6, 7, 5\), got \(7, 6\)",
    ),
    ("attn-mask-3d-shape", ValueError, r"attn_mask must have shape .* got \(3, 7, 5\)"),
]


@spec(section="torch", kind="error")
@pytest.mark.parametrize(
    ("case", "error", "match"), BAD_FORWARD_CASES, ids=[c[0] for c in BAD_FORWARD_CASES]
)
def test_bad_forward_inputs_raise_with_pinned_message(
    case: str, error: type[Exception], match: str
) -> None:
    """Wrong types, dtypes or shapes of query, key, value and the masks raise TypeError/ValueError naming the argument and what was seen (torch asserts or fails inside)."""
    ours = MultiheadAttention(E, H)
    with pytest.raises(error, match=match):
        ours(**_bad_call(case))


@spec(section="3.2.2", kind="equivalence")
@pytest.mark.parametrize("need_weights", [False, True])
def test_dropout_one_drops_every_weight_like_torch(need_weights: bool) -> None:
    """With dropout=1.0 in training mode every attention weight is dropped: the output is out_proj's bias alone, finite and equal to torch.nn.MultiheadAttention's (torch accepts p = 1)."""
    torch.manual_seed(0)
    ours = MultiheadAttention(8, 2, dropout=1.0, batch_first=True).train()
    theirs = nn.MultiheadAttention(8, 2, dropout=1.0, batch_first=True).train()
    randomize_(ours, seed=3)  # a non-zero out_proj bias: torch's init would make it 0
    theirs.load_state_dict(ours.state_dict())
    assert ours.out_proj.bias.abs().min() > 0
    x = torch.randn(2, 3, 8)
    out, _ = ours(x, x, x, need_weights=need_weights)
    expected, _ = theirs(x, x, x, need_weights=need_weights)
    assert_close(out, expected)
    assert_close(out, ours.out_proj.bias.expand_as(out))


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("need_weights", [False, True])
def test_add_bias_kv_under_cpu_autocast_works_like_torch(need_weights: bool) -> None:
    """Under CPU bf16 autocast the projected keys are bf16 while ``bias_k``/``bias_v`` stay fp32: the appended key takes the keys' dtype (torch's SDPA casts it there), so the call gives a bf16 output within twice torch's own autocast error of the fp64 result, with or without weights."""
    ours, theirs = make_pair(torch.float32, add_bias_kv=True)
    q, k, v = inputs(torch.float32)
    exact = copy.deepcopy(theirs).double()(q.double(), k.double(), v.double())[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(q, k, v, need_weights=need_weights)[0]
        expected = theirs(q, k, v, need_weights=need_weights)[0]
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_error_within_reference(out, expected, exact.detach())


@spec(section="torch", kind="masking")
def test_module_masks_convert_to_the_sdpa_convention() -> None:
    """A module-convention bool mask (True = masked out) flips to SDPA's (True = may attend), a float mask stays additive and takes the scores' dtype, and no mask stays None."""
    masked = torch.tensor([[False, True], [True, True]])
    assert torch.equal(module_mask_to_sdpa(masked, torch.float32), ~masked)  # type: ignore[arg-type]
    additive = torch.tensor([[0.0, float("-inf")], [-2.5, 0.0]], dtype=torch.float64)
    converted = module_mask_to_sdpa(additive, torch.float16)
    assert converted is not None and converted.dtype == torch.float16
    assert torch.equal(converted, additive.half())
    assert module_mask_to_sdpa(None, torch.float32) is None


@spec(section="torch", kind="masking")
@pytest.mark.parametrize("extra", ["add_bias_kv", "add_zero_attn"])
def test_causal_hint_with_an_appended_key_gives_the_result_of_its_mask(extra: str) -> None:
    """With ``add_bias_kv``/``add_zero_attn``, ``is_causal=True`` is only a hint (torch's docs): the output equals that of the same causal ``attn_mask`` without the hint, in which every query sees the appended key; torch's hint path hides that key from every query (a listed divergence)."""
    torch.manual_seed(0)
    mha = MultiheadAttention(8, 2, batch_first=True, **{extra: True}).eval()
    if extra == "add_bias_kv":
        assert mha.bias_k is not None
        nn.init.normal_(mha.bias_k, std=2.0)  # torch starts it at zero-mean normal; be sure
    x = torch.randn(2, 5, 8)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    hinted = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
    plain = mha(x, x, x, attn_mask=causal, need_weights=False)[0]
    assert_close(hinted, plain)


@spec(section="extra", kind="property")
@pytest.mark.parametrize("cached", [False, True], ids=["plain", "kv-cache"])
def test_the_output_projection_runs_as_the_out_proj_module_so_its_hooks_fire(
    cached: bool,
) -> None:
    """Each call applies ``out_proj`` by calling the module (torch's own MHA reads ``out_proj.weight`` instead), so a forward hook on it runs once per call, on the call's ``(B, L, E)`` input, cached decoding steps included. Module hooks are how ``torch.nn.utils.prune`` and wrappers such as LoRA act on a layer."""
    from transformer.kv_cache import KVCache

    mha = MultiheadAttention(8, 2, batch_first=True).eval()
    calls: list[tuple[int, ...]] = []
    mha.out_proj.register_forward_hook(lambda _m, args, _out: calls.append(tuple(args[0].shape)))
    x = randn(1, 3, 8, seed=1, dtype=torch.float32)
    cache = KVCache() if cached else None
    with torch.no_grad():
        for t in range(3):
            step = x[:, t : t + 1] if cached else x
            mha(step, step, step, need_weights=False, cache=cache)
    assert calls == ([(1, 1, 8)] * 3 if cached else [(1, 3, 8)] * 3)


@spec(section="extra", kind="error")
@pytest.mark.parametrize(
    "case", ["cache of another dtype", "cache of another head dim", "dropout NaN", "dropout 1.5"]
)
def test_what_the_module_cannot_vouch_for_still_raises_the_front_doors_value_error(
    case: str,
) -> None:
    """The module attends without re-running every check of ``scaled_dot_product_attention``, but what it does not build itself still gets that function's ``ValueError``: keys and values cached by another module (of another dtype, or another head dim with the same head count), and a ``dropout`` set outside ``[0, 1]`` after construction (in training mode, where it applies; 1 drops every weight, as torch allows)."""
    from transformer.kv_cache import KVCache

    mha = MultiheadAttention(8, 2, batch_first=True).eval()
    x = randn(1, 1, 8, seed=3, dtype=torch.float32)
    cache: KVCache | None = None
    if case.startswith("dropout"):
        mha.train()
        mha.dropout = float("nan") if case == "dropout NaN" else 1.5
        match = r"dropout_p must be in \[0, 1\)"
    else:
        cache = KVCache(static=True)
        other = (
            MultiheadAttention(8, 2, batch_first=True).double()
            if case == "cache of another dtype"
            else MultiheadAttention(12, 2, batch_first=True)
        )
        memory = torch.randn(1, 5, other.embed_dim, dtype=other.in_proj_weight.dtype)
        with torch.no_grad():
            other(memory[:, :1], memory, memory, need_weights=False, cache=cache)
        match = "must share a dtype" if case == "cache of another dtype" else "same head dim E"
    key = x if cache is None else randn(1, 5, 8, seed=4, dtype=torch.float32)  # 5 cached
    with pytest.raises(ValueError, match=match), torch.no_grad():
        mha(x, key, key, need_weights=False, cache=cache)
