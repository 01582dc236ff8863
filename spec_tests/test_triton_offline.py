"""The ``"triton"`` kernel compiled for real GPUs without one: it builds, fits, uses tensor cores.

The interpreter suite (``test_triton_kernel.py``) proves what the kernels compute, but
the interpreter runs them in NumPy: it cannot tell whether they compile for a GPU,
whether a tile fits in shared memory, or whether a dot runs on tensor cores or in
TF32. This module compiles every kernel of a forward and backward pass with triton's
own compiler and ``ptxas`` for NVIDIA targets (sm_80 = A100, sm_90 = H100/H200) and
reads the binaries: shared memory and registers against the target's per-program
maxima (a config over them fails at launch), spills, and the matmul instructions.

Runs in ``tox -e triton-offline`` (triton installed, ``TRITON_INTERPRET`` unset; no GPU
needed). Notation: B batch, H heads, L target length, S source length, E head dim.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from transformer.cli import main
from transformer.kernels.triton_offline import (
    KERNELS,
    SHARED_MEMORY_PER_BLOCK,
    KernelBuild,
    OfflineCompileError,
    compile_offline,
)

spec = functools.partial(pytest.mark.spec, component="triton_offline")

pytestmark = [
    pytest.mark.triton_offline,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton installed"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1",
        reason="compiles for a GPU: run with TRITON_INTERPRET unset (`tox -e triton-offline`)",
    ),
]

H100, A100 = 90, 80
DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}
ITEMSIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}
# The kernels of a training call without a mask gradient; "bwd_preprocess" runs one fixed
# tile, the others are autotuned. "attn_bwd_dmask" adds itself for a float mask with grad.
TRAINING = ("attn_fwd", "bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq")
TUNED = ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")
DMASK = ("attn_bwd_dmask",)


def operands(
    E: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    *,
    B: int = 2,
    H: int = 4,
    L: int = 300,
    S: int = 300,
    Ev: int | None = None,
    Hk: int | None = None,
    grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """``q (B, H, L, E)``, ``k (B, Hk, S, E)``, ``v (B, Hk, S, Ev)`` on the CPU, never read.

    ``grad`` makes them require grad, so the backward kernels are compiled too.
    """
    kv_heads = H if Hk is None else Hk
    q = torch.empty(B, H, L, E, dtype=dtype)
    k = torch.empty(B, kv_heads, S, E, dtype=dtype)
    v = torch.empty(B, kv_heads, S, E if Ev is None else Ev, dtype=dtype)
    return q.requires_grad_(grad), k.requires_grad_(grad), v.requires_grad_(grad)


def describe(builds: list[KernelBuild]) -> str:
    return "\n".join(
        f"{b.kernel} {b.config}: shared {b.shared_bytes}, regs {b.registers}, "
        f"stack {b.stack_bytes}, async {b.async_copies}, {b.matmul}, fits {b.fits}, "
        f"error {b.error}"
        for b in builds
    )


# --------------------------------------------------------------------------------------
# What gets compiled.
# --------------------------------------------------------------------------------------


@spec(section="3.2.1", kind="shape")
def test_one_build_per_launched_kernel_and_autotune_config() -> None:
    """A training call compiles the forward, the backward pre-pass, dK/dV and dQ kernels, one build per autotune config; inference compiles the forward only; a float mask that requires grad adds its gradient pass."""
    from transformer.kernels import _triton_kernels as k

    builds = compile_offline(*operands(), arch=H100)
    expected = [
        *["attn_fwd"] * len(k.FWD_CONFIGS),
        "bwd_preprocess",
        *["attn_bwd_dkdv"] * len(k.BWD_DKDV_CONFIGS),
        *["attn_bwd_dq"] * len(k.BWD_DQ_CONFIGS),
    ]
    assert [b.kernel for b in builds] == expected
    fwd_tiles = [(b.block_m, b.block_n, b.num_warps, b.num_stages) for b in builds[:7]]
    assert fwd_tiles == [
        (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in k.FWD_CONFIGS
    ]
    inference = compile_offline(*operands(grad=False), arch=H100, configs="smallest")
    assert [b.kernel for b in inference] == ["attn_fwd"]
    query, key, value = operands()
    mask = float_mask_with_grad(query, key)
    with_mask_grad = compile_offline(query, key, value, mask, arch=H100, configs="smallest")
    assert [b.kernel for b in with_mask_grad] == list(KERNELS)


@spec(section="extra", kind="shape")
@pytest.mark.parametrize("dtype_name", ["fp32", "fp64"])
def test_full_precision_calls_time_only_the_small_tiles(dtype_name: str) -> None:
    """fp32 and fp64 calls are tuned over the small full-precision tiles only (their dots get nothing from big tiles but spills), fp16/bf16 calls over the tensor-core tiles only: the autotuner's pruning hook picks the list by dot precision."""
    from transformer.kernels import _triton_kernels as k

    small = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in k.FULL_PRECISION_CONFIGS]
    builds = compile_offline(*operands(64, DTYPES[dtype_name]), arch=H100, kernels=TUNED)
    assert [(b.kernel, (b.block_m, b.block_n)) for b in builds] == [
        (name, tile) for name in TUNED for tile in small
    ]
    assert max(b.block_m * b.block_n for b in builds) <= 32 * 32


