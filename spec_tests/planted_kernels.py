"""Attention kernels with one planted bug each: the conformance suite must catch every one.

Each kernel is torch SDPA's semantics written plainly (:func:`plain`) with exactly one
thing wrong, the kind of bug FlashAttention-style kernels have shipped with. They live
outside the package, as a kernel author's code would, and are named as
``planted_kernels:NAME`` targets.

Notation: B batch, H heads, L query length, S key length, E head dim.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import CausalBias, CausalVariant

NEG_INF = float("-inf")


def _allowed(
    mask: Any, L: int, S: int, device: torch.device, *, bottom_right: bool = True
) -> Tensor | None:
    """A CausalBias as its bool mask; ``bottom_right=False`` reads lower-right as upper-left."""
    rows = torch.arange(L, device=device)[:, None]
    cols = torch.arange(S, device=device)[None, :]
    lower_right = mask.variant == CausalVariant.LOWER_RIGHT and bottom_right
    return cols <= rows + (S - L if lower_right else 0)


def plain(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    causal_diagonal: int = 0,
    bias_bottom_right: bool = True,
    invert_bool: bool = False,
    ignore_float: bool = False,
    repeat_heads: str = "interleave",
    safe_empty_rows: bool = True,
    scale_kept: bool = True,
    default_scale: bool = True,
    shared_keep: bool = False,
) -> Tensor:
    """Equation 1 with an explicit ``(..., L, S)`` score matrix; the keywords plant the bugs."""
    L, S, E = query.size(-2), key.size(-2), query.size(-1)
    if enable_gqa:
        g = query.size(-3) // key.size(-3)
        if repeat_heads == "interleave":
            key, value = key.repeat_interleave(g, dim=-3), value.repeat_interleave(g, dim=-3)
        else:  # tiles the heads: query head h gets key head h % Hk instead of h // g
            reps = [1] * key.dim()
            reps[-3] = g
            key, value = key.repeat(*reps), value.repeat(*reps)
    factor = scale if scale is not None else (1 / math.sqrt(E) if default_scale else 1.0)
    scores = (query @ key.transpose(-2, -1)) * factor  # (..., L, S)
    allowed = torch.ones(L, S, dtype=torch.bool, device=query.device)
    if is_causal:
        allowed = allowed & torch.ones(L, S, dtype=torch.bool, device=query.device).tril(
            causal_diagonal
        )
    if isinstance(attn_mask, CausalBias):
        # As kernels often do, the bias becomes a bool mask and takes the bool path.
        bias = _allowed(attn_mask, L, S, query.device, bottom_right=bias_bottom_right)
        allowed = allowed & (~bias if invert_bool else bias)
    elif attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & (~attn_mask if invert_bool else attn_mask)
    elif attn_mask is not None and not ignore_float:
        scores = scores + attn_mask
    scores = scores.masked_fill(~allowed, NEG_INF)
    if safe_empty_rows:
        empty = (scores == NEG_INF).all(dim=-1, keepdim=True)
        weights = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    else:
        weights = torch.softmax(scores, dim=-1)
    if dropout_p:
        # shared_keep: one mask per batch row, reused by all of its heads.
        shape = (weights.shape[0], 1, *weights.shape[-2:]) if shared_keep else weights.shape
        keep = torch.rand(shape, device=weights.device) >= dropout_p
        weights = weights * keep / ((1 - dropout_p) if scale_kept else 1.0)
    return weights @ value  # (..., L, Ev)


def materialises_scores(*args: Any, **kwargs: Any) -> Tensor:
    """Right answers, but it holds the whole ``L x S`` score matrix (no flash memory)."""
    return plain(*args, **kwargs)


def keeps_score_blocks(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    **kwargs: Any,
) -> Tensor:
    """Right answers from 8 blocks of query rows, none of whose tensors holds ``L x S``
    elements; but autograd keeps every block's scores for the backward, and together
    they hold the score matrix several times over."""
    L = query.size(-2)
    if isinstance(attn_mask, CausalBias) or L < 8:
        return plain(query, key, value, attn_mask, dropout_p, is_causal, **kwargs)
    step = -(-L // 8)
    blocks = []
    for r0 in range(0, L, step):
        mask = attn_mask
        if isinstance(mask, Tensor) and mask.dim() >= 2 and mask.size(-2) > 1:
            mask = mask[..., r0 : r0 + step, :]
        rows = query[..., r0 : r0 + step, :]
        blocks.append(
            plain(rows, key, value, mask, dropout_p, is_causal, causal_diagonal=r0, **kwargs)
        )
    return torch.cat(blocks, dim=-2)  # (..., L, Ev)


def holds_half_the_scores(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    **kwargs: Any,
) -> Tensor:
    """Right answers and gradients (torch's own SDPA's), but while the forward runs it
    holds the scores of every other block of ``L / 16`` query rows: half the score
    matrix, so no tensor holds ``L x S`` elements and the peak stays below the score
    matrices' size, yet the memory grows with ``L * S``."""
    L = query.size(-2)
    step = -(-L // 16)
    held = []
    if query.shape[:-2] == key.shape[:-2]:
        with torch.no_grad():
            held = [
                query[..., r : r + step, :] @ key.transpose(-2, -1) for r in range(0, L, 2 * step)
            ]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, **kwargs
    )
    del held
    return out


