"""Encoder and decoder layers and stacks (paper section 3.1, Figure 1), as in torch.nn.

Each encoder layer has two sub-layers, multi-head self-attention (section 3.2.2) and the
position-wise feed-forward network (section 3.3); each decoder layer inserts a third,
attention over the encoder output ("memory"), between them. Every sub-layer is wrapped
as ``LayerNorm(x + Dropout(Sublayer(x)))`` (post-norm, the paper's choice and torch's
default); ``norm_first=True`` gives the pre-norm variant ``x + Dropout(Sublayer(LayerNorm(x)))``,
a departure from the paper that trains more stably in deep stacks.

Constructor arguments, defaults, forward signatures, attribute names and ``state_dict``
keys are those of ``torch.nn.TransformerEncoderLayer``, ``TransformerDecoderLayer``,
``TransformerEncoder``, ``TransformerDecoder`` and ``Transformer`` (a test compares the
signatures with :func:`inspect.signature`): weights load in both directions with
``load_state_dict(strict=True)`` and outputs then match. Code that walks ``layers`` and
reads ``self_attn`` / ``multihead_attn`` / ``linear1`` / ``norm1`` ... works on both.

Divergences from torch.nn
-------------------------

The complete list, for this module and :class:`~transformer.MultiheadAttention`; each
is deliberate, and code written for torch.nn runs unchanged unless it relies on one:

* **No fast path.** ``TransformerEncoder(enable_nested_tensor=..., mask_check=...)`` are
  accepted and stored, and change nothing. Torch's encoder, in eval mode with gradients
  off and a ``src_key_padding_mask``, may pack the batch into a nested tensor and writes
  ``0`` at padded positions of the output; we always compute every position, so outputs
  differ at padded positions only (real positions agree).
* **No NestedTensor inputs.** A nested ``src``/``tgt``/``memory``/``query`` raises
  ``TypeError``: pass a padded tensor with a key padding mask.
* **Empty rows give zeros.** A query with no key left to attend to (every key masked)
  gives zeros and zero gradients; torch gives NaN.
* **The causal hint never changes the answer.** With ``add_bias_kv`` or
  ``add_zero_attn``, ``is_causal=True`` gives the result of its ``attn_mask``, in which
  every query sees the appended key; torch's hint path (no key padding mask) lets no
  query see it, so there torch's output depends on whether the hint is given.
* **Incremental decoding.** ``MultiheadAttention``, ``TransformerDecoderLayer`` and
  ``TransformerDecoder`` take a keyword-only ``cache`` after torch's arguments
  (:mod:`transformer.kv_cache`); without it they compute what torch computes.
* **Errors instead of asserts.** Bad arguments raise ``TypeError`` (wrong type: a str
  dropout, a float head count, a non-bool flag) or ``ValueError`` (out of range, shapes
  that do not fit, ``is_causal=True`` without a mask) naming the argument and the value
  seen, before any work; torch asserts, raises ``RuntimeError``, fails later or accepts.

Notation: B batch, S source length, T (or L) target length, E ``d_model``, H ``nhead``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer._checks import (
    check_bool,
    check_device,
    check_dropout,
    check_dtype,
    check_int,
    check_module,
    check_not_nested,
    check_real,
)
from transformer.feed_forward import Activation, get_activation, position_wise
from transformer.kv_cache import DecoderCache, DecoderLayerCache, KVCache
from transformer.masks import square_subsequent_mask
from transformer.multi_head_attention import MultiheadAttention

__all__ = [
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]


def _check_layer_args(
    d_model: object,
    nhead: object,
    dim_feedforward: object,
    dropout: object,
    layer_norm_eps: object,
    flags: dict[str, object],
    device: object,
    dtype: object,
) -> None:
    """Validate the arguments every layer shares; the error names the culprit and its value."""
    d_model = check_int("d_model", d_model)
    nhead = check_int("nhead", nhead)
    check_int("dim_feedforward", dim_feedforward)
    if d_model % nhead != 0:
        raise ValueError(
            f"d_model must be divisible by nhead, got d_model={d_model}, nhead={nhead}"
        )
    check_dropout(dropout)
    if check_real("layer_norm_eps", layer_norm_eps) < 0.0:
        raise ValueError(f"layer_norm_eps must be >= 0, got {layer_norm_eps}")
    for name, flag in flags.items():
        check_bool(name, flag)
    check_device("device", device)
    check_dtype("dtype", dtype)


def _check_tensors(**tensors: object) -> None:
    """Each input is a dense ``Tensor``; a mask or hint may also be ``None`` (checked by MHA)."""
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        check_not_nested(name, value)


def _check_hints(**hints: object) -> None:
    """``is_causal``-style hints are bools, or ``None`` where torch detects them."""
    for name, value in hints.items():
        if value is not None:
            check_bool(name, value)


def _clones(layer: nn.Module, n: int) -> nn.ModuleList:
    """``n`` independent deep copies of ``layer`` in a ``ModuleList`` (so all are in state_dict)."""
    return nn.ModuleList([copy.deepcopy(layer) for _ in range(n)])


def _seq_len(x: Tensor, batch_first: bool) -> int:
    """Sequence length of a ``(T, E)``, ``(T, B, E)`` or ``(B, T, E)`` input."""
    if x.dim() == 2:
        return x.size(0)
    return x.size(1 if batch_first else 0)


def _stack_batch_first(layers: nn.ModuleList) -> bool:
    """The ``batch_first`` of a stack, read from its first layer's self-attention (as torch)."""
    return bool(getattr(layers[0].self_attn, "batch_first", False))


