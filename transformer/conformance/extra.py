"""Properties beyond torch's documented semantics: extensions, memory, and errors.

* Extensions are what this package's kernels promise on top of torch SDPA: zeros (and zero
  gradients) for a query row with no key it may attend to, a mask together with
  ``is_causal``, a 1-D mask, batch dims of key/value that broadcast against the query's.
  A kernel that refuses one (raises anything) is UNSUPPORTED there, never FAIL.
* Memory is FlashAttention's promise: no op creates a tensor of ``L * S`` elements, in the
  forward or the backward (seen op by op, :mod:`~transformer.conformance.memory`); on
  the CPU the peak memory torch's allocator holds meanwhile stays below what the score
  matrices of all ``(batch, head)`` pairs would take (many smaller pieces kept for the
  backward add up to it too), and has no part that grows with ``L * S`` (pieces that add
  up to a fixed fraction of the matrix would); on CUDA the peak extra memory grows
  linearly with the length.
* Errors: bad input a kernel should refuse (mismatched head dims, a mask of the wrong
  shape). Informational: a kernel that answers anyway is reported SILENT.

Notation: B batch, H heads, L query length, S key length, E head dim, Ev value head dim.
"""

from __future__ import annotations

import math

import torch

from transformer.bench_memory import cpu_peak_bytes
from transformer.conformance.case import (
    Case,
    Failure,
    Kernel,
    Settings,
    build_inputs,
    call_kernel,
    kernel_kwargs,
)
from transformer.conformance.checks import check_equivalence, kernel_gradients, upstream_for
from transformer.conformance.core import bhle, per_dtype
from transformer.conformance.memory import LIMITS, AllocationLog, track_allocations
from transformer.conformance.reference import MaskSpec
from transformer.conformance.registry import conformance_property

_OURS = "transformer-spec's kernels (beyond torch's documentation)"

# ------------------------------------------------------------------------ extensions


def _empty_row_cases(settings: Settings) -> list[Case]:
    B, H, L, S = 2, 2, 10, 13
    cases = [
        bhle(B, H, L, S, 16, mask="bool", mask_shape=(B, H, L, S), empty_rows=True),
        bhle(B, H, L, S, 16, mask="float-grad", mask_shape=(L, S), empty_rows=True),
        bhle(B, H, L, 0, 16),
    ]
    return per_dtype(settings, cases)


@conformance_property(
    "empty-rows-give-zeros",
    section="extensions",
    rank=100,
    source=f"{_OURS}; torch >= 2.5's math backend",
    kind="masking",
    cases=_empty_row_cases,
)
def empty_rows_give_zeros(kernel: Kernel, case: Case, device: str) -> str | None:
    """A query row with no key it may attend to (an all-False bool row, an all ``-inf`` float row, or S = 0) gives a zero output row and zero gradients, never NaN; other rows are unaffected."""
    return check_equivalence(kernel, case, device, extension=True)


def _lower_right_cases(settings: Settings) -> list[Case]:
    return per_dtype(
        settings,
        [bhle(2, 2, L, S, 16, mask=MaskSpec("lower_right", L, S)) for L, S in ((5, 3), (70, 37))],
    )


@conformance_property(
    "lower-right-empty-rows",
    section="extensions",
    rank=101,
    source=f"{_OURS}; torch warns of NaN here",
    kind="masking",
    cases=_lower_right_cases,
)
def lower_right_empty_rows(kernel: Kernel, case: Case, device: str) -> str | None:
    """``causal_lower_right(L, S)`` with L > S leaves the first ``L - S`` rows without a key: they give zeros and zero gradients, the other rows the bottom-right causal answer."""
    return check_equivalence(kernel, case, device, extension=True)


def _mask_causal_cases(settings: Settings) -> list[Case]:
    B, H, L, S = 2, 2, 17, 23
    cases = [
        bhle(B, H, L, S, 16, mask="bool", mask_shape=(B, 1, 1, S), is_causal=True),
        bhle(B, H, L, S, 16, mask="float-grad", mask_shape=(L, S), is_causal=True),
    ]
    return per_dtype(settings, cases)