def forgets_scale(*args: Any, **kwargs: Any) -> Tensor:
    """Bug: ``scale=None`` multiplies the scores by 1 instead of ``1/sqrt(E)``."""
    return plain(*args, default_scale=False, **kwargs)


def ignores_is_causal(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    **kwargs: Any,
) -> Tensor:
    """Bug: accepts ``is_causal`` and drops it."""
    return plain(query, key, value, attn_mask, dropout_p, False, **kwargs)


def top_left_for_bottom_right(*args: Any, **kwargs: Any) -> Tensor:
    """Bug: ``causal_lower_right(L, S)`` is applied top-left aligned."""
    return plain(*args, bias_bottom_right=False, **kwargs)


def causal_off_by_one(*args: Any, **kwargs: Any) -> Tensor:
    """Bug: under ``is_causal`` query ``i`` also sees key ``i + 1``."""
    return plain(*args, causal_diagonal=1, **kwargs)


def gqa_heads_tiled(*args: Any, **kwargs: Any) -> Tensor:
    """Bug: GQA pairs query head ``h`` with key head ``h % Hk`` (``repeat``) instead of ``h // g``."""
    return plain(*args, repeat_heads="tile", **kwargs)


def mask_polarity_inverted(*args: Any, **kwargs: Any) -> Tensor:
    """Bug: a bool mask is read as True = masked out (torch MHA's convention, not SDPA's); a bias object, turned into a bool mask first, is inverted too."""
    return plain(*args, invert_bool=True, **kwargs)


def float_mask_ignored(*args: Any, **kwargs: Any) -> Tensor:
    """Bug: a float mask is accepted and not added."""
    return plain(*args, ignore_float=True, **kwargs)


def nan_on_empty_rows(*args: Any, **kwargs: Any) -> Tensor:
    """Bug: a row with no allowed key gets softmax of all ``-inf``: NaN."""
    return plain(*args, safe_empty_rows=False, **kwargs)


def dropout_unscaled(*args: Any, **kwargs: Any) -> Tensor:
    """Bug: dropped weights are zeroed but the kept ones are not scaled by ``1/(1-p)``."""
    return plain(*args, scale_kept=False, **kwargs)


