"""The ``"triton"`` attention kernel: FlashAttention-2 written from scratch in Triton.

Computes equation 1 of "Attention Is All You Need" (section 3.2.1),
``softmax(Q K^T / sqrt(d_k) + mask) V``, tile by tile with an online softmax, so the
``(L, S)`` score matrix is never stored; the backward pass recomputes it blockwise from
the saved per-row log-sum-exp (Dao, "FlashAttention-2", 2023). The kernels themselves
live in :mod:`transformer.kernels._triton_kernels`.

Importing this module registers the kernel and does **not** import triton; triton is
imported on the first call. The kernel is available on CUDA devices, and on the CPU
when ``TRITON_INTERPRET=1`` (Triton's interpreter: exact same kernels, run in NumPy,
slow; used by the test suite).

What it supports natively: fp16, bf16, fp32 (full-precision ``ieee`` dots, no TF32) and
fp64; head dims ``E`` and ``Ev`` (they may differ) from 1 to 256, padded to a power of
two of at least 16 with masked loads (e.g. 59 runs as 64); any ``L`` and ``S``; any
batch dims, broadcasting included; causal (top-left aligned; blocks above the diagonal
are skipped); grouped-query attention (query head ``h`` reads key/value head
``h // (Hq // Hk)``, nothing repeated); bool and float masks broadcasting to
``(..., L, S)`` (broadcast dims read through stride 0, nothing materialised); dropout
with an in-kernel Philox generator seeded from torch's default generator, the same
random bits regenerated in the backward pass; the gradient of a float ``attn_mask`` that
requires grad (the score gradient ``dS``, written by the ``dQ`` kernel into an
``(..., L, S)`` buffer only in that case, then summed over broadcast dims by autograd).

Where it hands over to :func:`transformer.attention.reference_attention` instead:
empty problems (``L``, ``S``, ``E``, ``Ev`` or the batch is 0), where there is no tile
to run and the reference already gives the zeros the spec asks for.

Head dims above 256 raise ``ValueError`` (the tiles would not fit on chip).

Notation: B batch, H heads (Hq query, Hk key/value), L target length, S source
length, E query/key head dim, Ev value head dim, Bo the product of the batch dims
left of the heads dim.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from transformer.attention import reference_attention, register_kernel

__all__ = ["MAX_HEAD_DIM", "dropout_keep_mask", "triton_attention", "triton_available"]

#: Largest head dim (``E`` or ``Ev``) the kernels accept.
MAX_HEAD_DIM = 256

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Tile sizes under the interpreter: small tiles keep NumPy fast and still exercise
# multi-block loops and ragged edges at test sizes.
_INTERPRET_BLOCK = 16
#: Rows per program of the backward pre-pass (``delta = rowsum(dO * O)``) on a GPU.
PREPROCESS_BLOCK = 64
_LOG2E = math.log2(math.e)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available(device: torch.device) -> bool:
    """Whether the ``"triton"`` kernel can run on ``device``.

    True when triton is installed and the device is CUDA, or the CPU with
    ``TRITON_INTERPRET=1``. Checks the installation without importing triton.
    """
    if importlib.util.find_spec("triton") is None:
        return False
    dev = torch.device(device)
    return dev.type == "cuda" or (dev.type == "cpu" and _interpreting())


_KERNELS: ModuleType | None = None


def _kernels() -> ModuleType:
    """Import the ``@triton.jit`` module on first use (see the module docstring)."""
    global _KERNELS
    if _KERNELS is None:
        from transformer.kernels import _triton_kernels

        _KERNELS = _triton_kernels
    return _KERNELS


def _block_dim(d: int) -> int:
    """Tile width for a head dim: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, 1 << (d - 1).bit_length())


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax statistics and accumulators in fp32, as FlashAttention does; fp64 keeps fp64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _strides4(t: Tensor | None) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2), t.stride(3))


