"""pytest-benchmark settings for the attention benchmarks (``tox -e bench``).

Sizes are small by default so the whole run takes a few minutes on 2 cores; set
``ATTENTION_BENCH_SEQ_LENS`` (e.g. ``"512,2048"``) to measure longer sequences.
Benchmarks measure and report; they never assert on time.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def bench_sizes() -> dict[str, int]:
    """B, H, E of every benchmark (``ATTENTION_BENCH_BATCH``/``_HEADS``/``_HEAD_DIM``)."""
    return {
        "batch": int(os.environ.get("ATTENTION_BENCH_BATCH", "2")),
        "heads": int(os.environ.get("ATTENTION_BENCH_HEADS", "4")),
        "head_dim": int(os.environ.get("ATTENTION_BENCH_HEAD_DIM", "64")),
    }
