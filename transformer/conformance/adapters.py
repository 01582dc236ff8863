"""torch's own kernels as conformance targets: SDPA pinned to one backend, and FlexAttention.

``transformer conform transformer.conformance.adapters:sdpa_math`` runs torch's math
backend alone (likewise ``sdpa_flash``, ``sdpa_efficient``, ``sdpa_cudnn``). A pinned
backend that cannot take a case says "No available kernel"; that documented refusal is
passed on as ``NotImplementedError`` (UNSUPPORTED), every other error as it is.

:func:`flex_attention` adapts ``torch.nn.attention.flex_attention`` (eager, so it runs on
the CPU without a compiler) to SDPA's signature: ``is_causal`` and bool masks become a
``mask_mod``, float masks a ``score_mod``, torch's causal bias objects a ``mask_mod`` with
their diagonal offset. Dropout has no FlexAttention counterpart and is refused.

Notation: B batch, H heads, L query length, S key length, E head dim.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["flex_attention", "sdpa_cudnn", "sdpa_efficient", "sdpa_flash", "sdpa_math"]


def _pinned(backend_name: str, *args: Any, **kwargs: Any) -> Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch explains each refusal in a warning
        with sdpa_kernel([backend]):
            try:
                return F.scaled_dot_product_attention(*args, **kwargs)
            except RuntimeError as err:
                if "No available kernel" in str(err):
                    raise NotImplementedError(
                        f"SDPA backend {backend_name} refuses this case"
                    ) from err
                raise


def sdpa_math(*args: Any, **kwargs: Any) -> Tensor:
    """torch SDPA pinned to its math backend (the plain composite of matmul and softmax)."""
    return _pinned("MATH", *args, **kwargs)


def sdpa_flash(*args: Any, **kwargs: Any) -> Tensor:
    """torch SDPA pinned to its flash backend (on the CPU: the fused CPU flash kernel)."""
    return _pinned("FLASH_ATTENTION", *args, **kwargs)


def sdpa_efficient(*args: Any, **kwargs: Any) -> Tensor:
    """torch SDPA pinned to its memory-efficient backend (CUDA)."""
    return _pinned("EFFICIENT_ATTENTION", *args, **kwargs)


def sdpa_cudnn(*args: Any, **kwargs: Any) -> Tensor:
    """torch SDPA pinned to its cuDNN backend (CUDA)."""
    return _pinned("CUDNN_ATTENTION", *args, **kwargs)


def flex_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """SDPA's signature on ``torch.nn.attention.flex_attention``: ``(B, H, L, E) -> (B, H, L, Ev)``.

    Inputs of fewer than four dims get leading size-1 dims; more than four are refused.
    """
    from torch.nn.attention.bias import CausalBias, CausalVariant

    if dropout_p:
        raise NotImplementedError("FlexAttention has no dropout")
    if max(query.dim(), key.dim(), value.dim()) > 4:
        raise NotImplementedError("FlexAttention takes (B, H, L, E) inputs")
    lead = 4 - query.dim()
    q, k, v = (t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) for t in (query, key, value))
    L, S = q.size(-2), k.size(-2)
    mask_mods = []
    score_mod = None
    if is_causal:
        mask_mods.append(lambda b, h, i, j: j <= i)
    if isinstance(attn_mask, CausalBias):
        offset = S - L if attn_mask.variant == CausalVariant.LOWER_RIGHT else 0
        mask_mods.append(lambda b, h, i, j: j <= i + offset)
    elif attn_mask is not None:
        m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        m = m.expand(q.size(0), q.size(1), L, S)
        if m.dtype == torch.bool:
            mask_mods.append(lambda b, h, i, j: m[b, h, i, j])
        else:

            def score_mod(score: Tensor, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
                return score + m[b, h, i, j]

    with warnings.catch_warnings():
        # Eager FlexAttention warns at every call that it is meant to be compiled.
        warnings.simplefilter("ignore", UserWarning)
        return _flex_call(q, k, v, lead, mask_mods, score_mod, scale, enable_gqa)


def _flex_call(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lead: int,
    mask_mods: list[Any],
    score_mod: Any,
    scale: float | None,
    enable_gqa: bool,
) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention as flex

    L, S = q.size(-2), k.size(-2)
    block_mask = None
    if mask_mods:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
            allowed = mask_mods[0](b, h, i, j)
            for more in mask_mods[1:]:
                allowed = allowed & more(b, h, i, j)
            return allowed

        block_mask = create_block_mask(mask_mod, q.size(0), q.size(1), L, S, device=str(q.device))
    out = flex(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa
    )
    return out.reshape(out.shape[lead:]) if lead else out
