"""How close is close enough: FlashAttention's rule, and a worst element a person can act on.

A kernel's result is judged against the float64 reference (the truth) by the error the
reference math itself makes in the kernel's dtype (FlashAttention's test rule)::

    max |kernel - exact|  <=  2 * max |reference_in_dtype - exact|  +  one rounding

"One rounding" is one unit in the last place, in that dtype, of the largest exact value
or of 1, whichever is larger (a result that is exactly zero, like the query gradient of
a row that sees one key, is still computed from terms of size about 1), so a result the
reference computes exactly still leaves room for one rounding of the kernel's own. In fp16 and bf16 the rounding of inputs and result dominates, and that is
the whole bound. In fp32 and fp64 the order of accumulation dominates instead (a blocked
kernel sums in another order than one matmul), so the bound there also allows
``torch.testing``'s default tolerance for the dtype (:func:`transformer.testing.tolerances`:
fp32 ``1e-5 + 1.3e-6 |x|``, fp64 ``1e-7 + 1e-7 |x|``, on the largest ``|x|``).

Notation: L query length, S key length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from transformer.testing import tolerances

__all__ = ["FACTOR", "Mismatch", "judge"]

#: FlashAttention's factor on the reference's own error.
FACTOR = 2.0


@dataclass(frozen=True)
class Mismatch:
    """Where a result breaks its bound: the tensor, its worst element and the numbers."""

    tensor: str
    index: tuple[int, ...]
    actual: float
    expected: float
    error: float
    bound: float
    reference_error: float
    allowance: str = "one rounding"

    def describe(self) -> str:
        """One line: worst element, both values, error against bound."""
        where = "[" + ", ".join(str(i) for i in self.index) + "]"
        return (
            f"{self.tensor}{where} = {self.actual:.6g}, expected {self.expected:.6g}: "
            f"error {self.error:.3g} > bound {self.bound:.3g} "
            f"(= {FACTOR:g} x the reference's own error {self.reference_error:.3g} in this "
            f"dtype + {self.allowance})"
        )


def _ulp(magnitude: float, dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps * max(magnitude, 1.0)


def judge(name: str, actual: Tensor, exact: Tensor, reference_low: Tensor) -> Mismatch | None:
    """``None`` when ``actual`` keeps the bound; else its worst element.

    ``actual`` is the kernel's result (any dtype and device), ``exact`` the float64
    reference, ``reference_low`` the reference math run in ``actual``'s dtype. A shape
    mismatch or a non-finite value where the truth is finite is a mismatch.
    """
    if tuple(actual.shape) != tuple(exact.shape):
        return Mismatch(
            f"{name} shape {tuple(actual.shape)} (expected {tuple(exact.shape)}) ",
            (),
            float("nan"),
            float("nan"),
            float("inf"),
            0.0,
            0.0,
        )
    if exact.numel() == 0:
        return None
    got = actual.detach().to("cpu", torch.float64)
    exact = exact.detach().to("cpu", torch.float64)
    ref_err = (reference_low.detach().to("cpu", torch.float64) - exact).abs().max().item()
    magnitude = exact.abs().max().item()
    bound = FACTOR * ref_err + _ulp(magnitude, actual.dtype)
    allowance = "one rounding"
    if actual.dtype in (torch.float32, torch.float64):
        tol = tolerances(actual.dtype)
        bound += tol["atol"] + tol["rtol"] * magnitude
        allowance = "one rounding + torch.testing's tolerance"
    diff = (got - exact).abs()
    # A NaN (or an inf where the truth is finite) is the worst possible element.
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    worst = int(diff.argmax().item())
    error = diff.reshape(-1)[worst].item()
    if error <= bound:
        return None
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
    return Mismatch(
        name,
        index,
        got.reshape(-1)[worst].item(),
        exact.reshape(-1)[worst].item(),
        error,
        bound,
        ref_err,
        allowance,
    )
