"""The registry of attention kernels: each registered by name, with where it runs and a
priority, and the choice ``kernel=None`` makes among them (by the project's committed
measurements, :mod:`transformer.kernel_choice`, then priority).

:func:`transformer.attention.scaled_dot_product_attention` picks its kernel here; the
names are re-exported by :mod:`transformer.attention`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from transformer.kernel_choice import rank_by_speed

if TYPE_CHECKING:
    from torch.nn.attention.bias import CausalBias

__all__ = [
    "AttentionKernel",
    "available_kernels",
    "pick_kernel",
    "register_kernel",
]


class AttentionKernel(Protocol):
    """The signature every kernel shares: ``torch.nn.functional.scaled_dot_product_attention``'s.

    Kernels receive arguments the front door has already validated; ``attn_mask`` may
    be a torch ``CausalBias`` (then ``is_causal`` is False and its sizes are ``L``, ``S``).
    """

    def __call__(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | CausalBias | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor: ...


@dataclass(frozen=True)
class _Entry:
    fn: AttentionKernel
    # Answers "can this kernel run on tensors of this device?"
    is_available: Callable[[torch.device], bool]
    # >= 0: a candidate for ``kernel=None`` (negative: never picked implicitly); among
    # candidates the committed measurements decide, and priority where there are none.
    priority: int


_KERNELS: dict[str, _Entry] = {}


def _always(device: torch.device) -> bool:
    return True


def register_kernel(
    name: str,
    fn: AttentionKernel,
    *,
    is_available: Callable[[torch.device], bool] | None = None,
    priority: int = -1,
) -> None:
    """Register an attention kernel under ``name``.

    Args:
        name: the name passed as ``kernel=`` to :func:`scaled_dot_product_attention`.
        fn: a callable with the signature of ``torch.nn.functional.scaled_dot_product_attention``
            (no ``kernel`` argument). It receives validated arguments.
        is_available: ``device -> bool``; ``None`` means every device.
        priority: ``>= 0`` makes the kernel a candidate for ``kernel=None``; the default
            ``-1`` keeps a user kernel from being picked implicitly. Among the candidates
            available on the call's device, ``kernel=None`` runs the fastest according
            to the committed measurements for that device type, its hardware kind and
            the dtype (:data:`transformer.kernel_choice.MEASURED`, derived from
            ``benchmarks/results/``); candidates with no measurement there rank after
            the measured ones, highest priority first, so where nothing is measured
            (another device, CPU kind or dtype) the priority alone decides.

    Raises:
        TypeError: ``name`` is not a non-empty string or ``fn`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_kernel: name must be a non-empty str, got {name!r}")
    if not callable(fn):
        raise TypeError(f"register_kernel: fn must be callable, got {type(fn).__name__}")
    _KERNELS[name] = _Entry(fn, is_available or _always, priority)


def available_kernels(
    device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> list[str]:
    """Names of the kernels usable on ``device`` (default CPU), in ``kernel=None``'s order.

    First the candidates for ``kernel=None`` (priority ``>= 0``), fastest first by the
    committed measurements for the device type, its hardware kind and ``dtype``
    (default: torch's default dtype; see :func:`transformer.kernel_choice.rank_by_speed`),
    unmeasured ones after them by priority; then the kernels only run when named
    (negative priority), by priority. ``kernel=None`` runs the first name.
    """
    dev = torch.device("cpu" if device is None else device)
    named_only = sorted(
        (-entry.priority, name)
        for name, entry in _KERNELS.items()
        if entry.priority < 0 and entry.is_available(dev)
    )
    ranked = _ranked_candidates(dev, torch.get_default_dtype() if dtype is None else dtype)
    return ranked + [name for _, name in named_only]


def _ranked_candidates(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The candidates for ``kernel=None`` on ``device``, in the order it prefers them."""
    by_priority = sorted(
        (-entry.priority, name)
        for name, entry in _KERNELS.items()
        if entry.priority >= 0 and entry.is_available(device)
    )
    return rank_by_speed([name for _, name in by_priority], device.type, dtype)


def pick_kernel(kernel: str | None, device: torch.device, dtype: torch.dtype) -> AttentionKernel:
    if kernel is None:
        best = _ranked_candidates(device, dtype)
        if not best:  # pragma: no cover - "reference" is registered below
            raise RuntimeError(f"no attention kernel is available on {device}")
        return _KERNELS[best[0]].fn
    if not isinstance(kernel, str):
        raise TypeError(f"kernel must be a str or None, got {type(kernel).__name__}")
    if kernel not in _KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; known kernels: {sorted(_KERNELS)}")
    entry = _KERNELS[kernel]
    if not entry.is_available(device):
        raise ValueError(
            f"kernel {kernel!r} is not available on device {device}; "
            f"available there: {available_kernels(device)}"
        )
    return entry.fn
