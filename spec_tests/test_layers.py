"""Spec of the encoder/decoder layers and stacks (paper section 3.1, Figure 1) against torch.nn.

Our ``TransformerEncoderLayer``, ``TransformerDecoderLayer``, ``TransformerEncoder``,
``TransformerDecoder`` and ``Transformer`` are held to torch's: same constructor
signature and defaults, same ``state_dict`` keys (loading works both ways), same
default initialisation under the same seed, and, with the same weights and dropout
off, the same outputs and the same gradients of inputs and of every parameter, for
post-norm and pre-norm, sequence-first and batch-first, every activation and every
mask form. Comparisons run in train mode with ``dropout=0`` so torch never takes its
nested-tensor fast path; one test pins the one place where that fast path differs.

Notation: B batch, S source length, T target length, E ``d_model``, H ``nhead``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer import layers
from transformer.testing import assert_close

spec = functools.partial(pytest.mark.spec, component="layers")

# Awkward sizes on purpose: head dim 6, feed-forward size 20, lengths 7 and 5.
E, H, FF = 18, 3, 20
S_LEN, T_LEN, BATCH = 7, 5, 3
KINDS = ("encoder_layer", "decoder_layer", "encoder", "decoder", "transformer")
MASKS = ("none", "bool", "float", "causal", "per_head")
NEG_INF = float("-inf")

Args = tuple[tuple[Tensor, ...], dict[str, Any]]


# --------------------------------------------------------------------------------------
# Builders: the same module from torch.nn and from our package.
# --------------------------------------------------------------------------------------


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's nested-tensor UserWarnings (its fast path, which we do not have)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def build(
    kind: str, lib: Any, *, num_layers: int = 2, d_model: int = E, nhead: int = H, **kw: Any
) -> nn.Module:
    """``kind`` built from ``lib`` (``torch.nn`` or ``transformer.layers``) with ``kw``."""
    with _quiet():
        if kind == "encoder_layer":
            return lib.TransformerEncoderLayer(d_model, nhead, FF, **kw)
        if kind == "decoder_layer":
            return lib.TransformerDecoderLayer(d_model, nhead, FF, **kw)
        norm = nn.LayerNorm(d_model, dtype=kw.get("dtype"))
        if kind == "encoder":
            layer = lib.TransformerEncoderLayer(d_model, nhead, FF, **kw)
            return lib.TransformerEncoder(layer, num_layers, norm)
        if kind == "decoder":
            layer = lib.TransformerDecoderLayer(d_model, nhead, FF, **kw)
            return lib.TransformerDecoder(layer, num_layers, norm)
        assert kind == "transformer"
        return lib.Transformer(d_model, nhead, num_layers, num_layers, FF, **kw)


def perturb_vectors(module: nn.Module, seed: int) -> None:
    """Move every 1-D parameter (biases, norm gains) off its default 0/1.

    Default biases are zero and norm gains one, which would hide a swapped ``norm1``/``norm2``
    or a dropped bias; after this every parameter matters.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def torch_and_ours(kind: str, seed: int = 0, **kw: Any) -> tuple[nn.Module, nn.Module]:
    """torch's module and ours with torch's weights loaded (strict), both in train mode."""
    torch.manual_seed(seed)
    theirs = build(kind, nn, **kw)
    perturb_vectors(theirs, seed)
    ours = build(kind, layers, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Seeded standard normal tensor."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def seq(
    length: int, *, batch_first: bool, dtype: torch.dtype, seed: int, batch: int = BATCH
) -> Tensor:
    """A ``(B, len, E)`` (batch_first) or ``(len, B, E)`` input."""
    x = randn(batch, length, E, seed=seed, dtype=dtype)
    return x if batch_first else x.transpose(0, 1).contiguous()


def padding(
    length: int,
    pads: tuple[int, ...],
    *,
    as_float: bool = False,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``(B, len)`` key padding mask, module convention: row ``b`` masks its last ``pads[b]`` keys."""
    mask = torch.zeros(len(pads), length, dtype=torch.bool)
    for b, p in enumerate(pads):
        if p:
            mask[b, length - p :] = True
    if as_float:
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(mask, NEG_INF)
    return mask


def attn_mask(L: int, S: int, form: str, *, seed: int, dtype: torch.dtype) -> Tensor:
    """A random module-convention attention mask; key 0 always stays visible (no empty row).

    ``form``: ``"bool"`` (True = masked out, ``(L, S)``), ``"float"`` (finite values and
    ``-inf``, ``(L, S)``) or ``"per_head"`` (bool, ``(B*H, L, S)``).
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH * H, L, S) if form == "per_head" else (L, S)
    masked = torch.rand(shape, generator=gen) < 0.4
    masked[..., 0] = False
    if form == "float":
        values = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        return values.masked_fill(masked, NEG_INF)
    return masked


def causal(size: int, dtype: torch.dtype) -> Tensor:
    return nn.Transformer.generate_square_subsequent_mask(size, dtype=dtype)


def make_inputs(kind: str, masks: str, *, batch_first: bool, dtype: torch.dtype) -> Args:
    """Positional inputs and mask keywords of ``kind``'s forward for one mask setting.

    ``masks``: ``"none"``; ``"bool"`` random bool attention masks alone (a square
    non-causal mask must not be taken for causal); ``"float"``/``"per_head"`` random
    attention masks of that form plus key padding masks (float padding masks with a float
    mask, as torch recommends); ``"causal"`` the square subsequent mask with the
    ``is_causal`` hint plus bool key padding masks.
    """
    src = seq(S_LEN, batch_first=batch_first, dtype=dtype, seed=1)
    tgt = seq(T_LEN, batch_first=batch_first, dtype=dtype, seed=2)
    src_pad, tgt_pad = (0, 2, 4), (1, 0, 3)
    as_float = masks == "float"

    def kpm(length: int, pads: tuple[int, ...]) -> Tensor | None:
        if masks in ("none", "bool"):
            return None
        return padding(length, pads, as_float=as_float, dtype=dtype)

    def mask(L: int, S: int, seed: int, square_causal: bool = True) -> Tensor | None:
        if masks == "none":
            return None
        if masks == "causal":
            return causal(L, dtype) if square_causal else None
        return attn_mask(L, S, masks, seed=seed, dtype=dtype)

    hint = True if masks == "causal" else None
    if kind in ("encoder_layer", "encoder"):
        kw: dict[str, Any] = {"src_key_padding_mask": kpm(S_LEN, src_pad)}
        kw["src_mask" if kind == "encoder_layer" else "mask"] = mask(S_LEN, S_LEN, 10)
        kw["is_causal"] = bool(hint) if kind == "encoder_layer" else hint
        return (src,), kw
    decoder_kw: dict[str, Any] = {
        "tgt_mask": mask(T_LEN, T_LEN, 11),
        "memory_mask": mask(T_LEN, S_LEN, 12, square_causal=False),
        "tgt_key_padding_mask": kpm(T_LEN, tgt_pad),
        "memory_key_padding_mask": kpm(S_LEN, src_pad),
    }
    if kind == "decoder_layer":
        return (tgt, src), {**decoder_kw, "tgt_is_causal": bool(hint)}
    if kind == "decoder":
        return (tgt, src), {**decoder_kw, "tgt_is_causal": hint}
    return (src, tgt), {
        **decoder_kw,
        "src_mask": mask(S_LEN, S_LEN, 10),
        "src_key_padding_mask": kpm(S_LEN, src_pad),
        "src_is_causal": hint,
        "tgt_is_causal": hint,
    }


