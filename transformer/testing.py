"""Helpers the spec suites share, public so users can hold their own kernels to the same bar.

One place decides how close is close enough, keyed by dtype (the "one helper" rule):
full precision is compared with fixed tolerances; low precision is judged with the
FlashAttention rule: our error against a float64 reference may be at most ``factor``
times the error the reference math itself makes when run in that low dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["assert_close", "assert_error_within_reference", "tolerances"]

# (atol, rtol) by dtype; fp32/fp64 are torch.testing's defaults.
_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-5, 1.3e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-3, 1.6e-2),
}


def tolerances(dtype: torch.dtype, scale: float = 1.0) -> dict[str, float]:
    """``{"atol": ..., "rtol": ...}`` for ``dtype``, each multiplied by ``scale``.

    ``scale`` loosens the bar for results that chain many operations (a 6-layer stack
    accumulates more rounding than one matmul); every caller names its reason.
    """
    if dtype not in _TOLERANCES:
        raise ValueError(f"no tolerance is defined for dtype {dtype}")
    atol, rtol = _TOLERANCES[dtype]
    return {"atol": atol * scale, "rtol": rtol * scale}


def assert_close(actual: Tensor, expected: Tensor, *, scale: float = 1.0, msg: str = "") -> None:
    """``torch.testing.assert_close`` with the dtype-keyed tolerances of :func:`tolerances`.

    On failure the message carries the max and mean absolute differences.
    """
    expected = expected.to(actual.dtype)
    try:
        tol = tolerances(actual.dtype, scale)
        torch.testing.assert_close(actual, expected, atol=tol["atol"], rtol=tol["rtol"])
    except AssertionError as err:
        diff = (actual.double() - expected.double()).abs()
        diff = diff[torch.isfinite(diff)]
        stats = (
            f"max |diff| {diff.max().item():.3e}, mean |diff| {diff.mean().item():.3e}"
            if diff.numel()
            else "no finite differences"
        )
        raise AssertionError(f"{msg}\n{stats}\n{err}") from None


def assert_error_within_reference(
    ours: Tensor, reference_low: Tensor, exact: Tensor, *, factor: float = 2.0, msg: str = ""
) -> None:
    """Low-precision check: ``|ours - exact| <= factor * |reference_low - exact| + eps``.

    ``exact`` is the float64 result of the reference math; ``reference_low`` is the
    same reference run in the low dtype. Compared on the max abs error, with a floor of
    the low dtype's tolerance so that an exactly-computed reference does not demand
    zero error.
    """
    exact = exact.double()
    ours_err = (ours.double() - exact).abs().max().item()
    ref_err = (reference_low.double() - exact).abs().max().item()
    floor = tolerances(ours.dtype)["atol"]
    if not ours_err <= factor * ref_err + floor:
        raise AssertionError(
            f"{msg}\nerror {ours_err:.3e} exceeds {factor} x reference error {ref_err:.3e} "
            f"(+ floor {floor:.1e}) in {ours.dtype}"
        )
