"""The built-in toy tasks: what each maps a source to, and how its sources are drawn.

The paper trains on WMT parallel corpora (§5.1). We replace them by small tasks that
are generated locally from a seed, so nothing is downloaded at run time:

* ``copy``, ``reverse``, ``sort``: space-separated letters, mapped to themselves, to
  their reverse, to their sorted order (the classic sanity checks of a seq2seq model);
* ``numbers``: an integer 0..9999 in digits to its English words
  (``"4213"`` -> ``"four thousand two hundred thirteen"``), a small translation task
  with real structure (word order, teens, tens, missing zeros);
* ``dates``: an ISO date to words (``"2024-03-07"`` ->
  ``"seventh of march two thousand twenty four"``).

Their train/held-out splits are made by :mod:`transformer.task_splits`.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable
from dataclasses import dataclass

from transformer.words import date_to_words, number_to_words

__all__ = ["TASKS", "Task", "source_length", "task_names"]

_LETTERS = "abcdefghij"
_SEQ_MIN_LEN, _SEQ_MAX_LEN = 1, 10
_FIRST_DAY = datetime.date(1900, 1, 1)
_N_DAYS = (datetime.date(2099, 12, 31) - _FIRST_DAY).days + 1
_DATE_LEN = len("2024-03-07")


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
