"""Dropout's values: the output and the gradients under dropout are equation 1 with the kernel's keep-mask.

The dropout properties (:mod:`~transformer.conformance.dropout`) check the drop rate,
the ``1/(1-p)`` scale and the seed on a probe whose every score is equal; they do not
see a backward pass that drops other weights than its forward did (a keep-mask
regenerated from the wrong seed or offset), nor a scale, a float mask or a gradient
that is right without dropout and wrong with it. Here the kernel's own keep-mask is read
first, by the same probe (query and key zero, value the identity ``(S, S)``: each output
element is one attention weight, ``0`` where it was dropped), under the same
``torch.manual_seed`` as the call checked next, on inputs of the same shapes. The call
on random inputs must then give, in output and gradients,

.. math:: \\mathrm{out} = \\frac{\\mathrm{softmax}(\\mathrm{scale} \\cdot QK^T + \\mathrm{mask}) \\circ M}{1 - p} V

with ``M`` that keep-mask, within FlashAttention's bound against the same formula in
float64. A kernel that draws its keep-mask from the values as well as the seed (none of
torch's does) fails here too, and the message says that it may be the reason.

Notation: L query length, S key length, ``M`` the keep-mask ``(..., L, S)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer.conformance.case import (
    BackwardUnsupported,
    Case,
    Failure,
    Kernel,
    Settings,
    Unsupported,
    build_inputs,
    call_kernel,
    invoke,
    kernel_kwargs,
    returned_tensor,
)
from transformer.conformance.checks import (
    check_gradients,
    kernel_gradients,
    reference_results,
    upstream_for,
)
from transformer.conformance.compare import judge
from transformer.conformance.core import bhle, per_dtype
from transformer.conformance.registry import conformance_property

_SDPA = "torch.nn.functional.scaled_dot_product_attention docs (dropout_p; its math reference)"
# One seed for the probe and the call it reads the keep-mask for.
_SEED = 2718


def _keep_mask(kernel: Kernel, case: Case, kwargs: dict[str, object], device: str) -> Tensor:
    """The keep-mask ``(..., L, S)`` the kernel draws after ``torch.manual_seed(_SEED)`` for
    this case's shapes and arguments, read through the identity-value probe."""
    # Inputs that require grad as the checked call's do: a kernel may take another path
    # (and draw otherwise) when it has to save for a backward.
    grads = case.grads
    zeros_q = torch.zeros(case.q, dtype=case.dtype, device=device, requires_grad=grads)
    zeros_k = torch.zeros(case.k, dtype=case.dtype, device=device, requires_grad=grads)
    eye = torch.eye(case.S, dtype=case.dtype, device=device).expand(case.v).contiguous()
    eye.requires_grad_(grads)
    probe_kwargs = {
        name: value.detach().clone().requires_grad_(value.requires_grad)
        if isinstance(value, Tensor)
        else value
        for name, value in kwargs.items()
    }
    torch.manual_seed(_SEED)
    weights = returned_tensor(invoke(lambda: kernel(zeros_q, zeros_k, eye, **probe_kwargs)))
    return (weights.detach() != 0).cpu()


def _cases(settings: Settings) -> list[Case]:
    # Value (..., S, S): the probe's identity needs Ev = S. L != S, both ways round; one
    # case with E = Ev = S, which fused kernels (flash: Ev = E) need to take part at all.
    base = bhle(2, 2, 24, 20, 16, Ev=20, dropout_p=0.3)
    cases = [
        base,
        bhle(2, 2, 24, 32, 32, Ev=32, dropout_p=0.3),
        base.replace(scale=0.5),
        base.replace(q=(2, 2, 20, 16), k=(2, 2, 24, 16), v=(2, 2, 24, 24), is_causal=True),
        base.replace(mask="bool", mask_shape=(24, 20)),
        base.replace(mask="float-grad", mask_shape=(2, 1, 24, 20)),
    ]
    return per_dtype(settings, cases)


@conformance_property(
    "dropout-values",
    section="core",
    rank=83,
    source=f"{_SDPA}; FlashAttention tests (dropout output and gradients)",
    kind="equivalence",
    cases=_cases,
)
def dropout_values(kernel: Kernel, case: Case, device: str) -> str | None:
    """Under dropout the output and the gradients of query, key, value (and of a float mask) equal ``(softmax(scale Q K^T + mask) * M / (1-p)) V`` in float64, where ``M`` is the kernel's own keep-mask for the same seed, read by the identity-value probe: the backward drops the weights its forward dropped."""
    p = case.dropout_p
    inputs = build_inputs(case, device)
    keep = _keep_mask(kernel, case, kernel_kwargs(case, inputs), device)
    torch.manual_seed(_SEED)
    out = call_kernel(kernel, case, inputs)
    upstream = upstream_for(out, case.seed) if case.grads else None
    (exact, exact_grads), (low, low_grads) = reference_results(
        case, inputs, upstream, dropout=(keep, p)
    )
    kept = f"{int(keep.sum())} of {keep.numel()} weights neither masked nor dropped"
    mismatch = judge("output", out, exact, low)
    if mismatch is not None:
        raise Failure(
            f"{mismatch.describe()}\n    under dropout the output is not softmax(...) * M / "
            f"(1-p) @ V for the keep-mask M this seed gives the probe ({kept}): the forward "
            f"is wrong under dropout, or its keep-mask depends on the input values"
            f"\n    case: {case.describe()}"
        )
    if upstream is None:
        return None
    try:
        grads = kernel_gradients(out, inputs, upstream)
    except Unsupported as refusal:
        raise BackwardUnsupported(
            f"forward right under dropout; backward refused: {refusal}"
        ) from None
    check_gradients(
        case,
        inputs,
        grads,
        exact_grads,
        low_grads,
        f"\n    the output is right under dropout but this gradient is not that of "
        f"softmax(...) * M / (1-p) @ V with the forward's keep-mask M ({kept}): the "
        f"backward drops other weights, or scales them otherwise",
    )
    return kept
