"""Spec of the position-wise feed-forward network (paper section 3.3, equation 2).

Reference: ``FFN(x) = max(0, x W_1 + b_1) W_2 + b_2`` written plainly in float64 from the
module's weights; and torch's ``TransformerEncoderLayer``, whose ``linear1``/``linear2``
carry the same weights under the same names.

Notation: E ``d_model``, F ``dim_feedforward`` (``d_ff``).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.feed_forward import FeedForward
from transformer.testing import assert_close, assert_error_within_reference

spec = functools.partial(pytest.mark.spec, component="feed_forward", section="3.3")

E, FF = 18, 37


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def paper_ffn(x: Tensor, ffn: FeedForward, activation: Any = None) -> Tensor:
    """Equation 2 in float64: ``act(x W_1^T + b_1) W_2^T + b_2`` (ReLU = max(0, .) by default)."""
    w1, b1 = ffn.linear1.weight.double(), ffn.linear1.bias.double()
    w2, b2 = ffn.linear2.weight.double(), ffn.linear2.bias.double()
    hidden = x.double() @ w1.T + b1  # (..., F)
    hidden = torch.clamp(hidden, min=0.0) if activation is None else activation(hidden)
    return hidden @ w2.T + b2  # (..., E)


def make(seed: int = 0, **kw: Any) -> FeedForward:
    torch.manual_seed(seed)
    return FeedForward(E, FF, **{"dropout": 0.0, **kw})


@spec(kind="shape")
@pytest.mark.parametrize("shape", [(E,), (7, E), (3, 7, E), (2, 1, 5, E)])
def test_output_has_the_input_shape(shape: tuple[int, ...]) -> None:
    """Input ``(..., E)`` gives output ``(..., E)`` with any number of leading dims (the network acts on the last axis only)."""
    out = make()(torch.randn(shape))
    assert out.shape == shape


@spec(kind="equivalence")
def test_relu_network_matches_equation_2_forward_and_gradients() -> None:
    """The default network is max(0, x W_1 + b_1) W_2 + b_2 (equation 2), forward and gradients, in float64."""
    ffn = make(seed=1).double()
    x = randn(3, 7, E, seed=2).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = ffn(x), paper_ffn(x_ref, ffn)
    assert_close(out, ref)
    upstream = randn(3, 7, E, seed=3)
    (grad,) = torch.autograd.grad(out, x, upstream)
    (grad_ref,) = torch.autograd.grad(ref, x_ref, upstream)
    assert_close(grad, grad_ref)


@spec(kind="equivalence")
@pytest.mark.parametrize(
    ("activation", "math"),
    [("gelu", F.gelu), (F.gelu, F.gelu), (torch.tanh, torch.tanh)],
    ids=["gelu", "F.gelu", "callable"],
)
def test_activation_replaces_the_relu(activation: Any, math: Any) -> None:
    """``activation="gelu"`` or a callable replaces the ReLU between the two linear maps, as in torch's layers."""
    ffn = make(activation=activation).double()
    x = randn(5, E, seed=4)
    assert_close(ffn(x), paper_ffn(x, ffn, math))


@spec(kind="property")
def test_each_position_is_transformed_separately_and_identically() -> None:
    """Applied to a sequence, the network acts on each position alone with the same weights (section 3.3): permuting positions permutes outputs, and one position alone gives its row of the full output."""
    ffn = make().double()
    x = randn(2, 9, E, seed=5)
    out = ffn(x)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    assert_close(ffn(x[:, perm]), out[:, perm])
    assert_close(ffn(x[1, 4]), out[1, 4])


@spec(section="torch", kind="equivalence")
def test_weights_have_torch_layer_names_and_shapes() -> None:
    """Parameters are ``linear1`` (W_1: (F, E)) and ``linear2`` (W_2: (E, F)) like torch's ``TransformerEncoderLayer``, whose feed-forward weights load directly and give the same result."""
    ffn = make().double()
    assert {k: tuple(v.shape) for k, v in ffn.state_dict().items()} == {
        "linear1.weight": (FF, E),
        "linear1.bias": (FF,),
        "linear2.weight": (E, FF),
        "linear2.bias": (E,),
    }
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(E, 3, FF, dropout=0.0, dtype=torch.float64)
    ffn.load_state_dict({k: v for k, v in layer.state_dict().items() if k.startswith("linear")})
    x = randn(4, E, seed=6)
    assert_close(ffn(x), layer.linear2(layer.activation(layer.linear1(x))))


