"""The ``"triton"`` attention kernel: FlashAttention-2 written from scratch in Triton.

Computes equation 1 of "Attention Is All You Need" (section 3.2.1),
``softmax(Q K^T / sqrt(d_k) + mask) V``, tile by tile with an online softmax, so the
``(L, S)`` score matrix is never stored; the backward pass recomputes it blockwise from
each row's saved max and ``1 / l`` (Dao, "FlashAttention-2", 2023, saves their
log-sum-exp instead). The kernels themselves
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
random bits regenerated in the backward pass; torch's attention-bias objects
``causal_upper_left(L, S)`` (the ``is_causal`` path) and ``causal_lower_right(L, S)``
(causal with diagonal offset ``S - L``, fully masked key blocks skipped); the gradient of
a float ``attn_mask`` that requires grad (the score gradient ``dS``, summed over the
mask's broadcast dims by a pass of its own, see below).

Memory: O(L + S) per (batch, head) in the forward and the backward pass alike. Besides
the inputs' and outputs' sizes, the only tensors created are the per-row statistics
(the max ``m`` and ``1 / l``, and ``D = rowsum(dO * O)``: ``L`` each per head); the
backward pass recomputes ``P``
tile by tile, as FlashAttention-2 does (algorithm 2): one kernel owns a key block and
accumulates ``dK``, ``dV`` over query blocks, another owns a query block and accumulates
``dQ`` over key blocks, both on chip, so no ``(L, S)`` buffer exists. The one
exception is asked for by the caller: a float mask that requires grad gets its
gradient, which a separate kernel fills tile by tile, summing ``dS`` over the dims the
mask broadcasts along; it has the mask's own shape (``L x S`` only when the mask itself
is ``(..., L, S)``), or all the outer batch dims where the mask varies along some of
them and broadcasts along others (summed there by torch). An fp64 call with a bool
mask also converts that mask to an additive one of the same shape (see :func:`_folded`).

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
import functools
import importlib.util
import math
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from transformer.attention import reference_attention, register_kernel

if TYPE_CHECKING:
    from torch.nn.attention.bias import CausalBias

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


@functools.cache
def _triton_installed() -> bool:
    # Asked at every kernel=None call; a path search each time cost ~0.2 ms per call.
    return importlib.util.find_spec("triton") is not None


def triton_available(device: torch.device) -> bool:
    """Whether the ``"triton"`` kernel can run on ``device``.

    True when triton is installed and the device is CUDA, or the CPU with
    ``TRITON_INTERPRET=1``. Checks the installation without importing triton (once per
    process: installing triton into a running interpreter is not seen).
    """
    if not _triton_installed():
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
    """Sizes, compile-time switches and launch helpers shared by the passes.

    Tensors are 4-D: query ``(Bo, Hq, L, E)``, key ``(Bo, Hk, S, E)``, value
    ``(Bo, Hk, S, Ev)``, mask ``(Bo, Hq, L, S)`` (any strides, 0 included). With
    ``is_causal``, query ``i`` may attend key ``j`` iff ``j <= i + causal_offset``.
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
        causal_offset: int = 0,
    ) -> None:
        self.Bo, self.H, self.L, self.E = q.shape
        self.S, self.Ev = k.size(2), v.size(3)
        self.group = self.H // k.size(1)
        self.dropout_p, self.seed = dropout_p, seed
        self.causal_offset = causal_offset if is_causal else 0
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

    def launch(
        self, name: str, programs: Callable[[int, int], int], *args: Any, **extra: Any
    ) -> None:
        """Run kernel ``name`` on a 1-D grid of ``programs(BLOCK_M, BLOCK_N)`` programs.

        Under the interpreter: the plain kernel with one small fixed tile. On a GPU: the
        autotuned kernel, the grid computed from whichever tile it picks. ``extra`` adds
        kernel-specific compile-time switches to :attr:`meta`.
        """
        meta = {**self.meta, **extra}
        if self.recorded is not None:
            self.recorded.append((name, args, meta))
            return
        k = _kernels()
        if _interpreting():
            fn = getattr(k, name)
            grid = (programs(_INTERPRET_BLOCK, _INTERPRET_BLOCK),)
            fn[grid](*args, **meta, BLOCK_M=_INTERPRET_BLOCK, BLOCK_N=_INTERPRET_BLOCK)
        else:
            tuned = getattr(k, name + "_tuned")

            def tuned_grid(meta: dict[str, Any]) -> tuple[int]:
                return (programs(meta["BLOCK_M"], meta["BLOCK_N"]),)

            tuned[tuned_grid](*args, **meta)

    def _tail(self) -> tuple[Any, ...]:
        """The scalar arguments every attention kernel ends with."""
        return (
            self.H, self.L, self.S, self.causal_offset,
            self.consts, self.seed, self.dropout_p, self.seq_bucket,
        )  # fmt: skip

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``O (Bo, Hq, L, Ev)`` and ``stats (Bo*Hq, 2, L)``: each row's max (log2), ``1 / l``."""
        out = torch.empty(self.Bo, self.H, self.L, self.Ev, dtype=q.dtype, device=q.device)
        stats = torch.empty(self.Bo * self.H, 2, self.L, dtype=self.acc, device=q.device)
        mask = q if self.mask is None else self.mask  # any pointer; never read without a mask
        heads = self.Bo * self.H
        self.launch(
            "attn_fwd", lambda m, n: math.ceil(self.L / m) * heads,
            q, k, v, mask, out, stats,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(self.mask), *_strides4(out),
            *self._tail(),
        )  # fmt: skip
        return out, stats

    def backward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        stats: Tensor,
        dout: Tensor,
        needs: tuple[bool, bool, bool],
        dmask_shape: tuple[int, int, int, int] | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``dQ``, ``dK``, ``dV``, ``dMask`` (``None`` where not needed) from ``O`` and ``stats``.

        ``needs`` says which of query, key and value want a gradient. ``dmask_shape``
        ``(GB, GH, GL, GS)``, given when the float mask wants one, is the mask's shape
        folded like the scores: each entry is ``1`` (summed over) or the full size of
        ``(Bo, Hq, L, S)``. ``dMask`` has that shape, in the accumulator dtype, and is the
        only tensor here that can be ``L x S`` (when the mask itself is).
        """
        delta = torch.empty(self.Bo * self.H, self.L, dtype=self.acc, device=q.device)
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
        saved = (q, k, v, mask, dout, stats, delta)
        dq = dk = dv = dmask = None
        if needs[1] or needs[2]:
            dk = torch.empty_like(k, memory_format=torch.contiguous_format)
            dv = torch.empty_like(v, memory_format=torch.contiguous_format)
            kv_heads = self.Bo * (self.H // self.group)
            self.launch(
                "attn_bwd_dkdv", lambda m, n: math.ceil(self.S / n) * kv_heads,
                *saved, dk, dv, *common, *_strides4(dk), *_strides4(dv), *self._tail(),
            )  # fmt: skip
        if needs[0]:
            dq = torch.empty_like(q, memory_format=torch.contiguous_format)
            heads = self.Bo * self.H
            self.launch(
                "attn_bwd_dq", lambda m, n: math.ceil(self.L / m) * heads,
                *saved, dq, *common, *_strides4(dq), *self._tail(),
            )  # fmt: skip
        if dmask_shape is not None:
            gb, gh, gl, gs = dmask_shape
            dmask = torch.empty(dmask_shape, dtype=self.acc, device=q.device)
            self.launch(
                "attn_bwd_dmask", lambda m, n: gb * gh * math.ceil(gl / m) * math.ceil(gs / n),
                *saved, dmask, *common, *self._tail(), self.Bo, gb, gh,
                SUM_L=gl == 1, SUM_S=gs == 1,
            )  # fmt: skip
        return dq, dk, dv, dmask


class _FlashAttention(torch.autograd.Function):
    """Autograd wrapper: saves ``Q, K, V, O``, two numbers per row and the mask; recomputes ``P``.

    q ``(Bo, Hq, L, E)``, k ``(Bo, Hk, S, E)``, v ``(Bo, Hk, S, Ev)``; the mask comes
    unfolded, broadcastable to ``(*batch, L, S)`` (``batch`` folds to ``(Bo, Hq)``), so
    that its gradient is summed over its broadcast dims in the kernel, never expanded
    to ``(Bo, Hq, L, S)`` first. Returns ``(Bo, Hq, L, Ev)``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        batch: tuple[int, ...],
        dropout_p: float,
        is_causal: bool,
        causal_offset: int,
        scale: float,
        seed: int,
    ) -> Tensor:
        mask4 = _fold_mask(mask, batch, q.size(2), k.size(2))
        problem = _Problem(q, k, v, mask4, dropout_p, is_causal, scale, seed, causal_offset)
        with _on_device(q):
            out, stats = problem.forward(q, k, v)
        ctx.save_for_backward(q, k, v, mask, out, stats)
        ctx.settings = (dropout_p, is_causal, scale, seed, causal_offset)
        ctx.batch = batch
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, mask, out, stats = ctx.saved_tensors
        L, S = q.size(2), k.size(2)
        problem = _Problem(q, k, v, _fold_mask(mask, ctx.batch, L, S), *ctx.settings)
        wants = ctx.needs_input_grad
        needs = (bool(wants[0]), bool(wants[1]), bool(wants[2]))
        dmask_shape = None
        if wants[3] and mask is not None:
            dmask_shape = _mask_grad_shape(mask.shape, ctx.batch)
        with _on_device(q):
            dq, dk, dv, dmask = problem.backward(q, k, v, out, stats, dout, needs, dmask_shape)
        if dmask is not None and mask is not None:
            dmask = _unfold_mask_grad(dmask, mask.shape, ctx.batch).to(mask.dtype)
        return dq, dk, dv, dmask, None, None, None, None, None, None


