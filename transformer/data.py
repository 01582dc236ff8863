"""Data for the sequence-to-sequence model: built-in tasks, TSV corpora, bucketed batches.

The paper trains on WMT parallel corpora "batched together by approximate sequence
length" (§5.1). We keep that batching scheme and replace the corpora by small tasks
that are generated locally from a seed, so nothing is downloaded at run time:

* ``copy``, ``reverse``, ``sort``: space-separated letters, mapped to themselves, to
  their reverse, to their sorted order (the classic sanity checks of a seq2seq model);
* ``numbers``: an integer 0..9999 in digits to its English words
  (``"4213"`` -> ``"four thousand two hundred thirteen"``), a small translation task
  with real structure (word order, teens, tens, missing zeros);
* ``dates``: an ISO date to words (``"2024-03-07"`` ->
  ``"seventh of march two thousand twenty four"``).

A user's own corpus is a TSV file, one ``source<TAB>target`` pair per line.

Every split is deterministic in its seed, and the held-out examples of a split never
share a source with its training examples, so held-out accuracy measures generalisation.
A built-in split is stratified by input length (:func:`source_length`): every length
has a guaranteed share of the training set, lengths with few sources (the numbers
0..99, strings of one or two letters) are trained on in full, and the held-out set
holds every other length.

Notation: B batch, S source length, T target length (in tokens).
"""

from __future__ import annotations

import datetime
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "TASKS",
    "Batch",
    "BucketBatcher",
    "Pair",
    "Split",
    "Task",
    "date_to_words",
    "make_batch",
    "make_task",
    "number_to_words",
    "pad_sequences",
    "read_tsv",
    "source_length",
    "split_heldout",
    "task_names",
]

#: One example: (source text, target text).
Pair = tuple[str, str]

# --------------------------------------------------------------------------- words

_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
]  # fmt: skip
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_ORDINAL_ONES = [
    "_", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
    "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth",
    "seventeenth", "eighteenth", "nineteenth",
]  # fmt: skip
_ORDINAL_TENS = {20: "twentieth", 30: "thirtieth"}
_MONTHS = [
    "january", "february", "march", "april", "may", "june", "july", "august", "september",
    "october", "november", "december",
]  # fmt: skip


def _below_thousand(n: int) -> list[str]:
    """Words of ``1 <= n <= 999`` (no "and", no hyphens: "one hundred twenty one")."""
    words: list[str] = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        words += [_ONES[hundreds], "hundred"]
    if rest >= 20:
        tens, ones = divmod(rest, 10)
        words.append(_TENS[tens])
        if ones:
            words.append(_ONES[ones])
    elif rest:
        words.append(_ONES[rest])
    return words


