"""The decoder (paper section 3.1): its layer and its stack, as ``torch.nn``'s.

Each decoder layer has three sub-layers: masked multi-head self-attention (section
3.2.3), attention over the encoder output ("memory"), and the position-wise feed-forward
network (section 3.3), each wrapped as in :mod:`transformer.encoder`. Beyond torch, both
classes take a keyword-only ``cache`` (:mod:`transformer.kv_cache`) so that incremental
decoding runs these very modules. How they differ from torch's is listed in
:mod:`transformer.layers` ("Divergences from torch.nn").

Notation: B batch, S source length, T target length, E ``d_model``, H ``nhead``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer._checks import check_int, check_module
from transformer.feed_forward import Activation, get_activation, position_wise
from transformer.kv_cache import DecoderCache, DecoderLayerCache, KVCache
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

__all__ = ["TransformerDecoder", "TransformerDecoderLayer"]


class TransformerDecoderLayer(nn.Module):
    """One decoder layer (section 3.1): masked self-attention, attention over memory, FFN.

    Post-norm (paper): ``x = norm1(x + SA(x)); x = norm2(x + MHA(x, mem)); x = norm3(x + FF(x))``.
    Pre-norm (``norm_first``): each sub-layer sees ``norm_k(x)`` and is added to ``x``.
    The target self-attention is causal only through ``tgt_mask`` (section 3.2.3); pass
    :meth:`Transformer.generate_square_subsequent_mask` as torch requires.

    Args: as :class:`~transformer.encoder.TransformerEncoderLayer`.

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
        # Encoder-decoder attention: queries from the decoder, keys/values from memory.
        self.multihead_attn = MultiheadAttention(
            d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, **factory
        )
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, **factory)
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
        check_tensors(tgt=tgt, memory=memory)
        check_hints(tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)
        if cache is not None and not isinstance(cache, DecoderLayerCache):
            raise TypeError(
                f"cache must be a DecoderLayerCache or None, got {type(cache).__name__}"
            )
        if memory.dim() > 0 and memory.size(-1) != self.multihead_attn.kdim:
            raise ValueError(
                f"memory must have {self.multihead_attn.kdim} features (d_model) in its last "
                f"dim, got shape {tuple(memory.shape)}"
            )
        _check_decoder_masks(
            self,
            tgt,
            memory,
            tgt_mask,
            memory_mask,
            tgt_key_padding_mask,
            memory_key_padding_mask,
            cached=cache is not None,
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


def _check_decoder_masks(
    layer: nn.Module,
    tgt: Tensor,
    memory: Tensor,
    tgt_mask: object,
    memory_mask: object,
    tgt_key_padding_mask: object,
    memory_key_padding_mask: object,
    *,
    cached: bool,
) -> None:
    """The decoder's four masks fit ``tgt`` ``(T, ...)`` and ``memory`` ``(S, ...)``.

    With a cache the target masks also cover the cached positions, which the attention
    module checks against its cache.
    """
    if tgt.dim() not in (2, 3) or memory.dim() not in (2, 3):
        return  # the attention modules refuse the rank, naming the tensor
    first = bool(getattr(getattr(layer, "self_attn", None), "batch_first", False))
    T, S = seq_len(tgt, first), seq_len(memory, first)
    attn: dict[str, tuple[object, int, int]] = {"memory_mask": (memory_mask, T, S)}
    padding: dict[str, tuple[object, int]] = {
        "memory_key_padding_mask": (memory_key_padding_mask, S)
    }
    if not cached:
        attn["tgt_mask"] = (tgt_mask, T, T)
        padding["tgt_key_padding_mask"] = (tgt_key_padding_mask, T)
    check_mask_shapes(batch_of(tgt, first), heads_of(layer), attn, padding)


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
        self.layers = clones(decoder_layer, num_layers)
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
        check_tensors(tgt=tgt, memory=memory)
        check_hints(tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)
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
        if not isinstance(self.layers[0], TransformerDecoderLayer):
            # Our layers check the masks themselves (once per layer is enough); torch's
            # or custom ones would name them only when reached, if at all.
            _check_decoder_masks(
                self.layers[0],
                tgt,
                memory,
                tgt_mask,
                memory_mask,
                tgt_key_padding_mask,
                memory_key_padding_mask,
                cached=cache is not None,
            )
        batch_first = stack_batch_first(self.layers)
        tgt_is_causal = detect_is_causal(tgt_mask, tgt_is_causal, seq_len(tgt, batch_first))
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
