"""The encoder-decoder ``Transformer`` (paper section 3.1, Figure 1), as in torch.nn.

``Transformer`` is defined here; the layers and stacks it assembles live in
:mod:`transformer.encoder` and :mod:`transformer.decoder` and are importable from here
too, so ``transformer.layers`` names all five classes, as ``torch.nn`` does.

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

The complete list, for the five classes here and :class:`~transformer.MultiheadAttention`; each
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
  (:mod:`transformer.kv_cache`); without it they compute what torch computes. TorchScript
  refuses keyword-only arguments, so ``torch.jit.script`` of these modules (and of the
  layers and ``Transformer`` that hold them) fails; ``torch.compile``, ``torch.export``,
  ``torch.jit.trace`` and ``torch.func`` work.
* **Linear layers are a subclass.** The feed-forward and attention projections are
  :class:`transformer.matvec.Linear`, an ``nn.Linear`` subclass (same parameters and
  ``state_dict``) that splits one-row products over threads. Tools that match
  ``type(module) is nn.Linear`` pass them by: ``torch.ao.quantization.quantize_dynamic``
  with ``{nn.Linear}`` quantizes nothing, silently (and its quantized ``Linear`` refuses
  the subclass when it is named).
* **No private helpers of torch's.** ``MultiheadAttention.merge_masks`` and
  ``TransformerEncoderLayer.activation_relu_or_gelu`` (fast-path internals) do not exist.
* **Errors instead of asserts.** Bad arguments raise ``TypeError`` (wrong type: a str
  dropout, a float head count, a non-bool flag, an integer or complex ``dtype``) or
  ``ValueError`` (out of range, shapes that do not fit, ``is_causal=True`` without a
  mask) naming the argument and the value seen, before any work; torch asserts, raises
  ``RuntimeError``, fails later or accepts.
* **Float masks of another float dtype are cast.** A float ``attn_mask`` or
  ``key_padding_mask`` in another float dtype than the module's is converted to it;
  torch raises ``RuntimeError``.
* **Mask values beyond -2.4e38 saturate.** The ``chunked`` and ``triton`` attention
  kernels keep scores in base 2 (``log2(e)`` times torch's), where ``log2(e) * finfo.min``
  would overflow to ``-inf``; finite float-mask values below ``-finfo.max / log2(e)``
  (about -2.4e38 in fp32, less a 0.1 % margin) act as that value. A row masked entirely
  with ``finfo.min`` gets equal weights, as in torch; two such values in one row that
  differ only below the bound tie, where torch would tell them apart.

Notation: B batch, S source length, T (or L) target length, E ``d_model``, H ``nhead``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer._checks import check_device, check_dtype, check_int, check_module
from transformer.decoder import TransformerDecoder, TransformerDecoderLayer
from transformer.encoder import TransformerEncoder, TransformerEncoderLayer
from transformer.feed_forward import Activation
from transformer.layer_common import (
    batch_of,
    check_hints,
    check_layer_args,
    check_mask_shapes,
    check_tensors,
    heads_of,
    seq_len,
)
from transformer.masks import square_subsequent_mask

__all__ = [
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]


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
        check_tensors(src=src, tgt=tgt)
        check_hints(
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
        # Every mask before any work: the encoder would run before a decoder mask is read.
        if src.dim() in (2, 3):  # another rank is the encoder's error, naming src
            S, T = seq_len(src, self.batch_first), seq_len(tgt, self.batch_first)
            batch = batch_of(src, self.batch_first)
            # Each stack's own head count (a custom encoder or decoder may differ).
            enc = self.encoder.layers[0] if isinstance(self.encoder, TransformerEncoder) else None
            dec = self.decoder.layers[0] if isinstance(self.decoder, TransformerDecoder) else None
            check_mask_shapes(
                batch,
                None if enc is None else heads_of(enc),
                {"src_mask": (src_mask, S, S)},
                {"src_key_padding_mask": (src_key_padding_mask, S)},
            )
            check_mask_shapes(
                batch,
                None if dec is None else heads_of(dec),
                {"tgt_mask": (tgt_mask, T, T), "memory_mask": (memory_mask, T, S)},
                {
                    "tgt_key_padding_mask": (tgt_key_padding_mask, T),
                    "memory_key_padding_mask": (memory_key_padding_mask, S),
                },
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
        ``sz`` must be an int >= 0 (or a 0-dim integer tensor, as torch accepts) and
        ``dtype`` (default: torch's default) floating point, or ``torch.bool`` for torch's
        bool mask: ``True`` (masked) above the diagonal.
        """
        if isinstance(sz, Tensor) and sz.dim() == 0 and not sz.is_floating_point():
            sz = int(sz.item())
        sz = check_int("sz", sz, low=0)
        check_device("device", device)
        if dtype == torch.bool:
            return torch.ones(sz, sz, dtype=torch.bool, device=device).triu_(1)
        check_dtype("dtype", dtype)
        return square_subsequent_mask(sz, device=device, dtype=dtype)
