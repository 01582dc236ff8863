"""Mixed precision: ``torch.autocast`` contexts and the fp16 gradient scaler of the step.

* ``bf16`` has float32's exponent range: autocast alone, no scaler.
* ``fp16`` gradients below 2^-24 flush to zero, so the loss is multiplied by a scale
  before the backward pass (``torch.amp.GradScaler``); the optimizer step unscales the
  gradients first and is skipped, with the scale halved, when any of them is inf or NaN.

Imports torch only.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

__all__ = [
    "AUTOCAST_DTYPES",
    "autocast",
    "autocast_enabled",
    "make_grad_scaler",
    "optimizer_step",
]

#: The ``TrainConfig.autocast`` names and their dtypes.
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, name: str | None) -> Any:
    """``torch.autocast`` to the dtype ``name`` on ``device``, or no context for float32."""
    if name is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[name])


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``; False on a device autocast does not know.

    torch raises there (``meta``: "unknown device type for autocast"), and a module's
    forward on the meta device (shape inference, ``to_empty`` initialisation) asks.
    """
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None and not available(device_type):
        return False
    return bool(torch.is_autocast_enabled(device_type))


def make_grad_scaler(device: torch.device, name: str | None) -> torch.amp.GradScaler:
    """A ``GradScaler`` for ``device`` that is enabled for fp16 alone (a no-op otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=name == "fp16")


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: list[nn.Parameter],
    clip_norm: float | None,
) -> bool:
    """Unscale, clip and apply the gradients of ``params``; False when the scaler skipped the step.

    The order torch documents for ``GradScaler`` with clipping: ``unscale_`` (which also
    records whether a gradient is inf/NaN), ``clip_grad_norm_`` on the true gradients,
    ``scaler.step`` (which does not call ``optimizer.step()`` after an inf), ``update``
    (which halves the scale after an inf and grows it after ``growth_interval`` clean
    steps). A skipped step is the one whose scale went down. Without a scaler every
    step is taken.
    """
    scaler.unscale_(optimizer)
    if clip_norm is not None:
        nn.utils.clip_grad_norm_(params, clip_norm)
    if not scaler.is_enabled():
        optimizer.step()
        return True
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= scale