def forward_backward(module: nn.Module, inputs: Args) -> tuple[Tensor, dict[str, Tensor]]:
    """Output and the gradients of every input and every parameter (by name) for a fixed upstream."""
    args, kwargs = inputs
    leaves = tuple(a.detach().clone().requires_grad_(True) for a in args)
    module.zero_grad(set_to_none=True)
    out = module(*leaves, **kwargs)
    upstream = randn(*out.shape, seed=4242, dtype=out.dtype)
    out.backward(upstream)
    grads = {f"input {i}": leaf.grad for i, leaf in enumerate(leaves)}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    assert all(g is not None for g in grads.values()), "some parameter received no gradient"
    return out.detach(), {k: g for k, g in grads.items() if g is not None}


def assert_same_results(
    actual: tuple[Tensor, dict[str, Tensor]],
    expected: tuple[Tensor, dict[str, Tensor]],
    *,
    scale: float = 1.0,
) -> None:
    """Compare outputs, then every gradient by name (the names must be the same set)."""
    out, grads = actual
    out_ref, grads_ref = expected
    assert out.shape == out_ref.shape
    assert_close(out, out_ref, scale=scale, msg="output differs")
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert_close(grad, grads_ref[name], scale=scale, msg=f"gradient of {name} differs")


# --------------------------------------------------------------------------------------
# API: signatures, state_dict keys, attribute names, initialisation.
# --------------------------------------------------------------------------------------

_CLASSES = (
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerDecoder",
    "Transformer",
)


def _params(fn: Callable[..., Any], drop: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    return [(n, p.default) for n, p in inspect.signature(fn).parameters.items() if n not in drop]


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("name", _CLASSES)
def test_constructor_and_forward_signatures_equal_torchs(name: str) -> None:
    """Constructor and forward take torch's argument names in torch's order with torch's defaults, the fast-path switches enable_nested_tensor and mask_check included (``inspect.signature`` of the installed torch); the decoder's ``forward`` adds only the keyword-only ``cache=None`` after them, so every call written for torch binds the same way."""
    ours, theirs = getattr(layers, name), getattr(nn, name)
    assert _params(ours.__init__) == _params(theirs.__init__)
    extra = [("cache", None)] if name.startswith("TransformerDecoder") else []
    assert _params(ours.forward) == _params(theirs.forward) + extra
    if extra:
        cache = inspect.signature(ours.forward).parameters["cache"]
        assert cache.kind is inspect.Parameter.KEYWORD_ONLY
    if name == "Transformer":
        assert _params(ours.generate_square_subsequent_mask) == _params(
            theirs.generate_square_subsequent_mask
        )


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_keys_and_shapes_equal_torchs(kind: str) -> None:
    """``state_dict`` has exactly torch's keys with torch's shapes, so checkpoints interchange."""
    torch.manual_seed(0)
    theirs, ours = build(kind, nn, norm_first=True), build(kind, layers, norm_first=True)
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("kind", KINDS)
def test_submodule_names_equal_torchs(kind: str) -> None:
    """Every sub-module has torch's name and type family (self_attn, multihead_attn, linear1, dropout, linear2, norm1..3, dropout1..3, layers, norm), so code walking torch's layers walks ours."""
    torch.manual_seed(0)
    theirs, ours = build(kind, nn), build(kind, layers)
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    for (name, mine), (_, ref) in zip(ours.named_modules(), theirs.named_modules(), strict=True):
        if isinstance(ref, nn.MultiheadAttention):
            assert mine.__class__.__name__ == "MultiheadAttention", name
            assert mine.batch_first == ref.batch_first
        elif name:
            # torch's out_proj is a Linear subclass that only changes quantization.
            ref_type = "Linear" if isinstance(ref, nn.Linear) else type(ref).__name__
            assert type(mine).__name__ == ref_type, name


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_is_in_state_dict_and_counted_like_torch(kind: str) -> None:
    """Every parameter of every layer is registered (so saved): names are state_dict keys and the parameter count equals torch's (a stack kept in a Python list fails here)."""
    torch.manual_seed(0)
    theirs, ours = build(kind, nn, num_layers=3), build(kind, layers, num_layers=3)
    names = [n for n, _ in ours.named_parameters()]
    assert set(names) <= set(ours.state_dict())
    assert names == [n for n, _ in theirs.named_parameters()]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


@spec(section="3.1", kind="equivalence")
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_into_fresh_model_reproduces_outputs(kind: str) -> None:
    """Loading a model's state_dict into a freshly initialised one reproduces its outputs exactly (every weight that matters is saved)."""
    torch.manual_seed(0)
    trained = build(kind, layers, dtype=torch.float64, dropout=0.0)
    perturb_vectors(trained, seed=0)
    torch.manual_seed(1)
    fresh = build(kind, layers, dtype=torch.float64, dropout=0.0)
    args, kwargs = make_inputs(kind, "bool", batch_first=False, dtype=torch.float64)
    before = fresh(*args, **kwargs)
    assert not torch.allclose(before, trained(*args, **kwargs)), "seeds gave the same model"
    fresh.load_state_dict(copy.deepcopy(trained.state_dict()), strict=True)
    assert torch.equal(fresh(*args, **kwargs), trained(*args, **kwargs))


@spec(section="3.1", kind="equivalence")
@pytest.mark.parametrize("kind", ("encoder", "decoder"))
def test_stack_layers_are_independent_copies_in_a_module_list(kind: str) -> None:
    """The N layers of a stack start equal (deep copies, as torch) but share no tensor: training one leaves the others unchanged."""
    stack = build(kind, layers, num_layers=3)
    assert isinstance(stack.layers, nn.ModuleList)
    assert len(stack.layers) == stack.num_layers == 3
    first, second = stack.layers[0], stack.layers[1]
    assert torch.equal(first.linear1.weight, second.linear1.weight)
    with torch.no_grad():
        first.linear1.weight.add_(1.0)
    assert not torch.equal(first.linear1.weight, second.linear1.weight)


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("kind", KINDS)
def test_default_initialisation_equals_torchs_under_the_same_seed(kind: str) -> None:
    """With the same seed, construction draws exactly torch's initial weights (Xavier-uniform on every matrix for Transformer, torch's layer defaults otherwise)."""
    torch.manual_seed(123)
    theirs = build(kind, nn)
    torch.manual_seed(123)
    ours = build(kind, layers)
    for (name, mine), ref in zip(
        ours.state_dict().items(), theirs.state_dict().values(), strict=True
    ):
        assert torch.equal(mine, ref), name


@spec(section="torch", kind="equivalence")
def test_activation_strings_resolve_to_torchs_functions() -> None:
    """``activation="relu"``/``"gelu"`` store ``F.relu``/``F.gelu`` (functions, so nothing enters state_dict), like torch, and a callable is kept as given."""
    assert layers.TransformerEncoderLayer(E, H).activation is F.relu
    assert layers.TransformerDecoderLayer(E, H, activation="gelu").activation is F.gelu
    assert layers.TransformerEncoderLayer(E, H, activation=torch.tanh).activation is torch.tanh


@spec(section="3.2.3", kind="masking")
@pytest.mark.parametrize("sz", [1, 7])
def test_generate_square_subsequent_mask_equals_torchs(sz: int) -> None:
    """``Transformer.generate_square_subsequent_mask`` returns torch's mask: ``-inf`` above the diagonal and ``0`` on and below it in a float dtype, ``True`` above it in ``torch.bool``; a 0-dim integer tensor size works as in torch."""
    for dtype in (None, torch.float64, torch.bool):
        for size in (sz, torch.tensor(sz)):
            ours = layers.Transformer.generate_square_subsequent_mask(size, dtype=dtype)
            theirs = nn.Transformer.generate_square_subsequent_mask(size, dtype=dtype)
            assert ours.dtype == theirs.dtype
            assert torch.equal(ours, theirs)
    instance = layers.Transformer(E, H, 1, 1, FF)
    assert torch.equal(
        instance.generate_square_subsequent_mask(sz, device="cpu"), causal(sz, torch.float32)
    )


# --------------------------------------------------------------------------------------
# Shapes.
# --------------------------------------------------------------------------------------


@spec(section="3.1", kind="shape")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["seq_first", "batch_first", "unbatched"])
def test_output_has_the_shape_of_the_target_sequence(kind: str, layout: str) -> None:
    """Output is shaped like the decoder input (the encoder input for encoders): ``(T, B, E)``, ``(B, T, E)`` with batch_first, ``(T, E)`` unbatched."""
    model = build(kind, layers, batch_first=layout == "batch_first")
    args, _ = make_inputs(kind, "none", batch_first=layout == "batch_first", dtype=torch.float32)
    if layout == "unbatched":
        args = tuple(a[:, 0] for a in args)  # (len, E): the first batch element
    out = model(*args)
    expected = args[1] if kind == "transformer" else args[0]
    assert out.shape == expected.shape
    assert out.dtype == expected.dtype