def _detect_is_causal(mask: Tensor | None, is_causal: bool | None, size: int) -> bool:
    """Torch's causal-mask detection: an explicit hint wins; ``None`` compares the mask.

    The hint only lets attention skip the masked blocks; results are the same either way,
    because :class:`MultiheadAttention` still uses the mask whenever it must (e.g. with a
    key padding mask).
    """
    if is_causal is not None:
        return is_causal
    if mask is None or tuple(mask.shape) != (size, size):
        return False
    causal = square_subsequent_mask(size, device=mask.device, dtype=mask.dtype)
    return bool((mask == causal).all())


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
        _check_layer_args(
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
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
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
        _check_tensors(src=src)
        _check_hints(is_causal=is_causal)
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


class TransformerDecoderLayer(nn.Module):
    """One decoder layer (section 3.1): masked self-attention, attention over memory, FFN.

    Post-norm (paper): ``x = norm1(x + SA(x)); x = norm2(x + MHA(x, mem)); x = norm3(x + FF(x))``.
    Pre-norm (``norm_first``): each sub-layer sees ``norm_k(x)`` and is added to ``x``.
    The target self-attention is causal only through ``tgt_mask`` (section 3.2.3); pass
    :meth:`Transformer.generate_square_subsequent_mask` as torch requires.

    Args: as :class:`TransformerEncoderLayer`.

    Shape:
        - tgt ``(T, B, E)``, ``(B, T, E)`` if batch_first, or unbatched ``(T, E)``;
        - memory ``(S, B, E)`` (likewise);
        - tgt_mask ``(T, T)`` or ``(B*H, T, T)``; memory_mask ``(T, S)`` or ``(B*H, T, S)``;
        - tgt_key_padding_mask ``(B, T)``; memory_key_padding_mask ``(B, S)``;
        - output: same as tgt.
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
        _check_layer_args(
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
        # Encoder-decoder attention: queries from the decoder, keys/values from memory.
        self.multihead_attn = MultiheadAttention(
            d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, **factory
        )
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = get_activation(activation)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
        *,
        cache: DecoderLayerCache | None = None,
    ) -> Tensor:
        """Pass ``tgt`` through the three sub-layers, attending to ``memory`` in the second.

        ``cache`` (not in torch; see :mod:`transformer.kv_cache`): ``tgt`` holds only the
        new positions, which attend to the cached ones too; ``tgt_mask`` and
        ``tgt_key_padding_mask`` then cover cached plus new keys, e.g. ``(T_new, T)``.
        """
        _check_tensors(tgt=tgt, memory=memory)
        _check_hints(tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)
        if cache is not None and not isinstance(cache, DecoderLayerCache):
            raise TypeError(
                f"cache must be a DecoderLayerCache or None, got {type(cache).__name__}"
            )
        self_cache = None if cache is None else cache.self_attn
        cross_cache = None if cache is None else cache.cross_attn
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(
                self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal, self_cache
            )
            x = x + self._mha_block(
                self.norm2(x),
                memory,
                memory_mask,
                memory_key_padding_mask,
                memory_is_causal,
                cross_cache,
            )
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(
                x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal, self_cache)
            )
            x = self.norm2(
                x
                + self._mha_block(
                    x, memory, memory_mask, memory_key_padding_mask, memory_is_causal, cross_cache
                )
            )
            x = self.norm3(x + self._ff_block(x))
        return x

    def _sa_block(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
        cache: KVCache | None = None,
    ) -> Tensor:
        out = self.self_attn(
            x,
            x,
            x,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
            need_weights=False,
            cache=cache,
        )[0]
        return self.dropout1(out)

    def _mha_block(
        self,
        x: Tensor,
        mem: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
        cache: KVCache | None = None,
    ) -> Tensor:
        out = self.multihead_attn(
            x,
            mem,
            mem,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
            need_weights=False,
            cache=cache,
        )[0]
        return self.dropout2(out)

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout3(
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
            nothing, as there is no fast path (see "Divergences from torch.nn" above).
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
        self.layers = _clones(encoder_layer, num_layers)
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
        _check_tensors(src=src)
        _check_hints(is_causal=is_causal)
        batch_first = _stack_batch_first(self.layers)
        is_causal = _detect_is_causal(mask, is_causal, _seq_len(src, batch_first))
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


class TransformerDecoder(nn.Module):
    """A stack of ``num_layers`` decoder layers (N = 6 in the paper), then an optional norm.

    Layers live in the ``nn.ModuleList`` ``layers`` (deep copies of ``decoder_layer``), so an
    incremental (KV-cache) decoder can walk them exactly as it walks torch's.

    Shape: see :class:`TransformerDecoderLayer`.
    """

    __constants__ = ("norm",)

    def __init__(
        self,
        decoder_layer: nn.Module,
        num_layers: int,
        norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        check_module("decoder_layer", decoder_layer)
        num_layers = check_int("num_layers", num_layers)
        check_module("norm", norm, optional=True)
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
        *,
        cache: DecoderCache | None = None,
    ) -> Tensor:
        """Run the layers in turn; ``tgt_is_causal=None`` detects a causal ``tgt_mask``.

        ``cache`` (not in torch): a :class:`~transformer.kv_cache.DecoderCache` with one
        entry per layer; each layer gets its own (see :class:`TransformerDecoderLayer`).
        """
        _check_tensors(tgt=tgt, memory=memory)
        _check_hints(tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)
        if cache is not None:
            if not isinstance(cache, DecoderCache):
                raise TypeError(f"cache must be a DecoderCache or None, got {type(cache).__name__}")
            if len(cache.layers) != len(self.layers):
                raise ValueError(
                    f"cache has {len(cache.layers)} layers, the decoder {len(self.layers)}; "
                    "make it with DecoderCache.for_decoder(decoder)"
                )
            for layer in self.layers:
                if not isinstance(layer, TransformerDecoderLayer):
                    raise TypeError(
                        "a cache needs transformer.TransformerDecoderLayer layers, got "
                        f"{type(layer).__name__}"
                    )
        batch_first = _stack_batch_first(self.layers)
        tgt_is_causal = _detect_is_causal(tgt_mask, tgt_is_causal, _seq_len(tgt, batch_first))
        output = tgt
        for i, layer in enumerate(self.layers):
            # Only our layers take a cache; torch.nn ones keep torch's exact call.
            extra = {} if cache is None else {"cache": cache.layers[i]}
            output = layer(
                output,
                memory,
                tgt_mask=tgt_mask,
                memory_mask=memory_mask,
                tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask,
                tgt_is_causal=tgt_is_causal,
                memory_is_causal=memory_is_causal,
                **extra,
            )
        if self.norm is not None:
            output = self.norm(output)
        return output


class Transformer(nn.Module):
    """The encoder-decoder of section 3.1 (Figure 1) without embeddings or output projection.

    Defaults are the paper's base model (``d_model=512``, ``nhead=8``, 6 + 6 layers,
    ``dim_feedforward=2048``, dropout 0.1) and torch's (post-norm, ReLU, sequence-first).
    Both stacks end with a ``LayerNorm`` like torch's. Every weight matrix is initialised
    with Xavier-uniform, as torch does.

    Args:
        d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
        norm_first, bias: as :class:`TransformerEncoderLayer`.
        num_encoder_layers, num_decoder_layers: stack depths N.
        custom_encoder, custom_decoder: modules used instead of the default stacks.

    Shape:
        - src ``(S, B, E)`` (``(B, S, E)`` if batch_first, or unbatched ``(S, E)``);
        - tgt ``(T, B, E)`` (likewise); masks as in the layers;
        - output ``(T, B, E)`` (like tgt).
    """

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Activation = F.relu,
        custom_encoder: nn.Module | None = None,
        custom_decoder: nn.Module | None = None,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_module("custom_encoder", custom_encoder, optional=True)
        check_module("custom_decoder", custom_decoder, optional=True)
        # Layers check the rest; with both stacks custom no layer is built, so check here.
        num_encoder_layers = check_int("num_encoder_layers", num_encoder_layers)
        num_decoder_layers = check_int("num_decoder_layers", num_decoder_layers)
        _check_layer_args(
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
        layer_args = (
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            activation,
            layer_norm_eps,
            batch_first,
            norm_first,
            bias,
        )
        self.encoder: nn.Module
        self.decoder: nn.Module
        if custom_encoder is not None:
            self.encoder = custom_encoder
        else:
            self.encoder = TransformerEncoder(
                TransformerEncoderLayer(*layer_args, **factory),
                num_encoder_layers,
                nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory),
            )
        if custom_decoder is not None:
            self.decoder = custom_decoder
        else:
            self.decoder = TransformerDecoder(
                TransformerDecoderLayer(*layer_args, **factory),
                num_decoder_layers,
                nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory),
            )
        self._reset_parameters()
        self.d_model = d_model
        self.nhead = nhead
        self.batch_first = batch_first

    def _reset_parameters(self) -> None:
        """Xavier-uniform on every matrix (biases and norms keep their defaults), as torch."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        src_is_causal: bool | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
    ) -> Tensor:
        """Encode ``src`` into memory, then decode ``tgt`` against it (Figure 1)."""
        _check_tensors(src=src, tgt=tgt)
        _check_hints(
            src_is_causal=src_is_causal,
            tgt_is_causal=tgt_is_causal,
            memory_is_causal=memory_is_causal,
        )
        if src.dim() != tgt.dim():
            raise ValueError(
                f"src and tgt must both be batched (3-D) or unbatched (2-D), got src "
                f"{tuple(src.shape)} and tgt {tuple(tgt.shape)}"
            )
        if src.dim() == 3:
            batch_dim = 0 if self.batch_first else 1
            if src.size(batch_dim) != tgt.size(batch_dim):
                raise ValueError(
                    f"the batch size of src and tgt must be equal, got src {tuple(src.shape)} "
                    f"and tgt {tuple(tgt.shape)} (batch_first={self.batch_first})"
                )
        if src.size(-1) != self.d_model or tgt.size(-1) != self.d_model:
            raise ValueError(
                f"the feature size of src and tgt must equal d_model={self.d_model}, got src "
                f"{tuple(src.shape)} and tgt {tuple(tgt.shape)}"
            )
        memory = self.encoder(
            src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal
        )
        output: Tensor = self.decoder(
            tgt,
            memory,
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
            tgt_is_causal=tgt_is_causal,
            memory_is_causal=memory_is_causal,
        )
        return output

    @staticmethod
    def generate_square_subsequent_mask(
        sz: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """The ``(sz, sz)`` float causal mask of torch: ``-inf`` above the diagonal, else ``0``.

        Section 3.2.3: position ``i`` of the decoder may attend to positions ``<= i`` only.
        ``sz`` must be an int >= 0 and ``dtype`` (default: torch's default) floating point.
        """
        sz = check_int("sz", sz, low=0)
        check_device("device", device)
        check_dtype("dtype", dtype)
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(
                f"dtype must be a floating point dtype (the mask holds -inf), got {dtype}"
            )
        return square_subsequent_mask(sz, device=device, dtype=dtype)