class _Problem:
    """Sizes, compile-time switches and launch helpers shared by the three passes.

    Tensors are 4-D: query ``(Bo, Hq, L, E)``, key ``(Bo, Hk, S, E)``, value
    ``(Bo, Hk, S, Ev)``, mask ``(Bo, Hq, L, S)`` (any strides, 0 included).
    """

    def __init__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        dropout_p: float,
        is_causal: bool,
        scale: float,
        seed: int,
    ) -> None:
        self.Bo, self.H, self.L, self.E = q.shape
        self.S, self.Ev = k.size(2), v.size(3)
        self.group = self.H // k.size(1)
        self.dropout_p, self.seed = dropout_p, seed
        self.acc = _acc_dtype(q.dtype)
        self.consts = _consts(scale, dropout_p, self.acc, q.device)
        tl = _kernels().tl
        self.meta: dict[str, Any] = {
            "GROUP": self.group,
            "E": self.E,
            "EV": self.Ev,
            "BLOCK_E": _block_dim(self.E),
            "BLOCK_EV": _block_dim(self.Ev),
            "IS_CAUSAL": is_causal,
            "MASK_KIND": 0 if mask is None else (1 if mask.dtype == torch.bool else 2),
            "HAS_DROPOUT": dropout_p > 0.0,
            "ACC_DTYPE": tl.float64 if self.acc == torch.float64 else tl.float32,
            # fp32 asks for true fp32 products: TF32 would miss the fp32 tolerances.
            "PRECISION": "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
        }
        # The autotuner re-tunes per power-of-two length bucket, not per exact length.
        self.seq_bucket = 1 << (max(self.L, self.S) - 1).bit_length()
        # A bool mask is read as bytes: same storage, a dtype every triton version loads.
        is_bool = mask is not None and mask.dtype == torch.bool
        self.mask = mask.view(torch.uint8) if mask is not None and is_bool else mask
        # When a list, launches are recorded as (kernel name, args, meta) instead of run:
        # how transformer.kernels.triton_offline compiles exactly what a launch would.
        self.recorded: list[tuple[str, tuple[Any, ...], dict[str, Any]]] | None = None

    def launch(self, name: str, rows: int, *args: Any, **extra: Any) -> None:
        """Run kernel ``name`` over ``ceil(rows / BLOCK) * heads`` programs.

        Under the interpreter: the plain kernel with one small fixed tile. On a GPU: the
        autotuned kernel, the grid computed from whichever tile it picks. ``extra`` adds
        kernel-specific compile-time switches to :attr:`meta`.
        """
        meta = {**self.meta, **extra}
        if self.recorded is not None:
            self.recorded.append((name, args, meta))
            return
        k = _kernels()
        heads = self.Bo * (self.H // self.group if name == "attn_bwd_dkdv" else self.H)
        tile = "BLOCK_N" if name == "attn_bwd_dkdv" else "BLOCK_M"
        if _interpreting():
            fn = getattr(k, name)
            grid = (math.ceil(rows / _INTERPRET_BLOCK) * heads,)
            fn[grid](*args, **meta, BLOCK_M=_INTERPRET_BLOCK, BLOCK_N=_INTERPRET_BLOCK)
        else:
            tuned = getattr(k, name + "_tuned")

            def tuned_grid(meta: dict[str, Any]) -> tuple[int]:
                return (math.ceil(rows / meta[tile]) * heads,)

            tuned[tuned_grid](*args, **meta)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``O (Bo, Hq, L, Ev)`` and the log2-domain ``LSE (Bo*Hq, L)``."""
        out = torch.empty(self.Bo, self.H, self.L, self.Ev, dtype=q.dtype, device=q.device)
        lse = torch.empty(self.Bo * self.H, self.L, dtype=self.acc, device=q.device)
        mask = q if self.mask is None else self.mask  # any pointer; never read without a mask
        self.launch(
            "attn_fwd", self.L,
            q, k, v, mask, out, lse,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(self.mask), *_strides4(out),
            self.H, self.L, self.S, self.consts, self.seed, self.dropout_p, self.seq_bucket,
        )  # fmt: skip
        return out, lse

    def backward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        dout: Tensor,
        needs: tuple[bool, bool, bool, bool],
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``dQ``, ``dK``, ``dV``, ``dMask`` (``None`` where not needed) from ``O`` and ``LSE``.

        ``needs`` says which of query, key, value and mask want a gradient; ``dMask`` is
        ``(Bo, Hq, L, S)`` in the accumulator dtype.
        """
        delta = torch.empty_like(lse)
        pre_block = _INTERPRET_BLOCK if _interpreting() else PREPROCESS_BLOCK
        pre_args = (out, dout, delta, *_strides4(out), *_strides4(dout), self.H, self.L)
        pre_meta = {
            "EV": self.Ev, "BLOCK_EV": self.meta["BLOCK_EV"],
            "ACC_DTYPE": self.meta["ACC_DTYPE"], "BLOCK_M": pre_block,
        }  # fmt: skip
        if self.recorded is not None:
            self.recorded.append(("bwd_preprocess", pre_args, pre_meta))
        else:
            grid = (math.ceil(self.L / pre_block) * self.Bo * self.H,)
            _kernels().bwd_preprocess[grid](*pre_args, **pre_meta)
        mask = q if self.mask is None else self.mask
        common = (
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(self.mask), *_strides4(dout),
        )  # fmt: skip
        tail = (self.H, self.L, self.S, self.consts, self.seed, self.dropout_p, self.seq_bucket)
        dq = dk = dv = dmask = None
        if needs[1] or needs[2]:
            dk = torch.empty_like(k, memory_format=torch.contiguous_format)
            dv = torch.empty_like(v, memory_format=torch.contiguous_format)
            self.launch(
                "attn_bwd_dkdv", self.S,
                q, k, v, mask, dout, lse, delta, dk, dv,
                *common, *_strides4(dk), *_strides4(dv), *tail,
            )  # fmt: skip
        if needs[0] or needs[3]:
            dq = torch.empty_like(q, memory_format=torch.contiguous_format)
            # Zeros: causal blocks the kernel skips are never written.
            ds = torch.zeros(self.Bo, self.H, self.L, self.S, dtype=self.acc, device=q.device)
            self.launch(
                "attn_bwd_dq", self.L,
                q, k, v, mask, dout, lse, delta, dq, ds,
                *common, *_strides4(dq), *tail,
                STORE_DS=needs[3],
            )  # fmt: skip
            dmask = ds if needs[3] else None
        return dq, dk, dv, dmask


class _FlashAttention(torch.autograd.Function):
    """Autograd wrapper: saves ``Q, K, V, O, LSE`` (and the mask), recomputes ``P`` backward.

    All tensors 4-D: q ``(Bo, Hq, L, E)``, k ``(Bo, Hk, S, E)``, v ``(Bo, Hk, S, Ev)``,
    mask ``(Bo, Hq, L, S)`` or ``None``; returns ``(Bo, Hq, L, Ev)``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        dropout_p: float,
        is_causal: bool,
        scale: float,
        seed: int,
    ) -> Tensor:
        problem = _Problem(q, k, v, mask, dropout_p, is_causal, scale, seed)
        with _on_device(q):
            out, lse = problem.forward(q, k, v)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.settings = (dropout_p, is_causal, scale, seed)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, mask, out, lse = ctx.saved_tensors
        problem = _Problem(q, k, v, mask, *ctx.settings)
        wants = ctx.needs_input_grad
        needs = (bool(wants[0]), bool(wants[1]), bool(wants[2]), bool(wants[3]))
        with _on_device(q):
            dq, dk, dv, dmask = problem.backward(q, k, v, out, lse, dout, needs)
        if dmask is not None and mask is not None:
            dmask = dmask.to(mask.dtype)
        return dq, dk, dv, dmask, None, None, None, None


def _consts(scale: float, dropout_p: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(qk_scale in the log2 domain, natural scale, 1 / keep probability, log2 e)``.

    Cached per value, dtype and device: a fresh host-to-device copy on every call would
    cost more than a small attention kernel itself.
    """
    key = (scale, dropout_p, dtype, device)
    if key not in _CONSTS:
        if len(_CONSTS) > 64:
            _CONSTS.clear()
        values = [scale * _LOG2E, scale, 1.0 / (1.0 - dropout_p), _LOG2E]
        _CONSTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return _CONSTS[key]


_CONSTS: dict[tuple[float, float, torch.dtype, torch.device], Tensor] = {}


def _on_device(t: Tensor) -> Any:
    """Make ``t``'s GPU the current one: triton launches on the current CUDA device."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _new_seed() -> int:
    """A Philox seed from torch's default generator, so ``torch.manual_seed`` governs dropout.

    Drawn from ``[2**32, 2**62)`` so triton always passes it as int64 (one compiled variant).
    """
    return int(torch.randint(2**32, 2**62, (1,), dtype=torch.int64).item())


def _check_supported(query: Tensor, key: Tensor, value: Tensor) -> None:
    if query.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"triton kernel: query dtype {query.dtype} is not supported; "
            f"use one of {[str(d) for d in _SUPPORTED_DTYPES]}"
        )
    for name, d in (("query/key", key.size(-1)), ("value", value.size(-1))):
        if d > MAX_HEAD_DIM:
            raise ValueError(
                f"triton kernel: {name} head dim {d} exceeds the maximum {MAX_HEAD_DIM}; "
                "use kernel='chunked' or 'reference'"
            )


def _folded(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, enable_gqa: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, tuple[int, ...]] | None:
    """The kernels' 4-D operands ``(q4, k4, v4, mask4, batch)``, or ``None`` if empty.

    Shapes: ``q4 (Bo, Hq, L, E)``, ``k4 (Bo, Hk, S, E)``, ``v4 (Bo, Hk, S, Ev)``,
    ``mask4 (Bo, Hq, L, S)`` or ``None``; ``batch`` is the broadcast batch shape of the
    output ``(..., L, Ev)``. ``None`` when there is nothing to tile (a zero size).

    Raises:
        ValueError: an unsupported dtype, or a head dim above :data:`MAX_HEAD_DIM`.
    """
    L, S, E, Ev = query.size(-2), key.size(-2), query.size(-1), value.size(-1)
    if enable_gqa:
        h_q, h_k = query.size(-3), key.size(-3)
        outer = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
        batch = (*outer, h_q)
    else:
        batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
        h_q = h_k = batch[-1] if batch else 1
        outer = batch[:-1]
    if 0 in (L, S, E, Ev) or math.prod(batch) == 0:
        return None
    _check_supported(query, key, value)

    # Broadcast the batch dims (autograd sums the gradients back) and fold everything left
    # of the heads dim into one: a view whenever the strides allow it.
    q4 = query.expand(*outer, h_q, L, E).reshape(-1, h_q, L, E)  # (Bo, Hq, L, E)
    k4 = key.expand(*outer, h_k, S, E).reshape(-1, h_k, S, E)  # (Bo, Hk, S, E)
    v4 = value.expand(*outer, h_k, S, Ev).reshape(-1, h_k, S, Ev)  # (Bo, Hk, S, Ev)
    if attn_mask is not None and attn_mask.dtype == torch.bool and query.dtype == torch.float64:
        # triton 3.6 fails to compile a bool-mask tile beside fp64 dots (sm_90); the same
        # mask as 0 / -inf added to the scores compiles with every supported version.
        additive = torch.zeros(attn_mask.shape, dtype=torch.float64, device=attn_mask.device)
        attn_mask = additive.masked_fill_(~attn_mask, float("-inf"))
    mask4 = None
    if attn_mask is not None:
        # Not detached: a float mask that requires grad gets dS, summed back by autograd.
        mask4 = attn_mask.expand(*batch, L, S).reshape(-1, h_q, L, S)  # (Bo, Hq, L, S)
    return q4, k4, v4, mask4, tuple(batch)


def triton_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """FlashAttention-2 in Triton, with ``torch.nn.functional.scaled_dot_product_attention``'s API.

    Section 3.2.1, equation 1. Arguments are those of torch's SDPA and arrive validated
    from :func:`transformer.attention.scaled_dot_product_attention`.

    Shapes: query ``(..., L, E)`` (``(..., Hq, L, E)`` with ``enable_gqa``), key
    ``(..., S, E)``, value ``(..., S, Ev)``, attn_mask broadcastable to ``(..., L, S)``
    (bool ``True`` = may attend, float added); returns ``(..., L, Ev)``. Rows with no
    allowed key give zeros and zero gradients.

    Raises:
        ValueError: an unsupported dtype, or a head dim above :data:`MAX_HEAD_DIM`.
    """
    folded = _folded(query, key, value, attn_mask, enable_gqa)
    if folded is None:
        return reference_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
        )
    q4, k4, v4, mask4, batch = folded
    L, E, Ev = query.size(-2), query.size(-1), value.size(-1)
    sm_scale = 1.0 / math.sqrt(E) if scale is None else scale
    seed = _new_seed() if dropout_p > 0.0 else 0
    out = _FlashAttention.apply(q4, k4, v4, mask4, dropout_p, is_causal, sm_scale, seed)
    return out.reshape(*batch, L, Ev)  # (..., L, Ev)


def dropout_keep_mask(
    seed: int, heads: int, L: int, S: int, dropout_p: float, device: torch.device | str
) -> Tensor:
    """The dropout keep-mask the kernel draws for ``seed``: bool ``(heads, L, S)``.

    Head ``i`` is the ``i``-th (flattened batch, query head) pair. Lets tests replay the
    kernel's dropout with plain math; needs the same conditions as the kernel.
    """
    out = torch.empty(heads, L, S, dtype=torch.uint8, device=device)
    block = _INTERPRET_BLOCK if _interpreting() else 64
    grid = (math.ceil(L / block), math.ceil(S / block), heads)
    with _on_device(out):
        _kernels().dropout_keep_mask_kernel[grid](
            out, L, S, seed, dropout_p, BLOCK_M=block, BLOCK_N=block
        )
    return out.bool()


register_kernel("triton", triton_attention, is_available=triton_available, priority=20)