@conformance_property(
    "mask-with-causal",
    section="extensions",
    rank=102,
    source=f"{_OURS} (torch's math backend refuses the pair)",
    kind="masking",
    cases=_mask_causal_cases,
)
def mask_with_causal(kernel: Kernel, case: Case, device: str) -> str | None:
    """An ``attn_mask`` together with ``is_causal=True`` applies both: a key must be allowed by the mask and lie at or before the query."""
    return check_equivalence(kernel, case, device, extension=True)


def _one_dim_cases(settings: Settings) -> list[Case]:
    return per_dtype(
        settings,
        [bhle(2, 2, 9, 14, 16, mask=m, mask_shape=(14,)) for m in ("bool", "float")],
    )


@conformance_property(
    "one-dim-mask",
    section="extensions",
    rank=103,
    source=f"{_OURS} (broadcasting, as torch.broadcast_shapes)",
    kind="masking",
    cases=_one_dim_cases,
)
def one_dim_mask(kernel: Kernel, case: Case, device: str) -> str | None:
    """A 1-D ``attn_mask`` of shape ``(S,)`` broadcasts over every query row, batch and head."""
    return check_equivalence(kernel, case, device, extension=True)


def _broadcast_cases(settings: Settings) -> list[Case]:
    return per_dtype(
        settings,
        [
            Case(q=(2, 1, 7, 12), k=(1, 3, 11, 12), v=(1, 3, 11, 5)),
            Case(q=(4, 7, 12), k=(11, 12), v=(11, 5)),
        ],
    )


@conformance_property(
    "batch-broadcast",
    section="extensions",
    rank=104,
    source=f"{_OURS} (broadcasting, as torch.matmul)",
    kind="shape",
    cases=_broadcast_cases,
)
def batch_broadcast(kernel: Kernel, case: Case, device: str) -> str | None:
    """Batch dims of query, key and value broadcast against each other (as ``torch.matmul``'s do), each slice being equation 1 on that slice."""
    return check_equivalence(kernel, case, device, extension=True)


# ---------------------------------------------------------------------------- memory


def _memory_cases(settings: Settings) -> list[Case]:
    n = settings.memory_length
    dtype = settings.dtypes[0]
    cases = [
        bhle(1, 2, n, n, 16),
        bhle(1, 2, n, n, 16, is_causal=True),
        bhle(1, 2, n, n, 16, mask="bool", mask_shape=(1, 1, 1, n)),
        bhle(1, 4, n, n, 16, Hk=2, enable_gqa=True),
    ]
    return [c.replace(dtype=dtype) for c in cases]


#: The memory property fits ``peak = a + b n + c n^2`` through L = S = n / 4, n / 2 and
#: n, and again through n / 8, n / 4, n / 2, and fails a quadratic part ``c n^2`` of at
#: least this fraction of the score matrices at both scales. A kernel in O(L + S)
#: memory has none, whatever its fixed-size buffers (they cancel, as do the linear
#: terms); one that holds a fixed fraction of the score matrix in blocks shows that
#: fraction at every scale. Buffers whose size a kernel picks by length are not a
#: polynomial: one that grows within the upper half of a triple reads as 8/3 of its
#: growth there, but only in that triple (torch's CPU flash kernel grows its query
#: blocks at L = 192 and 768, which reads as 33 % and 37 % of the score matrices in the
#: triples ending at 256 and 768); a kernel whose own buffers grow in the lower triple
#: can hide a leak there, which a longer ``memory_length`` sees past.
QUADRATIC_LIMIT = 1 / 4


def _shortened(case: Case, factor: int) -> Case:
    """A memory case (L = S, a mask of shape ``(..., 1, S)`` if any) at ``L / factor``."""
    n = case.L // factor
    mask_shape = None if case.mask_shape is None else (*case.mask_shape[:-1], n)
    return case.replace(
        q=(*case.q[:-2], n, case.q[-1]),
        k=(*case.k[:-2], n, case.k[-1]),
        v=(*case.v[:-2], n, case.v[-1]),
        mask_shape=mask_shape,
    )