# --------------------------------------------------------------------------------------
# Equivalence with torch.nn: forward and gradients.
# --------------------------------------------------------------------------------------


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_forward_and_gradients_with_loaded_weights(
    kind: str, norm_first: bool, batch_first: bool, masks: str
) -> None:
    """With torch's weights loaded, outputs and the gradients of inputs and of every parameter equal torch's, post-norm and pre-norm, both layouts, every mask form (bool, float, per-head, causal with is_causal hint, key padding)."""
    kw = {
        "norm_first": norm_first,
        "batch_first": batch_first,
        "dropout": 0.0,
        "dtype": torch.float64,
    }
    theirs, ours = torch_and_ours(kind, **kw)
    inputs = make_inputs(kind, masks, batch_first=batch_first, dtype=torch.float64)
    with _quiet():
        expected = forward_backward(theirs, inputs)
    assert_same_results(forward_backward(ours, inputs), expected)


def _tanh_shrink(x: Tensor) -> Tensor:
    return x - torch.tanh(x)


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize(
    "activation", ["relu", "gelu", F.gelu, _tanh_shrink], ids=["relu", "gelu", "F.gelu", "callable"]
)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_for_every_activation(kind: str, activation: Any) -> None:
    """The activation of the feed-forward sub-layer ("relu", "gelu" or any callable) is applied exactly as torch applies it."""
    kw = {
        "activation": activation,
        "dropout": 0.0,
        "dtype": torch.float64,
        "norm_first": kind == "decoder",
    }
    theirs, ours = torch_and_ours(kind, **kw)
    inputs = make_inputs(kind, "bool", batch_first=False, dtype=torch.float64)
    with _quiet():
        expected = forward_backward(theirs, inputs)
    assert_same_results(forward_backward(ours, inputs), expected)


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_without_bias_and_with_custom_layer_norm_eps(kind: str) -> None:
    """``bias=False`` (no biases in linear maps, attention and layer norms) and a non-default ``layer_norm_eps`` behave as in torch."""
    kw = {
        "bias": False,
        "layer_norm_eps": 0.3,
        "dropout": 0.0,
        "dtype": torch.float64,
        "batch_first": True,
    }
    theirs, ours = torch_and_ours(kind, **kw)
    assert not any(k.endswith("bias") for k in ours.state_dict() if ".norm" not in f".{k}")
    inputs = make_inputs(kind, "causal", batch_first=True, dtype=torch.float64)
    with _quiet():
        expected = forward_backward(theirs, inputs)
    assert_same_results(forward_backward(ours, inputs), expected)


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("kind", KINDS)
def test_torch_loads_our_state_dict_and_matches(kind: str) -> None:
    """The reverse direction: torch's module loads our state_dict (strict) and then computes our outputs and gradients."""
    kw = {"dropout": 0.0, "dtype": torch.float64, "norm_first": True}
    torch.manual_seed(5)
    ours = build(kind, layers, **kw)
    perturb_vectors(ours, seed=5)
    theirs = build(kind, nn, **kw)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    inputs = make_inputs(kind, "per_head", batch_first=False, dtype=torch.float64)
    with _quiet():
        expected = forward_backward(theirs, inputs)
    assert_same_results(forward_backward(ours, inputs), expected)


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_on_unbatched_inputs(kind: str) -> None:
    """Unbatched 2-D inputs ``(len, E)`` with 1-D key padding masks and causal masks give torch's outputs and gradients."""
    theirs, ours = torch_and_ours(kind, dropout=0.0, dtype=torch.float64)
    args, kwargs = make_inputs(kind, "causal", batch_first=False, dtype=torch.float64)
    args = tuple(a[:, 1] for a in args)  # (len, E): batch element 1
    kwargs = {k: v[1] if k.endswith("key_padding_mask") else v for k, v in kwargs.items()}
    with _quiet():
        expected = forward_backward(theirs, (args, kwargs))
    assert_same_results(forward_backward(ours, (args, kwargs)), expected)


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_in_float32_with_default_tolerances(kind: str, norm_first: bool) -> None:
    """In float32 outputs and gradients equal torch's within the default fp32 tolerances."""
    theirs, ours = torch_and_ours(kind, norm_first=norm_first, dropout=0.0, batch_first=True)
    inputs = make_inputs(kind, "float", batch_first=True, dtype=torch.float32)
    with _quiet():
        expected = forward_backward(theirs, inputs)
    assert_same_results(forward_backward(ours, inputs), expected)


