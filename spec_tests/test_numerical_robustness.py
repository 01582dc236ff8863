"""Numerical robustness: large logits, long sequences, extreme masks, low precision.

Equation 1 (section 3.2.1) is a softmax, which is where fp16/bf16 and large scores
bite: ``exp`` overflows, a fully masked row divides 0 by 0, and a ``-1e9`` mask added to
a score is not what ``-inf`` is. The kernel tests run every attention kernel usable on
the CPU in fp32, fp16 and bf16 (the NaN-row test in fp32, bf16 and fp64); the module
tests run our modules beside torch's in low precision. They hold them to two bars:

* nothing non-finite comes out of finite inputs (forward and gradients);
* accuracy by the low-precision rule of ``transformer.testing``: the error against a
  float64 evaluation of the *same* (rounded) inputs is at most twice the error of the
  reference kernel run in the same dtype (:func:`assert_error_within_reference`).

The float64 reference is :func:`exact_attention`, equation 1 written plainly here (for
the modules, torch's own module run in float64).
Notation: B batch, H heads, L target length, S source length, E head dim.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

import transformer
from transformer import MultiheadAttention
from transformer.testing import assert_close, assert_error_within_reference, tolerances

spec = functools.partial(pytest.mark.spec, section="3.2.1")

KERNELS = [
    pytest.param(name, id=name, marks=[pytest.mark.triton] if name == "triton" else [])
    for name in transformer.available_kernels("cpu")
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
NEG_INF = float("-inf")


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def exact_attention(
    query: Tensor, key: Tensor, value: Tensor, allowed: Tensor | None = None
) -> Tensor:
    """``softmax(Q K^T / sqrt(E)) V`` in float64 over the ``allowed`` keys; empty rows give 0."""
    q, k, v = query.double(), key.double(), value.double()
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., L, S)
    if allowed is None:
        return torch.softmax(scores, dim=-1) @ v
    has_key = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~allowed, NEG_INF).masked_fill(~has_key, 0.0)
    return (torch.softmax(scores, dim=-1) * has_key) @ v  # (..., L, Ev)


def sdpa(kernel: str, *args: Tensor, **kwargs: object) -> Tensor:
    return transformer.scaled_dot_product_attention(*args, kernel=kernel, **kwargs)  # type: ignore[arg-type]


def assert_finite(t: Tensor, what: str) -> None:
    bad = (~torch.isfinite(t)).sum().item()
    assert bad == 0, f"{what}: {bad} non-finite elements of {t.numel()}"


def large_logit_inputs(
    B: int, H: int, L: int, S: int, E: int, logit: float, seed: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v whose scaled scores ``q . k / sqrt(E)`` reach about ``logit`` in magnitude.

    Rows of q and k are unit vectors scaled by ``sqrt(logit * sqrt(E))``, so a score is
    ``logit * cos(angle)``: the softmax is nearly one-hot, the regime where a kernel that
    forgets to subtract the row max overflows ``exp``.
    """
    radius = math.sqrt(logit * math.sqrt(E))
    q = F.normalize(randn(B, H, L, E, seed=seed), dim=-1) * radius
    k = F.normalize(randn(B, H, S, E, seed=seed + 1), dim=-1) * radius
    v = randn(B, H, S, E, seed=seed + 2)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# --------------------------------------------------------------------------------------
# Attention kernels.
# --------------------------------------------------------------------------------------


