"""The ``"reference"`` kernel: equation 1 (section 3.2.1) written out, softmax of the scaled
scores times the values, with the zero-row rule for rows that may attend to no key.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer.masks import causal_bias_mask, causal_mask, is_causal_bias

if TYPE_CHECKING:
    from torch.nn.attention.bias import CausalBias

__all__ = [
    "attention_weights",
    "reference_attention",
    "repeat_kv_heads",
    "safe_softmax",
]


def repeat_kv_heads(query: Tensor, kv: Tensor) -> Tensor:
    """Grouped-query attention: repeat each key/value head for its group of query heads.

    ``(..., Hk, S, E) -> (..., Hq, S, E)``, head ``j`` serving query heads
    ``j*g .. j*g+g-1`` with ``g = Hq // Hk`` (``repeat_interleave``, like torch).
    """
    groups = query.size(-3) // kv.size(-3)
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=-3)


def safe_softmax(scores: Tensor) -> Tensor:
    """Softmax over the last dim that gives an all-zero row where every score is ``-inf``.

    The plain softmax divides 0 by 0 there and returns NaN, which then poisons the
    gradients of every other row sharing a weight. Subtracting the (detached) row
    max leaves the result unchanged (softmax is shift invariant) and keeps ``exp``
    from overflowing. fp16/bf16 scores are normalised in fp32 and rounded once, as
    ``torch.softmax`` does: summing the row in bf16 would round at every term.
    """
    if scores.size(-1) == 0:
        return scores
    if scores.dtype in (torch.float16, torch.bfloat16):
        return safe_softmax(scores.float()).to(scores.dtype)
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    unnormalised = torch.exp(scores - row_max)
    denom = unnormalised.sum(dim=-1, keepdim=True)
    return unnormalised / torch.where(denom == 0, torch.ones_like(denom), denom)


def attention_weights(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | CausalBias | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """The attention weights of equation 1: ``softmax(QK^T / sqrt(d_k) + mask)``.

    Shapes: query ``(..., L, E)``, key ``(..., S, E)``, SDPA-convention ``attn_mask``
    broadcastable to ``(..., L, S)`` or a torch ``CausalBias`` of size ``(L, S)`` (read
    as the bool mask it stands for); returns ``(..., L, S)``, each row summing to one
    (or all zeros where no key is allowed).
    """
    L, S = query.size(-2), key.size(-2)
    if is_causal_bias(attn_mask):
        attn_mask = causal_bias_mask(attn_mask, device=query.device)  # (L, S)
    # 1/sqrt(d_k): "to counteract" the dot products growing large (section 3.2.1).
    # With d_k = 0 every score is an empty sum (0) and any scale gives torch's uniform
    # weights; 1.0 avoids dividing by zero.
    d_k = query.size(-1)
    scale_factor = (1.0 / math.sqrt(d_k) if d_k > 0 else 1.0) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale_factor  # (..., L, S)
    if is_causal:
        scores = scores.masked_fill(~causal_mask(L, S, device=query.device), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    return safe_softmax(scores)


def reference_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | CausalBias | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Equation 1 written plainly: the executable spec every other kernel is held to.

    Materialises the full ``(..., L, S)`` score matrix; clarity over speed.

    Shapes: query ``(..., L, E)``, key ``(..., S, E)``, value ``(..., S, Ev)``,
    attn_mask broadcastable to ``(..., L, S)`` or a torch ``CausalBias`` (materialised
    as its ``(L, S)`` bool mask); returns ``(..., L, Ev)``.
    """
    if enable_gqa:
        key, value = repeat_kv_heads(query, key), repeat_kv_heads(query, value)
    weights = attention_weights(query, key, attn_mask, is_causal, scale)  # (..., L, S)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    return weights @ value  # (..., L, Ev)