class Scale(nn.Module):
    """Deterministic stand-in for a dropout module: multiplies by a fixed factor."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor


# A distinct factor per dropout site; the inner one is negative so that it does not
# commute with the ReLU (dropout before or after the activation then differ).
DROPOUT_SITES = {"dropout": -0.7, "dropout1": 1.5, "dropout2": 0.25, "dropout3": 3.0}


def mark_dropout_sites(model: nn.Module) -> None:
    """Replace every layer's dropout modules by :class:`Scale` stand-ins, by attribute name."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Dropout) and name in DROPOUT_SITES:
                setattr(module, name, Scale(DROPOUT_SITES[name]))


@spec(section="5.4", kind="equivalence")
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("kind", KINDS)
def test_dropout_sits_where_torch_puts_it(kind: str, norm_first: bool) -> None:
    """Each dropout module acts where torch's does: residual dropout on every sub-layer output before the sum (section 5.4) and inner dropout after the FFN activation (dropouts replaced by distinct fixed scalings in both models)."""
    theirs, ours = torch_and_ours(kind, norm_first=norm_first, dropout=0.0, dtype=torch.float64)
    mark_dropout_sites(theirs)
    mark_dropout_sites(ours)
    inputs = make_inputs(kind, "causal", batch_first=False, dtype=torch.float64)
    with _quiet():
        expected = forward_backward(theirs, inputs)
    assert_same_results(forward_backward(ours, inputs), expected)


@spec(section="5.4", kind="equivalence")
def test_dropout_acts_in_training_only_and_eval_matches_torch() -> None:
    """Dropout (default 0.1, section 5.4) makes training outputs random; in eval mode the model is deterministic and equals torch's."""
    theirs, ours = torch_and_ours("transformer", dtype=torch.float64)
    args, kwargs = make_inputs("transformer", "causal", batch_first=False, dtype=torch.float64)
    torch.manual_seed(0)
    first, second = ours(*args, **kwargs), ours(*args, **kwargs)
    assert not torch.allclose(first, second)
    ours.eval()
    theirs.eval()
    assert torch.equal(ours(*args, **kwargs), ours(*args, **kwargs))
    with _quiet():
        expected = theirs(*args, **kwargs)
    assert_close(ours(*args, **kwargs), expected)


@spec(section="torch", kind="masking")
def test_torch_fast_path_differs_only_at_padded_positions() -> None:
    """Where torch's encoder takes its nested-tensor fast path (eval, no grad, batch_first, even heads, a padding mask) its layers write 0 at padded positions (the final norm then maps them to norm(0)); we compute them, and every real position agrees."""
    kw = {"batch_first": True, "nhead": 2}
    theirs, ours = torch_and_ours("encoder", **kw)
    theirs.eval()
    ours.eval()
    src = randn(BATCH, S_LEN, E, seed=1, dtype=torch.float32)
    pad = padding(S_LEN, (0, 2, 4))
    with torch.no_grad(), _quiet():
        fast, mine = theirs(src, src_key_padding_mask=pad), ours(src, src_key_padding_mask=pad)
        zeros_normed = theirs.norm(torch.zeros(E))
    n_pad = int(pad.sum())
    assert torch.equal(fast[pad], zeros_normed.expand(n_pad, E)), "torch's fast path changed"
    assert not torch.allclose(mine[pad], zeros_normed.expand(n_pad, E))
    assert_close(mine[~pad], fast[~pad])
    slow = theirs(src, src_key_padding_mask=pad)  # gradients on: torch's ordinary path
    assert_close(mine, slow.detach())  # which computes every position, as we do


# --------------------------------------------------------------------------------------
# Causality (section 3.2.3) and padding invariance.
# --------------------------------------------------------------------------------------


def _decoder_with_target(
    kind: str, model: nn.Module, tgt_mask: Tensor, hint: bool | None
) -> Callable[[Tensor], Tensor]:
    """``tgt -> output`` of a decoder layer, decoder stack or whole model, source fixed."""
    memory = randn(BATCH, S_LEN, E, seed=7)
    hint_kw = {} if hint is None else {"tgt_is_causal": hint}

    def run(tgt: Tensor) -> Tensor:
        if kind == "transformer":
            return model(memory, tgt, tgt_mask=tgt_mask, **hint_kw)
        return model(tgt, memory, tgt_mask=tgt_mask, **hint_kw)

    return run