@spec(component="attention", kind="property")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_large_logits_stay_finite_and_match_float64_reference(
    kernel: str, dtype: torch.dtype
) -> None:
    """Scores of magnitude ~1e4 give finite outputs and gradients, the output and the value gradient as accurate against float64 as the reference kernel in the same dtype (§3.2.1: softmax with the row max subtracted). The query and key gradients are checked finite only: with the softmax saturated they come from ``dS = P * (dP - rowsum(dP * P))``, a difference of nearly equal terms (about 1e-4 here), which torch's SDPA, like the chunked kernel, gets to within about 1.5e-4 in fp32 while equation 1 written plainly gets it exactly."""
    q, k, v = large_logit_inputs(2, 2, 7, 37, 16, 1e4, seed=11, dtype=dtype)

    def grads(run: Callable[..., Tensor], cast: torch.dtype) -> tuple[Tensor, list[Tensor]]:
        # Fresh leaves per run (a same-dtype .to() would return q itself, sharing .grad).
        leaves = [t.to(cast).clone().requires_grad_(True) for t in (q, k, v)]
        out = run(*leaves)
        out.float().square().sum().backward()
        return out.detach(), [leaf.grad for leaf in leaves if leaf.grad is not None]

    exact, exact_grads = grads(exact_attention, torch.float64)
    ref_low, ref_grads = grads(functools.partial(sdpa, "reference"), dtype)
    out, out_grads = grads(functools.partial(sdpa, kernel), dtype)
    assert_finite(out, "output")
    assert_error_within_reference(out, ref_low, exact, msg=f"{kernel} {dtype}")
    assert len(out_grads) == 3
    for name, grad, ref_grad, exact_grad in zip(
        "qkv", out_grads, ref_grads, exact_grads, strict=True
    ):
        assert_finite(grad, f"grad of {name}")
        if name == "v":
            msg = f"{kernel} {dtype} d{name}"
            assert_error_within_reference(grad, ref_grad, exact_grad, msg=msg)


def long_sequence_length(dtype: torch.dtype) -> int:
    """S = 4096 in fp32 (past every block size); shorter in fp16/bf16 to stay fast."""
    return 4099 if dtype == torch.float32 else 1031


@spec(component="attention", kind="property")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_long_key_sequence_matches_float64_reference(kernel: str, dtype: torch.dtype) -> None:
    """Attending over ~4096 keys (1031 in fp16/bf16) stays finite and as accurate as the reference kernel in the same dtype, with no mask and with a bottom-right causal mask (``causal_lower_right``: the 9 queries are the last 9 positions, so each row sees S - 8 to S keys)."""
    S = long_sequence_length(dtype)
    L = 9
    q = randn(1, 2, L, 24, seed=3, dtype=dtype)
    k = randn(1, 2, S, 24, seed=4, dtype=dtype)
    v = randn(1, 2, S, 12, seed=5, dtype=dtype)
    for causal in (False, True):
        mask = causal_lower_right(L, S) if causal else None
        allowed = torch.ones(L, S, dtype=torch.bool).tril(S - L) if causal else None
        out = sdpa(kernel, q, k, v, attn_mask=mask)
        assert_finite(out, "output")
        assert_error_within_reference(
            out,
            sdpa("reference", q, k, v, attn_mask=mask),
            exact_attention(q, k, v, allowed),
            msg=f"{kernel} {dtype} causal={causal}",
        )


@spec(component="attention", kind="masking")
@pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs:UserWarning")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_fully_masked_rows_are_zero_with_zero_gradient_in_every_dtype(
    kernel: str, dtype: torch.dtype
) -> None:
    """Rows with no key to attend to (all-False bool mask rows 1 and 4, all -inf float mask rows, and under ``causal_lower_right`` with L > S the first L - S rows, which precede every key) give zeros and zero gradients in fp32, fp16 and bf16 (never NaN)."""
    L, S = 6, 4
    q, k, v = (randn(2, 3, n, 8, seed=i, dtype=dtype) for i, n in enumerate((L, S, S)))
    allowed = randn(L, S, seed=7) > 0
    allowed[:, 0] = True
    empty = torch.tensor([1, 4])
    allowed[empty] = False
    cases: dict[str, tuple[dict[str, object], Tensor]] = {
        "bool": ({"attn_mask": allowed}, empty),
        "float": (
            {"attn_mask": torch.zeros(L, S, dtype=dtype).masked_fill(~allowed, NEG_INF)},
            empty,
        ),
        # Query i sees keys j <= i - (L - S): rows 0 and 1 see none.
        "causal-lower-right": ({"attn_mask": causal_lower_right(L, S)}, torch.tensor([0, 1])),
    }
    for name, (kwargs, empty) in cases.items():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = sdpa(kernel, *leaves, **kwargs)
        assert_finite(out, f"{name} output")
        assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty])), name
        out.float().sum().backward()
        for leaf in leaves:
            assert leaf.grad is not None
            assert_finite(leaf.grad, f"{name} gradient")
        assert leaves[0].grad is not None
        assert torch.equal(leaves[0].grad[:, :, empty], torch.zeros_like(q[:, :, empty])), name


