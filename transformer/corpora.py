"""Parallel corpora: source/target pairs, their train/held-out splits, and TSV files of them.

A user's own corpus is a TSV file, one ``source<TAB>target`` pair per line. Its split
is deterministic in its seed, and its held-out pairs never share a source with its
training pairs, so held-out accuracy measures generalisation.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Pair", "Split", "read_tsv", "split_heldout"]

#: One example: (source text, target text).
Pair = tuple[str, str]


@dataclass(frozen=True)
class Split:
    """Training and held-out examples; no held-out source occurs among the training sources."""

    train: tuple[Pair, ...]
    heldout: tuple[Pair, ...]


def read_tsv(path: str | os.PathLike[str]) -> list[Pair]:
    """Read a parallel corpus: one ``source<TAB>target`` pair per line, UTF-8 (a leading
    byte-order mark, as some editors write, is dropped).

    Blank lines (no tab, only whitespace) are skipped. Any other line must hold exactly
    one tab with text on both sides; otherwise ``ValueError`` names the file and the
    1-based line number.
    A missing file raises ``FileNotFoundError``.
    """
    try:
        with open(path, encoding="utf-8-sig", newline=None) as f:
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