@spec(section="3.2.3", kind="masking")
@pytest.mark.parametrize(
    "mask_form",
    ["float", "bool", "float+hint"],
    ids=["float_mask", "bool_mask", "float_mask_is_causal"],
)
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("kind", ("decoder_layer", "decoder", "transformer"))
def test_decoder_output_at_t_ignores_targets_after_t(
    kind: str, norm_first: bool, mask_form: str
) -> None:
    """With the square subsequent mask, changing target position t changes no decoder output before t (and does change position t): section 3.2.3, no leftward information flow."""
    torch.manual_seed(0)
    model = build(
        kind, layers, batch_first=True, norm_first=norm_first, dropout=0.0, dtype=torch.float64
    )
    mask = causal(T_LEN, torch.float64)
    if mask_form == "bool":
        mask = mask.isinf()  # True above the diagonal = masked out
    run = _decoder_with_target(kind, model, mask, True if mask_form == "float+hint" else None)
    tgt = randn(BATCH, T_LEN, E, seed=3)
    base = run(tgt)
    for t in range(T_LEN):
        changed = tgt.clone()
        changed[:, t] += randn(BATCH, E, seed=100 + t)
        out = run(changed)
        assert torch.equal(out[:, :t], base[:, :t]), f"output before {t} moved"
        assert not torch.allclose(out[:, t], base[:, t]), f"output at {t} ignored its own input"


@spec(section="3.2.3", kind="masking")
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_decoder_jacobian_is_block_lower_triangular(norm_first: bool) -> None:
    """The Jacobian of the model output at position i with respect to target position j is zero exactly when j > i (causal mask, section 3.2.3), on a tiny model."""
    torch.manual_seed(0)
    model = layers.Transformer(
        8, 2, 1, 2, 12, dropout=0.0, norm_first=norm_first, dtype=torch.float64
    )
    src = randn(3, 8, seed=1)
    T = 5
    mask = layers.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(
        lambda tgt: model(src, tgt, tgt_mask=mask), randn(T, 8, seed=2)
    )
    block = jac.abs().sum(dim=(1, 3))  # (T, T): |d out_i / d tgt_j| summed over features
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    assert torch.all(block[future] == 0), f"output depends on later targets:\n{block}"
    assert torch.all(block[~future] > 0), f"output ignores earlier targets:\n{block}"


def _per_row_reference(
    model: nn.Module, kind: str, src: Tensor, tgt: Tensor, s_real: list[int], t_real: list[int]
) -> list[Tensor]:
    """Each batch row alone, unbatched and unpadded: the output every padded run must reproduce."""
    outs = []
    for b, (s, t) in enumerate(zip(s_real, t_real, strict=True)):
        if kind == "encoder":
            outs.append(model(src[b, :s]))
        else:
            mask = causal(t, torch.float64) if kind == "transformer" else None
            outs.append(model(src[b, :s], tgt[b, :t], tgt_mask=mask))
    return outs


@spec(section="torch", kind="masking")
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("kind", ("encoder", "transformer", "transformer-no-tgt-mask"))
def test_padded_positions_change_no_real_output(kind: str, norm_first: bool) -> None:
    """Extra padded source/target positions, whatever their values, marked in the key padding masks leave every real position's output equal to the unpadded run of that sequence alone. Without a causal ``tgt_mask`` only the target key padding mask hides the target's padded positions (with one, the causal mask already hides right padding)."""
    torch.manual_seed(0)
    model = build(
        "encoder" if kind == "encoder" else "transformer",
        layers,
        batch_first=True,
        norm_first=norm_first,
        dropout=0.0,
        dtype=torch.float64,
    )
    s_real, t_real = [S_LEN, 4, 1], [T_LEN, 2, 1]
    src, tgt = randn(BATCH, S_LEN, E, seed=1), randn(BATCH, T_LEN, E, seed=2)
    for b in range(BATCH):  # huge values in the padded slots: they must not leak
        src[b, s_real[b] :] = 1e3 * randn(S_LEN - s_real[b], E, seed=10 + b)
        tgt[b, t_real[b] :] = 1e3 * randn(T_LEN - t_real[b], E, seed=20 + b)
    src_pad = padding(S_LEN, tuple(S_LEN - s for s in s_real))
    tgt_pad = padding(T_LEN, tuple(T_LEN - t for t in t_real))
    if kind == "encoder":
        out = model(src, src_key_padding_mask=src_pad)
        reals = s_real
    else:
        out = model(
            src,
            tgt,
            tgt_mask=causal(T_LEN, torch.float64) if kind == "transformer" else None,
            src_key_padding_mask=src_pad,
            tgt_key_padding_mask=tgt_pad,
            memory_key_padding_mask=src_pad,
        )
        reals = t_real
    assert torch.isfinite(out).all()
    for b, ref in enumerate(_per_row_reference(model, kind, src, tgt, s_real, t_real)):
        assert_close(out[b, : reals[b]], ref, msg=f"batch row {b}")


# --------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------


def _every_constructor(**kw: Any) -> list[Callable[[], nn.Module]]:
    args = {"d_model": E, "nhead": H, **kw}
    return [
        lambda: layers.TransformerEncoderLayer(**args),
        lambda: layers.TransformerDecoderLayer(**args),
        lambda: layers.Transformer(**args),
    ]


@spec(section="3.2.2", kind="error")
@pytest.mark.parametrize(("d_model", "nhead"), [(18, 4), (7, 2)])
def test_d_model_not_divisible_by_nhead_raises_value_error(d_model: int, nhead: int) -> None:
    """``d_model`` must split evenly into ``nhead`` heads (section 3.2.2, d_k = d_model / h); otherwise ValueError naming both."""
    for make in _every_constructor(d_model=d_model, nhead=nhead):
        with pytest.raises(
            ValueError,
            match=rf"d_model must be divisible by nhead.*d_model={d_model}, nhead={nhead}",
        ):
            make()


@spec(section="extra", kind="error")
@pytest.mark.parametrize(
    ("name", "value", "error", "match"),
    [
        ("d_model", 0, ValueError, "d_model must be a positive int, got 0"),
        ("dim_feedforward", -8, ValueError, "dim_feedforward must be a positive int, got -8"),
        ("nhead", 2.0, TypeError, r"nhead must be an int, got float 2\.0"),
        ("dim_feedforward", True, TypeError, "dim_feedforward must be an int, got bool True"),
    ],
)
def test_sizes_that_are_not_positive_ints_raise_errors_naming_them(
    name: str, value: object, error: type[Exception], match: str
) -> None:
    """A layer size (d_model, nhead, dim_feedforward) below 1 raises ValueError, and one that is not an int (a float, a bool) raises TypeError, naming the argument and the value, in every layer class."""
    for make in _every_constructor(**{name: value}):
        with pytest.raises(error, match=match):
            make()