def _fold_mask(mask: Tensor | None, batch: tuple[int, ...], L: int, S: int) -> Tensor | None:
    """A mask broadcastable to ``(*batch, L, S)`` as the kernels' ``(Bo, Hq, L, S)``.

    A view through stride-0 dims wherever the strides allow it (always for a mask
    broadcast over every dim left of the heads dim).
    """
    if mask is None:
        return None
    h_q = batch[-1] if batch else 1
    return mask.expand(*batch, L, S).reshape(-1, h_q, L, S)  # (Bo, Hq, L, S)


def _mask_grad_shape(
    mask_shape: tuple[int, ...] | torch.Size, batch: tuple[int, ...]
) -> tuple[int, int, int, int]:
    """``(GB, GH, GL, GS)``: the shape the kernel writes a mask's gradient in.

    The mask's own sizes for heads, rows and columns (``1`` where it broadcasts, so the
    kernel sums ``dS`` there); ``1`` for the folded outer batch when the mask broadcasts
    over all of it, else ``Bo`` (the leftover sum runs in :func:`_unfold_mask_grad`).
    """
    full = (1,) * (len(batch) + 2 - len(mask_shape)) + tuple(mask_shape)
    outer, heads = full[: max(len(batch) - 1, 0)], full[-3] if batch else 1
    bo = math.prod(batch[:-1]) if batch else 1
    return (1 if math.prod(outer) == 1 else bo), heads, full[-2], full[-1]


