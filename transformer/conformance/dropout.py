"""Dropout properties: the drop rate is p, kept weights are scaled by 1/(1-p), a seed reproduces.

Dropout acts on the attention weights (torch's SDPA: "Dropout probability; if greater
than 0.0, dropout is applied"), so it is observed through a probe: with all scores equal
(query and key zero) every weight is ``1/S``, and with value the identity ``(S, S)``
each output element *is* one weight: ``0`` where it was dropped, ``1 / (S (1 - p))``
where kept. The drop count is binomial, so the observed rate must lie within five
standard deviations of ``p``; no two (batch, head) slices, and not every query row,
may drop the same weights; and with value rows of ones each output row must be one
value (its kept share), which dropout on the output instead of the weights is not. With
a causal or boolean mask the same probe sees the mask applied before dropout: masked
keys get nothing, allowed ones ``0`` or ``1 / (c (1 - p))`` for ``c`` allowed keys.
The output and the gradients on random inputs under dropout are checked by
:mod:`~transformer.conformance.dropout_values`, which reads the keep-mask with this probe.

Notation: L query length, S key length.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from transformer.conformance.case import (
    BackwardUnsupported,
    Case,
    Failure,
    Kernel,
    Settings,
    invoke,
    returned_tensor,
)
from transformer.conformance.core import bhle, per_dtype, results_of_one_call
from transformer.conformance.registry import conformance_property

_SDPA = "torch.nn.functional.scaled_dot_product_attention docs (dropout_p)"
_SIGMAS = 5.0


def _probe(kernel: Kernel, case: Case, device: str, value: str, **kwargs: object) -> Tensor:
    """The kernel's output, in float64 on the CPU, for zero query and keys (every score
    equal) and value ``"eye"`` (each output element one weight) or ``"ones"``."""
    zeros = torch.zeros(case.q, dtype=case.dtype, device=device)
    keys = torch.zeros(case.k, dtype=case.dtype, device=device)
    if value == "eye":
        v = torch.eye(case.S, dtype=case.dtype, device=device).expand(case.v).contiguous()
    else:
        v = torch.ones(case.v, dtype=case.dtype, device=device)
    p = case.dropout_p
    out = returned_tensor(invoke(lambda: kernel(zeros, keys, v, dropout_p=p, **kwargs)))
    return out.detach().double().cpu()


def _check_rate(dropped: int, n: int, case: Case, what: str) -> float:
    """The drop rate ``dropped / n``; a ``Failure`` when it is off ``p`` by more than the
    binomial bound."""
    p = case.dropout_p
    rate, spread = dropped / n, _SIGMAS * math.sqrt(p * (1 - p) / n) + 1 / n
    if abs(rate - p) > spread:
        raise Failure(
            f"{dropped} of {n} {what} dropped: rate {rate:.4f}, expected {p} +- {spread:.4f}"
            f"\n    case: {case.describe()}"
        )
    return rate


def _rate_cases(settings: Settings) -> list[Case]:
    return per_dtype(
        settings,
        [
            Case(q=(4, 2, 64, 8), k=(4, 2, 64, 8), v=(4, 2, 64, 64), dropout_p=p, grads=False)
            for p in (0.1, 0.5)
        ],
    )


@conformance_property(
    "dropout-rate",
    section="core",
    rank=80,
    source=f"{_SDPA}; FlashAttention tests (dropout fraction)",
    kind="property",
    cases=_rate_cases,
)
def dropout_rate(kernel: Kernel, case: Case, device: str) -> str | None:
    """Dropout drops each attention weight with probability ``p`` (the observed rate lies within a binomial bound) and scales the kept ones by ``1/(1-p)``."""
    S, p = case.S, case.dropout_p
    weights = _probe(kernel, case, device, "eye")
    rate = _check_rate(int((weights == 0).sum()), weights.numel(), case, "weights")
    kept = weights[weights != 0]
    want = 1.0 / (S * (1.0 - p))
    tol = 4 * torch.finfo(case.dtype).eps * want
    worst = (kept - want).abs().max().item() if kept.numel() else 0.0
    if worst > tol:
        raise Failure(
            f"kept weights are not scaled by 1/(1-p): a kept weight is "
            f"{kept[(kept - want).abs().argmax()].item():.6g}, expected 1/(S(1-p)) = {want:.6g}"
            f"\n    case: {case.describe()}"
        )
    # Drawn per weight: a keep-mask shared by every (batch, head) slice, or by every
    # query row, has the right rate yet is not dropout of each weight (two independent
    # rows of 64 keys coincide with probability below 1e-5).
    masks = (weights != 0).reshape(-1, case.L, S)  # (B*H, L, S)
    for i in range(masks.size(0)):
        for j in range(i + 1, masks.size(0)):
            if torch.equal(masks[i], masks[j]):
                raise Failure(
                    f"(batch, head) slices {i} and {j} (flattened) drop the same weights: the "
                    f"keep-mask must be drawn for each weight\n    case: {case.describe()}"
                )
    if case.L > 1 and bool((masks == masks[:, :1]).all()):
        raise Failure(
            f"every query row drops the same keys: the keep-mask must be drawn for each "
            f"weight\n    case: {case.describe()}"
        )
    # With every value row equal to ones, weight dropout gives each output row one value,
    # (kept keys) / (S (1 - p)), across its features; dropout on the output instead
    # gives 0 or 1/(1-p) feature by feature.
    rows = _probe(kernel, case, device, "ones")
    spread_in_row = (rows.amax(dim=-1) - rows.amin(dim=-1)).max().item()
    if spread_in_row > 4 * torch.finfo(case.dtype).eps * rows.abs().max().item():
        raise Failure(
            f"with value rows all ones an output row takes {spread_in_row:.3g} apart values "
            f"across its features: dropout acted on the output, not on the attention "
            f"weights\n    case: {case.describe()}"
        )
    return f"observed drop rate {rate:.4f} for p={p}"


def _masked_rate_cases(settings: Settings) -> list[Case]:
    base = Case(q=(2, 2, 64, 8), k=(2, 2, 64, 8), v=(2, 2, 64, 64), dropout_p=0.25, grads=False)
    cases = [base.replace(is_causal=True), base.replace(mask="bool", mask_shape=(64, 64))]
    return per_dtype(settings, cases)


@conformance_property(
    "dropout-with-masks",
    section="core",
    rank=82,
    source=f"{_SDPA} (its reference: mask, softmax, then dropout)",
    kind="masking",
    cases=_masked_rate_cases,
)
def dropout_with_masks(kernel: Kernel, case: Case, device: str) -> str | None:
    """With a causal or boolean mask and ``dropout_p > 0`` dropout acts after the mask and the softmax: a masked key gets no weight, each allowed weight of a row with ``c`` allowed keys is ``0`` or ``1/(c(1-p))``, and the allowed weights are dropped at rate ``p`` (within a binomial bound)."""
    L, S, p = case.L, case.S, case.dropout_p
    if case.is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool).tril()
        kwargs: dict[str, object] = {"is_causal": True}
    else:
        gen = torch.Generator().manual_seed(case.seed + 7)
        allowed = torch.rand(L, S, generator=gen) < 0.5
        allowed[:, 0] = True  # every row keeps a key: no row of zeros to argue about
        kwargs = {"attn_mask": allowed.to(device)}
    weights = _probe(kernel, case, device, "eye", **kwargs).reshape(-1, L, S)  # (B*H, L, S)
    leaked = weights[:, ~allowed]
    if bool((leaked != 0).any()):
        raise Failure(
            f"{int((leaked != 0).sum())} masked (query, key) pairs got a nonzero weight with "
            f"dropout_p={p}: the mask is not applied on the dropout path"
            f"\n    case: {case.describe()}"
        )
    count = allowed.sum(dim=-1, keepdim=True).double()  # (L, 1) allowed keys per row
    want = (1.0 / (count * (1.0 - p))).expand(L, S)[allowed]  # (allowed,)
    got = weights[:, allowed]  # (B*H, allowed)
    kept = got != 0
    tol = 4 * torch.finfo(case.dtype).eps * want.max().item()
    wrong = (got - want).abs().masked_fill(~kept, 0.0)
    if wrong.max().item() > tol:
        worst = int(wrong.argmax()) % want.numel()
        raise Failure(
            f"a kept weight is {got.flatten()[int(wrong.argmax())].item():.6g}, expected "
            f"1/(c(1-p)) = {want[worst].item():.6g} for its row's c allowed keys: the softmax "
            f"is not over the allowed keys, or the kept weights are not scaled by 1/(1-p)"
            f"\n    case: {case.describe()}"
        )
    rate = _check_rate(got.numel() - int(kept.sum()), got.numel(), case, "allowed weights")
    return f"observed drop rate {rate:.4f} of the allowed weights for p={p}"


def _seed_cases(settings: Settings) -> list[Case]:
    return per_dtype(settings, [bhle(2, 3, 33, 47, 16, dropout_p=0.3)])


@conformance_property(
    "dropout-seed",
    section="core",
    rank=81,
    source=f"{_SDPA}; torch.manual_seed",
    kind="property",
    cases=_seed_cases,
)
def dropout_seed(kernel: Kernel, case: Case, device: str) -> str | None:
    """With ``dropout_p > 0`` the same ``torch.manual_seed`` gives bit-identical outputs and gradients (the outputs alone for a kernel without a backward), and another seed gives another output."""
    first, refused = results_of_one_call(kernel, case, device, seed=1234)
    again, _ = results_of_one_call(kernel, case, device, seed=1234)
    other, _ = results_of_one_call(kernel, case, device, seed=4321)
    for name, a, b in zip(
        ["output", "grad of query", "grad of key", "grad of value"], first, again, strict=False
    ):
        if not torch.equal(a, b):
            raise Failure(
                f"{name} differs between two calls after torch.manual_seed(1234)\n    case: {case.describe()}"
            )
    if torch.equal(first[0], other[0]):
        raise Failure(
            f"seeds 1234 and 4321 give the same output: dropout ignores the seed\n    case: {case.describe()}"
        )
    if refused is not None:
        raise BackwardUnsupported(f"outputs follow the seed; no gradients to compare: {refused}")
    return None
