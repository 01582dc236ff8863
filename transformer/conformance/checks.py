"""The checks most properties share: equal to the reference in output and gradients.

:func:`check_equivalence` runs a case through the kernel and through the float64
reference, then judges the output and the gradients of query, key, value (and a float
mask that requires grad) by FlashAttention's rule (:mod:`~transformer.conformance.compare`).
The upstream gradient is seeded, so a failure reproduces.

Notation: L query length, S key length, Ev value head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer.conformance.case import (
    BackwardUnsupported,
    Case,
    Failure,
    Inputs,
    Kernel,
    Unsupported,
    build_inputs,
    call_kernel,
    invoke,
)
from transformer.conformance.compare import Mismatch, judge
from transformer.conformance.reference import MaskSpec, reference_attention

__all__ = [
    "check_equivalence",
    "check_gradients",
    "kernel_gradients",
    "reference_results",
    "upstream_for",
]


def upstream_for(out: Tensor, seed: int) -> Tensor:
    """The seeded gradient fed back from the output, ``(..., L, Ev)``, in its dtype."""
    gen = torch.Generator().manual_seed(seed + 4242)
    upstream = torch.randn(*out.shape, generator=gen, dtype=torch.float64)
    return upstream.to(device=out.device, dtype=out.dtype)


def _reference_run(
    case: Case,
    inputs: Inputs,
    upcast: bool,
    upstream: Tensor | None,
    dropout: tuple[Tensor, float] | None = None,
) -> tuple[Tensor, list[Tensor | None]]:
    """The reference's output and gradients, in float64 on the CPU or in the case's dtype.

    ``dropout``: ``(keep, p)``, a bool keep-mask ``(..., L, S)`` and the rate; the
    weights are then ``softmax(...) * keep / (1 - p)`` before they multiply the value
    (not with ``enable_gqa``: the weights are read through an ``(S, S)`` identity value).
    """
    if dropout is not None and case.enable_gqa:
        raise ValueError("the reference under dropout takes no enable_gqa case")
    device = "cpu" if upcast else inputs.query.device

    def leaf(t: Tensor) -> Tensor:
        t = t.detach().to(device)
        return (t.double() if upcast else t).requires_grad_(True)

    names = [name for name, _ in inputs.grad_inputs]
    leaves = {name: leaf(t) for name, t in inputs.grad_inputs}
    q, k, v = leaves["query"], leaves["key"], leaves["value"]
    mask: Tensor | MaskSpec | None = inputs.reference_mask
    if "attn_mask" in leaves:
        mask = leaves["attn_mask"]
    elif isinstance(mask, Tensor):
        mask = mask.detach().to(device)
        mask = mask.double() if upcast and mask.is_floating_point() else mask
    if dropout is None:
        out = reference_attention(
            q, k, v, mask, case.is_causal, case.scale, case.enable_gqa, upcast=upcast
        )
    else:
        keep, p = dropout
        # The weights themselves: the value the identity (S, S); exact in any dtype.
        eye = torch.eye(k.size(-2), dtype=q.dtype, device=device)
        weights = reference_attention(
            q, k, eye, mask, case.is_causal, case.scale, case.enable_gqa, upcast=upcast
        )  # (..., L, S)
        dropped = weights * keep.to(device=device, dtype=weights.dtype) / (1.0 - p)
        out = torch.matmul(dropped, v)  # (..., L, Ev)
    if upstream is None or out.numel() == 0:
        return out.detach(), []
    up = upstream.to(device=device, dtype=out.dtype)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], up, allow_unused=True)
    return out.detach(), list(grads)


def reference_results(
    case: Case,
    inputs: Inputs,
    upstream: Tensor | None,
    *,
    dropout: tuple[Tensor, float] | None = None,
) -> tuple[tuple[Tensor, list[Tensor | None]], tuple[Tensor, list[Tensor | None]]]:
    """``(exact, in_dtype)``: the float64 truth and the reference math in the case's dtype.

    ``dropout``: ``(keep, p)`` drops the weights by that keep-mask, ``(..., L, S)``.
    """
    return _reference_run(case, inputs, True, upstream, dropout), _reference_run(
        case, inputs, False, upstream, dropout
    )


def kernel_gradients(
    out: Tensor, inputs: Inputs, upstream: Tensor, *, any_error_unsupported: bool = False
) -> list[Tensor | None]:
    """Gradients of the case's inputs through the kernel's backward, sorted like :func:`invoke`."""
    if not out.requires_grad:
        raise Unsupported("no backward: the output does not require grad")
    tensors = [t for _, t in inputs.grad_inputs]
    return list(
        invoke(
            lambda: torch.autograd.grad(out, tensors, upstream, allow_unused=True),
            any_error_unsupported=any_error_unsupported,
        )
    )


def _fail(case: Case, mismatch: Mismatch) -> Failure:
    return Failure(f"{mismatch.describe()}\n    case: {case.describe()}")


def check_equivalence(
    kernel: Kernel, case: Case, device: str, *, extension: bool = False
) -> str | None:
    """Output and gradients equal the float64 reference within FlashAttention's bound.

    Raises :class:`Failure` naming the first tensor that breaks its bound (the output
    first, then the gradients of query, key, value and attn_mask). A kernel that refuses
    the backward (or inputs that require grad) is still held to the forward: the case
    is UNSUPPORTED only once its output has been found right.
    """
    try:
        return _check_equivalence(kernel, case, device, extension)
    except Unsupported as refusal:
        if not case.grads:
            raise
        _check_equivalence(kernel, case.replace(grads=False), device, extension)
        raise BackwardUnsupported(f"forward right; backward refused: {refusal}") from None


def _check_equivalence(kernel: Kernel, case: Case, device: str, extension: bool) -> str | None:
    inputs = build_inputs(case, device)
    out = call_kernel(kernel, case, inputs, any_error_unsupported=extension)
    upstream = upstream_for(out, case.seed) if case.grads and out.numel() else None
    (exact, exact_grads), (low, low_grads) = reference_results(case, inputs, upstream)
    mismatch = judge("output", out, exact, low)
    if mismatch is not None:
        raise _fail(case, mismatch)
    if upstream is None:
        return None
    grads = kernel_gradients(out, inputs, upstream, any_error_unsupported=extension)
    check_gradients(case, inputs, grads, exact_grads, low_grads)
    return None


def check_gradients(
    case: Case,
    inputs: Inputs,
    grads: list[Tensor | None],
    exact_grads: list[Tensor | None],
    low_grads: list[Tensor | None],
    why: str = "",
) -> None:
    """Judge the kernel's gradients of ``inputs.grad_inputs`` against the reference's.

    ``exact_grads`` are the float64 truth, ``low_grads`` the reference math in the case's
    dtype (:func:`reference_results`). Raises :class:`Failure` for the first input no
    gradient reaches or whose gradient breaks its bound; ``why`` (a line of its own,
    starting with a newline) follows the mismatch in the message.
    """
    for (name, _), grad, g_exact, g_low in zip(
        inputs.grad_inputs, grads, exact_grads, low_grads, strict=True
    ):
        if g_exact is None or g_low is None:
            continue
        if grad is None:
            raise Failure(f"no gradient reaches {name}\n    case: {case.describe()}")
        mismatch = judge(f"grad of {name}", grad, g_exact, g_low)
        if mismatch is not None:
            raise Failure(f"{mismatch.describe()}{why}\n    case: {case.describe()}")
