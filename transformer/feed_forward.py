"""Position-wise feed-forward network (paper section 3.3).

.. math::
    \\mathrm{FFN}(x) = \\max(0, x W_1 + b_1) W_2 + b_2

applied to each position separately and identically (two linear maps with a ReLU
between them; GELU or any callable may replace the ReLU, as in torch's layers).
The sub-modules carry torch's names (``linear1`` = ``W_1, b_1``, ``linear2`` =
``W_2, b_2``), the names ``torch.nn.TransformerEncoderLayer`` uses for the same weights.

Notation: E ``d_model``, F ``dim_feedforward`` (``d_ff`` in the paper).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer._checks import (
    check_device,
    check_dropout,
    check_dtype,
    check_int,
    check_not_nested,
)
from transformer.matvec import Linear
from transformer.precision import autocast_enabled

__all__ = ["Activation", "FeedForward", "get_activation", "position_wise"]

Activation = Callable[[Tensor], Tensor]

_ACTIVATIONS: dict[str, Activation] = {"relu": F.relu, "gelu": F.gelu}


def get_activation(activation: str | Activation) -> Activation:
    """Resolve ``"relu"``/``"gelu"`` to ``F.relu``/``F.gelu``; a callable is returned as is.

    Like torch's layers, the *functions* (not modules) are stored, so the activation adds
    nothing to ``state_dict``. An unknown name raises ``ValueError``; anything else that
    is not callable raises ``TypeError``.
    """
    if isinstance(activation, str):
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)} or a callable, "
                f"got {activation!r}"
            )
        return _ACTIVATIONS[activation]
    if not callable(activation):
        raise TypeError(f"activation must be a str or a callable, got {type(activation).__name__}")
    return activation


def position_wise(
    x: Tensor, linear1: nn.Module, activation: Activation, dropout: nn.Module, linear2: nn.Module
) -> Tensor:
    """``linear2(dropout(activation(linear1(x))))``: equation 2 with torch's inner dropout.

    Shared by :class:`FeedForward` and the Transformer layers, which keep ``linear1`` and
    ``linear2`` as their own attributes (torch's ``state_dict`` keys).
    ``(..., E) -> (..., F) -> (..., E)``.
    """
    out: Tensor = linear2(dropout(activation(linear1(x))))
    return out


class FeedForward(nn.Module):
    """Position-wise feed-forward network of section 3.3: ``FFN(x) = act(x W_1 + b_1) W_2 + b_2``.

    Dropout sits after the activation, where torch's Transformer layers put it; the
    residual dropout of section 5.4 belongs to the layer, not to this module.

    Args:
        d_model: input and output size E (512 in the base model).
        dim_feedforward: inner size F (``d_ff = 2048`` in the base model).
        dropout: dropout on the inner activations, in ``[0, 1]``.
        activation: ``"relu"`` (the paper), ``"gelu"`` or a callable.
        device, dtype: factory keywords of the two linear maps, as in torch's modules.

    A size that is not an int, or a dropout that is not a number, raises ``TypeError``; a
    size below 1 or a dropout outside ``[0, 1]`` raises ``ValueError``; both name the
    argument and the value.

    Shape:
        - input ``(..., E)``; output ``(..., E)``.
    """

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        activation: str | Activation = "relu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        d_model = check_int("d_model", d_model)
        dim_feedforward = check_int("dim_feedforward", dim_feedforward)
        dropout = check_dropout(dropout)
        check_device("device", device)
        check_dtype("dtype", dtype)
        self.activation = get_activation(activation)
        # W_1, b_1: (F, E), (F,).
        self.linear1 = Linear(d_model, dim_feedforward, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        # W_2, b_2: (E, F), (E,).
        self.linear2 = Linear(dim_feedforward, d_model, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the network to every position independently: ``(..., E) -> (..., E)``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        check_not_nested("x", x)
        if x.dim() == 0 or x.size(-1) != self.linear1.in_features:
            raise ValueError(
                f"x must be (..., d_model) with d_model={self.linear1.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        weight = self.linear1.weight
        if x.dtype != weight.dtype and not autocast_enabled(x.device.type):
            raise TypeError(
                f"x has dtype {x.dtype} but the parameters are {weight.dtype}; "
                f"convert one of them (e.g. module.to({x.dtype}))"
            )
        return position_wise(x, self.linear1, self.activation, self.dropout, self.linear2)
