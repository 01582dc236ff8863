"""The ``"torch"`` kernel: torch's own ``F.scaled_dot_product_attention`` with the project's
guarantees kept (zero rows where no key may be attended, NaN rows where torch's CPU
flash kernel would hide them), and torch's bias objects passed through.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor

from transformer.masks import causal_bias_mask, causal_mask, causal_offset, is_causal_bias

if TYPE_CHECKING:
    from torch.nn.attention.bias import CausalBias

from transformer.reference_kernel import reference_attention, repeat_kv_heads

__all__ = [
    "torch_attention",
]


def _allowed_rows(attn_mask: Tensor | None, L: int, S: int) -> Tensor | None:
    """``(..., L, 1)`` bool: does the row have at least one key it may attend to?

    ``None`` means every row does (no mask and ``S > 0``). A causal mask must already be
    folded into ``attn_mask`` (causal alone leaves every row key 0).
    """
    if attn_mask is None:
        return None if S > 0 else torch.zeros(L, 1, dtype=torch.bool)
    allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")
    return allowed.any(dim=-1, keepdim=True)


#: From this many keys on, torch's CPU SDPA shows a query's NaN in its output row itself.
#: Its flash kernel takes a row's max with a SIMD max, which propagates NaN, over every
#: full vector of keys, and with a scalar max, which drops NaN, over the rest: a row of
#: fewer keys than one vector (8 fp32/bf16/fp16 or 4 fp64 lanes under AVX2, measured on
#: torch 2.13; twice that under AVX-512) comes out zeros. 64 keys leave a margin, and
#: above it the wrapper adds no pass over the query: on a busy machine each extra
#: OpenMP region of a multi-threaded op (that sum) waits a scheduler slice, 8 ms here.
_CPU_NAN_SAFE_S = 64


def _values_readable(t: Tensor) -> bool:
    """May the wrapper read a value of ``t`` (``.item()``, ``bool()``) to skip a pass?

    Only for a real CPU tensor in eager mode: on a GPU the read would synchronise the
    device, and under ``torch.compile``/``torch.export``, a functorch transform
    (``vmap``, ``grad``) or a ``FakeTensorMode`` it is data-dependent control flow,
    which they refuse. There the pass runs unconditionally instead.
    """
    return (
        t.is_cpu
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and not isinstance(t, FakeTensor)
        # A real tensor under an active FakeTensorMode (a dispatch mode: the stack
        # length costs 0.1 us, detect_fake_mode 8 us, and decoding calls this often).
        and (torch._C._len_torch_dispatch_stack() == 0 or detect_fake_mode() is None)
    )


def _show_nan_rows(out: Tensor, query: Tensor, S: int) -> Tensor:
    """``out`` ``(..., L, Ev)`` with NaN in the rows whose query ``(..., L, E)`` holds one.

    torch's CPU flash kernel returns zeros for a row whose scores are all NaN (a NaN in
    the query) when ``S`` is shorter than one SIMD vector, hiding the NaN; the math path
    and every other kernel show it, so such rows are set to NaN. On the CPU that needs
    checking only for short ``S``, and there, where values can be read
    (:func:`_values_readable`), one sum (NaN wherever any element is) first rules it out
    for an all-finite query, so the row-wise pass runs only when it can matter.
    """
    if query.is_cpu and S >= _CPU_NAN_SAFE_S:
        return out
    if _values_readable(query) and math.isfinite(query.detach().sum().item()):
        return out
    return out.masked_fill(torch.isnan(query).any(dim=-1, keepdim=True), float("nan"))


def torch_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | CausalBias | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """torch's own SDPA, wrapped to honour this package's guarantees.

    The wrapper (a) applies ``is_causal`` together with ``attn_mask``, which older torch
    rejects, (b) repeats GQA heads itself, since ``enable_gqa`` only exists in torch >= 2.5,
    and (c) gives zero output and zero gradient to rows with no allowed key on every
    backend: such rows are given every key (so the softmax is finite) and then zeroed.
    A torch ``CausalBias`` is folded before torch sees it: an upper-left one (or any
    square one) becomes ``is_causal=True``, which is what torch's own dispatch does, and
    a lower-right one becomes its bool mask, which is what torch does on CPU, so that
    its key-less rows (``L > S``) go through (c) instead of torch's NaN warning.

    Shapes: query ``(..., L, E)``, key ``(..., S, E)``, value ``(..., S, Ev)``; returns
    ``(..., L, Ev)``.
    """
    if (
        attn_mask is None
        and not enable_gqa
        and scale is None
        and query.shape[:-2] == key.shape[:-2] == value.shape[:-2]
        and key.size(-2) > 0
        and query.size(-2) > 0
    ):
        # The common case (a module's unmasked or causal call, a decoding step): none of
        # the folds below applies and, with keys present, every row has one (top-left
        # causal leaves key 0 to all), so only the NaN rule can need a pass. Skipping the
        # general path's checks matters where a call is small: a cached step of a 6-layer
        # decoder makes a dozen of them.
        out = F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout_p, is_causal=is_causal
        )
        return _show_nan_rows(out, query, key.size(-2))
    if is_causal_bias(attn_mask):
        if causal_offset(attn_mask) == 0:
            attn_mask, is_causal = None, True
        else:
            attn_mask = causal_bias_mask(attn_mask, device=query.device)  # (L, S)
    if enable_gqa:
        key, value = repeat_kv_heads(query, key), repeat_kv_heads(query, value)
    if not (query.shape[:-2] == key.shape[:-2] == value.shape[:-2]):
        # torch's SDPA sizes its output from the query's batch dims and fails when key or
        # value carry more; expanding all three to the broadcast batch (views) fixes that.
        batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
        query = query.expand(*batch, *query.shape[-2:])  # (..., L, E)
        key = key.expand(*batch, *key.shape[-2:])  # (..., S, E)
        value = value.expand(*batch, *value.shape[-2:])  # (..., S, Ev)
    L, S = query.size(-2), key.size(-2)
    if isinstance(attn_mask, Tensor) and attn_mask.dim() < 2:
        # torch's SDPA rejects masks of fewer than two dims although they broadcast.
        attn_mask = attn_mask.expand(L, S)
    if attn_mask is None and is_causal and scale is not None and scale <= 0.0:
        # torch's causal path multiplies its -inf by the scale: -inf * 0 is NaN and
        # -inf * -1 is +inf. An explicit mask is applied after the scale.
        attn_mask = causal_mask(L, S, device=query.device)
        is_causal = False
    if attn_mask is not None and is_causal:
        causal = causal_mask(L, S, device=query.device)
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & causal
        else:
            attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
        is_causal = False
    if S == 0 or L == 0:
        return reference_attention(query, key, value, attn_mask, dropout_p, is_causal, scale)
    rows = _allowed_rows(attn_mask, L, S)  # is_causal is folded into attn_mask above
    if rows is not None and _values_readable(rows) and bool(rows.all()):
        # No key-less row: nothing to patch (on the CPU this check costs no sync).
        rows = None
    if rows is not None and attn_mask is not None:
        attn_mask = attn_mask.masked_fill(~rows, True if attn_mask.dtype == torch.bool else 0.0)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(query.dtype)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
    )
    out = _show_nan_rows(out, query, S)
    if rows is not None:
        out = out.masked_fill(~rows, 0.0)
    return out