@spec(section="3.2.1", kind="shape")
def test_kernels_filter_keeps_launch_order() -> None:
    """``kernels=`` compiles only the named kernels, still in launch order; ``configs="smallest"`` compiles the 32 x 32 fallback of the bf16 lists."""
    builds = compile_offline(
        *operands(), arch=H100, configs="smallest", kernels=("attn_bwd_dq", "attn_fwd")
    )
    assert [b.kernel for b in builds] == ["attn_fwd", "attn_bwd_dq"]
    assert all((b.block_m, b.block_n) == (32, 32) for b in builds)


# --------------------------------------------------------------------------------------
# It builds and fits, for every dtype and head dim the kernel claims.
# --------------------------------------------------------------------------------------


@spec(section="extra", kind="property")
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_the_fallback_tile_builds_and_fits_an_h100_for_every_dtype_and_head_dim(
    dtype_name: str, head_dim: int
) -> None:
    """For fp16, bf16, fp32 and fp64 at head dims 16 to 256, every kernel's smallest autotune config (the one every problem can fall back on) compiles for sm_90 and fits its shared memory and registers, so no supported call fails at launch for want of a tile."""
    builds = compile_offline(*operands(head_dim, DTYPES[dtype_name]), arch=H100, configs="smallest")
    assert [b.kernel for b in builds] == list(TRAINING)
    assert all(b.fits for b in builds), describe(builds)


def float_mask_with_grad(q: Tensor, k: Tensor, shape: str = "B-H-L-S") -> Tensor:
    """A float mask that requires grad: ``(B, H, L, S)``, or ``(B, 1, 1, S)`` (key padding)."""
    B, H, L, S = q.size(0), q.size(1), q.size(2), k.size(2)
    size = (B, H, L, S) if shape == "B-H-L-S" else (B, 1, 1, S)
    return torch.zeros(size, dtype=q.dtype, requires_grad=True)


@spec(section="extra", kind="property")
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_the_mask_gradient_fallback_tile_builds_and_fits_h100_and_a100(
    dtype_name: str, head_dim: int
) -> None:
    """The float mask's gradient pass (run only when a float ``attn_mask`` requires grad; it recomputes dS tile by tile like FlashAttention-2's dQ pass) compiles its smallest config for sm_90 at every dtype and head dim 16 to 256 within the shared memory and registers of one program, and for sm_80 at head dim 256, as the other kernels do."""
    q, k, v = operands(head_dim, DTYPES[dtype_name])
    mask = float_mask_with_grad(q, k)
    archs = (H100, A100) if head_dim == 256 else (H100,)
    for arch in archs:
        builds = compile_offline(q, k, v, mask, arch=arch, configs="smallest", kernels=DMASK)
        assert [b.kernel for b in builds] == list(DMASK)
        assert all(b.fits for b in builds), describe(builds)


@spec(section="extra", kind="property")
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_the_fallback_tile_fits_an_a100_at_the_largest_head_dim(dtype_name: str) -> None:
    """At head dim 256, the largest tiles, every kernel's smallest config also fits sm_80's smaller shared memory (163 KB per program)."""
    builds = compile_offline(*operands(256, DTYPES[dtype_name]), arch=A100, configs="smallest")
    assert all(b.fits for b in builds), describe(builds)


