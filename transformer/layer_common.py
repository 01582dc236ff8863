"""What the encoder and decoder layers and stacks share: argument checks, copies, hints.

Kept apart from the layers so that :mod:`transformer.encoder`, :mod:`transformer.decoder`
and :mod:`transformer.layers` (``Transformer``) use one copy of each rule.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from transformer._checks import (
    check_bool,
    check_device,
    check_dropout,
    check_dtype,
    check_int,
    check_not_nested,
    check_real,
)
from transformer.masks import square_subsequent_mask

__all__ = [
    "batch_of",
    "check_hints",
    "check_layer_args",
    "check_mask_shapes",
    "check_tensors",
    "clones",
    "detect_is_causal",
    "heads_of",
    "seq_len",
    "stack_batch_first",
]


def check_layer_args(
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


def check_tensors(**tensors: object) -> None:
    """Each input is a dense ``Tensor``; a mask or hint may also be ``None`` (checked by MHA)."""
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        check_not_nested(name, value)


def check_hints(**hints: object) -> None:
    """``is_causal``-style hints are bools, or ``None`` where torch detects them."""
    for name, value in hints.items():
        if value is not None:
            check_bool(name, value)


def check_mask_shapes(
    batch: int | None,
    nhead: int | None,
    attn: dict[str, tuple[object, int, int]],
    padding: dict[str, tuple[object, int]],
) -> None:
    """Each mask fits the call; the error names the mask as the caller's argument.

    ``attn`` maps a name to ``(mask, L, S)``: the mask is ``(L, S)`` or, for a batch of
    ``batch`` sequences, ``(batch * nhead, L, S)`` (``(nhead, L, S)`` unbatched, i.e.
    ``batch=None``; any first dim when ``nhead`` is unknown, as with a custom layer).
    ``padding`` maps a name to ``(mask, S)``: ``(batch, S)``, or ``(S,)`` unbatched.
    Checked before any work (a stack's attention modules would otherwise refuse a
    wrong mask only when reached, under their own argument names); a mask that is
    neither a tensor nor ``None`` raises ``TypeError`` under the caller's name.
    """
    for name, mask in [
        *((n, m) for n, (m, _, _) in attn.items()),
        *((n, m) for n, (m, _) in padding.items()),
    ]:
        if mask is not None and not isinstance(mask, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    for name, (mask, L, S) in attn.items():
        if not isinstance(mask, Tensor):
            continue
        shape = tuple(mask.shape)
        heads = None if nhead is None else (1 if batch is None else batch) * nhead
        fits = shape == (L, S) or (
            len(shape) == 3 and shape[1:] == (L, S) and heads in (None, shape[0])
        )
        if not fits:
            lead = "N" if heads is None else heads
            raise ValueError(f"{name} must have shape {(L, S)} or ({lead}, {L}, {S}), got {shape}")
    for name, (mask, S) in padding.items():
        if isinstance(mask, Tensor):
            expected = (S,) if batch is None else (batch, S)
            if tuple(mask.shape) != expected:
                raise ValueError(f"{name} must have shape {expected}, got {tuple(mask.shape)}")


def batch_of(x: Tensor, batch_first: bool) -> int | None:
    """Batch size of a ``(T, B, E)`` or ``(B, T, E)`` input; ``None`` when unbatched ``(T, E)``."""
    return None if x.dim() == 2 else x.size(0 if batch_first else 1)


def heads_of(layer: nn.Module) -> int | None:
    """``num_heads`` of a layer's self-attention; ``None`` for a layer without one (custom)."""
    heads = getattr(getattr(layer, "self_attn", None), "num_heads", None)
    return heads if isinstance(heads, int) else None


def clones(layer: nn.Module, n: int) -> nn.ModuleList:
    """``n`` independent deep copies of ``layer`` in a ``ModuleList`` (so all are in state_dict)."""
    return nn.ModuleList([copy.deepcopy(layer) for _ in range(n)])


def seq_len(x: Tensor, batch_first: bool) -> int:
    """Sequence length of a ``(T, E)``, ``(T, B, E)`` or ``(B, T, E)`` input."""
    if x.dim() == 2:
        return x.size(0)
    return x.size(1 if batch_first else 0)


def stack_batch_first(layers: nn.ModuleList) -> bool:
    """The ``batch_first`` of a stack, read from its first layer's self-attention (as torch)."""
    return bool(getattr(layers[0].self_attn, "batch_first", False))


def detect_is_causal(mask: Tensor | None, is_causal: bool | None, size: int) -> bool:
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