@spec(section="extra", kind="error")
@pytest.mark.parametrize(
    ("name", "value", "error", "match"),
    [
        ("dropout", "x", TypeError, r"dropout must be a real number in \[0, 1\], got str 'x'"),
        ("layer_norm_eps", "a", TypeError, "layer_norm_eps must be a real number, got str 'a'"),
        ("layer_norm_eps", -1e-5, ValueError, "layer_norm_eps must be >= 0, got -1e-05"),
        ("batch_first", "yes", TypeError, "batch_first must be a bool, got str 'yes'"),
        ("norm_first", 1, TypeError, "norm_first must be a bool, got int 1"),
        ("bias", None, TypeError, "bias must be a bool, got NoneType None"),
        ("dtype", "float32", TypeError, "dtype must be a torch.dtype or None, got str"),
        ("dtype", torch.int64, TypeError, "dtype must be a real floating point dtype, got"),
        ("dtype", torch.complex64, TypeError, "dtype must be a real floating point dtype, got"),
        ("device", "nowhere", ValueError, "device='nowhere' is not a device"),
    ],
)
def test_constructor_arguments_of_the_wrong_type_raise_errors_naming_them(
    name: str, value: object, error: type[Exception], match: str
) -> None:
    """Every layer class checks each argument's type before using it: a str dropout, a non-bool flag, a str, integer or complex dtype or an unknown device raises TypeError/ValueError naming the argument and the value seen (torch fails later with an unrelated message, or accepts: a complex dtype builds a module whose every forward then fails)."""
    for make in _every_constructor(**{name: value}):
        with pytest.raises(error, match=match):
            make()


#: The shapes each mask of ``Transformer.forward`` may have, for src (S_LEN, BATCH, E) and
#: tgt (T_LEN, BATCH, E): attention masks (L, S) or (BATCH * H, L, S), padding (BATCH, S).
_MASK_SHAPES = {
    "src_mask": ((S_LEN, S_LEN), (BATCH * H, S_LEN, S_LEN)),
    "tgt_mask": ((T_LEN, T_LEN), (BATCH * H, T_LEN, T_LEN)),
    "memory_mask": ((T_LEN, S_LEN), (BATCH * H, T_LEN, S_LEN)),
    "src_key_padding_mask": ((BATCH, S_LEN),),
    "tgt_key_padding_mask": ((BATCH, T_LEN),),
    "memory_key_padding_mask": ((BATCH, S_LEN),),
}


@spec(section="extra", kind="error")
@pytest.mark.parametrize("mask", list(_MASK_SHAPES))
def test_a_mask_of_the_wrong_shape_is_named_as_the_caller_passed_it_before_any_work(
    mask: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Transformer.forward`` checks each of its six masks against ``src`` and ``tgt`` before the encoder runs and names the mask by its own argument name (``src_key_padding_mask``, not the attention module's ``key_padding_mask``), with the shapes allowed and the one seen."""
    model = layers.Transformer(E, H, 1, 1, FF, dropout=0.0)

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the encoder ran before the masks were checked")

    monkeypatch.setattr(model.encoder, "forward", no_work)
    src, tgt = randn(S_LEN, BATCH, E, seed=1), randn(T_LEN, BATCH, E, seed=2)
    allowed = _MASK_SHAPES[mask]
    wrong = tuple(n + 1 for n in allowed[0])
    dtype = torch.bool if "padding" in mask else torch.float32
    expected = f"{mask} must have shape {allowed[0]}"
    if len(allowed) == 2:
        expected += f" or {allowed[1]}"
    with pytest.raises(ValueError, match=re.escape(f"{expected}, got {wrong}")):
        model(src, tgt, **{mask: torch.zeros(wrong, dtype=dtype)})


@spec(section="extra", kind="error")
def test_layers_and_stacks_name_their_own_mask_and_memory_arguments() -> None:
    """Each layer and stack names a misshapen mask by its own argument (an encoder stack's ``mask``, a layer's ``src_mask``, a decoder's ``memory_key_padding_mask``), and a decoder layer refuses a ``memory`` whose feature size is not d_model, naming ``memory``."""
    src, tgt = randn(S_LEN, BATCH, E, seed=1), randn(T_LEN, BATCH, E, seed=2)
    enc_layer = layers.TransformerEncoderLayer(E, H, FF)
    dec_layer = layers.TransformerDecoderLayer(E, H, FF)
    wrong = torch.zeros(S_LEN + 1, S_LEN + 1)
    memory_pad = torch.zeros(BATCH, S_LEN + 2, dtype=torch.bool)
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: enc_layer(src, src_mask=wrong), f"src_mask must have shape {(S_LEN, S_LEN)}"),
        (
            lambda: layers.TransformerEncoder(enc_layer, 2)(src, mask=wrong),
            f"mask must have shape {(S_LEN, S_LEN)}",
        ),
        (
            lambda: dec_layer(tgt, src, memory_key_padding_mask=memory_pad),
            f"memory_key_padding_mask must have shape {(BATCH, S_LEN)}",
        ),
        (
            lambda: layers.TransformerDecoder(dec_layer, 2)(tgt, src, tgt_mask=wrong),
            f"tgt_mask must have shape {(T_LEN, T_LEN)}",
        ),
        (lambda: dec_layer(tgt, src[..., :4]), f"memory must have {E} features (d_model)"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
    with pytest.raises(TypeError, match=r"memory_key_padding_mask must be a torch\.Tensor or None"):
        dec_layer(tgt, src, memory_key_padding_mask=[[False] * S_LEN] * BATCH)  # type: ignore[arg-type]


@spec(section="torch", kind="masking")
def test_valid_masks_pass_the_shape_checks_for_empty_batches_and_stacks_of_other_widths() -> None:
    """The mask checks accept what torch accepts: a ``(0, L, S)`` mask for an empty batch (B * nhead = 0), and a ``Transformer`` whose custom encoder has another head count than its decoder checks each stack's masks against its own heads."""
    layer = layers.TransformerEncoderLayer(E, H, FF, dtype=torch.float64)
    empty = randn(S_LEN, 0, E, seed=1)
    mask = torch.zeros(0, S_LEN, S_LEN, dtype=torch.float64)
    assert layer(empty, src_mask=mask).shape == empty.shape
    wide = layers.TransformerEncoderLayer(E, 2 * H, FF, dtype=torch.float64)
    encoder = layers.TransformerEncoder(wide, 1)
    model = layers.Transformer(E, H, 1, 1, FF, custom_encoder=encoder, dropout=0.0).double()
    src, tgt = randn(S_LEN, BATCH, E, seed=1), randn(T_LEN, BATCH, E, seed=2)
    out = model(
        src,
        tgt,
        src_mask=torch.zeros(BATCH * 2 * H, S_LEN, S_LEN, dtype=torch.float64),
        tgt_mask=torch.zeros(BATCH * H, T_LEN, T_LEN, dtype=torch.float64),
    )
    assert out.shape == tgt.shape


@spec(section="extra", kind="error")
def test_stack_and_model_arguments_of_the_wrong_type_raise_type_error_naming_them() -> None:
    """The stacks and ``Transformer`` check their own arguments' types: a layer or norm that is not an ``nn.Module``, a float depth or a non-bool fast-path switch raises TypeError naming it."""
    layer = layers.TransformerEncoderLayer(E, H, FF)
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: layers.TransformerEncoder(None, 2), "encoder_layer must be an nn.Module"),  # type: ignore[arg-type]
        (lambda: layers.TransformerEncoder(layer, 2.0), "num_layers must be an int, got float"),  # type: ignore[arg-type]
        (lambda: layers.TransformerEncoder(layer, 2, "ln"), "norm must be an nn.Module or None"),  # type: ignore[arg-type]
        (
            lambda: layers.TransformerEncoder(layer, 2, enable_nested_tensor="no"),  # type: ignore[arg-type]
            "enable_nested_tensor must be a bool, got str 'no'",
        ),
        (
            lambda: layers.TransformerEncoder(layer, 2, mask_check=None),  # type: ignore[arg-type]
            "mask_check must be a bool, got NoneType",
        ),
        (lambda: layers.TransformerDecoder(layer.linear1, 1.5), "num_layers must be an int"),  # type: ignore[arg-type]
        (
            lambda: layers.Transformer(E, H, custom_encoder="enc"),  # type: ignore[arg-type]
            "custom_encoder must be an nn.Module or None, got str",
        ),
        (
            lambda: layers.Transformer(E, H, num_decoder_layers="6"),  # type: ignore[arg-type]
            "num_decoder_layers must be an int, got str '6'",
        ),
        (
            lambda: layers.Transformer.generate_square_subsequent_mask(3.0),  # type: ignore[arg-type]
            r"sz must be an int, got float 3\.0",
        ),
    ]
    for make, match in cases:
        with pytest.raises(TypeError, match=match):
            make()


