"""The reference the conformance suite judges every kernel by: equation 1 written plainly.

``softmax(Q K^T * scale + mask) V`` (Vaswani et al. 2017, section 3.2.1), with torch
SDPA's documented conventions: a bool mask is True where a query may attend, a float
mask is added to the scores, ``is_causal`` is the top-left aligned lower triangle,
``scale`` defaults to ``1/sqrt(E)`` and ``enable_gqa`` repeats each key/value head for
its group of query heads (``repeat_interleave``). torch's attention-bias objects are
read here as the masks they stand for.

It is written apart from the package's kernels (it imports none of them), so that
checking a kernel of ours against it is a comparison with an independent computation.
Run in float64 it is the truth; run in a low dtype (``upcast=False``) it is "the
reference math in the same dtype" whose error sets FlashAttention's bound.

Notation: L query length, S key length, E query/key head dim, Ev value head dim.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MaskSpec", "allowed_keys", "reference_attention"]

NEG_INF = float("-inf")


@dataclass(frozen=True)
class MaskSpec:
    """What a case passes as ``attn_mask`` besides plain tensors: a torch attention-bias object.

    ``variant`` is ``"upper_left"`` or ``"lower_right"``; the object itself is built by
    :meth:`build` (torch >= 2.3 has ``torch.nn.attention.bias``).
    """

    variant: str
    L: int
    S: int

    def build(self) -> object:
        """The torch ``CausalBias`` object for this spec."""
        from torch.nn.attention import bias

        make = bias.causal_upper_left if self.variant == "upper_left" else bias.causal_lower_right
        with warnings.catch_warnings():
            # torch warns that lower-right with L > S gives NaN rows: that is the point.
            warnings.simplefilter("ignore", UserWarning)
            return make(self.L, self.S)

    def allowed(self, device: torch.device | str = "cpu") -> Tensor:
        """``(L, S)`` bool, True where query ``i`` may attend key ``j``.

        Upper-left: ``j <= i``. Lower-right: ``j <= i + S - L`` (the last query sees
        every key; with ``L > S`` the first ``L - S`` rows see none).
        """
        rows = torch.arange(self.L, device=device)[:, None]
        cols = torch.arange(self.S, device=device)[None, :]
        offset = 0 if self.variant == "upper_left" else self.S - self.L
        return cols <= rows + offset


def allowed_keys(
    L: int, S: int, attn_mask: Tensor | MaskSpec | None, is_causal: bool, device: torch.device
) -> Tensor:
    """Bool ``(..., L, S)``: may query ``i`` attend key ``j``? (mask, causal and bias combined)."""
    allowed = torch.ones(L, S, dtype=torch.bool, device=device)
    if is_causal:
        allowed = allowed & MaskSpec("upper_left", L, S).allowed(device)
    if isinstance(attn_mask, MaskSpec):
        allowed = allowed & attn_mask.allowed(device)
    elif attn_mask is not None:
        allowed = allowed & (attn_mask if attn_mask.dtype == torch.bool else attn_mask != NEG_INF)
    return allowed


def reference_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | MaskSpec | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    upcast: bool = True,
) -> Tensor:
    """Equation 1 plainly: ``(..., L, E), (..., S, E), (..., S, Ev) -> (..., L, Ev)``.

    ``upcast=True`` computes in float64 (the truth); ``False`` in the inputs' dtype.
    A row with no key it may attend to gives zeros (torch's math backend does too,
    since torch 2.5); dropout is not part of the reference (its properties are
    statistical).
    """
    q, k, v = (t.double() for t in (query, key, value)) if upcast else (query, key, value)
    if enable_gqa:
        group = q.size(-3) // k.size(-3)
        k = k.repeat_interleave(group, dim=-3)
        v = v.repeat_interleave(group, dim=-3)
    L, S = q.size(-2), k.size(-2)
    factor = (1.0 / math.sqrt(q.size(-1)) if q.size(-1) else 1.0) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * factor  # (..., L, S)
    if isinstance(attn_mask, Tensor) and attn_mask.is_floating_point():
        scores = scores + attn_mask.to(scores.dtype)
    allowed = allowed_keys(L, S, attn_mask, is_causal, q.device)
    has_key = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~allowed, NEG_INF).masked_fill(~has_key, 0.0)
    weights = torch.softmax(scores, dim=-1) * has_key  # (..., L, S)
    return torch.matmul(weights, v)  # (..., L, Ev)