def low_precision_accumulation(
    query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any
) -> Tensor:
    """Bug: fp16/bf16 outputs are summed over the keys one at a time in their own dtype."""
    if query.dtype not in (torch.float16, torch.bfloat16) or kwargs.get("enable_gqa"):
        return plain(query, key, value, *args, **kwargs)
    S = key.size(-2)
    # The weights in fp32, then weights @ value accumulated key by key in low precision.
    eye = torch.eye(S, dtype=torch.float32, device=value.device).expand(*value.shape[:-2], S, S)
    weights = plain(query.float(), key.float(), eye, *args, **kwargs).to(query.dtype)  # (..., L, S)
    out = torch.zeros(*weights.shape[:-1], value.size(-1), dtype=query.dtype, device=query.device)
    for j in range(S):
        out = out + weights[..., j : j + 1] * value[..., j : j + 1, :]
    return out


class _WrongKeyGrad(torch.autograd.Function):
    """Identity on the key in the forward; its gradient comes back 1% too large."""

    @staticmethod
    def forward(ctx: Any, key: Tensor) -> Tensor:
        return key.view_as(key)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad * 1.01


def wrong_key_gradient(
    query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any
) -> Tensor:
    """Bug: the output is right but the gradient of the key is 1% off."""
    return plain(query, _WrongKeyGrad.apply(key), value, *args, **kwargs)


def nondeterministic(
    query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any
) -> Tensor:
    """Bug: keys are summed in a random order each call (as unordered atomics would)."""
    S = key.size(-2)
    mask = kwargs.get("attn_mask", args[0] if args else None)
    if mask is not None or kwargs.get("is_causal") or S < 2:
        return plain(query, key, value, *args, **kwargs)
    order = torch.randperm(S, device=key.device)
    return plain(query, key[..., order, :], value[..., order, :], *args, **kwargs)


def _unmasked_scores(query: Tensor, key: Tensor, kwargs: dict[str, Any]) -> Tensor | None:
    """``Q K^T`` times the call's scale, ``(..., L, S)``; ``None`` for a masked, causal or GQA call.

    The softmax bugs below are planted on plain calls only; the others go to :func:`plain`.
    """
    if kwargs.get("attn_mask") is not None or kwargs.get("is_causal") or kwargs.get("enable_gqa"):
        return None
    scale = kwargs.get("scale")
    factor = 1 / math.sqrt(query.size(-1)) if scale is None else scale
    return (query @ key.transpose(-2, -1)) * factor


def softmax_without_max(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Any = None, **kwargs: Any
) -> Tensor:
    """Bug: ``exp(scores) / sum(exp(scores))`` with no row max subtracted: large scores overflow."""
    scores = _unmasked_scores(query, key, {"attn_mask": attn_mask, **kwargs})
    if scores is None:
        return plain(query, key, value, attn_mask, **kwargs)
    weights = scores.exp()  # (..., L, S)
    return (weights / weights.sum(dim=-1, keepdim=True)) @ value


def dropout_mask_shared_by_heads(*args: Any, **kwargs: Any) -> Tensor:
    """Bug: one keep-mask of (L, S) per batch row is drawn and reused by all of its heads."""
    return plain(*args, shared_keep=True, **kwargs)


def dropout_on_the_output(
    query: Tensor, key: Tensor, value: Tensor, *args: Any, dropout_p: float = 0.0, **kwargs: Any
) -> Tensor:
    """Bug: dropout is applied to the output instead of the attention weights."""
    out = plain(query, key, value, *args, **kwargs)
    return torch.nn.functional.dropout(out, dropout_p) if dropout_p > 0.0 else out


def _value_of_one_gradient_of_other(value_from: Tensor, gradient_from: Tensor) -> Tensor:
    """``value_from``'s values with ``gradient_from``'s gradients (a backward of other math)."""
    return value_from.detach() + (gradient_from - gradient_from.detach())


