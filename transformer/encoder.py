"""The encoder (paper section 3.1): its layer and its stack, as ``torch.nn``'s.

Each encoder layer has two sub-layers, multi-head self-attention (section 3.2.2) and the
position-wise feed-forward network (section 3.3), each wrapped as
``LayerNorm(x + Dropout(Sublayer(x)))`` (post-norm) or, with ``norm_first``,
``x + Dropout(Sublayer(LayerNorm(x)))``. How these classes differ from torch's is listed
in :mod:`transformer.layers` ("Divergences from torch.nn").

Notation: B batch, S source length, E ``d_model``, H ``nhead``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer._checks import check_bool, check_int, check_module
from transformer.feed_forward import Activation, get_activation, position_wise
from transformer.layer_common import (
    batch_of,
    check_hints,
    check_layer_args,
    check_mask_shapes,
    check_tensors,
    clones,
    detect_is_causal,
    heads_of,
    seq_len,
    stack_batch_first,
)
from transformer.matvec import Linear
from transformer.multi_head_attention import MultiheadAttention

__all__ = ["TransformerEncoder", "TransformerEncoderLayer"]


class TransformerEncoderLayer(nn.Module):
    """One encoder layer (section 3.1): self-attention, then the feed-forward network.

    Post-norm (paper): ``x = norm1(x + SA(x)); x = norm2(x + FF(x))``.
    Pre-norm (``norm_first``): ``x = x + SA(norm1(x)); x = x + FF(norm2(x))``.
    Dropout is applied to each sub-layer's output before the residual sum (section 5.4).

    Args:
        d_model: model size E (must be divisible by ``nhead``).
        nhead: number of attention heads H.
        dim_feedforward: inner size of the feed-forward network (``d_ff``).
        dropout: dropout rate used everywhere in the layer, in ``[0, 1]``.
        activation: ``"relu"``, ``"gelu"`` or a unary callable.
        layer_norm_eps: ``eps`` of the layer norms.
        batch_first: inputs are ``(B, S, E)`` instead of ``(S, B, E)``.
        norm_first: pre-norm instead of the paper's post-norm.
        bias: biases in the linear maps and layer norms.

    Shape:
        - src ``(S, B, E)``, ``(B, S, E)`` if batch_first, or unbatched ``(S, E)``;
        - src_mask ``(S, S)`` or ``(B*H, S, S)``; src_key_padding_mask ``(B, S)`` or ``(S,)``
          (module convention: bool ``True`` = masked out, float added);
        - output: same as src.
    """

    __constants__ = ("norm_first",)

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Activation = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_layer_args(
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            layer_norm_eps,
            {"batch_first": batch_first, "norm_first": norm_first, "bias": bias},
            device,
            dtype,
        )
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(
            d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, **factory
        )
        # Feed-forward network of section 3.3, kept flat (linear1/linear2) for torch's keys.
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        # Residual dropout (section 5.4) after the attention and after the FFN.
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = get_activation(activation)

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Self-attention then FFN over ``src``; ``is_causal`` hints that ``src_mask`` is causal."""
        check_tensors(src=src)
        check_hints(is_causal=is_causal)
        first = self.self_attn.batch_first
        if src.dim() in (2, 3):  # another rank is the attention module's error, naming src
            S = seq_len(src, first)
            check_mask_shapes(
                batch_of(src, first),
                self.self_attn.num_heads,
                {"src_mask": (src_mask, S, S)},
                {"src_key_padding_mask": (src_key_padding_mask, S)},
            )
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _sa_block(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
    ) -> Tensor:
        out = self.self_attn(
            x,
            x,
            x,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
        )[0]
        return self.dropout1(out)

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(
            position_wise(x, self.linear1, self.activation, self.dropout, self.linear2)
        )


class TransformerEncoder(nn.Module):
    """A stack of ``num_layers`` encoder layers (N = 6 in the paper), then an optional norm.

    Each layer is an independent deep copy of ``encoder_layer`` (same initial weights, as
    in torch), held in the ``nn.ModuleList`` ``layers``. ``norm`` is the final layer norm
    that pre-norm stacks need (``Transformer`` always passes one, like torch).

    Args:
        encoder_layer: the layer to copy ``num_layers`` times.
        num_layers: stack depth N, at least 1.
        norm: final normalisation, or ``None``.
        enable_nested_tensor, mask_check: torch's fast-path switches, accepted (bools) and
            stored as attributes so that code written for torch runs unchanged; they change
            nothing, as there is no fast path (see "Divergences from torch.nn" in
            :mod:`transformer.layers`).
            ``use_nested_tensor`` is always ``False``.

    Shape: see :class:`TransformerEncoderLayer`.
    """

    __constants__ = ("norm",)

    def __init__(
        self,
        encoder_layer: nn.Module,
        num_layers: int,
        norm: nn.Module | None = None,
        enable_nested_tensor: bool = True,
        mask_check: bool = True,
    ) -> None:
        super().__init__()
        check_module("encoder_layer", encoder_layer)
        num_layers = check_int("num_layers", num_layers)
        check_module("norm", norm, optional=True)
        self.enable_nested_tensor = check_bool("enable_nested_tensor", enable_nested_tensor)
        self.mask_check = check_bool("mask_check", mask_check)
        # torch's switch that its fast path reads; ours never packs a batch.
        self.use_nested_tensor = False
        self.layers = clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        """Run the layers in turn; ``is_causal=None`` detects a causal ``mask`` like torch."""
        check_tensors(src=src)
        check_hints(is_causal=is_causal)
        batch_first = stack_batch_first(self.layers)
        if src.dim() in (2, 3):  # another rank is the layers' error, naming src
            S = seq_len(src, batch_first)
            check_mask_shapes(
                batch_of(src, batch_first),
                heads_of(self.layers[0]),
                {"mask": (mask, S, S)},
                {"src_key_padding_mask": (src_key_padding_mask, S)},
            )
        is_causal = detect_is_causal(mask, is_causal, seq_len(src, batch_first))
        output = src
        for layer in self.layers:
            output = layer(
                output,
                src_mask=mask,
                is_causal=is_causal,
                src_key_padding_mask=src_key_padding_mask,
            )
        if self.norm is not None:
            output = self.norm(output)
        return output
