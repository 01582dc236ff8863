"""Argument checks shared by the modules' constructors and public functions (one home).

Each check names the argument and the value it saw: ``TypeError`` for a value of the wrong
type, ``ValueError`` for a value of the right type outside its range. They run before the
value is used, so a bad argument never surfaces as an error from deep inside torch (such
as ``'<=' not supported between instances of 'float' and 'str'``). This module imports
nothing from the package, so every module may import it.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

__all__ = [
    "check_bool",
    "check_device",
    "check_dropout",
    "check_dtype",
    "check_int",
    "check_module",
    "check_not_nested",
    "check_real",
]


def _seen(value: object) -> str:
    """``float 2.0``: the type and the value, for a ``TypeError`` message."""
    return f"{type(value).__name__} {value!r}"


def check_int(name: str, value: object, low: int | None = 1) -> int:
    """``value`` as an ``int`` (any integral number, not a bool) that is at least ``low``.

    ``low=1`` words the rule "a positive int"; ``low=None`` sets no bound.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_seen(value)}")
    number = int(value)
    if low is not None and number < low:
        rule = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{name} must be {rule}, got {number}")
    return number


def check_real(name: str, value: object) -> float:
    """``value`` as a finite ``float`` (a real number, not a bool); ranges are the caller's."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_seen(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


def check_dropout(value: object, name: str = "dropout") -> float:
    """A dropout probability in ``[0, 1]`` (the bound of ``torch.nn.Dropout``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {_seen(value)}")
    number = float(value)
    if not 0.0 <= number <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return number


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a ``bool`` (a flag); ``0``/``1`` or strings are refused."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_seen(value)}")
    return value


def check_module(name: str, value: object, *, optional: bool = False) -> None:
    """``value`` is an ``nn.Module`` (or ``None`` when ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, nn.Module):
        what = "an nn.Module or None" if optional else "an nn.Module"
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")


def check_dtype(name: str, value: object) -> None:
    """``value`` is a real floating point ``torch.dtype`` or ``None`` (a factory keyword).

    Parameters and tables are real numbers: an integer dtype would fail inside torch
    ("only floating point ... can require gradients") and a complex one every forward.
    """
    if value is not None and not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype or None, got {_seen(value)}")
    if value is not None and not value.is_floating_point:
        raise TypeError(f"{name} must be a real floating point dtype, got {value}")


def check_device(name: str, value: object) -> None:
    """``value`` is ``None`` or names a device (``torch.device``, ``"cuda:0"``, an index)."""
    if value is None or isinstance(value, torch.device):
        return
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TypeError(f"{name} must be a torch.device, str, int or None, got {_seen(value)}")
    try:
        torch.device(value)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{name}={value!r} is not a device: {err}") from None


def check_not_nested(name: str, value: object) -> None:
    """Refuse a NestedTensor: the modules take padded tensors with a key padding mask."""
    if isinstance(value, Tensor) and value.is_nested:
        raise TypeError(
            f"{name} is a NestedTensor, which this package does not take: pass a padded "
            f"tensor (torch.nested.to_padded_tensor({name}, 0.0)) with a key padding mask "
            "that is True at the padded positions"
        )