def dropout_backward_redraws_mask(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    **kwargs: Any,
) -> Tensor:
    """Bug: the backward regenerates the keep-mask from the wrong random offset: the
    output, its drop rate, scale and seed are right, the gradients are those of other
    dropped weights."""
    out = plain(query, key, value, attn_mask, dropout_p, **kwargs)
    if not dropout_p:
        return out
    redrawn = plain(query, key, value, attn_mask, dropout_p, **kwargs)  # the next draw
    return _value_of_one_gradient_of_other(out, redrawn)


def dropout_backward_unscaled(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    **kwargs: Any,
) -> Tensor:
    """Bug: the backward drops the forward's weights but forgets their ``1/(1-p)``."""
    if not dropout_p:
        return plain(query, key, value, attn_mask, dropout_p, **kwargs)
    with torch.random.fork_rng(devices=[query.device] if query.is_cuda else []):
        out = plain(query, key, value, attn_mask, dropout_p, **kwargs)
    # The RNG is back where it was: the same keep-mask, drawn again.
    unscaled = plain(query, key, value, attn_mask, dropout_p, scale_kept=False, **kwargs)
    return _value_of_one_gradient_of_other(out, unscaled)


def dropout_path_forgets_causal(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    **kwargs: Any,
) -> Tensor:
    """Bug: the dropout path drops ``is_causal`` (right without dropout, and its drop rate
    and scaling are right too)."""
    causal = is_causal and dropout_p == 0.0
    return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, causal, **kwargs)


def softmax_over_queries(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Any = None, **kwargs: Any
) -> Tensor:
    """Bug: normalises each key's column over the queries (softmax over dim -2), not each row."""
    scores = _unmasked_scores(query, key, {"attn_mask": attn_mask, **kwargs})
    if scores is None:
        return plain(query, key, value, attn_mask, **kwargs)
    return torch.softmax(scores, dim=-2) @ value


def writes_into_its_query(
    query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any
) -> Tensor:
    """Bug: folds the scale into the caller's query in place (the output itself is right)."""
    scale = kwargs.pop("scale", None)
    with torch.no_grad():  # also lets the in-place write through on a leaf that needs grad
        query.mul_(1 / math.sqrt(query.size(-1)) if scale is None else scale)
    return plain(query, key, value, *args, scale=1.0, **kwargs)


#: planted kernel -> the property that must catch it.
def wrong_unless_four_dims(query: Tensor, key: Tensor, value: Tensor, **kwargs: Any) -> Tensor:
    """Bug: right for ``(B, H, L, E)`` inputs, but other ranks (torch takes ``(N, ..., L, E)``) get the right shape filled with zeros."""
    out = plain(query, key, value, **kwargs)
    return out if query.dim() == 4 else torch.zeros_like(out)


CAUGHT_BY: dict[str, str] = {
    "forgets_scale": "default-scale",
    "ignores_is_causal": "causal-top-left",
    "top_left_for_bottom_right": "causal-bias-objects",
    "materialises_scores": "no-score-matrix",
    "keeps_score_blocks": "no-score-matrix",
    "holds_half_the_scores": "no-score-matrix",
    "causal_off_by_one": "causal-top-left",
    "gqa_heads_tiled": "gqa",
    "mask_polarity_inverted": "bool-mask",
    "float_mask_ignored": "float-mask",
    "nan_on_empty_rows": "empty-rows-give-zeros",
    "dropout_unscaled": "dropout-rate",
    "low_precision_accumulation": "decode",  # S = 300 in the quick tier; "forward" at S = 1031
    "wrong_key_gradient": "gradients",
    "nondeterministic": "deterministic",
    "writes_into_its_query": "accepts-plain-call",
    "softmax_over_queries": "forward",
    "dropout_mask_shared_by_heads": "dropout-rate",
    "dropout_on_the_output": "dropout-rate",
    "dropout_path_forgets_causal": "dropout-with-masks",
    "dropout_backward_redraws_mask": "dropout-values",
    "dropout_backward_unscaled": "dropout-values",
    "softmax_without_max": "explicit-scale",
    "wrong_unless_four_dims": "forward",
}