def _unfold_mask_grad(
    dmask: Tensor, mask_shape: tuple[int, ...] | torch.Size, batch: tuple[int, ...]
) -> Tensor:
    """The kernel's ``(GB, GH, GL, GS)`` gradient as the gradient of the mask itself.

    Outer batch dims the mask broadcasts over but the kernel kept (``GB = Bo``: the mask
    varies along some other outer dim) are summed here; otherwise this is a view.
    """
    gb, gh, gl, gs = dmask.shape
    outer = batch[:-1] if gb > 1 else (1,) * max(len(batch) - 1, 0)
    full = (1,) * (len(batch) + 2 - len(mask_shape)) + tuple(mask_shape)
    grad = dmask.reshape(*outer, *((gh,) if batch else ()), gl, gs)  # (*outer, GH, GL, GS)
    return grad.sum_to_size(full).reshape(mask_shape)


def _consts(scale: float, dropout_p: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(qk_scale in the log2 domain, natural scale, 1 / keep probability, log2 e, floor)``.

    ``floor``: the lowest float-mask value kept finite in the log2 domain,
    ``-finfo.max / log2(e)`` less a margin for the score added to it.

    Cached per value, dtype and device: a fresh host-to-device copy on every call would
    cost more than a small attention kernel itself.
    """
    key = (scale, dropout_p, dtype, device)
    if key not in _CONSTS:
        if len(_CONSTS) > 64:
            _CONSTS.clear()
        floor = -torch.finfo(dtype).max / _LOG2E * (1.0 - 2.0**-10)
        values = [scale * _LOG2E, scale, 1.0 / (1.0 - dropout_p), _LOG2E, floor]
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
    """The kernels' 4-D operands ``(q4, k4, v4, mask, batch)``, or ``None`` if empty.

    Shapes: ``q4 (Bo, Hq, L, E)``, ``k4 (Bo, Hk, S, E)``, ``v4 (Bo, Hk, S, Ev)``;
    ``batch`` is the broadcast batch shape of the output ``(..., L, Ev)``; ``mask`` is
    ``attn_mask`` as the kernels read it (an fp64 call's bool mask made additive), still
    unfolded: broadcastable to ``(*batch, L, S)`` (:func:`_fold_mask` folds it).
    ``None`` when there is nothing to tile (a zero size).

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
    return q4, k4, v4, attn_mask, tuple(batch)


def triton_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | CausalBias | None = None,
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

    ``attn_mask`` may also be a torch ``CausalBias`` for ``(L, S)``, applied natively as
    torch defines it: ``causal_upper_left`` is ``is_causal=True``; ``causal_lower_right``
    lets query ``i`` attend key ``j`` iff ``j <= i + S - L`` (the first ``L - S`` rows
    of a problem with ``L > S`` see no key: zeros, zero gradients).

    Raises:
        ValueError: an unsupported dtype, a head dim above :data:`MAX_HEAD_DIM`, a
            ``CausalBias`` together with ``is_causal=True`` (torch refuses it too) or one
            made for other lengths than ``(L, S)``.
    """
    L, S = query.size(-2), key.size(-2)
    bias = _causal_bias(attn_mask)
    tensor_mask = None if bias is not None else attn_mask  # (a CausalBias is a Tensor subclass)
    offset = 0 if bias is None else _bias_offset(bias, L, S, is_causal)
    folded = _folded(query, key, value, tensor_mask, enable_gqa)
    if folded is None:
        # Nothing to tile: the reference gives the zeros; a bias goes as its plain mask.
        if bias is not None:
            from transformer.masks import causal_bias_mask

            tensor_mask = causal_bias_mask(bias, query.device)
        return reference_attention(
            query, key, value, tensor_mask, dropout_p, is_causal, scale, enable_gqa
        )
    is_causal = is_causal or bias is not None
    q4, k4, v4, mask, batch = folded
    E, Ev = query.size(-1), value.size(-1)
    sm_scale = 1.0 / math.sqrt(E) if scale is None else scale
    seed = _new_seed() if dropout_p > 0.0 else 0
    out = _FlashAttention.apply(
        q4, k4, v4, mask, batch, dropout_p, is_causal, offset, sm_scale, seed
    )
    return out.reshape(*batch, L, Ev)  # (..., L, Ev)


def _causal_bias(mask: object) -> CausalBias | None:
    """``mask`` if it is a torch ``CausalBias``, else ``None``.

    Looked up in ``sys.modules`` rather than imported: a bias object exists only once its
    module is loaded, and importing ``torch.nn.attention.bias`` here would import triton
    with it (torch pulls triton in there), which this module must not do at import.
    """
    module = sys.modules.get("torch.nn.attention.bias")
    return mask if module is not None and isinstance(mask, module.CausalBias) else None


def _bias_offset(bias: CausalBias, L: int, S: int, is_causal: bool) -> int:
    """The causal diagonal offset a torch ``CausalBias`` stands for.

    See :func:`transformer.masks.causal_offset`: ``0`` for upper-left, ``S - L`` for
    lower-right.

    Raises:
        ValueError: ``is_causal`` is also set, or the bias was made for other lengths.
    """
    from transformer.masks import causal_offset  # see _causal_bias: masks reads the bias

    if is_causal:
        raise ValueError("triton kernel: attn_mask is a CausalBias; is_causal must be False")
    if (bias.seq_len_q, bias.seq_len_kv) != (L, S):
        raise ValueError(
            f"triton kernel: attn_mask is a CausalBias for (L, S) = "
            f"({bias.seq_len_q}, {bias.seq_len_kv}) but the query and key give ({L}, {S})"
        )
    return causal_offset(bias)


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
