"""Laws of the data pipeline (hypothesis): words read back, batches partition, TSV round-trips."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transformer.data import BucketBatcher, make_batch, number_to_words, read_tsv
from transformer.tokenizer import Tokenizer

spec = functools.partial(pytest.mark.spec, component="data", section="extra", kind="property")

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
    "seventy": 70, "eighty": 80, "ninety": 90,
}  # fmt: skip


def _read_back(words: str) -> int:
    total, current = 0, 0
    for word in words.split():
        if word == "thousand":
            total, current = total + current * 1000, 0
        elif word == "hundred":
            current *= 100
        else:
            current += _UNITS[word]
    return total + current


@spec()
@given(st.integers(min_value=0, max_value=999_999))
def test_number_words_read_back_to_the_number(n: int) -> None:
    """Every integer in [0, 999999] written in words reads back to itself with an independent parser."""
    assert _read_back(number_to_words(n)) == n


_ids = st.lists(st.integers(min_value=3, max_value=50), min_size=1, max_size=12)
_examples = st.lists(st.tuples(_ids, _ids), min_size=1, max_size=40)


@spec()
@given(_examples, st.integers(min_value=1, max_value=9), st.integers(min_value=0, max_value=3))
def test_every_epoch_partitions_the_examples(
    examples: list[tuple[list[int], list[int]]], batch_size: int, seed: int
) -> None:
    """Each epoch of the bucketing batcher serves every example exactly once, in batches of at most batch_size."""
    batcher = BucketBatcher(examples, batch_size, pad_id=0, bos_id=1, eos_id=2, seed=seed)
    for epoch in range(2):
        order = batcher.epoch_order(epoch)
        assert sorted(i for batch in order for i in batch) == list(range(len(examples)))
        assert all(1 <= len(batch) <= batch_size for batch in order)


@spec()
@given(_examples)
def test_batch_rows_strip_back_to_their_examples(
    examples: list[tuple[list[int], list[int]]],
) -> None:
    """Removing padding from a batch row gives back its source, <bos> + target and target + <eos>."""
    batch = make_batch(examples, pad_id=0, bos_id=1, eos_id=2)
    for row, (src, tgt) in enumerate(examples):
        assert [t for t in batch.src[row].tolist() if t != 0] == src
        assert [t for t in batch.tgt_in[row].tolist() if t != 0] == [1, *tgt]
        assert [t for t in batch.tgt_out[row].tolist() if t != 0] == [*tgt, 2]
    assert batch.n_tokens == sum(len(t) + 1 for _, t in examples)


# Fields as read_tsv gives them back: stripped of surrounding whitespace (it strips each
# field), and without U+FEFF, which at the start of a file is the byte-order mark that
# read_tsv drops (tested on its own in spec_tests/test_data.py).
_field = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\t\ufeff"
    ),
    min_size=1,
    max_size=12,
).filter(lambda s: s.strip() == s and s != "")
_padding = st.text(alphabet=" \u3000\u00a0", max_size=3)


@spec()
@given(st.lists(st.tuples(_field, _field), min_size=1, max_size=8))
def test_tsv_written_pairs_read_back_unchanged(pairs: list[tuple[str, str]]) -> None:
    """Pairs written as 'source<TAB>target' lines are read back exactly, for any Unicode text without surrounding whitespace, tab, line break or U+FEFF."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.tsv"
        path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
        assert read_tsv(path) == pairs


@spec()
@given(st.lists(st.tuples(_field, _field, _padding, _padding), min_size=1, max_size=8))
def test_tsv_fields_come_back_stripped_of_surrounding_whitespace(
    rows: list[tuple[str, str, str, str]],
) -> None:
    """Spaces (ASCII, no-break, ideographic) around a field are not part of it: each field is read back stripped."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.tsv"
        lines = (f"{pad}{s}{pad2}\t{pad2}{t}{pad}\n" for s, t, pad, pad2 in rows)
        path.write_text("".join(lines), encoding="utf-8")
        assert read_tsv(path) == [(s, t) for s, t, _, _ in rows]


@functools.cache
def _letters_tokenizer() -> Tokenizer:
    words = ["abc", "cab", "bca", "aa", "b", "c a b", "ab ab ab"]
    return Tokenizer.train(words * 20, vocab_size=30)


@spec()
@given(st.lists(st.text(alphabet="abc", min_size=1, max_size=6), min_size=1, max_size=6))
def test_decode_inverts_encode_for_text_of_the_training_alphabet(words: list[str]) -> None:
    """decode(encode(text)) == text for any single-spaced text over the characters BPE was trained on."""
    tokenizer = _letters_tokenizer()
    text = " ".join(words)
    assert tokenizer.decode(tokenizer.encode(text)) == text