@spec(component="attention", kind="masking")
@pytest.mark.parametrize("fill", [-1e9, "finfo.min"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_very_negative_finite_mask_acts_like_minus_inf_without_nan(
    kernel: str, dtype: torch.dtype, fill: float | str
) -> None:
    """A float mask of -1e9 or finfo.min where a bool mask says False gives the bool mask's result on rows with an allowed key, and a finite convex combination of values (never NaN) on rows it masks entirely."""
    L, S = 5, 9
    q, k, v = (randn(1, 2, n, 16, seed=20 + i, dtype=dtype) for i, n in enumerate((L, S, S)))
    allowed = randn(L, S, seed=9) > 0
    allowed[:, 2] = True
    allowed[3] = False  # a row the float mask masks entirely (finite, so not "empty")
    value = torch.finfo(dtype).min if fill == "finfo.min" else float(fill)
    # Built in fp32, then rounded: -1e9 becomes -inf in fp16, as it would for a user.
    additive = torch.zeros(L, S).masked_fill(~allowed, value).to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = sdpa(kernel, *leaves, attn_mask=additive)
    assert_finite(out, "output")
    out.float().sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None
        assert_finite(leaf.grad, "gradient")
    rows = torch.arange(L) != 3
    with_bool = sdpa(kernel, q, k, v, attn_mask=allowed)
    assert_close(out[:, :, rows].detach(), with_bool[:, :, rows], msg=f"{kernel} {dtype} {fill}")
    # The masked row: -1e9 is -inf in fp16 (a zero row, by the package's rule); otherwise the
    # constant shift cancels in the softmax and the row averages the values.
    row = out[:, :, 3].detach().double()
    if math.isinf(additive[3, 0].item()):
        assert torch.equal(row, torch.zeros_like(row))
    else:
        lo, hi = v.double().amin(dim=-2), v.double().amax(dim=-2)  # (1, 2, E)
        slack = 2 * torch.finfo(dtype).eps * v.double().abs().amax()
        assert bool(((row >= lo - slack) & (row <= hi + slack)).all()), "not a convex combination"


# (dtype, fill) pairs whose fill stays finite in the dtype: -1e9 is -inf in fp16.
FINITE_FILLS = [
    pytest.param(dtype, fill, id=f"{dtype_id}-{fill}")
    for dtype, dtype_id in (
        (torch.float32, "fp32"),
        (torch.bfloat16, "bf16"),
        (torch.float16, "fp16"),
    )
    for fill in ("-1e9", "finfo.min")
    if not (dtype == torch.float16 and fill == "-1e9")
]


# The reference kernel is the yardstick of this test, so it is not among the judged.
JUDGED_KERNELS = [p for p in KERNELS if p.values[0] != "reference"]


@spec(component="attention", kind="masking")
@pytest.mark.parametrize(("dtype", "fill"), FINITE_FILLS)
@pytest.mark.parametrize("kernel", JUDGED_KERNELS)
def test_row_masked_entirely_by_one_finite_fill_gets_equal_weights_forward_and_backward(
    kernel: str, dtype: torch.dtype, fill: str, request: pytest.FixtureRequest
) -> None:
    """A row whose scores are all equal (a zero query) and whose float mask is one finite value throughout (-1e9, finfo.min) has equal weights, the softmax being shift invariant (§3.2.1): output and gradients of q, k and v are within twice the reference kernel's error against float64 math in the same dtype (plus the dtype's atol). A backward that recomputes P from a rounded m + log(l) gets this row's gradients wrong by a factor of up to S at |m| = 1e9; a kernel that scales finfo.min into the log2 domain overflows it to -inf and returns a zero row."""
    if kernel == "torch" and dtype != torch.float16:
        # torch's fused CPU backward (torch 2.13; fp16 takes another path) gets this row's
        # query gradient wrong, off by about 6 here. Strict: a fixed torch shows up.
        reason = "torch's fused CPU attention backward: wrong dq on a row masked by one fill"
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))
    L, S, E = 5, 9, 16
    q, k, v = (randn(1, 2, n, E, seed=60 + i, dtype=dtype) for i, n in enumerate((L, S, S)))
    q[:, :, 3] = 0.0  # row 3: every score 0, hence equal after any constant shift
    allowed = randn(L, S, seed=64) > 0
    allowed[:, 2] = True
    allowed[3] = False
    value = torch.finfo(dtype).min if fill == "finfo.min" else float(fill)
    mask = torch.zeros(L, S, dtype=dtype).masked_fill(~allowed, value)
    assert bool(torch.isfinite(mask).all())
    upstream = randn(1, 2, L, E, seed=65, dtype=torch.float64)

    def run(attend: Callable[..., Tensor], cast: torch.dtype) -> list[Tensor]:
        leaves = [t.to(cast).clone().requires_grad_(True) for t in (q, k, v)]
        out = attend(*leaves, attn_mask=mask.to(cast))
        (out.double() * upstream).sum().backward()
        return [out.detach()] + [leaf.grad for leaf in leaves if leaf.grad is not None]

    def float64_math(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor) -> Tensor:
        scores = q @ k.transpose(-2, -1) / math.sqrt(E) + attn_mask
        return torch.softmax(scores, dim=-1) @ v

    exact = run(float64_math, torch.float64)
    ref_low = run(functools.partial(sdpa, "reference"), dtype)
    ours = run(functools.partial(sdpa, kernel), dtype)
    assert len(ours) == 4
    for name, got, ref, want in zip(
        ("output", "dq", "dk", "dv"), ours, ref_low, exact, strict=True
    ):
        msg = f"{kernel} {dtype} {fill} {name}"
        assert_finite(got, msg)
        assert_error_within_reference(got, ref, want, msg=msg)
    mean = v.double().mean(dim=-2)  # (1, 2, E): what equal weights give
    assert_close(exact[0][:, :, 3], mean, msg="float64 math: the row is the mean of the values")


