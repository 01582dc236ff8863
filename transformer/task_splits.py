"""Deterministic train/held-out splits of the built-in tasks, stratified by input length.

A split is deterministic in its seed, and its held-out examples never share a source
with its training examples, so held-out accuracy measures generalisation. Every input
length (:func:`transformer.tasks.source_length`) has a guaranteed share of the training
set, lengths with few sources (the numbers 0..99, strings of one or two letters) are
trained on in full, and the held-out set holds every other length.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from transformer.corpora import Pair, Split
from transformer.tasks import TASKS, task_names

__all__ = ["ALWAYS_TRAINED", "MIN_TRAIN_SHARE", "make_task"]

#: A length with at most this many distinct sources is never held out: it is all training.
ALWAYS_TRAINED = 100
#: Every length gets at least this fraction of an equal share of the training set; a length
#: with fewer distinct sources than that (the one-digit numbers) has them repeated, so the
#: model sees short inputs as often as the share says.
MIN_TRAIN_SHARE = 0.25


def _allocate(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Split ``total`` into integers in proportion to ``weights``, none above its cap.

    Water-filling: a share over its cap is capped and the rest shared again among the
    others; rounding by largest remainder, so the counts sum to ``min(total, sum(caps))``.
    """
    counts = [0] * len(weights)
    open_ = [i for i, cap in enumerate(caps) if cap > 0 and weights[i] > 0]
    left = min(total, sum(caps[i] for i in open_))
    while left > 0 and open_:
        weight = sum(weights[i] for i in open_)
        shares = {i: left * weights[i] / weight for i in open_}
        full = [i for i in open_ if counts[i] + shares[i] >= caps[i]]
        if full:
            for i in full:
                left -= caps[i] - counts[i]
                counts[i] = caps[i]
            open_ = [i for i in open_ if i not in full]
            continue
        floors = {i: int(shares[i]) for i in open_}
        rest = left - sum(floors.values())
        by_remainder = sorted(open_, key=lambda i: (floors[i] - shares[i], i))
        for i in open_:
            counts[i] += floors[i]
        for i in by_remainder[:rest]:
            counts[i] += 1
        left = 0
    return counts


def make_task(
    name: str, *, seed: int = 0, n_train: int | None = None, n_heldout: int | None = None
) -> Split:
    """A deterministic train/held-out split of the built-in task ``name``, stratified by length.

    Each input length (:func:`source_length`) is a stratum. A length with at most
    :data:`ALWAYS_TRAINED` sources is never held out; the held-out examples are shared
    among the other lengths by weight (the number of sources of a length for
    ``numbers`` and ``dates``, equal for the letter tasks). The training examples are
    shared the same way, except that every length first gets
    :data:`MIN_TRAIN_SHARE` of an equal share, so short inputs are trained on as often
    as long ones (at the default sizes: all of 0..99, every string of one or two
    letters); a length with fewer sources than its share has them repeated, so the
    training set may hold a pair more than once. Sources are drawn without replacement
    from one ``random.Random(seed)``, so the two sets are disjoint and the same seed gives
    the same split on every machine.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    task = TASKS[name]
    n_train = task.n_train if n_train is None else n_train
    n_heldout = task.n_heldout if n_heldout is None else n_heldout
    if n_train < 1:
        raise ValueError(f"n_train must be at least 1, got {n_train}")
    if n_heldout < 0:
        raise ValueError(f"n_heldout must be non-negative, got {n_heldout}")
    if n_train + n_heldout > task.universe:
        raise ValueError(
            f"task {name!r} has {task.universe} distinct examples, "
            f"asked for n_train + n_heldout = {n_train + n_heldout}"
        )
    counts = [task.count_of_length(n) for n in task.lengths]
    weights = [float(c) if task.weigh_by_count else 1.0 for c in counts]
    weights = [w / sum(weights) for w in weights]
    held_caps = [0 if c <= ALWAYS_TRAINED else c for c in counts]
    if n_heldout > sum(held_caps):
        raise ValueError(
            f"task {name!r} can hold out at most {sum(held_caps)} examples, asked for {n_heldout}"
        )
    held = _allocate(n_heldout, weights, held_caps)
    floor = MIN_TRAIN_SHARE / len(counts)
    # Training examples per length: a reserved floor each, the rest by weight; repeats are
    # allowed where a length has too few sources.
    reserved = int(floor * n_train)
    rest = _allocate(n_train - reserved * len(counts), weights, [n_train] * len(counts))
    wanted = [reserved + r for r in rest]
    free = [c - h for c, h in zip(counts, held, strict=True)]
    rng = random.Random(seed)
    heldout_pairs: list[Pair] = []
    train_pairs: list[Pair] = []
    for length, n_held, n_wanted, n_free in zip(task.lengths, held, wanted, free, strict=True):
        distinct = min(n_wanted, n_free)
        sources = task.draw_sources(rng, length, n_held + distinct)
        heldout_pairs += [(s, task.to_target(s)) for s in sources[:n_held]]
        trained = [(s, task.to_target(s)) for s in sources[n_held:]]
        # Cycled repeats up to the length's share (none where its sources suffice).
        train_pairs += [trained[i % len(trained)] for i in range(n_wanted)] if trained else []
    # Mixed lengths in any prefix: `evaluate --limit N` scores the first N held-out pairs.
    rng.shuffle(heldout_pairs)
    rng.shuffle(train_pairs)
    return Split(train=tuple(train_pairs), heldout=tuple(heldout_pairs))
