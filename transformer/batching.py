"""Batches for teacher forcing: padding, the :class:`Batch` and the length-bucketed stream.

The paper's training examples are "batched together by approximate sequence length"
(§5.1); :class:`BucketBatcher` keeps that scheme, reproducibly from a seed.

Notation: B batch, S source length, T target length (in tokens).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Batch", "BucketBatcher", "make_batch", "pad_sequences"]


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int) -> Tensor:
    """Right-pad token id lists with ``pad_id`` into a LongTensor (B, max length)."""
    if not seqs:
        raise ValueError("pad_sequences: got no sequences")
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


@dataclass(frozen=True)
class Batch:
    """A padded batch for teacher forcing (§5.1 batching, §3 decoder input shifted right).

    ``tgt_in`` is ``<bos> y_1 .. y_n`` and ``tgt_out`` is ``y_1 .. y_n <eos>``: the
    decoder reads ``tgt_in`` and is trained to predict ``tgt_out`` at each position.
    """

    #: (B, S) source ids, right-padded.
    src: Tensor
    #: (B, T) decoder input ids, right-padded.
    tgt_in: Tensor
    #: (B, T) next-token targets, right-padded.
    tgt_out: Tensor
    #: Number of non-pad target tokens (what tokens/s counts).
    n_tokens: int


def make_batch(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int,
    bos_id: int,
    eos_id: int,
) -> Batch:
    """Pad ``(source ids, target ids)`` pairs into a :class:`Batch`."""
    src = pad_sequences([s for s, _ in examples], pad_id)
    tgt_in = pad_sequences([[bos_id, *t] for _, t in examples], pad_id)
    tgt_out = pad_sequences([[*t, eos_id] for _, t in examples], pad_id)
    n_tokens = sum(len(t) + 1 for _, t in examples)
    return Batch(src=src, tgt_in=tgt_in, tgt_out=tgt_out, n_tokens=n_tokens)


class BucketBatcher:
    """Endless stream of batches of similar length, reshuffled each epoch from a seed (§5.1).

    Each epoch: shuffle the examples, cut them into pools of ``pool_batches`` batches,
    sort each pool by length and cut it into batches (so a batch holds examples of
    similar length and little padding), then shuffle the batch order. A batch holds
    ``batch_size`` pairs or, with ``batch_tokens``, as many as keep its padded source
    and target tensors at most ``batch_tokens`` tokens each (the paper's batches hold
    about 25000 source and 25000 target tokens, §5.1). The order of
    epoch ``e`` depends only on ``(seed, e)``, so the stream is reproducible and its
    position ``(epoch, position)`` is all a resumed run needs (see ``state_dict``).
    """

    def __init__(
        self,
        examples: Sequence[tuple[Sequence[int], Sequence[int]]],
        batch_size: int,
        *,
        pad_id: int,
        bos_id: int,
        eos_id: int,
        seed: int = 0,
        pool_batches: int = 50,
        batch_tokens: int | None = None,
    ) -> None:
        if not examples:
            raise ValueError("BucketBatcher: got no examples")
        if batch_size < 1:
            raise ValueError(f"BucketBatcher: batch_size must be at least 1, got {batch_size}")
        if pool_batches < 1:
            raise ValueError(f"BucketBatcher: pool_batches must be at least 1, got {pool_batches}")
        if batch_tokens is not None and batch_tokens < 1:
            raise ValueError(
                f"BucketBatcher: batch_tokens must be at least 1 or None, got {batch_tokens}"
            )
        self.examples = [(list(s), list(t)) for s, t in examples]
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.seed = seed
        self.pool_batches = pool_batches
        self.epoch = 0
        self.position = 0
        self._order: list[list[int]] = self.epoch_order(0)

    def epoch_order(self, epoch: int) -> list[list[int]]:
        """Example indices of each batch of ``epoch``, in the order they are served."""
        # A string seed is hashed with SHA-512 by `random`, so it is stable across processes.
        rng = random.Random(f"bucket-batcher:{self.seed}:{epoch}")
        indices = list(range(len(self.examples)))
        rng.shuffle(indices)
        pool = self._pairs_per_batch() * self.pool_batches
        batches: list[list[int]] = []
        for start in range(0, len(indices), pool):
            # Stable sort: equal lengths keep their shuffled order, so ties stay random.
            chunk = sorted(indices[start : start + pool], key=self._length)
            if self.batch_tokens is None:
                batches += [
                    chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)
                ]
            else:
                batches += self._cut_by_tokens(chunk, self.batch_tokens)
        rng.shuffle(batches)
        return batches

    def _pairs_per_batch(self) -> int:
        """Pairs in a typical batch: ``batch_size``, or what ``batch_tokens`` holds on average."""
        if self.batch_tokens is None:
            return self.batch_size
        longest = sum(max(self._padded(i)) for i in range(len(self.examples)))
        return max(1, self.batch_tokens * len(self.examples) // max(longest, 1))

    def _padded(self, index: int) -> tuple[int, int]:
        """Tokens of example ``index`` in a batch: source, and target with its <bos>/<eos>."""
        src, tgt = self.examples[index]
        return (len(src), len(tgt) + 1)

    def _cut_by_tokens(self, chunk: list[int], limit: int) -> list[list[int]]:
        """Cut length-sorted ``chunk`` into runs whose padded source and target tensors
        (rows times longest row) each hold at most ``limit`` tokens (§5.1); a pair longer
        than ``limit`` on its own gets a batch alone.
        """
        batches: list[list[int]] = []
        current: list[int] = []
        longest_src = longest_tgt = 0
        for index in chunk:
            src_len, tgt_len = self._padded(index)
            rows = len(current) + 1
            src_max, tgt_max = max(longest_src, src_len), max(longest_tgt, tgt_len)
            if current and (rows * src_max > limit or rows * tgt_max > limit):
                batches.append(current)
                current, src_max, tgt_max = [], src_len, tgt_len
            current.append(index)
            longest_src, longest_tgt = src_max, tgt_max
        if current:
            batches.append(current)
        return batches

    def _length(self, index: int) -> tuple[int, int]:
        src, tgt = self.examples[index]
        return (len(tgt), len(src))

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self.epoch_order(self.epoch)
        indices = self._order[self.position]
        self.position += 1
        return make_batch(
            [self.examples[i] for i in indices],
            pad_id=self.pad_id,
            bos_id=self.bos_id,
            eos_id=self.eos_id,
        )

    def state_dict(self) -> dict[str, int]:
        """Position in the stream: ``{"epoch": e, "position": batches served in epoch e}``."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the stream exactly where ``state_dict`` was taken."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0:
            raise ValueError(f"BucketBatcher: invalid state {state!r}")
        self.epoch, self.position = epoch, position
        self._order = self.epoch_order(epoch)