def _tracked_run(kernel: Kernel, case: Case, device: str, log: AllocationLog) -> int | None:
    """Forward and backward of ``case`` on one torch thread, every created tensor logged;
    the CPU allocator's peak bytes meanwhile (``None`` off the CPU)."""
    inputs = build_inputs(case, device)

    def forward_backward() -> None:
        with track_allocations(log, "forward"):
            out = call_kernel(kernel, case, inputs, check_inputs=False)
        if out.requires_grad:
            upstream = upstream_for(out, case.seed)
            with track_allocations(log, "backward"):
                kernel_gradients(out, inputs, upstream)

    # One torch thread, so a kernel that splits work over threads by torch's thread count
    # (as the chunked kernel does) runs it where the tracker sees it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak = cpu_peak_bytes(forward_backward) if device == "cpu" else None
        if peak is None:
            forward_backward()
    finally:
        torch.set_num_threads(threads)
    return peak


@conformance_property(
    "no-score-matrix",
    section="memory",
    rank=90,
    source="FlashAttention (Dao et al. 2022): O(L + S) extra memory",
    kind="property",
    cases=_memory_cases,
)
def no_score_matrix(kernel: Kernel, case: Case, device: str) -> str | None:
    """No op dispatched in the forward or the backward creates a tensor of ``L * S`` elements or more, and on the CPU torch's allocator never holds as much as the score matrices of all ``(batch, head)`` pairs meanwhile, and its peak, fitted as ``a + b n + c n^2`` through L = S = n / 4, n / 2, n, has a quadratic part ``c n^2`` under a quarter of those matrices (at n or, fitted through n / 8, n / 4, n / 2, at n / 2): the score matrix is never held, whole or a quarter of it or more in blocks."""
    shorter: list[int] = []
    if device == "cpu":
        # Shortest first, and one call before any is measured: what a kernel allocates
        # once (a JIT's or an interpreter's first-call buffers) would otherwise read as
        # growth. The run at the case's own length, last, gives the fit its top point.
        _tracked_run(kernel, _shortened(case, 8), device, AllocationLog())
        shorter = [
            _tracked_run(kernel, _shortened(case, f), device, AllocationLog()) or 0
            for f in (8, 4, 2)
        ]
    log = AllocationLog()
    peak = _tracked_run(kernel, case, device, log)
    limit = case.L * case.S
    big = log.at_least(limit)
    if big:
        a = big[0]
        raise Failure(
            f"in the {a.phase}, {a.op} created a tensor of shape {a.shape} ({a.elements:,} "
            f"elements >= L*S = {limit:,}); {len(big)} such tensor(s) in all"
            f"\n    case: {case.describe()}"
        )
    largest = log.largest()
    seen = (
        f"largest tensor created: {largest.op} {largest.shape}" if largest else "no tensor created"
    )
    if peak is not None:
        # The score matrices of every (batch, head) pair of the query, in the case's dtype.
        heads = math.prod(case.q[:-2])
        matrices = heads * limit * torch.empty((), dtype=case.dtype).element_size()
        if peak >= matrices:
            raise Failure(
                f"torch's CPU allocator held {peak / 2**20:.1f} MiB at the peak of the forward "
                f"and backward, at least the {matrices / 2**20:.1f} MiB of the {heads} "
                f"(batch, head) score matrices of L*S elements, although no single tensor "
                f"was that large ({seen})\n    case: {case.describe()}"
            )
        eighth, quarter, half = shorter
        full = peak
        # A second difference over m/4, m/2, m cancels a and b: it is 3/8 c m^2, and
        # the score matrices at m/2 are a quarter of those at m.
        top = (full - 3 * half + 2 * quarter) * 8 / 3 / matrices
        low = (half - 3 * quarter + 2 * eighth) * 8 / 3 / (matrices / 4)
        n = case.L
        peaks = (
            f"{eighth / 2**20:.2f}, {quarter / 2**20:.2f}, {half / 2**20:.2f}, "
            f"{full / 2**20:.2f} MiB at L = S = {n // 8}, {n // 4}, {n // 2}, {n}"
        )
        fit = f"a part growing with L * S of {low:.0%} and {top:.0%} of the score matrices"
        if min(top, low) >= QUADRATIC_LIMIT:
            raise Failure(
                f"torch's CPU allocator's peaks ({peaks}) have {fit} at L = S = {n // 2} and "
                f"{n} (at most {QUADRATIC_LIMIT:.0%} at either): pieces of the score "
                f"matrix are held ({seen})\n    case: {case.describe()}"
            )
        seen += (
            f"; peak {peak / 2**20:.1f} MiB < {matrices / 2**20:.1f} MiB of score matrices; "
            f"peaks {peaks}: {fit} at L = S = {n // 2} and {n}"
        )
    return f"{seen}; cannot see: {LIMITS}"


