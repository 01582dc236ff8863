"""Attention Is All You Need, from scratch in PyTorch, interchangeable with ``torch.nn``.

The public API is listed in ``__all__``; the spec suites in ``spec_tests/`` state the
contract each name honours. Heavier components
(layers, model, generation, checkpoints) are imported on first use, so ``import
transformer`` stays cheap for users who only want the attention kernels.
"""

from __future__ import annotations

import importlib
from typing import Any

from transformer import kernels as _kernels  # noqa: F401  (registers the scratch kernels)
from transformer.attention import available_kernels, register_kernel, scaled_dot_product_attention
from transformer.multi_head_attention import MultiheadAttention

# Public name -> module that defines it, resolved lazily by ``__getattr__``.
_LAZY = {
    "FeedForward": "transformer.feed_forward",
    "SinusoidalPositionalEncoding": "transformer.positional",
    "sinusoidal_table": "transformer.positional",
    "TransformerEncoderLayer": "transformer.layers",
    "TransformerDecoderLayer": "transformer.layers",
    "TransformerEncoder": "transformer.layers",
    "TransformerDecoder": "transformer.layers",
    "Transformer": "transformer.layers",
    "ModelConfig": "transformer.model",
    "Seq2SeqTransformer": "transformer.model",
    "save_checkpoint": "transformer.checkpoint",
    "load_checkpoint": "transformer.checkpoint",
    "CheckpointError": "transformer.checkpoint",
    "greedy_decode": "transformer.generate",
    "beam_search": "transformer.generate",
    "sample_decode": "transformer.sampling",
    "KVCache": "transformer.kv_cache",
    "DecoderCache": "transformer.kv_cache",
}

__all__ = [
    "MultiheadAttention",
    "available_kernels",
    "register_kernel",
    "scaled_dot_product_attention",
    *_LAZY,
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'transformer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
