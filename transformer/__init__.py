"""Attention Is All You Need, from scratch in PyTorch, interchangeable with ``torch.nn``.

The public API is listed in ``__all__``; see ``../shared/SPEC.md`` and the spec suites
in ``spec_tests/`` for the contract each name honours.
"""

from transformer.attention import available_kernels, register_kernel, scaled_dot_product_attention
from transformer.multi_head_attention import MultiheadAttention

__all__ = [
    "MultiheadAttention",
    "available_kernels",
    "register_kernel",
    "scaled_dot_product_attention",
]

__version__ = "0.1.0"
