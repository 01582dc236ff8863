"""Data parallelism under torchrun: process group, DistributedDataParallel, batch shards.

* :func:`init_distributed` joins the group torchrun describes in the environment:
  gloo on CPU; on CUDA ``"cpu:gloo,cuda:nccl"``, so device tensors go through NCCL
  and the pickled objects of ``all_gather_object`` through gloo.
* :func:`wrap_data_parallel` hands the model to ``torch.nn.parallel.DistributedDataParallel``,
  which broadcasts rank 0's weights once and averages gradients in buckets while the
  backward pass still runs (no hand-written all-reduce, no extra gradient copy).
* :func:`shard_batch` gives each rank its strided rows of the global batch, like
  ``torch.utils.data.DistributedSampler`` does with indices.
* :func:`sum_over_ranks`, :func:`any_rank`, :func:`gather_objects`, :func:`barrier`:
  every collective on a tensor of the device the group's backend expects.
* Elastic restarts: when ``torchrun --max-restarts`` starts the workers again, each
  joins a process group of its own attempt; the command line then resumes the run from
  its last checkpoint.

Imports the data module only; knows nothing of the recipe, the loop or the files.

Notation: B batch, S source length, T target length.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from transformer.data import Batch

__all__ = [
    "any_rank",
    "barrier",
    "gather_objects",
    "init_distributed",
    "shard_batch",
    "sum_over_ranks",
    "world",
    "wrap_data_parallel",
]


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default ``torch.distributed`` group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; ``(rank, world size)``.

    Reads torchrun's ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (the
    ``env://`` rendezvous). Gloo on CPU; on CUDA the process first takes ``device``
    (its ``LOCAL_RANK``'s GPU), then joins with NCCL for CUDA tensors and gloo for CPU
    ones. Without torchrun (no ``WORLD_SIZE``, or 1) this is a no-op: ``(0, 1)``. After
    torchrun restarted the worker group (``TORCHELASTIC_RESTART_COUNT`` > 0) the group
    is built on keys of that attempt alone (:func:`_fresh_store`).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "gloo"
        # CUDA only: needs torchrun on a machine with several GPUs.
        if device.type == "cuda":  # pragma: no cover
            torch.cuda.set_device(device)
            backend = "cpu:gloo,cuda:nccl"
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart == 0:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, **_fresh_store(restart))
    return dist.get_rank(), dist.get_world_size()


def _fresh_store(restart: int) -> dict[str, Any]:
    """``init_process_group`` arguments for attempt ``restart`` of torchrun's worker group.

    torchrun keeps the store its agent hosts across ``--max-restarts`` attempts, and the
    keys the failed attempt's ranks wrote there (gloo's addresses among them) would send
    the new ranks to dead peers; a prefix per attempt gives each attempt keys of its own.
    """
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=not agent_store and rank == 0,
    )
    return {
        "store": dist.PrefixStore(f"transformer/attempt_{restart}", store),
        "rank": rank,
        "world_size": world_size,
    }


def wrap_data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` under ``DistributedDataParallel`` in a group of several processes, else itself.

    DDP broadcasts rank 0's parameters and buffers at construction (every rank starts
    from the same weights), then all-reduces gradients bucket by bucket during the
    backward pass and divides them by the world size: each rank must therefore
    backpropagate ``world_size`` times its share of the batch-mean loss (see
    :func:`shard_batch`). The model's buffers are constants (positional encodings),
    so they are not re-broadcast before every forward; gradients are views into DDP's
    buckets, which saves the copy between them.
    """
    if world()[1] == 1:
        return model
    # Newer torch calls the switch that re-broadcasts buffers before every forward
    # forward_sync_buffers (broadcast_buffers is deprecated there).
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync: dict[str, Any] = {
        "forward_sync_buffers" if renamed else "broadcast_buffers": False
    }
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        **no_buffer_sync,
    )


def shard_batch(batch: Batch, rank: int, world_size: int, *, pad_id: int) -> Batch | None:
    """Rows ``rank, rank + world_size, ...`` of a global batch, like ``DistributedSampler``.

    Every process draws the same global batch from the same seeded stream and keeps its
    own strided share, with columns that are padding in every kept row cut off; ``None``
    when a small last batch leaves this rank no row. ``n_tokens`` stays the global
    batch's count: it is the divisor that makes the shards' summed losses the batch mean.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_batch: rank must be in [0, {world_size}), got {rank}")
    rows = torch.arange(rank, batch.src.size(0), world_size)
    if rows.numel() == 0:
        return None

    def trim(ids: Tensor) -> Tensor:
        used = (ids != pad_id).any(dim=0).nonzero()
        return ids[:, : int(used.max()) + 1] if used.numel() else ids

    return Batch(
        src=trim(batch.src[rows]),  # (B / world, S')
        tgt_in=trim(batch.tgt_in[rows]),  # (B / world, T')
        tgt_out=trim(batch.tgt_out[rows]),  # (B / world, T')
        n_tokens=batch.n_tokens,
    )


def sum_over_ranks(values: Tensor) -> Tensor:
    """``values`` summed over all ranks, in place (a no-op with one process)."""
    if world()[1] > 1:
        dist.all_reduce(values)
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on one (ranks must stop at the same step)."""
    if world()[1] == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (pickled; gloo carries it, also on CUDA)."""
    world_size = world()[1]
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(device: torch.device) -> None:
    """Wait for every rank: a one-element all-reduce on ``device``.

    A collective on the device's own tensor, rather than ``dist.barrier()``, which on
    a mixed gloo/NCCL group would have to guess the device.
    """
    if world()[1] > 1:
        dist.all_reduce(torch.zeros(1, device=device))