@spec(component="attention", kind="masking")
@pytest.mark.parametrize("kernel", KERNELS)
def test_nan_in_one_slices_mask_leaves_a_finfo_min_row_of_another_at_equal_weights(
    kernel: str,
) -> None:
    """A NaN in the float mask of one (batch, head) slice changes nothing in another, where a row masked entirely with finfo.min (and a zero query) still averages the values (§3.2.1: each slice's softmax is its own)."""
    q, k, v = (randn(2, 1, n, 8, seed=70 + i) for i, n in enumerate((4, 6, 6)))
    q[1, 0, 2] = 0.0
    mask = torch.zeros(2, 1, 4, 6)
    mask[0, 0, 0, 0] = math.nan
    mask[1, 0, 2] = torch.finfo(torch.float32).min
    out = sdpa(kernel, q, k, v, attn_mask=mask)
    assert_close(out[1, 0, 2], v[1, 0].mean(dim=0), msg=f"{kernel}: the finfo.min row")
    clean = sdpa(kernel, q[1:], k[1:], v[1:], attn_mask=mask[1:])
    assert_close(out[1:], clean, msg=f"{kernel}: the slice without NaN")


@spec(component="attention", kind="masking")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_zero_scale_averages_the_allowed_values_without_nan(
    kernel: str, dtype: torch.dtype
) -> None:
    """scale=0 makes every allowed score 0, so each row is the plain mean of the values it may see, causal included (torch's own causal path gives NaN here: -inf * 0)."""
    L, S = 5, 3
    q, k, v = (randn(2, n, 8, seed=40 + i, dtype=dtype) for i, n in enumerate((L, S, S)))
    allowed = torch.ones(L, S, dtype=torch.bool).tril()
    out = sdpa(kernel, q, k, v, is_causal=True, scale=0.0)
    assert_finite(out, "output")
    counts = allowed.sum(dim=-1, keepdim=True).double()  # (L, 1) keys each row sees
    mean = (allowed.double() / counts) @ v.double()  # (2, L, Ev)
    assert_error_within_reference(out, sdpa("reference", q, k, v, is_causal=True, scale=0.0), mean)


# --------------------------------------------------------------------------------------
# Modules: multi-head attention, layers, the model.
# --------------------------------------------------------------------------------------


