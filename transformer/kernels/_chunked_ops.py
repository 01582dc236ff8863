"""The chunked kernel as an autograd function and as a pair of ``torch.library`` operators.

Eager calls go through :class:`ChunkedAttention`; under ``torch.compile`` the kernel is
the custom operators ``transformer::chunked_attention_forward`` and ``_backward``, which
run the same passes (:mod:`transformer.kernels._chunked_tiles`) over the same worker
threads (:mod:`transformer.kernels._chunked_threads`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from transformer.kernels._chunked_threads import run_units, split_by_chunk, worker_count
from transformer.kernels._chunked_tiles import (
    Grads,
    Problem,
    Unit,
    backward_units,
    forward_units,
)

__all__ = ["ChunkedAttention", "draw_seed", "forward_op"]


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast disabled on ``device`` while the tiles run.

    Autocast is per thread: left on, the tile gemms of a call in the calling thread
    would run in low precision (and the in-place accumulations refuse their mixed
    dtypes), while the same call split over worker threads would not. The kernel does
    its own precision: fp16/bf16 inputs are computed in fp32.
    """
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    mask_index: Tensor | None,
    causal: int | None,
    scale: float,
    dropout_p: float,
    seed: int,
    block_l: int,
    block_s: int,
    tile_elements: int,
) -> tuple[Tensor, Tensor]:
    """Online-softmax forward pass over all units: ``(out, stats)``.

    Shapes: ``q (N, g, L, E)``, ``k (N, S, E)``, ``v (N, S, Ev)``, mask ``(M, g', L', S')``;
    returns ``out (N, g, L, Ev)`` and ``stats (2, N, g, L)``: each row's final score max
    (base 2) and ``1 / l``, its reciprocal softmax denominator.
    """
    pb = Problem(
        q, k, v, mask, mask_index, causal, scale, dropout_p, seed, block_l, block_s, tile_elements
    )
    N, g, L, _ = q.shape
    S, Ev = k.shape[1], v.shape[2]
    out = q.new_empty(N, g, L, Ev)
    stats = q.new_empty(2, N, g, L)
    units = pb.units()
    with _autocast_off(q.device):
        run_units(
            units,
            N * g * L * S,
            lambda part, w: forward_units(pb, part, out, stats),
            False,
            pb.cost,
        )
    return out, stats