def _cuda_memory_cases(settings: Settings) -> list[Case]:
    if settings.device != "cuda":
        return []
    return [
        bhle(1, 4, 2048, 2048, 64, dtype=settings.dtypes[0], is_causal=c) for c in (False, True)
    ]


def _peak_extra(kernel: Kernel, case: Case, device: str) -> int:
    inputs = build_inputs(case, device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = call_kernel(kernel, case, inputs, check_inputs=False)
    kernel_gradients(out, inputs, upstream_for(out, case.seed))
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


@conformance_property(
    "cuda-peak-memory-linear",
    section="memory",
    rank=91,
    source="FlashAttention (Dao et al. 2022): O(L + S) extra memory",
    kind="property",
    cases=_cuda_memory_cases,
)
def cuda_peak_memory_linear(kernel: Kernel, case: Case, device: str) -> str | None:
    """On CUDA the peak extra memory of forward plus backward grows linearly with the length: 4x the length costs at most 5x the memory (a score matrix would cost 16x)."""
    small = _peak_extra(kernel, case, device)
    n = 4 * case.L
    big_case = case.replace(
        q=(*case.q[:-2], n, case.q[-1]),
        k=(*case.k[:-2], n, case.k[-1]),
        v=(*case.v[:-2], n, case.v[-1]),
    )
    big = _peak_extra(kernel, big_case, device)
    ratio = big / max(small, 1)
    if ratio > 5.0:
        raise Failure(
            f"peak extra memory grows {ratio:.1f}x for 4x the length ({small:,} -> {big:,} bytes)\n    case: {case.describe()}"
        )
    return f"peak extra memory {small:,} -> {big:,} bytes for 4x the length ({ratio:.1f}x)"


# ---------------------------------------------------------------------------- errors


def _error_cases(settings: Settings) -> list[Case]:
    dtype = settings.dtypes[0]
    cases = [
        Case(q=(1, 2, 5, 8), k=(1, 2, 7, 6), v=(1, 2, 7, 8), grads=False),
        Case(q=(1, 2, 5, 8), k=(1, 2, 7, 8), v=(1, 2, 6, 8), grads=False),
        bhle(1, 2, 5, 7, 8, mask="bool", mask_shape=(6, 7), grads=False),
        bhle(1, 2, 5, 7, 8, mask="int", mask_shape=(5, 7), grads=False),
        bhle(1, 2, 5, 7, 8, dropout_p=1.5, grads=False),
        bhle(1, 5, 5, 7, 8, Hk=2, enable_gqa=True, grads=False),
    ]
    return [c.replace(dtype=dtype) for c in cases]


@conformance_property(
    "refuses-bad-input",
    section="errors",
    rank=200,
    source="torch.nn.functional.scaled_dot_product_attention (raises on these)",
    kind="error",
    cases=_error_cases,
)
def refuses_bad_input(kernel: Kernel, case: Case, device: str) -> str | None:
    """Bad input (head dims or lengths that do not match, a mask of the wrong shape or dtype, ``dropout_p`` outside [0, 1), GQA heads that do not divide) raises an error instead of returning an answer."""
    inputs = build_inputs(case, device)
    try:
        out = kernel(inputs.query, inputs.key, inputs.value, **kernel_kwargs(case, inputs))
    except Exception as err:  # any refusal is the right answer here
        return f"raises {type(err).__name__}"
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    raise Failure(f"returned an answer of shape {shape} for bad input\n    case: {case.describe()}")
