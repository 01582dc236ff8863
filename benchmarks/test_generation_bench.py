"""pytest-benchmark timings of token-by-token decoding (run by ``tox -e bench``; never asserts time).

Greedy decoding of 64 new tokens with a small model (2+2 layers, d_model 128), with the
KV cache and with full re-decoding of the prefix at every step, and beam search (K = 4)
with the cache. ``benchmarks/model_bench.py generation`` measures the base-size model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from transformer.generate import beam_search, greedy_decode
from transformer.model import ModelConfig, Seq2SeqTransformer

BOS, EOS = 1, 2
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def model_and_source() -> tuple[Seq2SeqTransformer, Tensor]:
    torch.manual_seed(0)
    config = ModelConfig.tiny(500, d_model=128, nhead=4, dim_feedforward=512)
    model = Seq2SeqTransformer.from_config(config).eval()
    with torch.no_grad():
        model.output.bias[EOS] = -1e9  # every run decodes exactly NEW_TOKENS tokens
    src = torch.randint(3, 500, (4, 20), generator=torch.Generator().manual_seed(1))
    return model, src


@pytest.mark.parametrize(
    "search",
    [
        pytest.param(lambda m, s: greedy_decode(m, s, NEW_TOKENS, BOS, EOS), id="greedy-cached"),
        pytest.param(
            lambda m, s: greedy_decode(m, s, NEW_TOKENS, BOS, EOS, use_cache=False),
            id="greedy-uncached",
        ),
        pytest.param(
            lambda m, s: beam_search(m, s, NEW_TOKENS, BOS, EOS, beam_size=4), id="beam4-cached"
        ),
    ],
)
def test_decoding_speed(
    benchmark: Any,
    model_and_source: tuple[Seq2SeqTransformer, Tensor],
    search: Callable[[Seq2SeqTransformer, Tensor], Tensor],
) -> None:
    """Time one decoding call of 4 sources x 64 new tokens."""
    model, src = model_and_source
    out = benchmark.pedantic(search, args=(model, src), rounds=3, iterations=1, warmup_rounds=1)
    assert out.shape == (4, NEW_TOKENS)