@spec(section="extra", kind="property")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_benchmarked_bf16_shapes_build_every_config_on_h100_tensor_cores(
    head_dim: int, is_causal: bool
) -> None:
    """For the GPU benchmark's shapes (bf16, E 64 and 128, causal and not), every autotune config compiles for sm_90, fits and pipelines its loads (asynchronous copies); its dots run on Hopper's warpgroup tensor cores (``wgmma``), except the 32 x 32 fallback, too small for a warpgroup, on ``mma``; and each kernel has ``wgmma`` configs that spill no register, for the autotuner to pick."""
    q, k, v = operands(head_dim, torch.bfloat16, L=4096, S=4096)
    builds = compile_offline(q, k, v, is_causal=is_causal, arch=H100)
    assert all(b.fits for b in builds), describe(builds)
    for b in builds:
        if b.kernel == "bwd_preprocess":
            assert b.matmul == "fma"  # no dot: a row sum
            continue
        small = (b.block_m, b.block_n) == (32, 32)
        assert b.matmul == ("mma.bf16" if small else "wgmma.bf16"), describe([b])
        assert b.async_copies, describe([b])
    for name in TUNED:
        clean = [b for b in builds if b.kernel == name and b.matmul == "wgmma.bf16"]
        assert any(b.stack_bytes == 0 for b in clean), describe(clean)


@spec(section="extra", kind="property")
def test_loads_are_pipelined_exactly_when_a_config_has_two_or_more_stages() -> None:
    """Triton's software pipelining shows in the PTX: the fp32 configs with ``num_stages`` 2 issue asynchronous global-to-shared copies (``cp.async``) for each kernel, the single-stage ones none, so the check above can tell a pipelined kernel from a stalling one."""
    builds = compile_offline(*operands(64, torch.float32), arch=H100, kernels=TUNED)
    assert {b.num_stages for b in builds} == {1, 2}
    for b in builds:
        assert (b.async_copies or 0) > 0 if b.num_stages > 1 else b.async_copies == 0, describe([b])


@spec(section="extra", kind="equivalence")
def test_fp32_dots_run_as_ieee_products_never_tf32() -> None:
    """fp32 inputs ask for IEEE products, not TF32 (whose 10-bit mantissa would miss the fp32 tolerances the suite holds the kernel to against torch): on sm_80 and sm_90 no fp32 kernel's PTX, the mask gradient pass's included, holds a matrix instruction, only fused multiply-adds."""
    q, k, v = operands(64, torch.float32)
    mask = float_mask_with_grad(q, k)
    for arch in (A100, H100):
        builds = compile_offline(q, k, v, mask, arch=arch, configs="smallest")
        assert [b.matmul for b in builds] == ["fma"] * len(KERNELS), describe(builds)


@spec(section="extra", kind="equivalence")
def test_fp64_dots_stay_in_fp64() -> None:
    """fp64 dots become fp64 matrix instructions (``mma`` on f64 operands, exact IEEE fp64), never a lower precision."""
    builds = compile_offline(*operands(64, torch.float64), arch=H100, kernels=TUNED)
    assert {b.matmul for b in builds} == {"mma.f64"}, describe(builds)


@spec(section="extra", kind="equivalence")
def test_fp16_and_bf16_dots_run_on_tensor_cores_on_an_a100() -> None:
    """On sm_80 the low-precision dots become ``mma.sync`` tensor-core instructions on their own input type (no ``wgmma`` before Hopper)."""
    for dtype, ptx_type in ((torch.float16, "f16"), (torch.bfloat16, "bf16")):
        builds = compile_offline(*operands(64, dtype), arch=A100, configs="smallest", kernels=TUNED)
        assert [b.matmul for b in builds] == [f"mma.{ptx_type}"] * len(TUNED), describe(builds)


@spec(section="extra", kind="property")
def test_matmul_reader_names_instruction_and_input_type() -> None:
    """The PTX reader names the matrix instruction and its input type (the second type in the name; the accumulator's comes first), so a TF32 dot would be caught as ``mma.tf32``."""
    from transformer.kernels.triton_offline import _matmul_kind

    assert _matmul_kind("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {...}") == "mma.tf32"
    assert _matmul_kind("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {...}") == "mma.f64"
    wgmma = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...}"
    assert _matmul_kind(wgmma + "\n" + wgmma) == "wgmma.bf16"
    assert _matmul_kind("fma.rn.f32 %f1, %f2, %f3, %f4;") == "fma"


