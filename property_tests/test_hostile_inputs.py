"""Hostile inputs: every public entry point answers correctly or refuses clearly.

The law each test states for one public function: hypothesis builds a *valid* call, then
damages one argument in one way (a wrong rank or shape, an integer/bool/complex or
mismatched float dtype, something that is not a tensor, an empty or zero-length tensor,
a mask of the wrong dtype or shape, an out-of-range or negative token id, an
out-of-range scalar). Whether the damaged call is still valid is decided here,
independently of the package (``torch.broadcast_shapes`` and the documented shape rules), and:

* a call that is still valid (a zero-length sequence, an empty batch, a mask that
  broadcasts, ``-1e9`` in a float mask) returns a result of the documented shape,
  finite when its inputs are finite;
* an invalid call raises ``ValueError`` or ``TypeError`` whose message names the
  argument at fault; never ``IndexError``/``RuntimeError`` from deep inside torch.

Modules built from :class:`~transformer.MultiheadAttention` (the layers, the model's
``decode``) may phrase the refusal in the words of the sub-module that caught it
("key has 5 features in shape (2, 5, 5)"); their law accepts a message that names the
argument *or* shows the offending shape or dtype, so the user can still find the culprit.

Non-finite values *in* the inputs are a separate law (see the module docstring of
:mod:`transformer.attention`): they propagate like torch's, never into a
finite-looking answer, and stay inside their own ``(batch, head)`` slice.

Notation: B batch, H heads, L target length, S source length, E head dim (attention)
or ``d_model`` (modules), Ev value head dim, V vocabulary size.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import transformer
from transformer import MultiheadAttention
from transformer.feed_forward import FeedForward
from transformer.layers import Transformer, TransformerDecoderLayer, TransformerEncoderLayer
from transformer.model import ModelConfig, Seq2SeqTransformer
from transformer.positional import SinusoidalPositionalEncoding

spec = functools.partial(pytest.mark.spec, section="extra", kind="error")

KERNELS = [
    pytest.param(name, id=name, marks=[pytest.mark.triton] if name == "triton" else [])
    for name in transformer.available_kernels("cpu")
]
GOOD_ERRORS = (ValueError, TypeError)
#: dtypes that are not floating point: a tensor of token ids, a mask, a complex signal.
NON_FLOAT = (torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64)
VOCAB = 11


def randn(shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(dtype)


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` converted to ``dtype`` (bool from the sign, so the values stay varied)."""
    return t > 0 if dtype == torch.bool else t.to(dtype)


@dataclass
class Expect:
    """What a call must do: refuse naming one of ``names``, or return ``shape`` (finite)."""

    names: tuple[str, ...] = ()
    shape: tuple[int, ...] | None = None
    finite: bool = True

    @property
    def refuses(self) -> bool:
        return bool(self.names)


def check(call: Callable[[], Any], expect: Expect, label: str = "") -> Any:
    """Run ``call`` and hold it to ``expect`` (see the module docstring)."""
    if expect.refuses:
        with pytest.raises(GOOD_ERRORS) as info:
            call()
        msg = str(info.value)
        # Whole words: the name "x" is not found in "expected", nor "src" in "srcs".
        assert any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", msg) for n in expect.names), (
            f"{label}: {type(info.value).__name__}({msg!r}) names none of {expect.names}"
        )
        return None
    out = call()
    result = out[0] if isinstance(out, tuple) else out
    if expect.shape is not None:
        assert tuple(result.shape) == expect.shape, f"{label}: shape {tuple(result.shape)}"
    if expect.finite and result.is_floating_point():
        assert bool(torch.isfinite(result).all()), f"{label}: non-finite output from finite input"
    return out


