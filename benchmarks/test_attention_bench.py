"""Attention kernels under pytest-benchmark: ``tox -e bench`` (measures, never asserts time).

Each benchmark times one kernel on one (sequence length, causal, mode) in fp32 on the
CPU: every registered kernel plus torch's ``scaled_dot_product_attention``
("torch-sdpa"). Compare the rows with ``--benchmark-group-by=param:seq_len`` or save
them with ``--benchmark-autosave``. The CLI (``transformer bench attention``) gives the
full table, JSON and plot.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import transformer
from transformer.kernels import chunked  # noqa: F401  (registers the scratch kernels)


def bench_seq_lens() -> list[int]:
    """Sequence lengths L = S to benchmark (``ATTENTION_BENCH_SEQ_LENS``, default 128,512)."""
    text = os.environ.get("ATTENTION_BENCH_SEQ_LENS", "128,512")
    return [int(part) for part in text.split(",") if part.strip()]


KERNELS = [k for k in transformer.available_kernels("cpu") if k != "triton"] + ["torch-sdpa"]


def make_call(
    kernel: str, sizes: dict[str, int], L: int, causal: bool, mode: str
) -> Callable[[], None]:
    """One forward (and backward) of ``kernel`` on seeded (B, H, L, E) inputs."""
    gen = torch.Generator().manual_seed(0)
    shape = (sizes["batch"], sizes["heads"], L, sizes["head_dim"])
    q, k, v = (torch.randn(shape, generator=gen).requires_grad_(mode == "fwd+bwd") for _ in "qkv")

    def fn() -> torch.Tensor:
        if kernel == "torch-sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return transformer.scaled_dot_product_attention(q, k, v, is_causal=causal, kernel=kernel)

    def call() -> None:
        if mode == "fwd":
            with torch.no_grad():
                fn()
        else:
            fn().sum().backward()

    return call


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seq_len", bench_seq_lens())
@pytest.mark.parametrize("kernel", KERNELS)
def test_attention(
    benchmark, kernel: str, seq_len: int, causal: bool, mode: str, bench_sizes: dict[str, int]
) -> None:
    """Time one attention call; extra_info carries the FLOP count (4*B*H*L*S*E, halved if causal, x3.5 with backward)."""
    call = make_call(kernel, bench_sizes, seq_len, causal, mode)
    flops = 4.0 * bench_sizes["batch"] * bench_sizes["heads"] * seq_len**2 * bench_sizes["head_dim"]
    flops = (flops / 2 if causal else flops) * (3.5 if mode == "fwd+bwd" else 1.0)
    benchmark.group = f"L={seq_len} {'causal' if causal else 'full'} {mode}"
    benchmark.extra_info["gflop"] = flops / 1e9
    benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
