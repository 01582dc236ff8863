"""What the benchmarks time, and how a request names it.

The candidates' names besides the registered kernels (torch's own SDPA, SDPA pinned to
one backend, ``torch.nn.MultiheadAttention``), the modes and dtypes a request may ask
for, :class:`BenchError` for a request that names something else, and
:func:`make_attention_call`, the closure running one pass of one candidate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

TORCH_SDPA = "torch-sdpa"
TORCH_MHA = "torch-mha"
# torch SDPA pinned to one backend with torch.nn.attention.sdpa_kernel (enum names).
SDPA_BACKENDS = {
    "torch-sdpa-flash": "FLASH_ATTENTION",
    "torch-sdpa-efficient": "EFFICIENT_ATTENTION",
    "torch-sdpa-cudnn": "CUDNN_ATTENTION",
    "torch-sdpa-math": "MATH",
}
MODES = ("fwd", "bwd", "fwd+bwd")


class BenchError(ValueError):
    """A bad benchmark request (unknown kernel, missing device, bad size)."""


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_attention_call(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch: int = 4,
    heads: int = 8,
    head_dim: int = 64,
    seq_len: int = 1024,
    causal: bool = False,
    mode: str = "fwd",
) -> Callable[[], None]:
    """A closure running one ``mode`` pass of candidate ``name`` on seeded inputs.

    ``name``: a registered kernel, :data:`TORCH_SDPA`, a key of :data:`SDPA_BACKENDS` or
    :data:`TORCH_MHA`. Inputs are ``(B, H, L, E)`` = ``(batch, heads, seq_len,
    head_dim)`` (MHA: ``(B, L, H * E)``). ``mode`` "fwd" runs under ``no_grad``;
    "fwd+bwd" runs forward and ``.sum().backward()``; "bwd" builds the graph once here
    and each call runs only its backward (``retain_graph``, so it can repeat).
    Building the closure does not run the candidate, except "bwd"'s one forward.
    """
    from transformer.attention import scaled_dot_product_attention

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    shape = (batch, heads, seq_len, head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(dev, dtype) for _ in range(3))
    grad = mode != "fwd"
    if name == TORCH_MHA:
        E = heads * head_dim
        mha = torch.nn.MultiheadAttention(E, heads, batch_first=True, device=dev, dtype=dtype)
        x = q.transpose(1, 2).reshape(batch, seq_len, E).requires_grad_(grad)  # (B, L, E)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(
            seq_len, device=dev, dtype=dtype
        )

        def fn() -> Tensor:
            kwargs = {"attn_mask": mask, "is_causal": True} if causal else {}
            return mha(x, x, x, need_weights=False, **kwargs)[0]

    elif name in SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[name], None)
        if backend is None:
            raise NotImplementedError(f"this torch has no SDPA backend {SDPA_BACKENDS[name]}")
        q, k, v = (t.requires_grad_(grad) for t in (q, k, v))

        def fn() -> Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    else:
        q, k, v = (t.requires_grad_(grad) for t in (q, k, v))

        def fn() -> Tensor:
            if name == TORCH_SDPA:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            return scaled_dot_product_attention(q, k, v, is_causal=causal, kernel=name)

    if mode == "bwd":
        out = fn()
        upstream = torch.ones_like(out)

        def backward_only() -> None:
            out.backward(upstream, retain_graph=True)

        return backward_only

    def call() -> None:
        if grad:
            fn().sum().backward()
        else:
            with torch.no_grad():
                fn()

    return call
