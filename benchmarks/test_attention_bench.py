"""Attention kernels under pytest-benchmark: ``tox -e bench`` (measures, never asserts time).

Each benchmark times one candidate on one (sequence length, causal, mode): on the CPU in
fp32, every registered kernel plus torch's ``scaled_dot_product_attention``
("torch-sdpa"); on a CUDA device as well, in bf16, the ``"triton"`` kernel and torch
SDPA pinned to each of its backends ("torch-sdpa-flash", "-efficient", "-cudnn",
"-math"). Modes: "fwd", "bwd" (backward alone) and "fwd+bwd". Compare the rows with
``--benchmark-group-by=param:seq_len`` or save them with ``--benchmark-autosave``. The
CLI (``transformer bench attention``) gives the full table, JSON and plot.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

import transformer
from transformer.bench import MODES, SDPA_BACKENDS, TORCH_SDPA, make_attention_call
from transformer.kernels import chunked  # noqa: F401  (registers the scratch kernels)


def bench_seq_lens() -> list[int]:
    """Sequence lengths L = S to benchmark (``ATTENTION_BENCH_SEQ_LENS``, default 128,512)."""
    text = os.environ.get("ATTENTION_BENCH_SEQ_LENS", "128,512")
    return [int(part) for part in text.split(",") if part.strip()]


def candidates() -> list[object]:
    """``(device, candidate)`` params: the CPU kernels, and on CUDA the GPU candidates."""
    cpu = [k for k in transformer.available_kernels("cpu") if k != "triton"] + [TORCH_SDPA]
    params: list[object] = [pytest.param(("cpu", k), id=f"{k}-cpu") for k in cpu]
    if torch.cuda.is_available():
        gpu = [*transformer.available_kernels("cuda"), TORCH_SDPA, *SDPA_BACKENDS]
        params += [pytest.param(("cuda", k), id=f"{k}-cuda") for k in gpu]
    return params


def make_call(
    device: str, kernel: str, sizes: dict[str, int], L: int, causal: bool, mode: str
) -> Callable[[], None]:
    """One ``mode`` pass of ``kernel`` on seeded (B, H, L, E) inputs (bf16 on CUDA, then synchronised)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    call = make_attention_call(
        kernel, device=device, dtype=dtype, batch=sizes["batch"], heads=sizes["heads"],
        head_dim=sizes["head_dim"], seq_len=L, causal=causal, mode=mode,
    )  # fmt: skip
    if device != "cuda":
        return call

    def synchronised() -> None:
        call()
        torch.cuda.synchronize()

    return synchronised


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seq_len", bench_seq_lens())
@pytest.mark.parametrize("candidate", candidates())
def test_attention(
    benchmark,
    candidate: tuple[str, str],
    seq_len: int,
    causal: bool,
    mode: str,
    bench_sizes: dict[str, int],
) -> None:
    """Time one attention call; extra_info carries the FLOP count (4*B*H*L*S*E, halved if causal, x2.5 backward alone, x3.5 with both)."""
    device, kernel = candidate
    try:
        call = make_call(device, kernel, bench_sizes, seq_len, causal, mode)
        call()
    except RuntimeError as err:  # a pinned SDPA backend that refuses this shape
        pytest.skip(f"{kernel} refuses this combination: {str(err).splitlines()[0][:120]}")
    flops = 4.0 * bench_sizes["batch"] * bench_sizes["heads"] * seq_len**2 * bench_sizes["head_dim"]
    flops = (flops / 2 if causal else flops) * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
    benchmark.group = f"{device} L={seq_len} {'causal' if causal else 'full'} {mode}"
    benchmark.extra_info["gflop"] = flops / 1e9
    benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
