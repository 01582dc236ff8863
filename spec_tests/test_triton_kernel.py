"""Triton-specific guarantees of the ``"triton"`` FlashAttention-2 kernel (paper section 3.2.1).

The attention conformance suite (``test_attention.py``) already holds the kernel to
equation 1 at every mask, shape and dtype it checks. This module pins what only a
tiled kernel can get wrong: ragged tile edges and padded head dims, causal block
skipping, the mask gradient, dropout bits regenerated in the backward pass,
non-contiguous strides, fp16/bf16 accuracy (FlashAttention's rule: at most 2x the
error of the reference math run in the same dtype), and when the kernel is offered
at all.

It runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (``tox -e triton``), where
the kernels use 16 x 16 tiles, so lengths such as 15, 16, 17 and 33 cross tile edges.
Full-size checks live in :class:`TestFullSizeOnCuda` and run only with a GPU.

Notation: B batch, H heads (Hq query, Hk key/value), L target length, S source length,
E query/key head dim, Ev value head dim.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.nn.attention.bias import CausalBias, causal_lower_right, causal_upper_left

import transformer
from transformer.kernels import triton_flash
from transformer.testing import assert_close, assert_error_within_reference

spec = functools.partial(pytest.mark.spec, component="triton_kernel")

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_HAS_CUDA = torch.cuda.is_available()

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        not _HAS_TRITON or not (_HAS_CUDA or _INTERPRETING),
        reason="the triton kernel needs triton installed and a CUDA device, or the CPU "
        "with TRITON_INTERPRET=1 (run `tox -e triton`)",
    ),
]

# Under the interpreter the kernels run on the CPU; otherwise on the GPU.
DEVICE = torch.device("cuda" if _HAS_CUDA and not _INTERPRETING else "cpu")
NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------
# Float64 reference and helpers (equation 1 written plainly, independent of the package).
# --------------------------------------------------------------------------------------


def paper_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """``softmax(Q K^T * scale + mask) V`` in float64, rows with no allowed key giving zeros.

    ``keep`` (bool, broadcast to ``(..., L, S)``) replays dropout on the weights:
    kept weights are scaled by ``1 / (1 - dropout_p)``, the rest are zero (torch's order).
    """
    q, k, v = q.double(), k.double(), v.double()
    L, S = q.size(-2), k.size(-2)
    factor = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * factor  # (..., L, S)
    allowed = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if is_causal:
        allowed = allowed.tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask.double()
            allowed = allowed & (attn_mask != NEG_INF)
    has_key = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~allowed, NEG_INF).masked_fill(~has_key, 0.0)
    weights = torch.softmax(scores, dim=-1) * has_key
    if keep is not None:
        weights = weights * keep / (1.0 - dropout_p)
    return weights @ v  # (..., L, Ev)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Seeded standard normal tensor on :data:`DEVICE`, drawn on the CPU in float64."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)


def bool_mask(*shape: int, seed: int) -> Tensor:
    """Random SDPA bool mask (True = may attend), at least one allowed key per row."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(*shape, generator=gen) < 0.5
    keep = torch.randint(shape[-1], (*shape[:-1], 1), generator=gen)
    return mask.scatter(-1, keep, True).to(DEVICE)


def forward_backward(
    fn: Callable[..., Tensor], *tensors: Tensor, upstream_dtype: torch.dtype | None = None
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Output of ``fn(*tensors)`` and the gradients of every tensor for a seeded upstream gradient.

    The upstream gradient is rounded to ``upstream_dtype`` (default: the output's) so a
    float64 reference sees exactly what a low-precision kernel saw.
    """
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in tensors)
    out = fn(*leaves)
    upstream = randn(*out.shape, seed=777, dtype=upstream_dtype or out.dtype).to(out.dtype)
    return out.detach(), torch.autograd.grad(out, leaves, upstream)


def triton_fn(**kwargs: object) -> Callable[..., Tensor]:
    """``(q, k, v[, mask]) -> out`` through the package front door with ``kernel="triton"``."""

    def fn(q: Tensor, k: Tensor, v: Tensor, *mask: Tensor) -> Tensor:
        # A mask given positionally is a leaf whose gradient the caller wants.
        extra = {"attn_mask": mask[0]} if mask else {}
        return transformer.scaled_dot_product_attention(q, k, v, kernel="triton", **kwargs, **extra)  # type: ignore[arg-type]

    return fn


def assert_matches_float64(
    ours: tuple[Tensor, tuple[Tensor, ...]],
    exact: tuple[Tensor, tuple[Tensor, ...]],
    names: str,
) -> None:
    """Output and every gradient within the dtype's tolerances of the float64 result."""
    assert_close(ours[0], exact[0], msg="output differs")
    for name, g, g_exact in zip(names, ours[1], exact[1], strict=True):
        assert_close(g, g_exact, msg=f"grad of {name} differs")


# --------------------------------------------------------------------------------------
# Availability and the lazy import.
# --------------------------------------------------------------------------------------


@spec(section="extra", kind="error")
def test_kernel_is_not_offered_when_triton_is_not_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without triton installed, ``available_kernels`` omits "triton" on every device and naming it raises ValueError."""
    real_find_spec = importlib.util.find_spec

    def no_triton(name: str, package: str | None = None) -> object:
        return None if name == "triton" else real_find_spec(name, package)

    assert "triton" in transformer.available_kernels(DEVICE)  # the patch below has power
    monkeypatch.setattr(triton_flash.importlib.util, "find_spec", no_triton)
    triton_flash._triton_installed.cache_clear()  # the answer is kept once per process
    try:
        assert "triton" not in transformer.available_kernels("cpu")
        assert "triton" not in transformer.available_kernels("cuda")
        q = torch.zeros(2, 5, 8, device=DEVICE)
        with pytest.raises(ValueError, match=r"kernel 'triton' is not available on device"):
            transformer.scaled_dot_product_attention(q, q, q, kernel="triton")
    finally:
        monkeypatch.undo()
        triton_flash._triton_installed.cache_clear()


@spec(section="extra", kind="error")
def test_kernel_is_offered_on_cpu_only_under_the_interpreter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the CPU "triton" is listed only with ``TRITON_INTERPRET=1``; on CUDA devices it is listed whenever triton is installed."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" in transformer.available_kernels("cpu")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "triton" not in transformer.available_kernels("cpu")
    assert "triton" in transformer.available_kernels("cuda")


@spec(section="extra", kind="equivalence")
def test_importing_transformer_does_not_import_triton() -> None:
    """``import transformer`` registers the kernel without importing triton (triton is imported on the first call)."""
    code = (
        "import sys, transformer; "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "assert 'triton' in transformer.available_kernels('cuda')"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------
# Tiles: ragged edges, padded head dims, strides.
# --------------------------------------------------------------------------------------


@spec(section="3.2.1", kind="equivalence")
@pytest.mark.parametrize(
    ("L", "S", "E", "Ev"),
    [(1, 33, 1, 3), (15, 16, 17, 100), (17, 15, 128, 59), (33, 1, 59, 128), (16, 47, 12, 16)],
    ids=["L1-S33-E1", "L15-S16-E17-Ev100", "L17-S15-E128", "L33-S1-E59-Ev128", "L16-S47-E12"],
)
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_ragged_tiles_and_padded_head_dims_match_float64_reference(
    L: int, S: int, E: int, Ev: int, causal: bool
) -> None:
    """Lengths that end mid-tile and head dims padded to a power of two (1, 12, 17, 59, 100) give equation 1 exactly in fp32, forward and gradients (§3.2.1)."""
    q, k, v = randn(2, 2, L, E, seed=1), randn(2, 2, S, E, seed=2), randn(2, 2, S, Ev, seed=3)
    ours = forward_backward(triton_fn(is_causal=causal), q, k, v)
    paper = functools.partial(paper_attention, is_causal=causal)
    exact = forward_backward(paper, q.double(), k.double(), v.double(), upstream_dtype=q.dtype)
    assert_matches_float64(ours, exact, "qkv")


@spec(section="3.2.1", kind="equivalence")
def test_non_contiguous_inputs_are_read_through_their_strides() -> None:
    """Query/key/value in (B, L, H, E) layout viewed as (B, H, L, E), and a value sliced from a wider tensor, give the same result as contiguous copies."""
    q = randn(2, 21, 3, 24, seed=4).transpose(1, 2)  # (B, H, L, E), strided
    k = randn(2, 37, 3, 24, seed=5).transpose(1, 2)  # (B, H, S, E)
    v = randn(2, 3, 37, 40, seed=6)[..., 3:35]  # (B, H, S, Ev=32), row stride 40
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    ours = forward_backward(triton_fn(), q, k, v)
    contiguous = forward_backward(triton_fn(), q.contiguous(), k.contiguous(), v.contiguous())
    assert_matches_float64(ours, contiguous, "qkv")
    exact = forward_backward(
        paper_attention, q.double(), k.double(), v.double(), upstream_dtype=q.dtype
    )
    assert_matches_float64(ours, exact, "qkv")


@spec(section="extra", kind="masking")
def test_mask_rows_past_element_two_to_the_31_are_read_where_they_lie() -> None:
    """A bool mask whose row 16 starts at element 2^31 (as the last row of an (L, S) mask does from L = S = 46342 on) is read there, not at a wrapped 32-bit offset: output and gradients match float64 math. The mask is a strided view into 2^31 + 16 bools, allocated but never touched except at the 17 rows used."""
    L, S, E = 17, 16, 16
    row_stride = 2**27  # row 16 starts at 16 * 2^27 = 2^31
    storage = torch.empty(row_stride * (L - 1) + S, dtype=torch.bool, device=DEVICE)
    mask = storage.as_strided((L, S), (row_stride, 1))
    mask.copy_(bool_mask(L, S, seed=30))
    mask[16] = False
    mask[16, 5] = True  # the last row may see key 5 only: its output is v[..., 5, :]
    q, k, v = (randn(1, 2, n, E, seed=31 + i) for i, n in enumerate((L, S, S)))
    ours = forward_backward(triton_fn(attn_mask=mask), q, k, v)
    exact = forward_backward(
        functools.partial(paper_attention, attn_mask=mask),
        q.double(), k.double(), v.double(), upstream_dtype=q.dtype,
    )  # fmt: skip
    assert_matches_float64(ours, exact, "qkv")
    assert_close(ours[0][:, :, 16], v[:, :, 5], msg="the last row sees key 5 only")


@spec(section="3.2.3", kind="masking")
# The interpreter warns while reducing the poisoned rows past the cut; those are not checked.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("variant", ["is_causal", "lower_right"])
def test_causal_skips_key_blocks_right_of_the_diagonal(variant: str) -> None:
    """Under ``is_causal=True`` and torch's ``causal_lower_right(L, S)`` (diagonal ``S - L``) a query block never reads keys/values right of its diagonal: NaN planted there does not reach earlier rows' outputs or query gradients (§3.2.3, FlashAttention-2 block skipping)."""
    # The cut and the offset are multiples of every tile size (16 interpreted, up to 128
    # on a GPU), so rows before the cut lie in blocks whose last key block ends at
    # cut + offset exactly.
    cut = 32 if _INTERPRETING else 256
    offset = 0 if variant == "is_causal" else cut // 2
    L = cut + cut // 2
    S = L + offset
    q, k, v = randn(1, 2, L, 32, seed=7), randn(1, 2, S, 32, seed=8), randn(1, 2, S, 16, seed=9)
    k_poisoned, v_poisoned = k.clone(), v.clone()
    k_poisoned[..., cut + offset :, :] = float("nan")
    v_poisoned[..., cut + offset :, :] = float("nan")
    if variant == "is_causal":
        fn = triton_fn(is_causal=True)
    else:
        fn = functools.partial(triton_flash.triton_attention, attn_mask=causal_lower_right(L, S))
    out, (gq, _, _) = forward_backward(fn, q, k_poisoned, v_poisoned)
    clean_out, (clean_gq, _, _) = forward_backward(fn, q, k, v)
    assert torch.isfinite(out[..., :cut, :]).all() and torch.isfinite(gq[..., :cut, :]).all()
    assert_close(out[..., :cut, :], clean_out[..., :cut, :], msg="output before the cut")
    assert_close(gq[..., :cut, :], clean_gq[..., :cut, :], msg="grad q before the cut")


@spec(section="torch", kind="equivalence")
def test_grouped_query_attention_reads_shared_heads_across_tiles() -> None:
    """With ``enable_gqa`` (8 query heads on 2 key/value heads) over several tiles, output and gradients equal the float64 math with repeated heads; dK/dV sum over each group."""
    q, k, v = (
        randn(2, 8, 35, 20, seed=10),
        randn(2, 2, 41, 20, seed=11),
        randn(2, 2, 41, 9, seed=12),
    )
    mask = bool_mask(2, 1, 35, 41, seed=13)
    ours = forward_backward(triton_fn(attn_mask=mask, enable_gqa=True, is_causal=True), q, k, v)

    def repeated(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k, v = k.repeat_interleave(4, dim=-3), v.repeat_interleave(4, dim=-3)
        return paper_attention(q, k, v, mask, is_causal=True)

    exact = forward_backward(repeated, q.double(), k.double(), v.double(), upstream_dtype=q.dtype)
    assert_matches_float64(ours, exact, "qkv")


# --------------------------------------------------------------------------------------
# The float mask's gradient and rows with no key.
# --------------------------------------------------------------------------------------


@spec(section="3.2.3", kind="masking")
@pytest.mark.parametrize(
    "mask_shape", [(2, 3, 19, 23), (3, 1, 23), (23,)], ids=["B-H-L-S", "H-1-S", "S"]
)
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_float_mask_gradient_matches_float64_reference(
    mask_shape: tuple[int, ...], causal: bool
) -> None:
    """A float ``attn_mask`` that requires grad gets the score gradient dS, summed over its broadcast dims, like the float64 math (fully -inf columns get zero)."""
    q, k, v = (
        randn(2, 3, 19, 16, seed=14),
        randn(2, 3, 23, 16, seed=15),
        randn(2, 3, 23, 8, seed=16),
    )
    mask = randn(*mask_shape, seed=17)
    mask[..., 4] = NEG_INF
    ours = forward_backward(triton_fn(is_causal=causal), q, k, v, mask)
    paper = functools.partial(paper_attention, is_causal=causal)
    f64 = (t.double() for t in (q, k, v, mask))
    exact = forward_backward(paper, *f64, upstream_dtype=q.dtype)
    assert_matches_float64(ours, exact, "qkvm")
    assert torch.equal(ours[1][3][..., 4], torch.zeros_like(ours[1][3][..., 4]))


@spec(section="3.2.3", kind="masking")
@pytest.mark.parametrize(
    ("mask_shape", "gqa", "dropout_p"),
    [((19, 1), False, 0.0), ((2, 1, 1, 19, 23), False, 0.0), ((1, 4, 1, 23), True, 0.0),
     ((3, 4, 19, 23), False, 0.25)],
    ids=["L-1", "A-1-1-L-S", "gqa-1-H-1-S", "dropout-B-H-L-S"],
)  # fmt: skip
def test_float_mask_gradient_sums_its_broadcast_dims_like_autograd(
    mask_shape: tuple[int, ...], gqa: bool, dropout_p: float
) -> None:
    """A float mask broadcast over key columns, over some outer batch dims, or over rows and batch under GQA, and a full mask under dropout, gets dS summed over exactly its broadcast dims, in its own shape, as autograd gives for the float64 math (torch's broadcasting gradient)."""
    # Outer batch (2, 3) and 4 query heads (on 2 key/value heads with GQA): every mask
    # broadcasts over the outer 2 at least.
    q = randn(2, 3, 4, 19, 16, seed=50)
    k, v = (
        randn(2, 3, 2 if gqa else 4, 23, 16, seed=51),
        randn(2, 3, 2 if gqa else 4, 23, 8, seed=52),
    )
    mask = randn(*mask_shape, seed=53)
    torch.manual_seed(7)
    fn = functools.partial(triton_flash.triton_attention, dropout_p=dropout_p, enable_gqa=gqa)
    ours = forward_backward(fn, q, k, v, mask)
    keep = None
    if dropout_p:
        torch.manual_seed(7)
        seed = triton_flash._new_seed()
        keep = triton_flash.dropout_keep_mask(seed, 24, 19, 23, dropout_p, DEVICE)
        keep = keep.view(2, 3, 4, 19, 23)

    def paper(q: Tensor, k: Tensor, v: Tensor, m: Tensor) -> Tensor:
        if gqa:
            k, v = k.repeat_interleave(2, dim=-3), v.repeat_interleave(2, dim=-3)
        return paper_attention(q, k, v, m, keep=keep, dropout_p=dropout_p)

    exact = forward_backward(paper, *(t.double() for t in (q, k, v, mask)), upstream_dtype=q.dtype)
    assert ours[1][3].shape == mask.shape
    assert_matches_float64(ours, exact, "qkvm")


@spec(section="torch", kind="masking")
# torch warns when it builds causal_lower_right(L, S) with L > S (its own math gives NaN).
@pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs:UserWarning")
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@pytest.mark.parametrize(
    ("L", "S"), [(3, 5), (5, 3), (1, 7), (37, 70), (70, 37)], ids=lambda n: str(n)
)
def test_causal_bias_objects_match_torch(L: int, S: int, variant: str) -> None:
    """torch's ``causal_upper_left(L, S)`` and ``causal_lower_right(L, S)`` given as ``attn_mask`` give torch's SDPA output and q/k/v gradients for the same bias object (float64); lower-right rows with no key (``L > S``) are zeros with zero gradient, never NaN."""
    make = causal_upper_left if variant == "upper_left" else causal_lower_right
    q = randn(2, 3, L, 20, seed=60, dtype=torch.float64)
    k, v = (
        randn(2, 3, S, 20, seed=61, dtype=torch.float64),
        randn(2, 3, S, 12, seed=62, dtype=torch.float64),
    )
    ours = forward_backward(
        functools.partial(triton_flash.triton_attention, attn_mask=make(L, S)), q, k, v
    )
    theirs = forward_backward(
        functools.partial(torch.nn.functional.scaled_dot_product_attention, attn_mask=make(L, S)),
        q, k, v,
    )  # fmt: skip
    for t in (ours[0], *ours[1]):
        assert torch.isfinite(t).all()
    assert_matches_float64(ours, theirs, "qkv")
    empty = L - S if variant == "lower_right" and L > S else 0
    for t in (ours[0], ours[1][0]):  # output and grad of q of the rows that see no key
        assert torch.equal(t[..., :empty, :], torch.zeros_like(t[..., :empty, :]))


@spec(section="torch", kind="error")
def test_causal_bias_with_is_causal_or_other_lengths_raises_value_error() -> None:
    """A ``CausalBias`` together with ``is_causal=True`` raises ValueError (torch's SDPA refuses it too), and so does one made for other lengths than the query's and key's."""
    q, k = torch.zeros(1, 4, 16, device=DEVICE), torch.zeros(1, 6, 16, device=DEVICE)
    with pytest.raises(ValueError, match="CausalBias; is_causal must be False"):
        triton_flash.triton_attention(q, k, k, causal_upper_left(4, 6), is_causal=True)
    with pytest.raises(ValueError, match=r"CausalBias for \(L, S\) = \(4, 5\).*\(4, 6\)"):
        triton_flash.triton_attention(q, k, k, causal_lower_right(4, 5))


@spec(section="extra", kind="masking")
def test_rows_without_keys_in_a_multi_tile_problem_are_zero_with_zero_gradient() -> None:
    """Rows with no allowed key (an all-False mask row, and rows L > S under causal with padding) give zeros and zero gradients, never NaN, while every other row is exact."""
    L, S = 40, 37
    q, k, v = randn(2, 2, L, 24, seed=18), randn(2, 2, S, 24, seed=19), randn(2, 2, S, 12, seed=20)
    mask = bool_mask(2, 1, L, S, seed=21)
    mask[0, :, 5] = False
    mask[1, :, 33:] = False
    ours = forward_backward(triton_fn(attn_mask=mask, is_causal=True), q, k, v)
    for t in (ours[0], *ours[1]):
        assert torch.isfinite(t).all()
    for b, rows in ((0, slice(5, 6)), (1, slice(33, None))):
        assert torch.equal(ours[0][b, :, rows], torch.zeros_like(ours[0][b, :, rows]))
        assert torch.equal(ours[1][0][b, :, rows], torch.zeros_like(ours[1][0][b, :, rows]))
    paper = functools.partial(paper_attention, attn_mask=mask, is_causal=True)
    exact = forward_backward(paper, q.double(), k.double(), v.double(), upstream_dtype=q.dtype)
    assert_matches_float64(ours, exact, "qkv")


# --------------------------------------------------------------------------------------
# Memory: O(L + S) per (batch, head), forward and backward.
# --------------------------------------------------------------------------------------


@spec(section="extra", kind="property")
@pytest.mark.parametrize(
    "case", ["plain", "causal", "bool mask", "lower-right bias", "float key mask with grad"]
)
def test_forward_and_backward_create_no_tensor_of_l_times_s_elements(case: str) -> None:
    """No tensor created in the forward or the backward pass (dQ, dK and dV all wanted) holds ``L * S`` elements or more: P is recomputed per tile and dQ accumulated on chip, as in FlashAttention-2's backward (Dao 2023, algorithm 2), so extra memory is O(L + S) per head; a broadcast float mask's gradient is summed in the kernel, at the mask's own size."""
    from transformer.conformance.memory import AllocationLog, track_allocations

    L, S = 47, 70  # q, k, v and every per-row statistic stay well below L * S elements
    q, k, v = randn(1, 2, L, 16, seed=40), randn(1, 2, S, 16, seed=41), randn(1, 2, S, 8, seed=42)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    mask: Tensor | CausalBias | None = None
    if case == "bool mask":
        mask = bool_mask(L, S, seed=43)
    elif case == "lower-right bias":
        mask = causal_lower_right(L, S)
    elif case == "float key mask with grad":
        mask = randn(S, seed=45).requires_grad_()
        leaves.append(mask)
    upstream = randn(1, 2, L, 8, seed=44)
    log = AllocationLog()
    with track_allocations(log, "forward"):
        out = triton_flash.triton_attention(q, k, v, attn_mask=mask, is_causal=case == "causal")
    with track_allocations(log, "backward"):
        out.backward(upstream)
    # The log really saw the backward pass: dQ, dK and dV are created there.
    assert sum(a.phase == "backward" for a in log.allocations) >= 3, log.allocations
    assert not log.at_least(L * S), log.at_least(L * S)
    assert all(t.grad is not None for t in leaves)


# --------------------------------------------------------------------------------------
# Dropout: the backward pass regenerates the forward's bits.
# --------------------------------------------------------------------------------------


@spec(section="torch", kind="equivalence")
def test_dropout_forward_and_gradients_replay_the_same_keep_mask() -> None:
    """With dropout, output and gradients equal the float64 math applying the kernel's own keep-mask (read back from its generator), so the backward pass drops exactly what the forward dropped (torch's SDPA dropout on the weights)."""
    p = 0.3
    q, k, v = (
        randn(2, 2, 21, 16, seed=22),
        randn(2, 2, 35, 16, seed=23),
        randn(2, 2, 35, 8, seed=24),
    )
    torch.manual_seed(99)
    ours = forward_backward(triton_fn(dropout_p=p, is_causal=True), q, k, v)
    torch.manual_seed(99)
    seed = triton_flash._new_seed()
    keep = triton_flash.dropout_keep_mask(seed, 4, 21, 35, p, DEVICE).view(2, 2, 21, 35)
    assert 0.2 < 1 - keep.float().mean().item() < 0.4  # the replayed mask drops about p
    paper = functools.partial(paper_attention, is_causal=True, keep=keep, dropout_p=p)
    exact = forward_backward(paper, q.double(), k.double(), v.double(), upstream_dtype=q.dtype)
    assert_matches_float64(ours, exact, "qkv")


# --------------------------------------------------------------------------------------
# Low precision: FlashAttention's rule against the reference kernel in the same dtype.
# --------------------------------------------------------------------------------------


@spec(section="extra", kind="equivalence")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    ("E", "Ev", "causal"),
    [(16, 16, False), (59, 40, True), (128, 128, True)],
    ids=["E16", "E59-Ev40-causal", "E128-causal"],
)
def test_low_precision_error_within_twice_reference_kernel_error(
    dtype: torch.dtype, E: int, Ev: int, causal: bool
) -> None:
    """In fp16/bf16, with GQA and a bool mask, the error against float64 math is at most 2x that of the reference kernel in the same dtype, forward and gradients (FlashAttention's rule)."""
    q = randn(1, 4, 45, E, seed=25, dtype=dtype)
    k, v = randn(1, 2, 70, E, seed=26, dtype=dtype), randn(1, 2, 70, Ev, seed=27, dtype=dtype)
    mask = bool_mask(1, 4, 45, 70, seed=28)

    def run(kernel: str) -> Callable[..., Tensor]:
        return functools.partial(
            transformer.scaled_dot_product_attention,
            attn_mask=mask,
            is_causal=causal,
            enable_gqa=True,
            kernel=kernel,
        )

    ours = forward_backward(run("triton"), q, k, v)
    ref_low = forward_backward(run("reference"), q, k, v)

    def paper(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k, v = k.repeat_interleave(2, dim=-3), v.repeat_interleave(2, dim=-3)
        return paper_attention(q, k, v, mask, is_causal=causal)

    exact = forward_backward(paper, q.double(), k.double(), v.double(), upstream_dtype=dtype)
    assert ours[0].dtype == dtype
    assert_error_within_reference(ours[0], ref_low[0], exact[0], msg="output")
    for name, g, g_ref, g_exact in zip("qkv", ours[1], ref_low[1], exact[1], strict=True):
        assert g.dtype == dtype
        assert_error_within_reference(g, g_ref, g_exact, msg=f"grad of {name}")


# --------------------------------------------------------------------------------------
# Bad input the kernel itself rejects.
# --------------------------------------------------------------------------------------


@spec(section="extra", kind="error")
def test_head_dim_above_the_maximum_raises_value_error() -> None:
    """A head dim above ``MAX_HEAD_DIM`` (256) raises ValueError naming the head dim and pointing to other kernels."""
    big = triton_flash.MAX_HEAD_DIM + 1
    q = torch.zeros(1, 4, big, device=DEVICE)
    with pytest.raises(ValueError, match=rf"head dim {big} exceeds the maximum 256.*chunked"):
        transformer.scaled_dot_product_attention(q, q, q, kernel="triton")


@spec(section="extra", kind="error")
def test_fp8_inputs_raise_value_error_naming_the_dtype() -> None:
    """Float8 inputs (floating point, so past the front door) raise ValueError naming the dtype and the supported ones."""
    q = torch.zeros(1, 4, 16, device=DEVICE).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"dtype torch.float8_e4m3fn is not supported"):
        transformer.scaled_dot_product_attention(q, q, q, kernel="triton")


# --------------------------------------------------------------------------------------
# Full sizes on a GPU (autotuned tiles); skipped without CUDA.
# --------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(
    not _HAS_CUDA or _INTERPRETING, reason="needs a CUDA device (not the interpreter)"
)
class TestFullSizeOnCuda:
    """The autotuned kernels at training sizes: long sequences, head dims 64 and 128."""

    @spec(section="extra", kind="equivalence")
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    @pytest.mark.parametrize(
        ("L", "S", "E", "causal"),
        [(1024, 1024, 64, True), (2048, 2048, 128, False), (1000, 1537, 96, True)],
        ids=["L1024-E64-causal", "L2048-E128", "L1000-S1537-E96-causal"],
    )
    def test_low_precision_error_within_twice_reference_error_at_full_size(
        self, dtype: torch.dtype, L: int, S: int, E: int, causal: bool
    ) -> None:
        """At training sizes in fp16/bf16 the error against float64 math is at most 2x the reference kernel's in the same dtype, forward and gradients."""
        q, k, v = (
            randn(2, 8, L, E, seed=30, dtype=dtype),
            randn(2, 8, S, E, seed=31, dtype=dtype),
            randn(2, 8, S, E, seed=32, dtype=dtype),
        )
        fn = functools.partial(transformer.scaled_dot_product_attention, is_causal=causal)
        ours = forward_backward(functools.partial(fn, kernel="triton"), q, k, v)
        ref_low = forward_backward(functools.partial(fn, kernel="reference"), q, k, v)
        paper = functools.partial(paper_attention, is_causal=causal)
        exact = forward_backward(paper, q.double(), k.double(), v.double(), upstream_dtype=dtype)
        assert_error_within_reference(ours[0], ref_low[0], exact[0], msg="output")
        for name, g, g_ref, g_exact in zip("qkv", ours[1], ref_low[1], exact[1], strict=True):
            assert_error_within_reference(g, g_ref, g_exact, msg=f"grad of {name}")

    @spec(section="3.2.1", kind="equivalence")
    @pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
    def test_fp32_uses_full_precision_products_at_full_size(self, causal: bool) -> None:
        """In fp32 (ieee products, no TF32) the error against float64 math is at most 2x the reference kernel's fp32 error at L = S = 1536, E = 64."""
        q, k, v = (
            randn(1, 4, 1536, 64, seed=33),
            randn(1, 4, 1536, 64, seed=34),
            randn(1, 4, 1536, 64, seed=35),
        )
        fn = functools.partial(transformer.scaled_dot_product_attention, is_causal=causal)
        ours = forward_backward(functools.partial(fn, kernel="triton"), q, k, v)
        ref_low = forward_backward(functools.partial(fn, kernel="reference"), q, k, v)
        paper = functools.partial(paper_attention, is_causal=causal)
        exact = forward_backward(paper, q.double(), k.double(), v.double(), upstream_dtype=q.dtype)
        assert_error_within_reference(ours[0], ref_low[0], exact[0], msg="output")
        for name, g, g_ref, g_exact in zip("qkv", ours[1], ref_low[1], exact[1], strict=True):
            assert_error_within_reference(g, g_ref, g_exact, msg=f"grad of {name}")

    @spec(section="3.2.3", kind="masking")
    def test_gqa_with_padding_mask_within_twice_reference_error_at_full_size(self) -> None:
        """GQA (16 query heads on 4 key/value heads) with a (B, 1, 1, S) padding mask at S = 2048 in bf16 stays within 2x the reference kernel's error."""
        dtype = torch.bfloat16
        q = randn(2, 16, 777, 128, seed=36, dtype=dtype)
        k, v = (
            randn(2, 4, 2048, 128, seed=37, dtype=dtype),
            randn(2, 4, 2048, 128, seed=38, dtype=dtype),
        )
        lengths = torch.tensor([2048, 1001], device=DEVICE)
        padding = (torch.arange(2048, device=DEVICE) < lengths[:, None])[:, None, None, :]
        fn = functools.partial(
            transformer.scaled_dot_product_attention, attn_mask=padding, enable_gqa=True
        )
        ours = forward_backward(functools.partial(fn, kernel="triton"), q, k, v)
        ref_low = forward_backward(functools.partial(fn, kernel="reference"), q, k, v)

        def paper(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            k, v = k.repeat_interleave(4, dim=-3), v.repeat_interleave(4, dim=-3)
            return paper_attention(q, k, v, padding)

        exact = forward_backward(paper, q.double(), k.double(), v.double(), upstream_dtype=dtype)
        assert_error_within_reference(ours[0], ref_low[0], exact[0], msg="output")
        for name, g, g_ref, g_exact in zip("qkv", ours[1], ref_low[1], exact[1], strict=True):
            assert_error_within_reference(g, g_ref, g_exact, msg=f"grad of {name}")


# --------------------------------------------------------------------------------------
# Shapes.
# --------------------------------------------------------------------------------------


@spec(section="3.2.1", kind="shape")
@pytest.mark.parametrize(
    ("q_shape", "k_shape", "v_shape", "gqa", "expected"),
    [
        ((7, 16), (9, 16), (9, 24), False, (7, 24)),
        ((2, 7, 16), (1, 9, 16), (2, 9, 8), False, (2, 7, 8)),
        ((2, 3, 5, 16), (2, 3, 11, 16), (2, 3, 11, 16), False, (2, 3, 5, 16)),
        ((1, 6, 5, 32), (1, 2, 11, 32), (1, 2, 11, 16), True, (1, 6, 5, 16)),
    ],
    ids=["unbatched-Ev24", "broadcast-batch", "B2-H3", "gqa-6-over-2"],
)
def test_output_has_query_rows_and_value_features(
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    gqa: bool,
    expected: tuple[int, ...],
) -> None:
    """query (..., L, E), key (..., S, E), value (..., S, Ev) give (..., L, Ev) with batch dims broadcast and query heads kept under GQA, in the query's dtype (§3.2.1)."""
    q, k, v = randn(*q_shape, seed=1), randn(*k_shape, seed=2), randn(*v_shape, seed=3)
    out = transformer.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, kernel="triton")
    assert out.shape == expected
    assert out.dtype == q.dtype
    assert out.device == q.device
