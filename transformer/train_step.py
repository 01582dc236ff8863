"""One training step: forward and backward of this rank's share of each accumulated batch,
the gradients all-reduced once per step by DistributedDataParallel (see
:func:`transformer.train_loop.train`).

Notation: B batch, S source length, T target length, V vocabulary size.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from transformer.data import Batch
from transformer.distributed import (
    shard_batch,
    sum_over_ranks,
    world,
)
from transformer.precision import autocast
from transformer.recipe import sequence_loss
from transformer.train_config import TrainConfig

__all__ = ["forward_backward", "step_losses", "sync_gradients"]


def forward_backward(
    net: nn.Module,
    batch: Batch,
    shard: Batch | None,
    *,
    config: TrainConfig,
    pad_id: int,
    device: torch.device,
    scaler: torch.amp.GradScaler,
    step_tokens: int | None = None,
) -> Tensor:
    """Forward and backward of this rank's share of ``batch``; its losses, (2,) float64.

    One process divides by its own token count (torch's mean, bit-stable); with several,
    each divides its summed loss by the global count, so the ranks' losses add up to
    the batch mean, and backpropagates ``world_size`` times that, since DDP averages
    the ranks' gradients. A rank that a small last batch leaves no row still runs
    rank 0's rows with weight 0: DDP's all-reduce needs every rank's backward.
    ``step_tokens``, when one step accumulates several batches, is the token count of
    all of them: each batch's summed loss is divided by it, so the gradients add up to
    those of the mean loss of one batch holding them all.
    """
    world_size = world()[1]
    part = shard if shard is not None else shard_batch(batch, 0, world_size, pad_id=pad_id)
    assert part is not None  # rank 0 always has a row
    src, tgt_in, tgt_out = part.src.to(device), part.tgt_in.to(device), part.tgt_out.to(device)
    if step_tokens is not None:
        divisor: int | None = step_tokens
    else:
        divisor = batch.n_tokens if world_size > 1 else None
    with autocast(device, config.autocast):
        logits = net(src, tgt_in)  # (B', T', V)
        loss = sequence_loss(
            logits,
            tgt_out,
            pad_id=pad_id,
            label_smoothing=config.label_smoothing,
            num_tokens=divisor,
        )
    weight = float(world_size) if shard is not None else 0.0
    scaler.scale(loss if weight == 1.0 else loss * weight).backward()
    with torch.no_grad():
        nll = sequence_loss(logits.detach().float(), tgt_out, pad_id=pad_id, num_tokens=divisor)
    losses = torch.stack([loss.detach().float(), nll]).double()  # (2,)
    return losses if shard is not None else torch.zeros_like(losses)


def sync_gradients(net: nn.Module, *, last: bool) -> AbstractContextManager[Any]:
    """DDP's ``no_sync`` for every accumulated batch but the last one of a step.

    Gradients then add up locally and are all-reduced once per optimizer step, as
    ``DistributedDataParallel`` documents for accumulation, not once per batch.
    """
    if last or not isinstance(net, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return net.no_sync()


def step_losses(
    net: nn.Module,
    batches: list[Batch],
    *,
    config: TrainConfig,
    pad_id: int,
    device: torch.device,
    scaler: torch.amp.GradScaler,
) -> Tensor:
    """Forward and backward of the ``accumulate`` batches of one step; their summed losses
    over all ranks, (2,) float64 on the CPU. The gradients are all-reduced once, after
    the last batch."""
    rank, world_size = world()
    step_tokens = sum(b.n_tokens for b in batches)
    summed: Tensor | None = None
    for i, batch in enumerate(batches):
        shard = shard_batch(batch, rank, world_size, pad_id=pad_id) if world_size > 1 else batch
        with sync_gradients(net, last=i == len(batches) - 1):
            part = forward_backward(
                net,
                batch,
                shard,
                config=config,
                pad_id=pad_id,
                device=device,
                scaler=scaler,
                step_tokens=step_tokens if len(batches) > 1 else None,
            )
        summed = part if summed is None else summed + part
    assert summed is not None  # accumulate >= 1
    return sum_over_ranks(summed).cpu()
