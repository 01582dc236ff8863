"""The front door's checks of attention arguments, done once so that kernels can trust them.

Every check raises ``TypeError`` or ``ValueError`` naming the argument and what it was,
before any work starts; under ``torch.autocast`` the inputs are cast first, as torch's
SDPA casts them.
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from transformer.masks import is_causal_bias

if TYPE_CHECKING:
    from torch.nn.attention.bias import CausalBias

__all__ = [
    "autocast_inputs",
    "check_dropout_range",
    "check_mask_device",
    "check_pairing",
    "validate",
]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {t.dtype}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (..., seq_len, head_dim), got {_shape(t)}")
    return t


def _check_causal_bias(bias: CausalBias, is_causal: bool, L: int, S: int) -> None:
    """A ``CausalBias`` must describe this call's ``(L, S)`` and not come with ``is_causal``."""
    if is_causal:
        # torch's CausalBias._dispatch raises ValueError("CausalBias should not be used
        # with causal=True"); we refuse the same pair rather than guess which one is meant.
        raise ValueError(
            "attn_mask is a CausalBias, which cannot be combined with is_causal=True "
            "(as in torch); pass one of them"
        )
    if (bias.seq_len_q, bias.seq_len_kv) != (L, S):
        raise ValueError(
            f"attn_mask is a CausalBias of size (seq_len_q, seq_len_kv) = "
            f"({bias.seq_len_q}, {bias.seq_len_kv}) but query has L={L} and key has S={S}"
        )


def _broadcast(*shapes: tuple[int, ...]) -> tuple[int, ...] | None:
    """The broadcast of ``shapes`` by torch's rules, or ``None`` where they do not broadcast.

    ``torch.broadcast_shapes`` gives the same answer but goes through torch's symbolic-
    shape reference implementation: 15 us per call against about 1 us here, paid by
    every call through the front door.
    """
    out: list[int] = []
    for dims in itertools.zip_longest(*(reversed(s) for s in shapes), fillvalue=1):
        size = 1
        for d in dims:
            if d != 1:
                if size not in (1, d):
                    return None
                size = d
        out.append(size)
    return tuple(reversed(out))


def check_pairing(query: Tensor, key: Tensor, value: Tensor) -> None:
    """Query, key and value fit together: one dtype and device, E shared by query and key,
    S by key and value (shapes ``(..., L, E)``, ``(..., S, E)``, ``(..., S, Ev)``)."""
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            "query, key and value must share a dtype, got "
            f"query {query.dtype}, key {key.dtype}, value {value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            "query, key and value must be on one device, got "
            f"query {query.device}, key {key.device}, value {value.device}"
        )
    if query.size(-1) != key.size(-1):
        raise ValueError(
            "query and key must have the same head dim E: "
            f"query {_shape(query)} has E={query.size(-1)}, key {_shape(key)} has E={key.size(-1)}"
        )
    if key.size(-2) != value.size(-2):
        raise ValueError(
            "key and value must have the same sequence length S: "
            f"key {_shape(key)} has S={key.size(-2)}, value {_shape(value)} has S={value.size(-2)}"
        )


def autocast_inputs(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Query, key and value in autocast's dtype where autocast is on for their device.

    torch's SDPA is on autocast's lower-precision list, so under ``torch.autocast`` it
    casts its fp32/fp16/bf16 inputs (not fp64) to the autocast dtype; doing the same
    here gives every kernel torch's inputs, output dtype included. The mask keeps its
    dtype: the kernels convert a float mask to their compute dtype themselves.
    """
    device_type = "cpu" if query.is_cpu else query.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return query, key, value
    low = torch.get_autocast_dtype(device_type)

    def cast(t: Tensor) -> Tensor:
        return t.to(low) if t.is_floating_point() and t.dtype != torch.float64 else t

    return cast(query), cast(key), cast(value)


def check_mask_device(attn_mask: Tensor, query: Tensor) -> None:
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")


def check_dropout_range(dropout_p: float) -> None:
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def validate(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | CausalBias | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument and what was seen."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t)
    check_pairing(query, key, value)
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    q_batch, k_batch, v_batch = query.shape[:-2], key.shape[:-2], value.shape[:-2]
    if enable_gqa:
        if query.dim() < 3 or key.dim() < 3 or value.dim() < 3:
            raise ValueError(
                "enable_gqa=True needs a heads dimension (..., H, L, E); got "
                f"query {_shape(query)}, key {_shape(key)}, value {_shape(value)}"
            )
        hq, hk, hv = query.size(-3), key.size(-3), value.size(-3)
        if hk != hv or hk == 0 or hq % hk != 0:
            raise ValueError(
                "enable_gqa=True needs key and value heads equal and dividing the query heads; "
                f"got query heads {hq}, key heads {hk}, value heads {hv}"
            )
        # The heads dims are reconciled by repetition; the rest must broadcast.
        q_batch, k_batch, v_batch = q_batch[:-1], k_batch[:-1], v_batch[:-1]
    batch = _broadcast(tuple(q_batch), tuple(k_batch), tuple(v_batch))
    if batch is None:
        raise ValueError(
            "batch dims of query, key and value do not broadcast: "
            f"query {_shape(query)}, key {_shape(key)}, value {_shape(value)}"
        )
    L, S = query.size(-2), key.size(-2)
    if enable_gqa:
        batch = (*batch, query.size(-3))
    scores_shape = (*batch, L, S)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal_bias(attn_mask):
        # A CausalBias is a Tensor subclass whose data is meaningless (uninitialised
        # storage); only its variant and sizes count, so no tensor check applies to it.
        _check_causal_bias(attn_mask, is_causal, L, S)
    elif attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(
                f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}"
            )
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(
                "attn_mask must be bool (True = may attend) or floating point (added to the "
                f"scores), got dtype {attn_mask.dtype}"
            )
        check_mask_device(attn_mask, query)
        if _broadcast(tuple(attn_mask.shape), scores_shape) != scores_shape:
            raise ValueError(
                f"attn_mask of shape {_shape(attn_mask)} does not broadcast to the attention "
                f"scores (..., L, S) = {scores_shape}"
            )
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    check_dropout_range(dropout_p)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale}")