def number_to_words(n: int) -> str:
    """English words of an integer ``0 <= n < 1_000_000``, US style, lower case.

    ``0`` -> ``"zero"``, ``4213`` -> ``"four thousand two hundred thirteen"``,
    ``1001`` -> ``"one thousand one"``; no "and" and no hyphens, so every word is
    one whitespace-separated token.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"number_to_words: n must be an int, got {type(n).__name__}")
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_to_words: n must be in [0, 999999], got {n}")
    if n == 0:
        return "zero"
    thousands, rest = divmod(n, 1000)
    words = [*_below_thousand(thousands), "thousand"] if thousands else []
    return " ".join(words + (_below_thousand(rest) if rest else []))


def _ordinal_words(day: int) -> str:
    """Ordinal words of a day of the month 1..31 ("twenty first", "thirtieth")."""
    if day < 20:
        return _ORDINAL_ONES[day]
    tens, ones = divmod(day, 10)
    return f"{_TENS[tens]} {_ORDINAL_ONES[ones]}" if ones else _ORDINAL_TENS[day]


def date_to_words(date: datetime.date) -> str:
    """``2024-03-07`` -> ``"seventh of march two thousand twenty four"``."""
    return f"{_ordinal_words(date.day)} of {_MONTHS[date.month - 1]} {number_to_words(date.year)}"


# --------------------------------------------------------------------------- tasks

_LETTERS = "abcdefghij"
_SEQ_MIN_LEN, _SEQ_MAX_LEN = 1, 10
_FIRST_DAY = datetime.date(1900, 1, 1)
_N_DAYS = (datetime.date(2099, 12, 31) - _FIRST_DAY).days + 1
_DATE_LEN = len("2024-03-07")

#: A length with at most this many distinct sources is never held out: it is all training.
ALWAYS_TRAINED = 100
#: Every length gets at least this fraction of an equal share of the training set; a length
#: with fewer distinct sources than that (the one-digit numbers) has them repeated, so the
#: model sees short inputs as often as the share says.
MIN_TRAIN_SHARE = 0.25


def source_length(source: str) -> int:
    """Input length as a person counts it: words of a multi-word source, else characters.

    ``"a b c"`` -> 3 (letters), ``"4213"`` -> 4 (digits), ``"2024-03-07"`` -> 10.
    """
    words = source.split()
    return len(words) if len(words) > 1 else len(source.strip())


def _letter_sources(rng: random.Random, length: int, count: int) -> list[str]:
    """``count`` distinct space-separated letter strings of ``length`` letters."""
    base = len(_LETTERS)
    out = []
    for index in rng.sample(range(base**length), count):
        letters = []
        for _ in range(length):
            index, digit = divmod(index, base)
            letters.append(_LETTERS[digit])
        out.append(" ".join(letters))
    return out


def _number_sources(rng: random.Random, length: int, count: int) -> list[str]:
    """``count`` distinct integers of ``length`` digits (no leading zeros), in digits."""
    low = 0 if length == 1 else 10 ** (length - 1)
    return [str(n) for n in rng.sample(range(low, 10**length), count)]


def _date_sources(rng: random.Random, length: int, count: int) -> list[str]:
    """``count`` distinct ISO dates 1900..2099 (all of one length)."""
    days = rng.sample(range(_N_DAYS), count)
    return [(_FIRST_DAY + datetime.timedelta(days=d)).isoformat() for d in days]


def _letter_count(length: int) -> int:
    return len(_LETTERS) ** length


def _number_count(length: int) -> int:
    return 10 if length == 1 else 9 * 10 ** (length - 1)


@dataclass(frozen=True)
class Task:
    """A built-in task: its input lengths, how to draw sources of a length, how to map them."""

    #: Name used on the command line (``--task NAME``).
    name: str
    #: One line for ``--help`` and error messages.
    description: str
    #: The input lengths (:func:`source_length`) the task's sources have.
    lengths: tuple[int, ...]
    #: ``(rng, length, count) -> count`` distinct sources of that length, deterministic in ``rng``.
    draw_sources: Callable[[random.Random, int, int], list[str]]
    #: How many distinct sources of a length exist.
    count_of_length: Callable[[int], int]
    #: ``True``: lengths weigh as their number of sources; ``False``: all lengths weigh alike.
    weigh_by_count: bool
    #: The exact target of a source.
    to_target: Callable[[str], str]
    #: Default sizes of the training and held-out sets.
    n_train: int
    n_heldout: int

    @property
    def universe(self) -> int:
        """How many distinct sources exist."""
        return sum(self.count_of_length(n) for n in self.lengths)


_SEQ_LENGTHS = tuple(range(_SEQ_MIN_LEN, _SEQ_MAX_LEN + 1))

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "copy",
            "letters -> the same letters",
            _SEQ_LENGTHS,
            _letter_sources,
            _letter_count,
            False,
            lambda s: s,
            5000,
            500,
        ),
        Task(
            "reverse",
            "letters -> the letters reversed",
            _SEQ_LENGTHS,
            _letter_sources,
            _letter_count,
            False,
            lambda s: " ".join(reversed(s.split())),
            5000,
            500,
        ),
        Task(
            "sort",
            "letters -> the letters sorted",
            _SEQ_LENGTHS,
            _letter_sources,
            _letter_count,
            False,
            lambda s: " ".join(sorted(s.split())),
            5000,
            500,
        ),
        Task(
            "numbers",
            "0..9999 in digits -> English words",
            (1, 2, 3, 4),
            _number_sources,
            _number_count,
            True,
            lambda s: number_to_words(int(s)),
            9_000,
            1_000,
        ),
        Task(
            "dates",
            "ISO date 1900..2099 -> English words",
            (_DATE_LEN,),
            _date_sources,
            lambda _: _N_DAYS,
            True,
            lambda s: date_to_words(datetime.date.fromisoformat(s)),
            20_000,
            1_000,
        ),
    )
}


def task_names() -> list[str]:
    """Names of the built-in tasks, sorted."""
    return sorted(TASKS)


@dataclass(frozen=True)
class Split:
    """Training and held-out examples; no held-out source occurs among the training sources."""

    train: tuple[Pair, ...]
    heldout: tuple[Pair, ...]


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


# --------------------------------------------------------------------------- TSV corpora


def read_tsv(path: str | os.PathLike[str]) -> list[Pair]:
    """Read a parallel corpus: one ``source<TAB>target`` pair per line, UTF-8.

    Blank lines (no tab, only whitespace) are skipped. Any other line must hold exactly
    one tab with text on both sides; otherwise ``ValueError`` names the file and the
    1-based line number.
    A missing file raises ``FileNotFoundError``.
    """
    try:
        with open(path, encoding="utf-8", newline=None) as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"{os.fspath(path)}: not valid UTF-8 ({err.reason})") from err
    pairs: list[Pair] = []
    for lineno, line in enumerate(lines, start=1):
        if "\t" not in line and not line.strip():
            continue  # a blank line separates nothing; a lone tab is still malformed
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise ValueError(
                f"{os.fspath(path)}, line {lineno}: expected 'source<TAB>target' "
                f"(one tab, text on both sides), got {line!r}"
            )
        pairs.append((fields[0].strip(), fields[1].strip()))
    if not pairs:
        raise ValueError(f"{os.fspath(path)}: no 'source<TAB>target' lines found")
    return pairs


def split_heldout(pairs: Sequence[Pair], *, heldout_fraction: float = 0.1, seed: int = 0) -> Split:
    """Split a corpus into training and held-out pairs by source, deterministically.

    All pairs that share a source land on the same side, so no held-out source is
    ever seen in training. At least one source is held out when there are two or more,
    and at least one is kept for training: a corpus of one source is all training data.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    sources = list(dict.fromkeys(src for src, _ in pairs))
    random.Random(seed).shuffle(sources)
    n_heldout = min(round(heldout_fraction * len(sources)), max(len(sources) - 1, 0))
    if heldout_fraction > 0 and len(sources) >= 2:
        n_heldout = max(n_heldout, 1)
    heldout_sources = set(sources[:n_heldout])
    return Split(
        train=tuple(p for p in pairs if p[0] not in heldout_sources),
        heldout=tuple(p for p in pairs if p[0] in heldout_sources),
    )


# --------------------------------------------------------------------------- batches


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