@spec(section="3.2.3", kind="masking")
# torch warns when it builds causal_lower_right(L, S) with L > S (its own math gives NaN).
@pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs:UserWarning")
@pytest.mark.parametrize(
    "variant",
    [
        "causal",
        "bool mask",
        "float mask with grad",
        "float key padding mask with grad",
        "broadcast key padding mask",
        "lower-right causal bias",
        "dropout",
        "gqa",
        "E != Ev",
        "odd head dim",
        "fp64 bool mask",
    ],
)
def test_every_variant_builds_and_fits_an_h100(variant: str) -> None:
    """Causal (top-left, and torch's lower-right bias), bool and float masks (with the mask gradient pass, full and summed over broadcast dims), broadcast masks, dropout, grouped-query heads, E != Ev and a padded odd head dim each compile every kernel for sm_90 within its limits."""
    dtype = torch.float64 if variant == "fp64 bool mask" else torch.bfloat16
    E = 59 if variant == "odd head dim" else 64
    q, k, v = operands(E, dtype, Ev=128 if variant == "E != Ev" else None,
                       Hk=2 if variant == "gqa" else None)  # fmt: skip
    L, S = q.size(-2), k.size(-2)
    kwargs: dict[str, object] = {}
    if variant == "causal":
        kwargs["is_causal"] = True
    elif variant in ("bool mask", "fp64 bool mask"):
        kwargs["attn_mask"] = torch.ones(L, S, dtype=torch.bool)
    elif variant == "float mask with grad":
        kwargs["attn_mask"] = float_mask_with_grad(q, k)
    elif variant == "float key padding mask with grad":
        kwargs["attn_mask"] = float_mask_with_grad(q, k, "B-1-1-S")
    elif variant == "lower-right causal bias":
        kwargs["attn_mask"] = causal_lower_right(L, S - 44)  # S - L = -44
        k, v = k[..., :-44, :], v[..., :-44, :]
    elif variant == "broadcast key padding mask":
        kwargs["attn_mask"] = torch.ones(2, 1, 1, S, dtype=torch.bool)
    elif variant == "dropout":
        kwargs["dropout_p"] = 0.1
    elif variant == "gqa":
        kwargs["enable_gqa"] = True
    builds = compile_offline(q, k, v, arch=H100, configs="smallest", **kwargs)  # type: ignore[arg-type]
    with_mask_grad = variant.startswith("float") and variant.endswith("with grad")
    assert [b.kernel for b in builds] == list(KERNELS if with_mask_grad else TRAINING)
    assert all(b.fits for b in builds), describe(builds)


@spec(section="extra", kind="property")
def test_a_tile_too_big_for_the_chip_is_reported_as_not_fitting() -> None:
    """The fit check can fail: at head dim 256 in fp16, the forward's 128 x 128 tile stages K and V blocks of at least 2 x 128 x 256 x 2 bytes (128 KiB) per pipeline stage, more than sm_90's 227 KB over three stages, and is reported as not fitting."""
    builds = compile_offline(*operands(256, torch.float16, grad=False), arch=H100)
    big = next(b for b in builds if (b.block_m, b.block_n) == (128, 128))
    assert big.error is None
    assert big.shared_bytes is not None
    assert big.shared_bytes > SHARED_MEMORY_PER_BLOCK[H100]
    assert not big.fits
    for b in builds:  # one K tile in shared memory at least: a floor independent of triton
        assert b.shared_bytes is not None
        assert b.shared_bytes >= b.block_n * 256 * ITEMSIZE[torch.float16]


# --------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------


@spec(section="extra", kind="error")
def test_unknown_arch_raises_naming_the_known_ones() -> None:
    """An arch without known limits raises OfflineCompileError listing the supported ones."""
    with pytest.raises(
        OfflineCompileError, match=r"arch must be one of \[80, 86, 87, 89, 90\], got 75"
    ):
        compile_offline(*operands(), arch=75)


@spec(section="extra", kind="error")
def test_interpreter_mode_refuses_to_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``TRITON_INTERPRET=1`` the kernels are interpreter functions: compiling raises OfflineCompileError saying to unset it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(OfflineCompileError, match="TRITON_INTERPRET=1"):
        compile_offline(*operands(), arch=H100)


@spec(section="extra", kind="error")
def test_empty_problem_unknown_kernel_and_bad_configs_raise_value_error() -> None:
    """An empty problem (nothing to tile), an unknown kernel name and a ``configs`` other than "all"/"smallest" each raise ValueError naming it."""
    with pytest.raises(ValueError, match="empty"):
        compile_offline(*operands(L=0), arch=H100)
    with pytest.raises(ValueError, match=r"unknown kernels \['attn_bwd'\]"):
        compile_offline(*operands(), arch=H100, kernels=("attn_bwd",))
    with pytest.raises(ValueError, match="configs must be 'all' or 'smallest', got 'best'"):
        compile_offline(*operands(), arch=H100, configs="best")  # type: ignore[arg-type]


