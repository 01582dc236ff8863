"""Sinusoidal positional encoding (paper section 3.5).

.. math::
    PE_{(pos, 2i)} = \\sin(pos / 10000^{2i / d_{model}}), \\quad
    PE_{(pos, 2i+1)} = \\cos(pos / 10000^{2i / d_{model}})

The encoding is added to the token embeddings at the bottoms of the encoder and
decoder stacks, then dropout is applied ("we apply dropout to the sums of the
embeddings and the positional encodings", section 5.4).

Notation: B batch, T sequence length, E ``d_model``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from transformer._checks import (
    check_bool,
    check_device,
    check_dropout,
    check_dtype,
    check_int,
    check_not_nested,
)

__all__ = ["SinusoidalPositionalEncoding", "sinusoidal_table"]

# The wavelengths form a geometric progression from 2*pi to 10000 * 2*pi (section 3.5).
_BASE = 10000.0


def sinusoidal_table(
    max_len: int,
    d_model: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The table ``PE`` of section 3.5: row ``pos`` is the encoding of position ``pos``.

    ``PE[pos, 2i] = sin(pos / 10000^(2i/d_model))`` and ``PE[pos, 2i+1] = cos(...)``
    with the same angle. For an odd ``d_model`` the last column ``d_model - 1`` is even,
    hence a sin column without a cos partner.

    Computed in float64, then cast to ``dtype`` (default: torch's default dtype), so
    large positions keep their accuracy whatever the output dtype. A size that is not an
    int or a ``dtype`` that is not floating point raises ``TypeError``; a size below 1
    raises ``ValueError``.

    Shape: ``(max_len, d_model)``.
    """
    max_len = check_int("max_len", max_len)
    d_model = check_int("d_model", d_model)
    check_dtype("dtype", dtype)
    check_device("device", device)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    pos = torch.arange(max_len, dtype=torch.float64, device=device).unsqueeze(1)  # (T, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64, device=device)  # (ceil(E/2),)
    # 1 / 10000^(2i/d_model), written as an exponential for accuracy.
    inv_freq = torch.exp(two_i * (-math.log(_BASE) / d_model))
    angle = pos * inv_freq  # (T, ceil(E/2))
    table = torch.empty(max_len, d_model, dtype=torch.float64, device=device)
    # Even columns sin, odd columns cos, interleaved along the feature axis (not the
    # position axis); an odd d_model has one fewer cos column.
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return table.to(dtype)


class SinusoidalPositionalEncoding(nn.Module):
    """Add the fixed sinusoidal encoding of section 3.5 to a sequence, then apply dropout.

    The table is a *non-persistent* buffer: it moves with ``.to(device)`` and is cast
    by ``.half()``/``.double()`` like any buffer, but it is left out of ``state_dict``,
    because it is a pure function of ``(max_len, d_model)`` and is rebuilt at
    construction; checkpoints stay clean and do not depend on ``max_len``.

    Args:
        d_model: model dimension E (any positive int; odd values allowed).
        max_len: the longest sequence accepted.
        dropout: dropout applied to the sum (section 5.4), in ``[0, 1]``.
        batch_first: inputs are ``(B, T, E)``; otherwise ``(T, B, E)``.

    Arguments of the wrong type raise ``TypeError`` and values out of range ``ValueError``,
    naming the argument and the value.

    Shape:
        - input ``(B, T, E)`` if ``batch_first`` else ``(T, B, E)``, or unbatched ``(T, E)``;
        - output: same as the input.
    """

    pe: Tensor

    def __init__(
        self,
        d_model: int,
        max_len: int = 5000,
        dropout: float = 0.1,
        batch_first: bool = True,
    ) -> None:
        super().__init__()
        d_model = check_int("d_model", d_model)
        max_len = check_int("max_len", max_len)
        dropout = check_dropout(dropout)
        batch_first = check_bool("batch_first", batch_first)
        self.d_model = d_model
        self.max_len = max_len
        self.batch_first = batch_first
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("pe", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, x: Tensor, *, offset: int = 0) -> Tensor:
        """Return ``dropout(x + PE[offset : offset + T])`` with ``PE`` broadcast over the batch.

        ``offset`` is the position of ``x``'s first step: a decoder that feeds one new
        position at a time (a KV cache) passes the number of positions before it.
        """
        offset = check_int("offset", offset, low=0)
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        check_not_nested("x", x)
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor of embeddings, got {x.dtype}")
        if x.dim() not in (2, 3):
            raise ValueError(
                f"x must be (B, T, E), (T, B, E) or unbatched (T, E), got shape {tuple(x.shape)}"
            )
        if x.size(-1) != self.d_model:
            raise ValueError(
                f"x has {x.size(-1)} features in shape {tuple(x.shape)}, expected "
                f"d_model={self.d_model}"
            )
        time_dim = 1 if (x.dim() == 3 and self.batch_first) else 0
        seq_len = x.size(time_dim)
        if offset + seq_len > self.max_len:
            where = f"sequence length {seq_len}" + (f" at offset {offset}" if offset else "")
            raise ValueError(f"{where} exceeds max_len={self.max_len} of the positional table")
        pe = self.pe[offset : offset + seq_len].to(dtype=x.dtype)  # (T, E)
        if x.dim() == 3 and not self.batch_first:
            pe = pe.unsqueeze(1)  # (T, 1, E): broadcast over the batch axis
        return self.dropout(x + pe)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}, batch_first={self.batch_first}"
