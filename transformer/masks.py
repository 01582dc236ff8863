"""Attention masks: the one place where mask conventions are converted.

Two conventions meet in this package, each inherited from torch:

* the *functional* attention (:func:`transformer.attention.scaled_dot_product_attention`)
  follows ``torch.nn.functional.scaled_dot_product_attention``: a bool mask is
  ``True`` where a query **may attend**; a float mask is **added** to the scores;
* the *module* APIs (:class:`~transformer.MultiheadAttention` and the layers) follow
  ``torch.nn.MultiheadAttention``: a bool mask is ``True`` where a key is **masked out**;
  a float mask is added.

Every conversion between the two happens here, so no other file re-implements it.
torch's attention-bias objects (``torch.nn.attention.bias.CausalBias``, made by
``causal_upper_left(L, S)`` and ``causal_lower_right(L, S)``) are read here too: a
bias is a causal mask with a diagonal offset (:func:`causal_offset`), which kernels
either apply natively or materialise with :func:`causal_bias_mask`.

Notation: B batch, H heads, L target (query) length, S source (key) length.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TypeGuard

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.nn.attention.bias import CausalBias

__all__ = [
    "causal_bias_mask",
    "causal_mask",
    "causal_offset",
    "is_causal_bias",
    "merge_module_masks",
    "module_mask_to_sdpa",
    "square_subsequent_mask",
]


def causal_mask(
    L: int, S: int, device: torch.device | str | None = None, *, diagonal: int = 0
) -> Tensor:
    """Causal mask in the SDPA convention (``True`` = may attend), ``(L, S)`` bool.

    Query ``i`` may attend to keys ``j <= i + diagonal``. ``diagonal=0`` is top-left
    aligned, torch's ``is_causal=True`` (a lower-triangular matrix): every row keeps at
    least key ``0`` whatever ``L`` and ``S`` are (rows ``i >= S`` keep all keys); only
    ``S == 0`` leaves rows empty. ``diagonal=S - L`` is bottom-right aligned, torch's
    ``causal_lower_right(L, S)``: the last query sees every key, and with ``L > S`` the
    first ``L - S`` rows see none (the package gives such rows zeros).

    Shape: ``(L, S)``, dtype ``bool``.
    """
    return torch.ones(L, S, dtype=torch.bool, device=device).tril(diagonal)


def is_causal_bias(obj: object) -> TypeGuard[CausalBias]:
    """Is ``obj`` a torch ``CausalBias``? Answered without importing ``torch.nn.attention.bias``.

    That module imports triton where triton is installed (a second or more at start-up),
    and an object cannot be a ``CausalBias`` unless the caller has imported it already.
    """
    module = sys.modules.get("torch.nn.attention.bias")
    return module is not None and isinstance(obj, module.CausalBias)


def causal_offset(bias: CausalBias) -> int:
    """The diagonal of a torch ``CausalBias``: query ``i`` may attend keys ``j <= i + offset``.

    ``0`` for ``CausalVariant.UPPER_LEFT`` (``is_causal=True``'s mask) and
    ``seq_len_kv - seq_len_q`` for ``CausalVariant.LOWER_RIGHT``, the ``diagonal`` that
    torch's ``CausalBias._lower_right`` passes to ``torch.tril``.

    Raises:
        ValueError: the bias has a variant this package does not know.
    """
    from torch.nn.attention.bias import CausalVariant  # imported by whoever made the bias

    if bias.variant == CausalVariant.UPPER_LEFT:
        return 0
    if bias.variant == CausalVariant.LOWER_RIGHT:
        return bias.seq_len_kv - bias.seq_len_q
    raise ValueError(f"attn_mask is a CausalBias of unknown variant {bias.variant!r}")


def causal_bias_mask(bias: CausalBias, device: torch.device | str | None = None) -> Tensor:
    """The bool mask a torch ``CausalBias`` stands for (``True`` = may attend).

    Shape: ``(seq_len_q, seq_len_kv)``, dtype ``bool``; the same values as torch's
    ``CausalBias._materialize``.
    """
    return causal_mask(bias.seq_len_q, bias.seq_len_kv, device, diagonal=causal_offset(bias))


def square_subsequent_mask(
    sz: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The float causal mask torch's module APIs use: ``-inf`` above the diagonal, ``0`` elsewhere.

    Same values as ``torch.nn.Transformer.generate_square_subsequent_mask(sz)``
    (paper section 3.2.3: "masking out ... all values in the input of the softmax
    which correspond to illegal connections"). Shape: ``(sz, sz)``.
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    return torch.triu(torch.full((sz, sz), float("-inf"), dtype=dtype, device=device), diagonal=1)


def module_mask_to_sdpa(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Convert a module-convention mask to the SDPA convention.

    A bool mask flips (module ``True`` = masked out becomes SDPA ``False`` = may not
    attend); a float mask is additive in both conventions and is only cast to
    ``dtype``, the dtype of the scores.
    """
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ~mask
    return mask.to(dtype)


def _as_additive(mask_sdpa: Tensor, dtype: torch.dtype) -> Tensor:
    """SDPA-convention mask as an additive float mask (``0`` may attend, ``-inf`` may not)."""
    if mask_sdpa.dtype != torch.bool:
        return mask_sdpa.to(dtype)
    zeros = torch.zeros((), dtype=dtype, device=mask_sdpa.device)
    neg_inf = torch.full((), float("-inf"), dtype=dtype, device=mask_sdpa.device)
    return torch.where(mask_sdpa, zeros, neg_inf)


def merge_module_masks(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    batch: int,
    heads: int,
    L: int,
    S: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """Merge torch-MHA style ``attn_mask`` and ``key_padding_mask`` into one SDPA mask.

    Args:
        attn_mask: module convention, ``(L, S)`` or ``(B*H, L, S)``.
        key_padding_mask: module convention, ``(B, S)``; ``True`` marks padding.
        batch, heads, L, S: sizes of the attention call.
        dtype: dtype of the scores, used when a float mask is involved.

    Returns:
        ``None`` when neither mask is given, else an SDPA-convention mask that
        broadcasts to ``(B, H, L, S)``: bool when both inputs are bool (keeps the
        cheaper dtype), otherwise additive float.
    """
    masks: list[Tensor] = []
    if attn_mask is not None:
        m = module_mask_to_sdpa(attn_mask, dtype)
        assert m is not None
        if m.dim() == 3:
            m = m.view(batch, heads, L, S)  # (B, H, L, S)
        masks.append(m)
    if key_padding_mask is not None:
        m = module_mask_to_sdpa(key_padding_mask, dtype)
        assert m is not None
        masks.append(m.view(batch, 1, 1, S))  # (B, 1, 1, S)
    if not masks:
        return None
    if len(masks) == 1:
        return masks[0]
    a, b = masks
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    return _as_additive(a, dtype) + _as_additive(b, dtype)