@spec(section="extra", kind="error")
def test_unsupported_dtype_raises_the_kernels_own_error() -> None:
    """What the kernel refuses at a call (here int32 inputs, and a head dim above 256) is refused the same way offline."""
    q = torch.zeros(1, 1, 8, 16, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"dtype torch\.int32 is not supported"):
        compile_offline(q, q, q, arch=H100)
    with pytest.raises(ValueError, match="head dim 512 exceeds the maximum 256"):
        compile_offline(*operands(512), arch=H100)


@spec(section="extra", kind="error")
def test_a_config_the_compiler_rejects_is_reported_with_its_error_not_raised(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A build the compiler rejects (here a 24-row tile: ``tl.arange`` needs a power of two) comes back with the compiler's message as ``error``, no costs and ``fits`` false, and the report table shows the error on its row."""
    from transformer.kernels import triton_flash, triton_offline

    launches = triton_offline._record_launches(*operands(), None, 0.0, False, None, False)
    name, args, meta = launches[0]
    with triton_offline._offline_target(H100):
        build = triton_offline._build(
            triton_flash._kernels(), name, args, {**meta, "BLOCK_M": 24, "BLOCK_N": 32}, 4, 2, H100
        )
    assert build.error is not None and "power of 2" in build.error
    costs = (build.shared_bytes, build.registers, build.stack_bytes, build.async_copies)
    assert (*costs, build.matmul) == (None,) * 5
    assert not build.fits
    report = {"triton": "x", "target": "sm_90", "shared_memory_limit_bytes": 1024, "rows": [
        {"dtype": "bf16", "head_dim": 64, "causal": False, **build.as_dict()}
    ]}  # fmt: skip
    assert build.config == "24x32 w4 s2"
    row = triton_offline.format_report(report).splitlines()[-1]
    assert "24x32 w4 s2" in row and "error: CompilationError" in row


@spec(section="extra", kind="error")
def test_without_triton_compiling_raises_offline_compile_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where triton cannot be imported, compiling raises OfflineCompileError saying triton is needed."""
    import sys

    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(OfflineCompileError, match="needs triton installed"):
        compile_offline(*operands(), arch=H100)


@spec(section="extra", kind="error")
def test_report_rejects_sizes_below_one_and_prints_nothing_when_log_is_none(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``compile_report`` raises ValueError naming a size below 1; with ``log=None`` and no ``out`` it returns its rows and prints nothing."""
    from transformer.kernels.triton_offline import compile_report

    for size in ("seq_len", "batch", "heads"):
        with pytest.raises(ValueError, match=f"{size} must be at least 1, got 0"):
            compile_report(**{size: 0})  # type: ignore[arg-type]
    report = compile_report(
        head_dims=(16,), causal=(False,), seq_len=32, configs="smallest", log=None
    )
    assert [r["kernel"] for r in report["rows"]] == list(TRAINING)
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------------------
# The command.
# --------------------------------------------------------------------------------------


@spec(section="extra", kind="shape")
def test_bench_compile_prints_a_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``transformer bench compile`` prints one row per kernel and config and writes ``compile-sm<arch>-triton<version>.json`` with the target's limit and every build."""
    import triton

    argv = ["bench", "compile", "--arch", "90", "--head-dims", "64", "--causal", "no",
            "--configs", "smallest", "--seq-len", "256", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "sm_90" in table and "static, not timed" in table
    report = json.loads((tmp_path / f"compile-sm90-triton{triton.__version__}.json").read_text())
    assert report["shared_memory_limit_bytes"] == 227 * 1024
    rows = report["rows"]
    assert [r["kernel"] for r in rows] == list(TRAINING)
    assert all(r["dtype"] == "bf16" and r["head_dim"] == 64 and r["fits"] for r in rows)
    for r in rows:
        assert r["kernel"] in table


@spec(section="extra", kind="error")
def test_bench_compile_bad_arguments_exit_2_with_one_line_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unknown dtype, an unknown arch, a head dim above 256 or a size below 1 exits with status 2 and a one-line error naming the flag and the value."""
    for argv, message in (
        (["--dtypes", "fp8"], "--dtypes: unknown dtype(s) ['fp8']"),
        (["--arch", "70"], "--arch must be one of [80, 86, 87, 89, 90], got 70"),
        (["--head-dims", "512"], "--head-dims must be within 1..256, got [512]"),
        (["--seq-len", "0"], "--seq-len must be >= 1, got 0"),
        (["--batch", "0"], "--batch must be >= 1, got 0"),
        (["--heads", "-1"], "--heads must be >= 1, got -1"),
    ):
        assert main(["bench", "compile", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