@spec(section="5.4", kind="equivalence")
def test_dropout_acts_on_the_hidden_layer_in_training_only() -> None:
    """Dropout on the hidden activations changes training outputs; eval mode is deterministic and equals equation 2."""
    ffn = FeedForward(E, FF, dropout=0.5).double()
    x = randn(6, E, seed=7)
    torch.manual_seed(0)
    assert not torch.allclose(ffn(x), ffn(x))
    ffn.eval()
    assert torch.equal(ffn(x), ffn(x))
    assert_close(ffn(x), paper_ffn(x, ffn))


class Scale(nn.Module):
    """Deterministic stand-in for the dropout module: multiplies by a fixed factor."""

    def forward(self, x: Tensor) -> Tensor:
        return -0.7 * x  # negative: does not commute with the ReLU


@spec(section="5.4", kind="equivalence")
def test_dropout_acts_after_the_activation() -> None:
    """The inner dropout acts on the hidden activations, after the ReLU, like torch's layers: linear2(dropout(relu(linear1(x)))) (dropout replaced by a fixed scaling to see where it acts)."""
    ffn = make().double()
    ffn.dropout = Scale()
    x = randn(6, E, seed=8)
    w2, b2 = ffn.linear2.weight.double(), ffn.linear2.bias.double()
    hidden = torch.relu(x @ ffn.linear1.weight.double().T + ffn.linear1.bias.double())
    assert_close(ffn(x), (-0.7 * hidden) @ w2.T + b2)


@spec(kind="error")
def test_bad_arguments_raise_errors_naming_them() -> None:
    """Non-positive sizes, dropout outside [0, 1] and unknown activation names raise ValueError naming the argument; a size or dropout of the wrong type (a float size, a str dropout) and a non-callable activation raise TypeError naming it and the value."""
    with pytest.raises(ValueError, match=r"d_model must be a positive int, got 0"):
        FeedForward(0, FF)
    with pytest.raises(ValueError, match=r"dim_feedforward must be a positive int, got -3"):
        FeedForward(E, -3)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\], got -0.5"):
        FeedForward(E, FF, dropout=-0.5)
    with pytest.raises(
        ValueError, match=r"activation must be one of \['gelu', 'relu'\] or a callable, got 'swish'"
    ):
        FeedForward(E, FF, activation="swish")
    with pytest.raises(TypeError, match=r"activation must be a str or a callable, got NoneType"):
        FeedForward(E, FF, activation=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"dropout must be a real number in \[0, 1\], got str 'x'"):
        FeedForward(E, FF, dropout="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"dim_feedforward must be an int, got float 8\.0"):
        FeedForward(E, 8.0)  # type: ignore[arg-type]


@spec(kind="error")
@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        ([[0.0] * 8], TypeError, "x must be a Tensor, got list"),
        (torch.ones(3, 7), ValueError, r"d_model=8, got shape \(3, 7\)"),
        (torch.tensor(1.0), ValueError, r"d_model=8, got shape \(\)"),
        (torch.ones(3, 8, dtype=torch.float64), TypeError, "float64 but the parameters are"),
        (torch.ones(3, 8, dtype=torch.long), TypeError, "int64 but the parameters are"),
    ],
    ids=["list", "wrong-features", "scalar", "float64", "int64"],
)
def test_bad_input_raises_error_naming_x_and_what_was_seen(
    x: object, error: type[Exception], match: str
) -> None:
    """A non-tensor, a last dim other than d_model, or a dtype other than the parameters' (outside autocast) raises ValueError/TypeError naming x's shape or dtype, not a matmul error from deep inside torch."""
    ff = FeedForward(8, 16, dropout=0.0)
    with pytest.raises(error, match=match):
        ff(x)


@spec(kind="equivalence")
def test_autocast_accepts_input_of_another_dtype() -> None:
    """Under torch.autocast (bf16 on CPU) fp32 parameters take an fp32 input and compute in bf16, like nn.Linear: the dtype check steps aside, and the error against float64 is within twice that of torch's own nn.Linear/ReLU/nn.Linear under the same autocast."""
    torch.manual_seed(0)
    ff = FeedForward(8, 16, dropout=0.0)
    torch_ff = nn.Sequential(ff.linear1, nn.ReLU(), ff.linear2)
    x = torch.randn(2, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, torch_out = ff(x), torch_ff(x)
    assert out.dtype == torch.bfloat16
    exact = copy.deepcopy(torch_ff).double()(x.double())
    assert_error_within_reference(out, torch_out, exact)
