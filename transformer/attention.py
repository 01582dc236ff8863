"""Scaled dot-product attention (paper section 3.2.1, equation 1) and its kernel registry.

.. math:: \\mathrm{Attention}(Q, K, V) = \\mathrm{softmax}\\left(\\frac{QK^T}{\\sqrt{d_k}}\\right) V

:func:`scaled_dot_product_attention` is a drop-in for
``torch.nn.functional.scaled_dot_product_attention``: same arguments, same
broadcasting, same mask convention, plus a ``kernel`` keyword that picks the
implementation. The front door validates every argument once, then hands the
untouched arguments to the chosen kernel, so every kernel shares one signature.

Notation (used in every shape comment): B batch, H heads (Hq query heads, Hk key/value
heads under GQA), L target/query length, S source/key length, E query/key head dim
(``d_k``), Ev value head dim (``d_v``). ``...`` is any number of batch dimensions.

Conventions pinned by the spec suite:

* bool ``attn_mask``: ``True`` = may attend; float ``attn_mask``: added to the scores;
  it broadcasts to ``(..., L, S)``;
* ``is_causal=True`` is the top-left aligned lower-triangular mask; given together with
  ``attn_mask`` both apply (a key must be allowed by each), as in torch >= 2.5 on CPU;
* ``attn_mask`` may be one of torch's attention-bias objects,
  ``torch.nn.attention.bias.causal_upper_left(L, S)`` or ``causal_lower_right(L, S)``
  (a ``CausalBias``): every kernel returns what torch's SDPA returns for it. The front
  door checks that its sizes are the query's ``L`` and the key's ``S`` and refuses it
  together with ``is_causal=True`` (torch's ``CausalBias._dispatch`` raises
  ``ValueError`` for that pair too), then hands the object itself to the kernel;
* a query row with no key it may attend to yields zeros and zero gradients, never NaN.

Non-finite numbers (the contract ``spec_tests/test_numerical_robustness.py`` and
``property_tests/test_hostile_inputs.py`` pin down):

* finite query/key/value with a bool mask, or a float mask of finite values and
  ``-inf`` (``-1e9`` and ``finfo.min`` included), give a finite result and finite
  gradients, as long as the scaled scores ``QK^T * scale`` are themselves finite in
  the working dtype (scores ~1e4 are fine; an overflowing ``QK^T`` is not representable);
* NaN/inf *in* query, key or value propagate as in torch, never into a finite-looking
  wrong answer: an output row whose query holds NaN, or that attends to a key/value
  holding NaN, is non-finite. The damage stays inside its ``(batch, head)`` slice (and a
  NaN query stays in its own row); other slices are bit-for-bit what they would be
  without it. A NaN at a *masked-out* position may still spread within its slice
  (``0 * NaN``), as in torch: mask values, do not rely on masking NaN away.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from torch.nn.attention.bias import CausalBias

from transformer.attention_checks import (
    autocast_inputs,
    check_dropout_range,
    check_mask_device,
    check_pairing,
    validate,
)
from transformer.kernel_registry import (
    AttentionKernel,
    available_kernels,
    pick_kernel,
    register_kernel,
)
from transformer.reference_kernel import (
    attention_weights,
    reference_attention,
)
from transformer.torch_kernel import torch_attention

__all__ = [
    "AttentionKernel",
    "attention_weights",
    "available_kernels",
    "reference_attention",
    "register_kernel",
    "scaled_dot_product_attention",
    "torch_attention",
]


# Both are candidates for kernel=None; "torch" is correct for every call (it keeps every
# guarantee above), so where the measurements show it fastest it is the default.
register_kernel("reference", reference_attention, priority=0)
register_kernel("torch", torch_attention, priority=5)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | CausalBias | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    kernel: str | None = None,
) -> Tensor:
    """Scaled dot-product attention, interchangeable with torch's (section 3.2.1, eq. 1).

    Args:
        query: ``(..., L, E)``.
        key: ``(..., S, E)``; batch dims broadcast with the query's.
        value: ``(..., S, Ev)``.
        attn_mask: broadcastable to ``(..., L, S)``; bool ``True`` = may attend, float is
            added to the scores. Or a torch ``CausalBias`` of size ``(L, S)``
            (``torch.nn.attention.bias.causal_upper_left`` / ``causal_lower_right``),
            passed to the kernel as it is; with ``causal_lower_right`` and ``L > S`` the
            first ``L - S`` rows have no key and are zeros.
        dropout_p: dropout on the attention weights, applied whenever ``> 0`` (like torch's
            functional form, it does not look at a module's training flag).
        is_causal: apply the top-left aligned causal mask (query ``i`` sees keys ``<= i``).
        scale: multiplies ``QK^T``; defaults to ``1/sqrt(E)``.
        enable_gqa: repeat key/value heads (dim ``-3``) to the query's head count.
        kernel: implementation name (see :func:`available_kernels`); ``None`` runs the
            fastest kernel available on the query's device by the project's committed
            measurements for that device type and the query's dtype (see
            :func:`register_kernel`; priority decides where nothing is measured).

    Returns:
        ``(..., L, Ev)``. Rows with no key to attend to are zeros (and get zero gradient).

    Raises:
        TypeError: an argument has the wrong type (e.g. an integer ``query``).
        ValueError: shapes/dtypes do not fit, ``dropout_p`` is outside ``[0, 1)``, a
            ``CausalBias`` has other sizes than ``(L, S)`` or comes with
            ``is_causal=True``, or the kernel name is unknown or unavailable on the device.

    Under ``torch.autocast`` query, key and value are first cast to the autocast dtype
    (fp64 excepted), as torch's SDPA is.
    """
    if isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor):
        query, key, value = autocast_inputs(query, key, value)
    validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    fn = pick_kernel(kernel, query.device, query.dtype)
    return fn(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=float(dropout_p),
        is_causal=is_causal,
        scale=None if scale is None else float(scale),
        enable_gqa=enable_gqa,
    )


def attend_prechecked(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
) -> Tensor:
    """``kernel=None`` attention for callers that built their arguments themselves.

    Shapes: query ``(B, H, L, E)``, key ``(B, H, S, E)``, value ``(B, H, S, Ev)``, mask
    broadcastable to ``(B, H, L, S)`` -> ``(B, H, L, Ev)``.

    :class:`~transformer.multi_head_attention.MultiheadAttention` checks its inputs at its
    own front door and then builds query, key, value and mask itself: they are tensors
    of the right rank, the mask has the scores' shape and a bool or float dtype. What it
    cannot vouch for is checked here as :func:`scaled_dot_product_attention` checks it,
    with the same ``ValueError``: query, key and value sharing a dtype, device and head
    dims (a cache filled by another module of another dtype or head dim), the mask's
    device, and ``dropout_p`` in ``[0, 1)`` (the module's ``dropout`` can be changed
    after construction). The rest of the front door's checks (types, ranks, broadcast,
    ``scale``, ``CausalBias``) are skipped: a cached step of a 6-layer decoder makes a
    dozen such calls. The kernel is chosen by the registry, as ``kernel=None`` does, and
    autocast casts the inputs as at the front door.
    """
    query, key, value = autocast_inputs(query, key, value)
    check_pairing(query, key, value)
    if attn_mask is not None:
        check_mask_device(attn_mask, query)
    check_dropout_range(dropout_p)
    fn = pick_kernel(None, query.device, query.dtype)
    return fn(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=float(dropout_p),
        is_causal=is_causal,
        scale=None,
        enable_gqa=False,
    )
