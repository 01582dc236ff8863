"""Numbers and dates written as English words, the targets of the ``numbers`` and ``dates`` tasks.

Words are US style and lower case, with no "and" and no hyphens, so every word is one
whitespace-separated token: ``4213`` -> ``"four thousand two hundred thirteen"``,
``2024-03-07`` -> ``"seventh of march two thousand twenty four"``.
"""

from __future__ import annotations

import datetime

__all__ = ["date_to_words", "number_to_words"]

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