@spec(section="3.3", kind="error")
def test_unknown_activation_raises_value_error_and_non_callable_type_error() -> None:
    """An activation name other than "relu"/"gelu" raises ValueError naming ``activation`` and the value; a non-callable raises TypeError."""
    for make in _every_constructor(activation="tanh"):
        with pytest.raises(
            ValueError, match=r"activation must be one of \['gelu', 'relu'\].*'tanh'"
        ):
            make()
    for make in _every_constructor(activation=3):
        with pytest.raises(TypeError, match=r"activation must be a str or a callable, got int"):
            make()


@spec(section="5.4", kind="error")
@pytest.mark.parametrize("dropout", [-0.1, 1.5])
def test_dropout_outside_unit_interval_raises_value_error(dropout: float) -> None:
    """A dropout rate outside [0, 1] raises ValueError naming ``dropout`` and the value."""
    for make in _every_constructor(dropout=dropout):
        with pytest.raises(ValueError, match=rf"dropout must be in \[0, 1\], got {dropout}"):
            make()


@spec(section="3.1", kind="error")
@pytest.mark.parametrize("num_layers", [0, -1])
def test_stack_without_layers_raises_value_error(num_layers: int) -> None:
    """A stack needs at least one layer (torch fails later with an IndexError); ValueError names ``num_layers``."""
    with pytest.raises(ValueError, match=rf"num_layers must be a positive int, got {num_layers}"):
        layers.TransformerEncoder(layers.TransformerEncoderLayer(E, H), num_layers)
    with pytest.raises(ValueError, match=rf"num_layers must be a positive int, got {num_layers}"):
        layers.TransformerDecoder(layers.TransformerDecoderLayer(E, H), num_layers)


@spec(section="torch", kind="error")
def test_transformer_rejects_mismatched_batches_and_features() -> None:
    """``Transformer.forward`` rejects src/tgt batch sizes or feature sizes that differ (torch raises RuntimeError; we raise ValueError with the shapes)."""
    model = layers.Transformer(E, H, 1, 1, FF, batch_first=True)
    with pytest.raises(
        ValueError, match=r"batch size of src and tgt must be equal.*\(2, 7, 18\).*\(3, 5, 18\)"
    ):
        model(torch.randn(2, 7, E), torch.randn(3, 5, E))
    with pytest.raises(ValueError, match=r"must equal d_model=18"):
        model(torch.randn(2, 7, E), torch.randn(2, 5, E + 1))
    with pytest.raises(ValueError, match=r"both be batched \(3-D\) or unbatched \(2-D\)"):
        model(torch.randn(2, 7, E), torch.randn(5, E))


@spec(section="torch", kind="error")
def test_is_causal_hint_without_mask_raises_value_error() -> None:
    """``tgt_is_causal=True`` is only a hint about ``tgt_mask``; without the mask it raises ValueError (torch raises RuntimeError) instead of silently attending everywhere."""
    model = layers.TransformerDecoder(layers.TransformerDecoderLayer(E, H, FF), 1)
    with pytest.raises(ValueError, match=r"is_causal=True .* needs attn_mask"):
        model(torch.randn(T_LEN, 2, E), torch.randn(S_LEN, 2, E), tgt_is_causal=True)