def fits(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Does ``shape`` broadcast to exactly ``target``?"""
    try:
        return tuple(torch.broadcast_shapes(tuple(shape), tuple(target))) == tuple(target)
    except RuntimeError:
        return False


def not_a_tensor(t: Tensor, choice: int) -> Any:
    """Something a careless caller passes instead of a tensor."""
    return [t.tolist(), None, 1.0, "tensor"][choice]


# --------------------------------------------------------------------------------------
# scaled_dot_product_attention
# --------------------------------------------------------------------------------------


@dataclass
class Call:
    """Keyword arguments of one call and what it must do."""

    kwargs: dict[str, Any]
    expect: Expect = field(default_factory=Expect)
    label: str = ""


@st.composite
def sdpa_calls(draw: st.DrawFn, target: str, valid: bool = False) -> Call:
    """An SDPA call with ``target`` damaged, or (``valid``) made unusual but still valid.

    Sizes include zeros on purpose (empty batch, ``L = 0``, ``S = 0``, ``E = 0``, ``Ev = 0``).
    """
    B, H = draw(st.integers(0, 2)), draw(st.integers(1, 3))
    L, S = draw(st.integers(0, 7)), draw(st.integers(0, 7))
    E, Ev = draw(st.integers(0, 9)), draw(st.integers(0, 9))
    seed = draw(st.integers(0, 2**16))
    kw: dict[str, Any] = {
        "query": randn((B, H, L, E), seed),
        "key": randn((B, H, S, E), seed + 1),
        "value": randn((B, H, S, Ev), seed + 2),
        "attn_mask": None,
        "dropout_p": 0.0,
        "is_causal": draw(st.booleans()),
        "scale": None,
        "enable_gqa": False,
    }
    shapes = {n: tuple(kw[n].shape) for n in ("query", "key", "value")}
    kind = ""
    names: tuple[str, ...] = ()
    if target in ("query", "key", "value"):
        t = kw[target]
        kinds = ["batch"] if valid else ["dtype", "float", "type", "rank", "dim", "batch"]
        kind = draw(st.sampled_from(kinds))
        if kind == "dtype":
            kw[target], names = as_dtype(t, draw(st.sampled_from(NON_FLOAT))), (target,)
        elif kind == "float":
            kw[target], names = (
                t.to(draw(st.sampled_from([torch.float64, torch.float16]))),
                (target,),
            )
        elif kind == "type":
            kw[target], names = not_a_tensor(t, draw(st.integers(0, 3))), (target,)
        elif kind == "rank":
            kw[target], names = (t.sum() if draw(st.booleans()) else t.reshape(-1)), (target,)
        elif kind == "dim" and target == "value":
            # Ev is free, S is not: a value of another length than the key.
            kw[target], names = randn((B, H, S + 1, Ev), seed), (target,)
        elif kind == "dim":
            kw[target] = randn((*t.shape[:-1], E + 1), seed)  # head dims E disagree
            names = (target,)
        else:
            # Another batch size: valid only where it broadcasts with the other two.
            sizes = st.sampled_from([1, B]) if valid else st.integers(0, 3)
            shapes[target] = (draw(sizes), *t.shape[1:])
            kw[target] = randn(shapes[target], seed)
            batches = [shapes[n][:-2] for n in ("query", "key", "value")]
            try:
                torch.broadcast_shapes(*batches)
            except RuntimeError:
                names = (target,)
    elif target == "attn_mask":
        kind = draw(
            st.sampled_from(["fitting", "extreme"] if valid else ["shape", "dtype", "type"])
        )
        if kind == "fitting":
            # Leading dims dropped, any dim 1: broadcasts to (B, H, L, S).
            full = (B, H, L, S)
            mshape = tuple(n if draw(st.booleans()) else 1 for n in full)
            kw["attn_mask"] = randn(mshape[draw(st.integers(0, 4)) :], seed + 3) > 0
        elif kind == "shape":
            rank = draw(st.integers(0, 5))
            pool = [1, B, H, L, S, draw(st.integers(0, 4))]
            mshape = tuple(draw(st.sampled_from(pool)) for _ in range(rank))
            kw["attn_mask"] = randn(mshape, seed + 3) > 0
            if not fits(mshape, (B, H, L, S)):
                names = ("attn_mask",)
        elif kind == "dtype":
            mask = as_dtype(randn((L, S), seed + 3), draw(st.sampled_from(NON_FLOAT[:-2])))
            kw["attn_mask"] = mask.to(torch.complex64) if draw(st.booleans()) else mask
            names = ("attn_mask",)
        elif kind == "type":
            kw["attn_mask"], names = [[True] * S] * L, ("attn_mask",)
        else:
            # Very negative but finite: behaves like -inf, never NaN.
            big = draw(st.sampled_from([-1e9, torch.finfo(torch.float32).min, float("-inf")]))
            kw["attn_mask"] = torch.where(randn((L, S), seed + 3) > 0, 0.0, big)
    elif target == "dropout_p":
        kw["dropout_p"] = draw(st.sampled_from([-0.1, 1.0, 1.5, float("nan"), "0.1", True, None]))
        names = ("dropout_p",)
    elif target == "scale":
        kind = "odd" if valid else "bad"
        if kind == "bad":
            bad = [float("nan"), float("inf"), "1", True, torch.tensor(0.5)]
            kw["scale"], names = draw(st.sampled_from(bad)), ("scale",)
        else:
            kw["scale"] = draw(st.sampled_from([0.0, -1.0, 1e-3, 3.0]))  # odd but valid
    elif target == "flags" and not valid:
        flag = draw(st.sampled_from(["is_causal", "enable_gqa"]))
        kw[flag], names = draw(st.sampled_from([1, 0, None, "yes", torch.tensor(True)])), (flag,)
    out_shape = None
    if not names:
        batch = torch.broadcast_shapes(*(shapes[n][:-2] for n in ("query", "key", "value")))
        out_shape = (*batch, L, Ev)
    return Call(kw, Expect(names=names, shape=out_shape), f"{target}/{kind}")


SDPA_ARGS = ["query", "key", "value", "attn_mask", "dropout_p", "scale", "flags"]
#: Arguments that can be made unusual but valid (broadcast batches, masks, extreme values).
SDPA_VALID = ["query", "key", "value", "attn_mask", "scale", "flags"]
#: Validation happens once, at the front door, before a kernel is picked; every plain
#: PyTorch kernel is drawn anyway so a kernel that re-validates differently is caught.
CPU_KERNELS = [k for k in transformer.available_kernels("cpu") if k != "triton"]


@spec(component="attention", section="3.2.1")
@pytest.mark.parametrize("target", SDPA_ARGS)
@given(data=st.data(), kernel=st.sampled_from(CPU_KERNELS))
def test_sdpa_bad_argument_raises_error_naming_it(
    target: str, kernel: str, data: st.DataObject
) -> None:
    """scaled_dot_product_attention with one malformed argument raises ValueError/TypeError naming it (or, where the change left the call valid, returns a finite (..., L, Ev) result)."""
    call = data.draw(sdpa_calls(target))
    sdpa = functools.partial(transformer.scaled_dot_product_attention, kernel=kernel)
    check(lambda: sdpa(**call.kwargs), call.expect, call.label)


@spec(component="attention", section="3.2.1", kind="property")
@pytest.mark.parametrize("kernel", KERNELS)
@given(call=st.sampled_from(SDPA_VALID).flatmap(lambda t: sdpa_calls(t, valid=True)))
def test_sdpa_unusual_valid_input_gives_finite_result_of_documented_shape(
    kernel: str, call: Call
) -> None:
    """Zero-length or empty dims, broadcast batches and masks, -1e9/finfo.min/-inf masks and odd scales give a finite (..., L, Ev) result on every kernel."""
    sdpa = functools.partial(transformer.scaled_dot_product_attention, kernel=kernel)
    check(lambda: sdpa(**call.kwargs), call.expect, call.label)


@spec(component="attention", section="3.2.1")
@given(name=st.sampled_from(["nope", "", "REFERENCE"]), other=st.sampled_from([1, b"reference"]))
def test_sdpa_unknown_or_mistyped_kernel_is_refused_naming_the_kernel(
    name: str, other: Any
) -> None:
    """An unknown kernel name raises ValueError listing the known kernels; a non-str kernel raises TypeError naming kernel."""
    q = randn((1, 3, 4), 0)
    with pytest.raises(ValueError, match="known kernels") as info:
        transformer.scaled_dot_product_attention(q, q, q, kernel=name)
    assert "reference" in str(info.value)
    with pytest.raises(TypeError, match="kernel"):
        transformer.scaled_dot_product_attention(q, q, q, kernel=other)


@st.composite
def nan_placements(draw: st.DrawFn) -> tuple[str, tuple[int, int, int, int], float, int]:
    """Where to put one non-finite number in (B=2, H=2, L=5, S=6) attention inputs."""
    target = draw(st.sampled_from(["query", "key", "value"]))
    b, h = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    row = draw(st.integers(0, 4 if target == "query" else 5))
    col = draw(st.integers(0, 7))
    bad = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    return target, (b, h, row, col), bad, draw(st.integers(0, 2**16))


@spec(component="attention", section="3.2.1", kind="property")
@pytest.mark.parametrize("kernel", KERNELS)
@given(placement=nan_placements())
def test_non_finite_input_stays_in_its_slice_and_nan_is_never_hidden(
    kernel: str, placement: tuple[str, tuple[int, int, int, int], float, int]
) -> None:
    """A NaN/inf in query, key or value leaves every other (batch, head) slice bit-for-bit unchanged, a NaN query stays in its row, and a row reading a NaN is non-finite (documented in transformer.attention)."""
    target, (b, h, row, col), bad, seed = placement
    clean = {
        "query": randn((2, 2, 5, 8), seed),
        "key": randn((2, 2, 6, 8), seed + 1),
        "value": randn((2, 2, 6, 8), seed + 2),
    }
    dirty = {n: t.clone() for n, t in clean.items()}
    dirty[target][b, h, row, col] = bad
    sdpa = functools.partial(transformer.scaled_dot_product_attention, kernel=kernel)
    want, got = sdpa(**clean), sdpa(**dirty)
    others = torch.ones(2, 2, dtype=torch.bool)
    others[b, h] = False
    assert torch.equal(got[others], want[others]), "a non-finite input leaked into another slice"
    if target == "query":
        rows = torch.arange(5) != row
        assert torch.equal(got[b, h, rows], want[b, h, rows]), (
            "a query's NaN leaked into other rows"
        )
    if bad != bad:  # NaN: every row attending to it must show it (no mask here)
        hit = got[b, h, row] if target == "query" else got[b, h]
        assert not bool(torch.isfinite(hit).all(dim=-1).any()), "NaN input gave a finite row"


# --------------------------------------------------------------------------------------
# MultiheadAttention.forward
# --------------------------------------------------------------------------------------


@st.composite
def mha_calls(draw: st.DrawFn, target: str) -> tuple[MultiheadAttention, Call]:
    """A MultiheadAttention and a valid forward call with ``target`` damaged."""
    H, D = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    E = H * D
    kdim, vdim = draw(st.sampled_from([E, 5])), draw(st.sampled_from([E, 3]))
    batch_first, batched = draw(st.booleans()), draw(st.booleans())
    B, L, S = draw(st.integers(0, 2)), draw(st.integers(0, 6)), draw(st.integers(0, 6))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    mha = MultiheadAttention(E, H, kdim=kdim, vdim=vdim, batch_first=batch_first).eval()

    def seq(T: int, F: int, s: int, b: int = B) -> Tensor:
        if not batched:
            return randn((T, F), s)  # (T, F)
        return randn((b, T, F) if batch_first else (T, b, F), s)

    kw: dict[str, Any] = {
        "query": seq(L, E, seed),
        "key": seq(S, kdim, seed + 1),
        "value": seq(S, vdim, seed + 2),
        "key_padding_mask": None,
        "need_weights": draw(st.booleans()),
        "attn_mask": None,
    }
    kpm_shape = (B, S) if batched else (S,)
    kind = ""
    names: tuple[str, ...] = ()
    if target in ("query", "key", "value"):
        t = kw[target]
        kind = draw(st.sampled_from(["dtype", "float", "type", "rank", "features", "length"]))
        names = (target,)
        if kind == "dtype":
            kw[target] = as_dtype(t, draw(st.sampled_from(NON_FLOAT)))
        elif kind == "float":
            kw[target] = t.to(draw(st.sampled_from([torch.float64, torch.float16])))
        elif kind == "type":
            kw[target] = not_a_tensor(t, draw(st.integers(0, 3)))
        elif kind == "rank":
            kw[target] = t.reshape(-1) if draw(st.booleans()) else t[None, None]
        elif kind == "features":
            kw[target] = randn((*t.shape[:-1], t.size(-1) + 1), seed)
        elif target == "query":
            # Another batch size for the query (batched only; unbatched: L is free).
            if batched:
                kw["query"] = seq(L, E, seed, b=B + 1)
            else:
                names = ()
        else:
            kw[target] = seq(S + 1, t.size(-1), seed)  # key and value lengths disagree
    elif target == "key_padding_mask":
        kind = draw(st.sampled_from(["dtype", "shape", "rank", "float"]))
        base = randn(kpm_shape, seed + 3) > 0
        if kind == "dtype":
            kw["key_padding_mask"] = as_dtype(base.double(), draw(st.sampled_from(NON_FLOAT[:-2])))
            names = ("key_padding_mask",)
        elif kind == "shape":
            kw["key_padding_mask"] = randn((*kpm_shape[:-1], S + 1), seed) > 0
            names = ("key_padding_mask",)
        elif kind == "rank":
            kw["key_padding_mask"] = base[..., None]
            names = ("key_padding_mask",)
        else:
            big = draw(st.sampled_from([-1e9, torch.finfo(torch.float32).min, float("-inf")]))
            if base.numel() and draw(st.booleans()):
                base.view(-1, S)[0] = True  # the first batch row pads every key
            kw["key_padding_mask"] = torch.where(base, big, 0.0)  # valid, may mask whole rows
    elif target == "attn_mask":
        kind = draw(st.sampled_from(["dtype", "shape", "heads", "float"]))
        names = ("attn_mask",)
        if kind == "dtype":
            kw["attn_mask"] = as_dtype(randn((L, S), seed), draw(st.sampled_from(NON_FLOAT[:-2])))
        elif kind == "shape":
            kw["attn_mask"] = randn((L + 1, S), seed) > 0
        elif kind == "heads":
            # A 3-D mask must be (B*H, L, S); another leading size is refused.
            lead = max(B, 1) + 1
            kw["attn_mask"] = randn((lead, L, S), seed) > 0
            if lead == (B if batched else 1) * H:
                names = ()
        else:
            big = draw(st.sampled_from([-1e9, torch.finfo(torch.float32).min, float("-inf")]))
            masked = randn((L, S), seed) > 0
            if masked.numel() and draw(st.booleans()):
                masked[0] = True  # the first query may see no key
            kw["attn_mask"] = torch.where(masked, big, 0.0)
            names = ()
    out_shape = None
    if not names:
        out_shape = (*kw["query"].shape[:-1], E)
    return mha, Call(kw, Expect(names=names, shape=out_shape), f"{target}/{kind}")


@spec(component="multi_head_attention", section="3.2.2")
@pytest.mark.parametrize(
    "target", ["query", "key", "value", "key_padding_mask", "attn_mask", "valid"]
)
@given(data=st.data())
def test_mha_returns_query_shaped_output_or_raises_error_naming_the_bad_argument(
    target: str, data: st.DataObject
) -> None:
    """MultiheadAttention.forward either returns a finite output shaped like query (zero lengths, empty batch, fully padded rows included) or raises ValueError/TypeError naming the argument at fault."""
    mha, call = data.draw(mha_calls(target))
    out = check(lambda: mha(**call.kwargs), call.expect, call.label)
    if out is not None and out[1] is not None:
        assert bool(torch.isfinite(out[1]).all()), "non-finite attention weights"


# --------------------------------------------------------------------------------------
# Layers, positional encoding, feed-forward
# --------------------------------------------------------------------------------------

D_MODEL = 8


def culprit(name: str, t: Any) -> tuple[str, ...]:
    """Words that identify a bad tensor ``t`` passed as ``name``: its name, shape or dtype."""
    if not isinstance(t, Tensor):
        return (name, type(t).__name__)
    return (name, str(tuple(t.shape)), str(t.dtype))


@functools.cache
def layer_module(which: str) -> torch.nn.Module:
    """A small batch-first layer or stack (E=8, 2 heads, d_ff=16, no dropout), eval mode."""
    torch.manual_seed(0)
    module: torch.nn.Module
    if which == "encoder_layer":
        module = TransformerEncoderLayer(D_MODEL, 2, 16, 0.0, batch_first=True)
    elif which == "decoder_layer":
        module = TransformerDecoderLayer(D_MODEL, 2, 16, 0.0, batch_first=True)
    else:
        module = Transformer(D_MODEL, 2, 1, 1, 16, 0.0, batch_first=True)
    return module.eval()


LAYER_INPUTS = {
    "encoder_layer": ["src"],
    "decoder_layer": ["tgt", "memory"],
    "transformer": ["src", "tgt"],
}


@st.composite
def layer_calls(draw: st.DrawFn) -> tuple[str, Call]:
    """An encoder layer, decoder layer or Transformer (batch first) with one input damaged."""
    which = draw(st.sampled_from(sorted(LAYER_INPUTS)))
    seq_args = LAYER_INPUTS[which]
    B, T = draw(st.integers(0, 2)), draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2**16))
    kw: dict[str, Any] = {n: randn((B, T, D_MODEL), seed + i) for i, n in enumerate(seq_args)}
    target = draw(st.sampled_from(seq_args))
    kinds = ["dtype", "float", "type", "rank", "features", "valid"]
    kind = draw(st.sampled_from(kinds))
    t = kw[target]
    if kind == "dtype":
        kw[target] = as_dtype(t, draw(st.sampled_from(NON_FLOAT)))
    elif kind == "float":
        kw[target] = t.double()
    elif kind == "type":
        kw[target] = not_a_tensor(t, draw(st.integers(0, 3)))
    elif kind == "rank":
        kw[target] = t[None] if draw(st.booleans()) else t.reshape(-1)
    elif kind == "features":
        kw[target] = randn((B, T, D_MODEL + 1), seed)
    if kind == "valid":
        out_shape = tuple(kw[seq_args[-1] if which == "transformer" else seq_args[0]].shape)
        return which, Call(kw, Expect(shape=out_shape), kind)
    return which, Call(kw, Expect(names=culprit(target, kw[target])), f"{which}/{target}/{kind}")


@spec(component="layers", section="3.1")
@given(case=layer_calls())
def test_layers_return_input_shaped_output_or_raise_error_identifying_the_bad_input(
    case: tuple[str, Call],
) -> None:
    """Encoder layer, decoder layer and Transformer return a finite output shaped like their input or raise ValueError/TypeError naming the input, its shape or its dtype."""
    which, call = case
    check(lambda: layer_module(which)(**call.kwargs), call.expect, call.label)


@spec(component="positional", section="3.5")
@given(
    batch_first=st.booleans(),
    lead=st.lists(st.sampled_from([0, 1, 2, 10, 11]), min_size=0, max_size=3),
    features=st.sampled_from([8, 7, 0]),
)
def test_positional_encoding_refuses_bad_shapes_naming_the_problem(
    batch_first: bool, lead: list[int], features: int
) -> None:
    """SinusoidalPositionalEncoding accepts (B, T, E) and (T, E) with T <= max_len, zero lengths included, and refuses other shapes with a ValueError naming x, d_model or max_len (section 3.5)."""
    pe = SinusoidalPositionalEncoding(8, max_len=10, dropout=0.0, batch_first=batch_first)
    x = torch.randn(*lead, features)
    time = 1 if (x.dim() == 3 and batch_first) else 0
    valid = x.dim() in (2, 3) and x.size(-1) == 8 and x.size(time) <= 10
    expect = Expect(shape=tuple(x.shape)) if valid else Expect(names=("x", "d_model", "max_len"))
    check(lambda: pe(x), expect)


@spec(component="feed_forward", section="3.3", kind="shape")
@given(lead=st.lists(st.integers(0, 3), min_size=0, max_size=3))
def test_feed_forward_keeps_every_leading_shape_including_empty_ones(lead: list[int]) -> None:
    """FeedForward maps (..., E) to a finite (..., E) for any leading dims, empty ones included (section 3.3, position-wise)."""
    torch.manual_seed(0)
    ff = FeedForward(D_MODEL, 16, dropout=0.0)
    x = torch.randn(*lead, D_MODEL)
    check(lambda: ff(x), Expect(shape=tuple(x.shape)))


# --------------------------------------------------------------------------------------
# Seq2SeqTransformer, generation, checkpoints
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def tiny_model() -> Seq2SeqTransformer:
    """One tiny model (V=11, E=32, max_len 512) shared by the examples: it is never trained."""
    torch.manual_seed(0)
    return Seq2SeqTransformer.from_config(ModelConfig.tiny(VOCAB)).eval()


@st.composite
def token_ids(draw: st.DrawFn, name: str, B: int, T: int, seed: int) -> tuple[Any, Expect]:
    """Token ids ``(B, T)`` for argument ``name``, maybe damaged, and what the model must do."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)  # pad (0) included on purpose
    kind = draw(
        st.sampled_from(["valid", "high", "negative", "dtype", "rank", "type", "long", "empty"])
    )
    if kind == "valid":
        return ids, Expect()
    if kind in ("high", "negative") and ids.numel() == 0:
        return ids, Expect()
    if kind == "high":
        ids[0, -1] = VOCAB + draw(st.integers(0, 100))
    elif kind == "negative":
        ids[0, 0] = -draw(st.integers(1, 100))
    elif kind == "dtype":
        return as_dtype(ids.double(), draw(st.sampled_from([torch.float32, torch.bool]))), Expect(
            names=(name,)
        )
    elif kind == "rank":
        return (ids.reshape(-1) if draw(st.booleans()) else ids[None]), Expect(names=(name,))
    elif kind == "type":
        return ids.tolist(), Expect(names=(name,))
    elif kind == "long":
        return torch.ones(B, 513, dtype=torch.long), Expect(names=(name, "max_len"))
    else:
        # Zero-length: a documented refusal or a correct empty-aware answer are both fine.
        return ids[:, :0], Expect(names=(name,))
    return ids, Expect(names=(name,))


def answer_or_refuse(
    call: Callable[[], Any], expect: Expect, validate: Callable[[Any], None], *, empty: bool
) -> None:
    """Like :func:`check`, but an ``empty`` (zero-length, well-formed) input may be answered.

    A zero-length sequence is either refused with a message naming it or answered with a
    result that ``validate`` accepts; anything else must be refused as ``expect`` says.
    """
    refusal: Exception | None = None
    try:
        out = call()
    except GOOD_ERRORS as err:
        refusal = err
    if refusal is not None:
        assert expect.refuses, f"refused a valid call: {refusal!r}"
        msg = str(refusal)
        assert any(n in msg for n in expect.names), f"{refusal!r} names none of {expect.names}"
        return
    assert not expect.refuses or empty, f"accepted a call that names {expect.names} as bad"
    validate(out)


def is_empty_ids(ids: Any) -> bool:
    """Well-formed integer ids with no element: ``(0, T)`` or ``(B, 0)``."""
    integer = isinstance(ids, Tensor) and not (ids.is_floating_point() or ids.dtype == torch.bool)
    return integer and ids.dim() == 2 and ids.numel() == 0


@spec(component="model", section="3.4")
@given(
    B=st.integers(0, 2),
    S=st.integers(1, 6),
    L=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    which=st.sampled_from(["src", "tgt_in"]),
    data=st.data(),
)
def test_model_forward_returns_logits_or_raises_error_naming_the_bad_ids(
    B: int, S: int, L: int, seed: int, which: str, data: st.DataObject
) -> None:
    """Seq2SeqTransformer.forward returns finite (B, L, V) logits, all-padding rows included, or raises ValueError/TypeError naming src or tgt_in for out-of-range, negative, mistyped or misshapen ids."""
    model = tiny_model()
    gen = torch.Generator().manual_seed(seed)
    ids = {
        "src": torch.randint(0, VOCAB, (B, S), generator=gen),
        "tgt_in": torch.randint(0, VOCAB, (B, L), generator=gen),
    }
    T = S if which == "src" else L
    ids[which], expect = data.draw(token_ids(which, B, T, seed))
    # A row of padding only (id 0), in src or tgt_in, unless that would undo the damage.
    padded = data.draw(st.sampled_from(["none", "src", "tgt_in"]))
    if padded != "none" and B > 0 and (padded != which or not expect.refuses):
        t = ids[padded]
        if isinstance(t, Tensor) and t.dim() == 2 and t.size(0) == B and t.size(1) > 0:
            ids[padded] = t.clone()
            ids[padded][0] = 0
    src, tgt_in = ids["src"], ids["tgt_in"]

    def validate(logits: Tensor) -> None:
        check(lambda: logits, Expect(shape=(B, tgt_in.size(-1), VOCAB)))

    answer_or_refuse(lambda: model(src, tgt_in), expect, validate, empty=is_empty_ids(ids[which]))


@spec(component="model", section="3.1")
@given(
    kind=st.sampled_from(["shape", "dtype", "double", "type", "batch"]),
    seed=st.integers(0, 2**16),
)
def test_model_decode_refuses_foreign_memory_identifying_it(kind: str, seed: int) -> None:
    """Seq2SeqTransformer.decode refuses a memory of the wrong shape, dtype or type with ValueError/TypeError naming memory, its shape or its dtype."""
    model = tiny_model()
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(1, VOCAB, (2, 5), generator=gen)
    tgt_in = torch.randint(1, VOCAB, (2, 3), generator=gen)
    memory: Any = model.encode(src).detach()
    if kind == "shape":
        memory = memory[:, :3]
    elif kind == "dtype":
        memory = as_dtype(memory, NON_FLOAT[seed % len(NON_FLOAT)])
    elif kind == "double":
        memory = memory.double()
    elif kind == "type":
        memory = memory.tolist()
    else:
        memory = memory[:1]
    check(lambda: model.decode(tgt_in, memory, src), Expect(names=culprit("memory", memory)))


@st.composite
def search_calls(draw: st.DrawFn, beam: bool) -> Call:
    """Arguments of greedy_decode/beam_search with one of them damaged."""
    B = draw(st.integers(0, 2))
    S = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    src, src_expect = draw(token_ids("src", B, S, seed))
    kw: dict[str, Any] = {"model": tiny_model(), "src": src, "max_len": 3, "bos_id": 1, "eos_id": 2}
    if beam:
        kw["beam_size"] = 2
    names = src_expect.names
    if not names:
        options = ["max_len", "bos_id", "eos_id", "model", "valid"]
        if beam:
            options += ["beam_size", "length_penalty"]
        target = draw(st.sampled_from(options))
        bad: dict[str, list[Any]] = {
            "max_len": [0, -1, 2.5, None, True],
            "bos_id": [-1, VOCAB, 1.0, None],
            "eos_id": [-1, VOCAB + 5, "2"],
            "model": [torch.nn.Linear(2, 2), None],
            "beam_size": [0, -2, 1.5],
            "length_penalty": [-0.1, float("nan"), "0.6", None],
        }
        if target != "valid":
            kw[target], names = draw(st.sampled_from(bad[target])), (target,)
    return Call(kw, Expect(names=names))


def check_search(fn: Callable[..., Tensor], call: Call) -> None:
    """Hold a search to its law: valid tokens ``(B, <= max_len)`` or a refusal naming the culprit."""
    src = call.kwargs["src"]

    def validate(out: Tensor) -> None:
        assert out.dtype == torch.int64 and out.size(0) == src.size(0), out.shape
        assert out.size(1) <= call.kwargs["max_len"], out.shape
        assert bool(((out >= 0) & (out < VOCAB)).all()), out

    answer_or_refuse(lambda: fn(**call.kwargs), call.expect, validate, empty=is_empty_ids(src))


@spec(component="generation", section="extra")
@given(call=search_calls(beam=False))
def test_greedy_decode_returns_valid_tokens_or_raises_error_naming_the_bad_argument(
    call: Call,
) -> None:
    """greedy_decode returns (B, <=max_len) in-vocabulary int64 tokens, an empty batch included, or raises ValueError/TypeError naming the bad argument."""
    check_search(transformer.greedy_decode, call)


@spec(component="generation", section="extra")
@given(call=search_calls(beam=True))
def test_beam_search_returns_valid_tokens_or_raises_error_naming_the_bad_argument(
    call: Call,
) -> None:
    """beam_search returns (B, <=max_len) in-vocabulary int64 tokens or raises ValueError/TypeError naming the bad argument."""
    check_search(transformer.beam_search, call)


@functools.lru_cache(maxsize=1)
def saved_checkpoint() -> Path:
    """One checkpoint of :func:`tiny_model`, written once per session."""
    root = Path(tempfile.mkdtemp(prefix="hostile-ckpt-"))
    transformer.save_checkpoint(root / "ckpt", tiny_model(), step=7)
    return root / "ckpt"


def resign(directory: Path, name: str) -> None:
    """Make the manifest agree with ``name``'s current bytes (damage behind a valid hash)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    data = (directory / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (directory / "manifest.json").write_text(json.dumps(manifest))


DAMAGES = ["delete", "truncate", "empty", "flip", "garbage", "directory"]
CHECKPOINT_FILES = ["model.safetensors", "config.json", "meta.json", "manifest.json"]
# Every (file, damage) pair, each run (hypothesis draws only where and whether the manifest
# is re-signed), less a flip in the manifest: a flipped digit of its informational "size"
# field can leave valid JSON and intact hashes, a checkpoint not damaged at all. Plus a
# flip inside the tensor data, past the safetensors header, which only the hash can see.
FILE_DAMAGES = [
    pytest.param(name, damage, id=f"{name}-{damage}")
    for name in CHECKPOINT_FILES
    for damage in DAMAGES
    if not (name == "manifest.json" and damage == "flip")
] + [pytest.param("model.safetensors", "flip-data", id="model.safetensors-flip-data")]


@spec(component="checkpoint", section="extra")
@pytest.mark.parametrize(("name", "damage"), FILE_DAMAGES)
@given(where=st.floats(0.0, 1.0), resigned=st.booleans())
def test_damaged_checkpoint_raises_checkpoint_error_naming_the_file(
    name: str, damage: str, where: float, resigned: bool
) -> None:
    """load_checkpoint on a directory with one file deleted, truncated, emptied, bit-flipped (the tensor bytes included), overwritten or replaced by a folder raises CheckpointError (a ValueError) naming that file."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ckpt"
        shutil.copytree(saved_checkpoint(), directory)
        file = directory / name
        data = file.read_bytes()
        if damage == "delete":
            file.unlink()
        elif damage == "truncate":
            file.write_bytes(data[: int(where * (len(data) - 1))])
        elif damage == "empty":
            file.write_bytes(b"")
        elif damage in ("flip", "flip-data"):
            # safetensors: an 8-byte little-endian header length, the header, the tensors.
            start = 8 + int.from_bytes(data[:8], "little") if damage == "flip-data" else 0
            i = start + int(where * (len(data) - 1 - start))
            file.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :])
        elif damage == "garbage":
            file.write_bytes(bytes(range(256)) * 3)
        else:
            file.unlink()
            file.mkdir()
        # Damage behind a consistent manifest (a JSON file that no longer parses) must
        # still be caught, by parsing.
        unparsable = damage in ("truncate", "empty", "garbage")
        if resigned and unparsable and name in ("config.json", "meta.json"):
            resign(directory, name)
        with pytest.raises(transformer.CheckpointError) as info:
            transformer.load_checkpoint(directory)
        # A damaged manifest may surface as a file that "differs from the manifest".
        assert (name if name != "manifest.json" else "manifest") in str(info.value), info.value