def _backward(
    pb: Problem, d_out: Tensor, out: Tensor, stats: Tensor, want_dmask: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """FlashAttention-2's backward pass over all units: ``(dq, dk, dv, dmask)``.

    Shapes: ``d_out``/``out (N, g, L, Ev)``, ``stats (2, N, g, L)``; returns ``dq (N, g, L, E)``,
    ``dk (N, S, E)``, ``dv (N, S, Ev)`` and ``dmask`` of the mask's shape (or ``None``).
    """
    N, g, L, _ = pb.q.shape
    S = pb.k.shape[1]
    d_out = d_out.contiguous()
    # rowsum(dO * O) = rowsum(dP * P): the softmax backward's correction, dropout included.
    delta = (d_out * out).sum(dim=-1)  # (N, g, L)
    units = pb.units()
    by_chunk = split_by_chunk(units)
    workers = worker_count()
    mask = pb.mask

    def zeros(shared: Grads | None) -> Grads:
        # dq rows never overlap between workers; dk/dv/dmask may unless split by chunk.
        return Grads(
            shared.dq if shared else torch.zeros_like(pb.q),
            shared.dk_t if shared and by_chunk else pb.k.new_zeros(N, pb.k.shape[2], S),
            shared.dv_t if shared and by_chunk else pb.v.new_zeros(N, pb.v.shape[2], S),
            torch.zeros(mask.shape, dtype=pb.q.dtype, device=pb.q.device)
            if want_dmask and mask is not None
            else None,
        )

    grads = [zeros(None)]
    grads += [zeros(grads[0]) for _ in range(1, workers)]

    def work(part: list[Unit], w: int) -> None:
        backward_units(pb, part, d_out, delta, stats, grads[w])

    with _autocast_off(pb.q.device):
        used = run_units(units, N * g * L * S, work, by_chunk, pb.cost)
    total = grads[0]
    for extra in grads[1:used]:
        if not by_chunk:
            total.dk_t.add_(extra.dk_t)
            total.dv_t.add_(extra.dv_t)
        if total.dmask is not None and extra.dmask is not None:
            total.dmask.add_(extra.dmask)
    dmask = None if total.dmask is None or mask is None else total.dmask.to(mask.dtype)
    dk = total.dk_t.transpose(1, 2).contiguous()  # (N, S, E)
    dv = total.dv_t.transpose(1, 2).contiguous()  # (N, S, Ev)
    return total.dq, dk, dv, dmask


class ChunkedAttention(torch.autograd.Function):
    """Eager mode: online-softmax attention; the backward recomputes tiles from saved rows.

    It saves only ``(q, k, v, out, stats)`` (and the mask), never an ``(L, S)`` tensor.

    Eager calls run the tile ops in the open (a ``TorchDispatchMode`` sees each one);
    compiled ones go through the custom operators below, which share the same code.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        mask_index: Tensor | None,
        causal: int | None,
        scale: float,
        dropout_p: float,
        seed: int,
        block_l: int,
        block_s: int,
        tile_elements: int,
    ) -> Tensor:
        """``q (N, g, L, E)``, ``k (N, S, E)``, ``v (N, S, Ev)``, mask ``(M, g', L', S')``."""
        config = (causal, scale, dropout_p, seed, block_l, block_s, tile_elements)
        out, stats = _forward(q, k, v, mask, mask_index, *config)
        ctx.save_for_backward(q, k, v, out, stats, mask, mask_index)
        ctx.config = config
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, d_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, stats, mask, mask_index = ctx.saved_tensors
        pb = Problem(q, k, v, mask, mask_index, *ctx.config)
        want_dmask = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]
        dq, dk, dv, dmask = _backward(pb, d_out, out, stats, want_dmask)
        return dq, dk, dv, dmask, None, None, None, None, None, None, None, None


# Under torch.compile the kernel is two custom operators with an autograd formula:
# the compiler (fullgraph included) keeps each as one opaque op of known output shape
# instead of tracing the tile loops, the thread pool and the dropout seed, which it cannot.


@torch.library.custom_op(
    "transformer::chunked_attention_forward",
    mutates_args=(),
    tags=(torch.Tag.nondeterministic_seeded,),  # draws the dropout seed: never merge calls
)
def forward_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    mask_index: Tensor | None,
    causal: int | None,
    scale: float,
    dropout_p: float,
    block_l: int,
    block_s: int,
    tile_elements: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_forward` plus the dropout seed it drew, a 0-dim int64 tensor (0 without dropout)."""
    seed = draw_seed(dropout_p)
    out, stats = _forward(
        q, k, v, mask, mask_index, causal, scale, dropout_p, seed, block_l, block_s, tile_elements
    )
    return out, stats, torch.tensor(seed, dtype=torch.int64)


@forward_op.register_fake
def _forward_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    mask_index: Tensor | None,
    causal: int | None,
    scale: float,
    dropout_p: float,
    block_l: int,
    block_s: int,
    tile_elements: int,
) -> tuple[Tensor, Tensor, Tensor]:
    N, g, L, _ = q.shape
    out = q.new_empty(N, g, L, v.shape[2])
    return out, q.new_empty(2, N, g, L), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("transformer::chunked_attention_backward", mutates_args=())
def _backward_op(
    d_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    stats: Tensor,
    seed: Tensor,
    mask: Tensor | None,
    mask_index: Tensor | None,
    causal: int | None,
    scale: float,
    dropout_p: float,
    block_l: int,
    block_s: int,
    tile_elements: int,
    want_dmask: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_backward`; ``dmask`` is empty ``(0,)`` unless ``want_dmask`` (ops return tensors)."""
    config = (causal, scale, dropout_p, int(seed.item()), block_l, block_s, tile_elements)
    pb = Problem(q, k, v, mask, mask_index, *config)
    dq, dk, dv, dmask = _backward(pb, d_out, out, stats, want_dmask)
    return dq, dk, dv, q.new_empty(0) if dmask is None else dmask


@_backward_op.register_fake
def _backward_fake(
    d_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    stats: Tensor,
    seed: Tensor,
    mask: Tensor | None,
    mask_index: Tensor | None,
    causal: int | None,
    scale: float,
    dropout_p: float,
    block_l: int,
    block_s: int,
    tile_elements: int,
    want_dmask: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dmask = mask.new_empty(mask.shape) if want_dmask and mask is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    q, k, v, mask, mask_index, causal, scale, dropout_p, block_l, block_s, tile_elements = inputs
    out, stats, seed = output
    ctx.save_for_backward(q, k, v, out, stats, seed, mask, mask_index)
    ctx.config = (causal, scale, dropout_p, block_l, block_s, tile_elements)


def _op_backward(
    ctx: Any, d_out: Tensor, d_stats: Tensor | None, d_seed: Tensor | None
) -> tuple[Tensor | None, ...]:
    """Only ``out`` is differentiable: ``stats`` and the seed are the backward's own inputs."""
    q, k, v, out, stats, seed, mask, mask_index = ctx.saved_tensors
    want_dmask = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = _backward_op(
        d_out, q, k, v, out, stats, seed, mask, mask_index, *ctx.config, want_dmask
    )
    return dq, dk, dv, dmask if want_dmask else None, None, None, None, None, None, None, None


forward_op.register_autograd(_op_backward, setup_context=_setup_context)


def draw_seed(dropout_p: float) -> int:
    """The call's dropout seed: one draw from the global generator (``torch.manual_seed``)."""
    # On the CPU whatever the default device (a meta tensor holds no value to read).
    return int(torch.randint(0, 2**62, (1,), device="cpu").item()) if dropout_p > 0.0 else 0
