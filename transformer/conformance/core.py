"""Core properties: torch SDPA's documented semantics, which torch's own SDPA passes in full.

Each property's docstring states it in one sentence (the report's first line of a
failure) and its ``source`` names the behaviour pinned down: the documentation of
``torch.nn.functional.scaled_dot_product_attention`` (torch >= 2.5), the paper's
section 3.2.1, or FlashAttention's test suite for the sizes and the accuracy rule.

Sizes are awkward on purpose: lengths 1 and primes, lengths that are no multiple of any
block size (and, in the full tier, cross two 512-wide blocks), head dims 21, 59, 72, 111,
203 beside 16 and 64, and value dims that differ from the key dims.

Notation: B batch, Hq query heads, Hk key/value heads, L query length, S key length,
E query/key head dim, Ev value head dim.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from transformer.conformance.case import (
    BackwardUnsupported,
    Case,
    Failure,
    FollowsFromAnother,
    Kernel,
    Settings,
    Unsupported,
    build_inputs,
    call_kernel,
)
from transformer.conformance.checks import check_equivalence, kernel_gradients, upstream_for
from transformer.conformance.compare import judge
from transformer.conformance.reference import MaskSpec, reference_attention
from transformer.conformance.registry import conformance_property

_SDPA = "torch.nn.functional.scaled_dot_product_attention docs"


def bhle(
    B: int,
    H: int,
    L: int,
    S: int,
    E: int,
    Ev: int | None = None,
    Hk: int | None = None,
    **flags: Any,
) -> Case:
    """A case of query ``(B, H, L, E)``, key ``(B, Hk, S, E)``, value ``(B, Hk, S, Ev)``."""
    hk = H if Hk is None else Hk
    return Case(q=(B, H, L, E), k=(B, hk, S, E), v=(B, hk, S, E if Ev is None else Ev), **flags)


def per_dtype(settings: Settings, cases: list[Case]) -> list[Case]:
    """Every case once per dtype of the run."""
    return [c.replace(dtype=d) for d in settings.dtypes for c in cases]


def _lengths(settings: Settings) -> list[tuple[int, int, int]]:
    """``(L, S, E)`` triples: decode, primes, L != S both ways, odd head dims."""
    sizes = [(1, 1, 16), (1, 97, 59), (17, 17, 21), (97, 130, 64), (130, 97, 72)]
    if settings.big:
        sizes += [(257, 257, 111), (61, 203, 203), (1031, 1031, 64)]
    if settings.tier == "thorough":
        sizes += [(2053, 1543, 59), (4099, 1, 16)]
    return sizes


# ------------------------------------------------------------------------- the basics


def _plain_cases(settings: Settings) -> list[Case]:
    dtype = torch.float32 if torch.float32 in settings.dtypes else settings.dtypes[0]
    return [bhle(1, 2, 16, 16, 8, dtype=dtype, grads=False)]


@conformance_property(
    "accepts-plain-call", section="core", rank=0, source=_SDPA, kind="shape", cases=_plain_cases
)
def accepts_plain_call(kernel: Kernel, case: Case, device: str) -> str | None:
    """The plain call, ``kernel(query, key, value)`` with no optional argument, in fp32 (or the run's first dtype without fp32), is answered, not refused: a kernel may refuse features, but refusing this one means every other case says nothing."""
    try:
        out = call_kernel(kernel, case, build_inputs(case, device))
    except Unsupported as refusal:
        raise Failure(
            f"the kernel refused the plain call: {refusal}\n    case: {case.describe()}"
        ) from None
    want = (*case.q[:-1], case.v[-1])
    if tuple(out.shape) != want:
        raise Failure(f"output is {tuple(out.shape)}, expected {want}\n    case: {case.describe()}")
    return None


def _shape_cases(settings: Settings) -> list[Case]:
    return per_dtype(
        settings,
        [
            bhle(2, 3, 7, 11, 12, Ev=5, grads=False),
            Case(q=(4, 7, 12), k=(4, 11, 12), v=(4, 11, 5), grads=False),
            Case(q=(7, 12), k=(11, 12), v=(11, 5), grads=False),
            Case(q=(2, 2, 3, 7, 12), k=(2, 2, 3, 11, 12), v=(2, 2, 3, 11, 5), grads=False),
        ],
    )


@conformance_property(
    "output-shape", section="core", rank=10, source=_SDPA, kind="shape", cases=_shape_cases
)
def output_shape(kernel: Kernel, case: Case, device: str) -> str | None:
    """The output is ``(..., L, Ev)`` for query ``(..., L, E)``, key ``(..., S, E)`` and value ``(..., S, Ev)``, in the query's dtype and on its device."""
    out = call_kernel(kernel, case, build_inputs(case, device))
    want = (*case.q[:-1], case.v[-1])
    if tuple(out.shape) != want or out.dtype != case.dtype or out.device.type != device:
        raise Failure(
            f"output is {tuple(out.shape)} {out.dtype} on {out.device}, expected {want} "
            f"{case.dtype} on {device}\n    case: {case.describe()}"
        )
    return None


def _scale_cases(settings: Settings) -> list[Case]:
    return per_dtype(settings, [bhle(1, 2, 16, 16, e, grads=False) for e in (8, 59)])


@conformance_property(
    "default-scale",
    section="core",
    rank=20,
    source=f"{_SDPA}; paper §3.2.1",
    kind="equivalence",
    cases=_scale_cases,
)
def default_scale(kernel: Kernel, case: Case, device: str) -> str | None:
    """With ``scale=None`` the scores ``Q K^T`` are multiplied by ``1/sqrt(E)``, the key/query head dim (§3.2.1: "we scale the dot products by 1/sqrt(d_k)")."""
    try:
        return check_equivalence(kernel, case, device)
    except Failure as failure:
        # Name the usual culprit: the kernel computes scale 1 (or another power of E).
        inputs = build_inputs(case, device)
        out = call_kernel(kernel, case, inputs)
        E = case.q[-1]
        for guess, words in (
            (1.0, "no scale at all (1.0)"),
            (1.0 / E, "1/E"),
            (math.sqrt(E), "sqrt(E)"),
        ):
            ref = reference_attention(inputs.query, inputs.key, inputs.value, scale=guess)
            if judge("output", out, ref, ref.to(case.dtype)) is None:
                raise Failure(
                    f"the output equals attention with {words} instead of 1/sqrt(E): {failure}"
                ) from None
        # No scale mistake explains it: is the output wrong with the scale given, too?
        try:
            check_equivalence(kernel, case.replace(scale=1.0 / math.sqrt(E)), device)
        except Failure:
            raise FollowsFromAnother(
                "the output is also wrong with scale=1/sqrt(E) given explicitly, so the "
                f"default scale is not the cause: {failure}"
            ) from None
        except Unsupported:
            raise failure from None  # the kernel takes no scale: nothing to compare with
        raise


def _explicit_scale_cases(settings: Settings) -> list[Case]:
    base = bhle(2, 2, 33, 41, 24)
    # 20: scores of magnitude ~100, where exp without the row max subtracted overflows;
    # forward only: there the gradients come from nearly cancelling terms, and even
    # torch's SDPA misses the fp32 bound on them.
    cases = [base.replace(scale=s) for s in (0.37, 2.0, 0.0)]
    return per_dtype(settings, [*cases, base.replace(scale=20.0, grads=False)])


@conformance_property(
    "explicit-scale",
    section="core",
    rank=32,
    source=_SDPA,
    kind="equivalence",
    cases=_explicit_scale_cases,
)
def explicit_scale(kernel: Kernel, case: Case, device: str) -> str | None:
    """An explicit ``scale`` replaces ``1/sqrt(E)`` as the factor on ``Q K^T``, in the output and the gradients (``scale=0`` averages the values; ``scale=20``, forward only, gives scores of magnitude ~100, which overflow a softmax that does not subtract its row max)."""
    return check_equivalence(kernel, case, device)


def _forward_cases(settings: Settings) -> list[Case]:
    cases = [bhle(2, 3, L, S, E, grads=False) for L, S, E in _lengths(settings)]
    cases.append(bhle(2, 3, 33, 65, 24, Ev=40, grads=False))
    # torch takes (N, ..., L, E): one batch dim, none and three are judged by value too.
    cases += [
        Case(q=(4, 7, 12), k=(4, 11, 12), v=(4, 11, 5), grads=False),
        Case(q=(7, 12), k=(11, 12), v=(11, 5), grads=False),
        Case(q=(2, 2, 3, 7, 12), k=(2, 2, 3, 11, 12), v=(2, 2, 3, 11, 5), grads=False),
    ]
    return per_dtype(settings, cases)


@conformance_property(
    "forward",
    section="core",
    rank=30,
    source=f"{_SDPA}; paper §3.2.1 eq. 1",
    kind="equivalence",
    cases=_forward_cases,
)
def forward(kernel: Kernel, case: Case, device: str) -> str | None:
    """The output equals equation 1, ``softmax(Q K^T / sqrt(E)) V``, computed in float64, within FlashAttention's bound (2x the reference math's own error in the same dtype, plus one rounding)."""
    return check_equivalence(kernel, case, device)


def _gradient_cases(settings: Settings) -> list[Case]:
    return [c.replace(grads=True) for c in _forward_cases(settings)]


@conformance_property(
    "gradients",
    section="core",
    rank=31,
    source=f"{_SDPA} (autograd); FlashAttention tests",
    kind="equivalence",
    cases=_gradient_cases,
)
def gradients(kernel: Kernel, case: Case, device: str) -> str | None:
    """The gradients of query, key and value equal those of equation 1 in float64, within FlashAttention's bound."""
    return check_equivalence(kernel, case, device)


# ---------------------------------------------------------------------------- masking


def _causal_cases(settings: Settings) -> list[Case]:
    sizes = [(17, 17), (5, 23), (23, 5), (1, 9)]
    if settings.big:
        sizes += [(1031, 1031), (600, 1100)]
    return per_dtype(settings, [bhle(2, 2, L, S, 32, is_causal=True) for L, S in sizes])


@conformance_property(
    "causal-top-left",
    section="core",
    rank=40,
    source=f"{_SDPA} (is_causal: top-left aligned); paper §3.2.3",
    kind="masking",
    cases=_causal_cases,
)
def causal_top_left(kernel: Kernel, case: Case, device: str) -> str | None:
    """``is_causal=True`` lets query ``i`` attend keys ``0..i`` only (the top-left aligned lower triangle, also for L != S), in the output and the gradients."""
    return check_equivalence(kernel, case, device)


def _bias_cases(settings: Settings) -> list[Case]:
    # Lower-right with L <= S only: with L > S its first rows see no key (an extension).
    sizes = [(3, 5), (5, 5), (1, 7), (37, 70), (70, 37)]
    if settings.big:
        sizes += [(600, 1100)]
    cases = []
    for L, S in sizes:
        cases.append(bhle(2, 2, L, S, 16, mask=MaskSpec("upper_left", L, S)))
        if L <= S:
            cases.append(bhle(2, 2, L, S, 16, mask=MaskSpec("lower_right", L, S)))
    return per_dtype(settings, cases)


@conformance_property(
    "causal-bias-objects",
    section="core",
    # After the masks: kernels usually turn a bias object into one, so a mask bug would
    # show here first and be blamed on the bias objects.
    rank=45,
    source="torch.nn.attention.bias (causal_upper_left, causal_lower_right)",
    kind="masking",
    cases=_bias_cases,
)
def causal_bias_objects(kernel: Kernel, case: Case, device: str) -> str | None:
    """torch's attention-bias objects as ``attn_mask``: ``causal_upper_left(L, S)`` lets query ``i`` see keys ``j <= i``, ``causal_lower_right(L, S)`` keys ``j <= i + S - L`` (bottom-right aligned, as in decoding with a cache)."""
    return check_equivalence(kernel, case, device)


def _bool_mask_cases(settings: Settings) -> list[Case]:
    B, H, L, S = 2, 3, 19, 37
    shapes = [(L, S), (B, 1, 1, S), (1, H, L, S), (B, H, L, S), (B, 1, L, S)]
    cases = [bhle(B, H, L, S, 16, mask="bool", mask_shape=s) for s in shapes]
    if settings.big:
        cases.append(bhle(1, 2, 1031, 1031, 16, mask="bool", mask_shape=(1, 1, 1, 1031)))
    return per_dtype(settings, cases)


@conformance_property(
    "bool-mask",
    section="core",
    rank=41,
    source=f"{_SDPA} (bool attn_mask: True = may attend; broadcasts)",
    kind="masking",
    cases=_bool_mask_cases,
)
def bool_mask(kernel: Kernel, case: Case, device: str) -> str | None:
    """A bool ``attn_mask`` (True = may take part in attention) broadcast from any shape to ``(B, H, L, S)`` keeps exactly the keys it allows, in the output and the gradients."""
    return check_equivalence(kernel, case, device)


def _float_mask_cases(settings: Settings) -> list[Case]:
    B, H, L, S = 2, 3, 19, 37
    cases = [
        bhle(B, H, L, S, 16, mask="float", mask_shape=(L, S)),
        bhle(B, H, L, S, 16, mask="float", mask_shape=(B, 1, 1, S)),
        bhle(B, H, L, S, 16, mask="float-grad", mask_shape=(B, H, L, S)),
        bhle(B, H, L, S, 16, mask="float-grad", mask_shape=(1, 1, L, S)),
    ]
    return per_dtype(settings, cases)


@conformance_property(
    "float-mask",
    section="core",
    rank=42,
    source=f"{_SDPA} (float attn_mask is added to the scores)",
    kind="masking",
    cases=_float_mask_cases,
)
def float_mask(kernel: Kernel, case: Case, device: str) -> str | None:
    """A float ``attn_mask`` is added to the scaled scores before the softmax; the gradients of query, key, value and of the mask itself follow."""
    return check_equivalence(kernel, case, device)


def _gqa_cases(settings: Settings) -> list[Case]:
    cases = [
        bhle(2, 6, 13, 29, 16, Hk=2, enable_gqa=True),
        bhle(2, 4, 13, 29, 16, Hk=1, enable_gqa=True),  # multi-query attention
        bhle(1, 6, 13, 29, 16, Hk=3, enable_gqa=True, is_causal=True),
    ]
    return per_dtype(settings, cases)


@conformance_property(
    "gqa",
    section="core",
    rank=50,
    source=f"{_SDPA} (enable_gqa: key/value heads repeat_interleave'd)",
    kind="equivalence",
    cases=_gqa_cases,
)
def gqa(kernel: Kernel, case: Case, device: str) -> str | None:
    """With ``enable_gqa=True``, key/value head ``j`` serves query heads ``j*g .. j*g+g-1`` (``g = Hq/Hk``), MQA (one key/value head) included."""
    return check_equivalence(kernel, case, device)


def _decode_cases(settings: Settings) -> list[Case]:
    sizes = [1, 2, 300] + ([1543] if settings.big else [])
    cases = [bhle(2, 4, 1, S, 64) for S in sizes]
    cases.append(bhle(2, 4, 1, 300, 64, mask="bool", mask_shape=(2, 1, 1, 300)))
    return per_dtype(settings, cases)


@conformance_property(
    "decode",
    section="core",
    rank=55,
    source="FlashAttention tests (seqlen_q = 1)",
    kind="shape",
    cases=_decode_cases,
)
def decode(kernel: Kernel, case: Case, device: str) -> str | None:
    """One query against many keys (L = 1, as in token-by-token decoding) equals equation 1, with and without a key padding mask."""
    return check_equivalence(kernel, case, device)


def _strided_cases(settings: Settings) -> list[Case]:
    base = bhle(2, 3, 21, 34, 24)
    cases = [base.replace(layout=layout) for layout in ("transposed", "sliced", "expanded")]
    cases.append(base.replace(layout="transposed", is_causal=True))
    return per_dtype(settings, cases)


@conformance_property(
    "strided-inputs",
    section="core",
    rank=60,
    source=f"{_SDPA}; torch test_transformers (non-contiguous inputs)",
    kind="shape",
    cases=_strided_cases,
)
def strided_inputs(kernel: Kernel, case: Case, device: str) -> str | None:
    """Non-contiguous inputs (transposed from ``(B, L, H, E)``, sliced with stride 2, key/value expanded over heads with stride 0) give the same output and gradients as contiguous ones."""
    return check_equivalence(kernel, case, device)


def _empty_cases(settings: Settings) -> list[Case]:
    return per_dtype(
        settings,
        [bhle(2, 3, 0, 5, 8), bhle(0, 3, 4, 5, 8), bhle(2, 0, 4, 5, 8)],
    )


@conformance_property(
    "empty-batch-or-queries",
    section="core",
    rank=65,
    source=_SDPA,
    kind="shape",
    cases=_empty_cases,
)
def empty_batch_or_queries(kernel: Kernel, case: Case, device: str) -> str | None:
    """No queries (L = 0), no batch or no heads give an empty output of the right shape, and its backward runs."""
    inputs = build_inputs(case, device)
    out = call_kernel(kernel, case, inputs)
    want = (*case.q[:-1], case.v[-1])
    if tuple(out.shape) != want:
        raise Failure(f"output is {tuple(out.shape)}, expected {want}\n    case: {case.describe()}")
    if out.requires_grad:
        kernel_gradients(out, inputs, upstream_for(out, case.seed))
    return None


# ------------------------------------------------------------------- reproducibility


def _determinism_cases(settings: Settings) -> list[Case]:
    return per_dtype(settings, [bhle(2, 3, 97, 130, 32), bhle(2, 3, 97, 130, 32, is_causal=True)])


def results_of_one_call(
    kernel: Kernel, case: Case, device: str, *, seed: int | None = None
) -> tuple[list[torch.Tensor], Unsupported | None]:
    """The output and the gradients of one call (``torch.manual_seed(seed)`` first if given).

    A kernel with no backward, or one refusing it, still has its outputs compared: the
    refusal is returned in place of the gradients, for the caller to raise afterwards.
    """
    inputs = build_inputs(case, device)
    if seed is not None:
        torch.manual_seed(seed)
    out = call_kernel(kernel, case, inputs)
    try:
        grads = kernel_gradients(out, inputs, upstream_for(out, case.seed))
    except Unsupported as refusal:
        return [out.detach()], refusal
    return [out.detach()] + [g for g in grads if g is not None], None


@conformance_property(
    "deterministic",
    section="core",
    rank=70,
    source="torch.use_deterministic_algorithms; FlashAttention tests (deterministic backward)",
    kind="property",
    cases=_determinism_cases,
)
def deterministic(kernel: Kernel, case: Case, device: str) -> str | None:
    """Two calls on the same inputs (no dropout) give bit-identical outputs and gradients (the outputs alone for a kernel without a backward)."""
    (first, refused), (second, _) = (
        results_of_one_call(kernel, case, device),
        results_of_one_call(kernel, case, device),
    )
    names = ["output", "grad of query", "grad of key", "grad of value"]
    for name, a, b in zip(names, first, second, strict=False):
        if a.shape != b.shape:
            raise Failure(
                f"{name} has shape {tuple(a.shape)} in one call and {tuple(b.shape)} in "
                f"another\n    case: {case.describe()}"
            )
        differ = (a != b) & ~(a.isnan() & b.isnan())  # NaN where both are NaN is the same
        if bool(differ.any()):
            raise Failure(
                f"{name} differs between two identical calls in {int(differ.sum())} of "
                f"{a.numel()} elements (max |diff| {(a.double() - b.double()).abs().max().item():.3g})"
                f"\n    case: {case.describe()}"
            )
    if refused is not None:
        raise BackwardUnsupported(f"outputs bit-identical; no gradients to compare: {refused}")
    return None