@spec(component="multi_head_attention", section="3.2.2", kind="property")
@pytest.mark.parametrize("dtype", DTYPES)
def test_mha_with_large_inputs_and_finfo_min_padding_is_finite_and_accurate(
    dtype: torch.dtype,
) -> None:
    """MultiheadAttention on inputs of magnitude ~30 with a finfo.min key padding mask gives finite outputs, weights and gradients, as accurate as torch.nn.MultiheadAttention in the same dtype."""
    torch.manual_seed(0)
    ours = MultiheadAttention(24, 3, batch_first=True)
    theirs = torch.nn.MultiheadAttention(24, 3, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    x = randn(2, 13, 24, seed=1) * 30
    padding = torch.zeros(2, 13)
    padding[0, 9:] = torch.finfo(torch.float32).min
    # The float64 truth is torch's module: ours computing it would move the target with a bug.
    exact, exact_w = theirs.double()(x.double(), x.double(), x.double(), padding.double())
    ours.to(dtype)
    theirs.to(dtype)
    x_low = x.to(dtype).requires_grad_(True)
    out, weights = ours(x_low, x_low, x_low, padding.to(dtype))
    ref, ref_w = theirs(x.to(dtype), x.to(dtype), x.to(dtype), padding.to(dtype))
    assert weights is not None and ref_w is not None
    assert_finite(out, "output")
    assert_finite(weights, "weights")
    assert_error_within_reference(out.detach(), ref.detach(), exact, msg=f"output {dtype}")
    assert_error_within_reference(weights.detach(), ref_w.detach(), exact_w, msg=f"weights {dtype}")
    out.float().square().mean().backward()
    assert x_low.grad is not None
    assert_finite(x_low.grad, "gradient")


@spec(component="layers", section="3.1", kind="property")
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_encoder_layer_in_low_precision_is_as_accurate_as_torch(
    dtype: torch.dtype, norm_first: bool
) -> None:
    """A TransformerEncoderLayer in fp16/bf16 is finite and as accurate against float64 as torch.nn.TransformerEncoderLayer in the same dtype (§3.1, post- and pre-norm)."""
    torch.manual_seed(0)
    kwargs = {"dropout": 0.0, "batch_first": True, "norm_first": norm_first}
    ours = transformer.TransformerEncoderLayer(32, 4, 64, **kwargs)
    theirs = torch.nn.TransformerEncoderLayer(32, 4, 64, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    x = randn(3, 19, 32, seed=2) * 4
    padding = torch.zeros(3, 19, dtype=torch.bool)
    padding[1, 11:] = True
    exact = theirs.double()(x.double(), src_key_padding_mask=padding)  # torch's, not ours
    ours.to(dtype)
    theirs.to(dtype)
    # Gradients on: keeps torch's layer off its fused fast path, as in training.
    x_low = x.to(dtype).requires_grad_(True)
    out = ours(x_low, src_key_padding_mask=padding)
    ref = theirs(x_low, src_key_padding_mask=padding)
    assert_finite(out, "output")
    assert_error_within_reference(out.detach(), ref.detach(), exact, msg=f"{dtype}")


def copy_batch(gen: torch.Generator, vocab: int, B: int, T: int) -> tuple[Tensor, Tensor, Tensor]:
    """A batch of the copy task: src ``(B, T)``, decoder input and target ``(B, T + 1)``.

    Ids 3.. are content; 0 pad, 1 BOS, 2 EOS. The target is the source followed by EOS.
    """
    src = torch.randint(3, vocab, (B, T), generator=gen)
    bos = torch.ones(B, 1, dtype=torch.long)
    eos = torch.full((B, 1), 2, dtype=torch.long)
    return src, torch.cat([bos, src], dim=1), torch.cat([src, eos], dim=1)


@spec(component="model", section="5.3", kind="property")
def test_bf16_autocast_training_keeps_loss_finite_and_decreasing() -> None:
    """Twenty Adam steps of a tiny Seq2SeqTransformer under torch.autocast("cpu", bfloat16) on a copy task keep every loss and gradient finite and end below the initial loss (§5.3)."""
    torch.manual_seed(0)
    vocab = 13
    model = transformer.Seq2SeqTransformer.from_config(transformer.ModelConfig.tiny(vocab))
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(20):
        src, tgt_in, tgt_out = copy_batch(gen, vocab, B=16, T=6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(src, tgt_in)  # (B, T + 1, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), tgt_out.flatten())
        optimizer.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                assert_finite(p.grad, f"gradient of {name}")
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses


# --------------------------------------------------------------------------------------
# The judging helpers of transformer.testing, failing as they should.
# --------------------------------------------------------------------------------------


@spec(component="attention", section="extra", kind="error")
def test_assert_close_failure_reports_max_and_mean_difference() -> None:
    """A failing assert_close raises AssertionError carrying the caller's message and the max and mean absolute differences over the finite entries ('no finite differences' when there is none)."""
    expected = torch.zeros(4)
    actual = torch.tensor([0.0, 0.5, -1.0, float("nan")])
    with pytest.raises(
        AssertionError, match=r"(?s)^row 3\nmax \|diff\| 1\.000e\+00, mean \|diff\| 5\.000e-01\n"
    ):
        assert_close(actual, expected, msg="row 3")
    with pytest.raises(AssertionError, match="no finite differences"):
        assert_close(torch.full((2,), float("inf")), torch.zeros(2))
    assert_close(expected + 1e-7, expected)  # within fp32 tolerance: passes silently


@spec(component="attention", section="extra", kind="error")
def test_low_precision_rule_fails_above_factor_times_reference_error() -> None:
    """assert_error_within_reference raises when our error exceeds factor x the reference's error plus the dtype's floor, naming both errors and the dtype; at or under the bound it passes."""
    exact = torch.zeros(3, dtype=torch.float64)
    # Powers of two, exact in float16: the reference errs by 2^-6, we by 2^-5 (at the bound).
    reference = torch.tensor([0.0, 2**-6, 0.0], dtype=torch.float16)
    assert_error_within_reference(
        torch.tensor([0.0, 0.0, 2**-5], dtype=torch.float16), reference, exact
    )
    bad = torch.tensor([2**-4, 0.0, 0.0], dtype=torch.float16)
    with pytest.raises(
        AssertionError,
        match=r"(?s)^case\nerror 6\.250e-02 exceeds 2\.0 x reference error 1\.56\de-02 .* in torch\.float16$",
    ):
        assert_error_within_reference(bad, reference, exact, factor=2.0, msg="case")


@spec(component="attention", section="extra", kind="error")
def test_tolerances_are_defined_only_for_floating_dtypes_they_know() -> None:
    """Asking for the tolerances of a dtype without a defined bar (int64, complex64) raises ValueError naming it, instead of comparing with a default."""
    for dtype in (torch.int64, torch.complex64):
        with pytest.raises(ValueError, match=f"no tolerance is defined for dtype {dtype}"):
            tolerances(dtype)
    scaled = tolerances(torch.float32, scale=10.0)  # torch's fp32 defaults, ten times looser
    assert scaled == {"atol": pytest.approx(1e-4), "rtol": pytest.approx(1.3e-5)}


@spec(component="attention", kind="property")
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("S", [1, 3, 7, 8, 9, 16, 63, 64, 65, 130])
def test_a_nan_query_row_gives_a_nan_output_row_at_every_key_length(
    kernel: str, dtype: torch.dtype, S: int
) -> None:
    """A NaN in one query row makes that output row NaN and leaves the other rows finite, for key lengths below, at and above one SIMD vector and the torch wrapper's 64-key threshold (torch's CPU flash kernel returns zeros for such a row when S is shorter than a vector; the wrapper restores the NaN there and relies on torch propagating it from 64 keys on)."""
    q = randn(2, 3, 5, 16, seed=1, dtype=dtype)
    k, v = randn(2, 3, S, 16, seed=2, dtype=dtype), randn(2, 3, S, 16, seed=3, dtype=dtype)
    q[1, 2, 3, 7] = float("nan")
    out = transformer.scaled_dot_product_attention(q, k, v, kernel=kernel)
    assert bool(out[1, 2, 3].isnan().all()), f"the NaN row came out {out[1, 2, 3]}"
    rows = torch.ones(2, 3, 5, dtype=torch.bool)
    rows[1, 2, 3] = False
    assert bool(out[rows].isfinite().all())