@spec(section="torch", kind="equivalence")
def test_transformer_runs_the_custom_encoder_and_decoder_it_is_given() -> None:
    """``Transformer(custom_encoder=..., custom_decoder=...)`` uses those very modules, like torch: its output is the decoder run on the encoder's memory."""
    torch.manual_seed(5)
    encoder = layers.TransformerEncoder(layers.TransformerEncoderLayer(E, H, FF, dropout=0.0), 2)
    decoder = layers.TransformerDecoder(layers.TransformerDecoderLayer(E, H, FF, dropout=0.0), 1)
    model = layers.Transformer(E, H, custom_encoder=encoder, custom_decoder=decoder)
    assert model.encoder is encoder and model.decoder is decoder
    src, tgt = torch.randn(S_LEN, 2, E), torch.randn(T_LEN, 2, E)
    torch.testing.assert_close(model(src, tgt), decoder(tgt, encoder(src)), rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# A drop-in for torch.nn: torch's own documented examples, fast-path switches, NestedTensor.
# --------------------------------------------------------------------------------------


class _OursAsNN:
    """A stand-in for ``torch.nn`` whose Transformer classes (and MultiheadAttention) are ours."""

    def __getattr__(self, name: str) -> Any:
        from transformer import MultiheadAttention

        if name == "MultiheadAttention":
            return MultiheadAttention
        return getattr(layers, name) if name in _CLASSES else getattr(nn, name)


@spec(section="torch", kind="equivalence")
@pytest.mark.parametrize("name", ("MultiheadAttention", *_CLASSES))
def test_torchs_documented_examples_run_unchanged_on_our_classes(name: str) -> None:
    """The usage examples of torch.nn's own docstrings (class and ``forward``), read from the installed torch with ``doctest`` and run with ``nn`` bound to our classes, construct and run unchanged, and every output has the shape torch documents (like the target, or the query)."""
    import doctest

    torch.manual_seed(0)
    theirs = getattr(nn, name)
    # Names torch's examples use without defining them (MultiheadAttention, Transformer.forward).
    namespace: dict[str, Any] = {
        "torch": torch,
        "nn": _OursAsNN(),
        "embed_dim": 16,
        "num_heads": 4,
        "query": torch.rand(5, 2, 16),
        "key": torch.rand(7, 2, 16),
        "value": torch.rand(7, 2, 16),
        "src_mask": nn.Transformer.generate_square_subsequent_mask(10),
        "tgt_mask": nn.Transformer.generate_square_subsequent_mask(20),
    }
    parser = doctest.DocTestParser()
    examples = [
        e
        for doc in (theirs.__doc__, theirs.forward.__doc__)
        for e in parser.get_examples(doc or "")
    ]
    assert examples, f"torch.nn.{name} documents no example any more"
    with _quiet(), torch.no_grad():
        for example in examples:
            exec(compile(example.source, f"<torch.nn.{name} example>", "exec"), namespace)
            for result in ("out", "output", "attn_output"):
                if not re.match(rf"{result}\b", example.source):  # what this line computed
                    continue
                like = namespace["query"] if result == "attn_output" else namespace.get("tgt")
                like = namespace["src"] if like is None else like
                assert namespace[result].shape == like.shape, (example.source, result)
                assert bool(torch.isfinite(namespace[result]).all())
    built = [v for v in namespace.values() if isinstance(v, nn.Module)]
    assert built and all(type(m).__module__.startswith("transformer.") for m in built)


@spec(section="torch", kind="equivalence")
def test_fast_path_switches_are_accepted_and_change_nothing() -> None:
    """``TransformerEncoder(enable_nested_tensor=..., mask_check=...)`` accepts torch's fast-path switches and stores them like torch, and every combination gives the same output (there is no fast path: ``use_nested_tensor`` stays False)."""
    torch.manual_seed(1)
    layer = layers.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True)
    src = randn(BATCH, S_LEN, E, seed=2, dtype=torch.float32)
    pad = padding(S_LEN, (0, 2, 4))
    outputs = []
    for nested, check in itertools.product((True, False), repeat=2):
        stack = layers.TransformerEncoder(layer, 2, enable_nested_tensor=nested, mask_check=check)
        assert (stack.enable_nested_tensor, stack.mask_check) == (nested, check)
        assert stack.use_nested_tensor is False
        stack.load_state_dict(layers.TransformerEncoder(layer, 2).state_dict())
        with torch.no_grad():
            outputs.append(stack.eval()(src, src_key_padding_mask=pad))
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])


@spec(section="torch", kind="error")
@pytest.mark.parametrize("kind", KINDS)
def test_nested_tensor_inputs_raise_type_error_asking_for_padding_and_a_mask(kind: str) -> None:
    """A NestedTensor input (which torch's fast path builds) raises TypeError naming the input and asking for a padded tensor with a key padding mask, in every layer, stack and the Transformer."""
    model = build(kind, layers, batch_first=True, dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: nested tensors are a prototype
        nested = torch.nested.nested_tensor([torch.randn(3, E), torch.randn(2, E)])
    dense = torch.randn(2, 3, E)
    call = {
        "encoder_layer": lambda: model(nested),
        "encoder": lambda: model(nested),
        "decoder_layer": lambda: model(dense, nested),
        "decoder": lambda: model(nested, dense),
        "transformer": lambda: model(nested, dense),
    }[kind]
    with pytest.raises(TypeError, match=r"is a NestedTensor.*padded tensor.*key padding mask"):
        call()


@spec(section="torch", kind="property")
@pytest.mark.parametrize("kind", ["encoder_layer", "decoder_layer"])
def test_layers_call_their_dropout_modules_in_eval_mode_too_as_torch_does(kind: str) -> None:
    """torch's layers call ``dropout``, ``dropout1``, ``dropout2`` (and ``dropout3``) on every forward, whatever the mode, so a forward hook on them fires and a replacement that stays active in eval mode (Monte Carlo dropout) is honoured; skipping them in eval mode would silently change both."""
    fired: list[str] = []
    for lib in (nn, layers):
        model = build(kind, lib, batch_first=True, dropout=0.0).eval()
        names = [n for n, m in model.named_children() if isinstance(m, nn.Dropout)]
        for name in names:
            getattr(model, name).register_forward_hook(
                lambda *_, lib=lib, name=name: fired.append(f"{lib.__name__}.{name}")
            )
        x = randn(2, 4, E, seed=1, dtype=torch.float32)
        args = (x,) if kind == "encoder_layer" else (x, randn(2, 3, E, seed=2, dtype=torch.float32))
        with torch.no_grad():
            plain = model(*args)
            model.dropout1 = nn.Dropout(0.5).train()  # active although the layer is in eval
            torch.manual_seed(0)
            dropped = model(*args)
        assert not torch.equal(plain, dropped), f"{lib.__name__}: the active dropout1 was skipped"
    ours = sorted(f for f in fired if f.startswith("transformer"))
    theirs = sorted(
        f.replace("torch.nn", "transformer.layers") for f in fired if f.startswith("torch")
    )
    assert ours == theirs and ours, fired
