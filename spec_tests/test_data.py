"""Data: built-in tasks, TSV corpora and length-bucketed batches (paper §5.1, our own tasks).

The expected words below are written by hand, independently of ``transformer.data``;
the read-back parser at the top is the test's own, so a consistent misspelling in the
code (say "fourty") cannot agree with it.
"""

from __future__ import annotations

import collections
import datetime
import functools
import itertools
import random

import pytest
import torch

from transformer.data import (
    ALWAYS_TRAINED,
    MIN_TRAIN_SHARE,
    TASKS,
    BucketBatcher,
    date_to_words,
    make_batch,
    make_task,
    number_to_words,
    pad_sequences,
    read_tsv,
    source_length,
    split_heldout,
    task_names,
)
from transformer.evaluation import exact_match_by_length

spec = functools.partial(pytest.mark.spec, component="data", section="extra")

# The test's own vocabulary, for reading words back to numbers.
_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
    "seventy": 70, "eighty": 80, "ninety": 90,
}  # fmt: skip


def _read_back(words: str) -> int:
    """Words -> number with the test's own vocabulary (raises KeyError on unknown words)."""
    total, current = 0, 0
    for word in words.split():
        if word == "thousand":
            total, current = total + current * 1000, 0
        elif word == "hundred":
            current *= 100
        else:
            current += _UNITS[word]
    return total + current


@spec(kind="equivalence")
@pytest.mark.parametrize(
    "n, words",
    [
        (0, "zero"),
        (7, "seven"),
        (12, "twelve"),
        (14, "fourteen"),
        (15, "fifteen"),
        (20, "twenty"),
        (40, "forty"),
        (80, "eighty"),
        (99, "ninety nine"),
        (100, "one hundred"),
        (101, "one hundred one"),
        (110, "one hundred ten"),
        (1000, "one thousand"),
        (1001, "one thousand one"),
        (2019, "two thousand nineteen"),
        (4213, "four thousand two hundred thirteen"),
        (7010, "seven thousand ten"),
        (9999, "nine thousand nine hundred ninety nine"),
        (123456, "one hundred twenty three thousand four hundred fifty six"),
    ],
)
def test_number_words_match_hand_checked_examples(n: int, words: str) -> None:
    """Integers are written as US English words without "and" or hyphens."""
    assert number_to_words(n) == words


@spec(kind="equivalence")
def test_number_words_read_back_to_the_number_for_all_task_values() -> None:
    """Every number of the numbers task (0..9999) reads back to itself with an independent parser."""
    wrong = [n for n in range(10_000) if _read_back(number_to_words(n)) != n]
    assert wrong == []


@spec(kind="error")
@pytest.mark.parametrize("bad", [-1, 1_000_000])
def test_number_words_reject_out_of_range(bad: int) -> None:
    """Numbers outside [0, 999999] raise ValueError naming the range."""
    with pytest.raises(ValueError, match=r"\[0, 999999\]"):
        number_to_words(bad)


@spec(kind="error")
@pytest.mark.parametrize("bad", [True, 3.0, "7"], ids=["bool", "float", "str"])
def test_number_words_reject_values_that_are_not_ints(bad: object) -> None:
    """A bool, float or string raises TypeError naming the type, even when it would read as a number."""
    with pytest.raises(TypeError, match=f"n must be an int, got {type(bad).__name__}"):
        number_to_words(bad)  # type: ignore[arg-type]


@spec(kind="equivalence")
@pytest.mark.parametrize(
    "iso, words",
    [
        ("2024-03-07", "seventh of march two thousand twenty four"),
        ("1999-12-31", "thirty first of december one thousand nine hundred ninety nine"),
        ("2000-01-20", "twentieth of january two thousand"),
        ("1900-02-02", "second of february one thousand nine hundred"),
        ("2011-11-11", "eleventh of november two thousand eleven"),
        ("2022-08-22", "twenty second of august two thousand twenty two"),
        ("2030-05-30", "thirtieth of may two thousand thirty"),
        ("1912-06-13", "thirteenth of june one thousand nine hundred twelve"),
    ],
)
def test_dates_match_hand_checked_examples(iso: str, words: str) -> None:
    """Dates read as "<ordinal day> of <month> <year in words>"."""
    assert date_to_words(datetime.date.fromisoformat(iso)) == words


@spec(kind="equivalence")
@pytest.mark.parametrize(
    "name, expected",
    [
        ("copy", lambda letters: letters),
        ("reverse", lambda letters: letters[::-1]),
        ("sort", sorted),
    ],
)
def test_sequence_task_targets_are_the_transformed_sources(name: str, expected: object) -> None:
    """copy/reverse/sort map space-separated letters to themselves, reversed, sorted."""
    split = make_task(name, seed=3, n_train=300, n_heldout=50)
    for source, target in split.train + split.heldout:
        assert target.split() == list(expected(source.split()))  # type: ignore[operator]
        assert 1 <= len(source.split()) <= 10


@spec(kind="equivalence")
@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_split_is_a_function_of_the_seed(name: str) -> None:
    """The same seed gives the same split; another seed gives another one."""
    first = make_task(name, seed=11, n_train=200, n_heldout=30)
    again = make_task(name, seed=11, n_train=200, n_heldout=30)
    other = make_task(name, seed=12, n_train=200, n_heldout=30)
    assert first == again
    assert first.train != other.train


@spec(kind="property")
@pytest.mark.parametrize("name", sorted(TASKS))
def test_heldout_sources_never_occur_in_training(name: str) -> None:
    """Held-out examples are disjoint from the training examples, at the default sizes."""
    split = make_task(name, seed=0)
    task = TASKS[name]
    assert (len(split.train), len(split.heldout)) == (task.n_train, task.n_heldout)
    train_sources = {s for s, _ in split.train}
    heldout_sources = [s for s, _ in split.heldout]
    assert len(set(heldout_sources)) == len(heldout_sources)
    assert not train_sources & set(heldout_sources)


@spec(kind="property")
@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_input_length_is_in_training_and_every_large_one_is_held_out(name: str) -> None:
    """At the default sizes each input length has at least its minimum share of the training examples (short ones repeated where they have fewer sources), every source of a short length is trained on, and each length with more than ALWAYS_TRAINED sources also occurs in the held-out set."""
    task = TASKS[name]
    split = make_task(name, seed=0)
    train = collections.Counter(source_length(s) for s, _ in split.train)
    distinct = collections.Counter(source_length(s) for s in {s for s, _ in split.train})
    heldout = collections.Counter(source_length(s) for s, _ in split.heldout)
    assert set(train) == set(task.lengths)
    for length in task.lengths:
        sources = task.count_of_length(length)
        floor = MIN_TRAIN_SHARE * task.n_train / len(task.lengths)
        assert train[length] >= int(floor), length
        if sources > ALWAYS_TRAINED:
            assert heldout[length] >= 1, length
        else:
            assert distinct[length] == sources and heldout[length] == 0, length


@spec(kind="property")
def test_numbers_training_set_holds_all_of_zero_to_ninety_nine() -> None:
    """The default numbers split trains on every number of one or two digits, so "7" is never unseen."""
    train = {int(s) for s, _ in make_task("numbers", seed=0).train}
    assert set(range(100)) <= train


@spec(kind="property")
def test_heldout_prefix_mixes_input_lengths() -> None:
    """The held-out pairs are shuffled across lengths: the first 100 numbers hold 3- and 4-digit ones."""
    first = make_task("numbers", seed=0).heldout[:100]
    assert {source_length(s) for s, _ in first} == {3, 4}


@spec(kind="equivalence")
@pytest.mark.parametrize(
    ("source", "length"), [("7", 1), ("4213", 4), ("a b c", 3), ("2024-03-07", 10), ("x", 1)]
)
def test_source_length_counts_words_or_characters_of_one_word(source: str, length: int) -> None:
    """source_length is the number of words of a multi-word source, else its characters."""
    assert source_length(source) == length


@spec(kind="equivalence")
def test_numbers_task_pairs_digits_with_their_words() -> None:
    """A numbers example is a decimal integer of 0..9999 and its words, held-out numbers never trained on."""
    split = make_task("numbers", seed=5, n_train=9_990, n_heldout=10)
    pairs = split.train + split.heldout
    assert {int(s) for s, _ in pairs} <= set(range(10_000))
    assert {int(s) for s, _ in split.heldout}.isdisjoint(int(s) for s, _ in split.train)
    for source, target in pairs:
        assert source == str(int(source))
        assert _read_back(target) == int(source)


@spec(kind="error")
def test_numbers_task_rejects_more_examples_than_exist() -> None:
    """Asking for more distinct numbers than 0..9999 holds raises ValueError."""
    with pytest.raises(ValueError, match="10000 distinct"):
        make_task("numbers", n_train=9_900, n_heldout=101)


@spec(kind="error")
@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        ({"n_train": 0}, "n_train must be at least 1, got 0"),
        ({"n_heldout": -1}, "n_heldout must be non-negative, got -1"),
    ],
    ids=["no-training", "negative-heldout"],
)
def test_task_sizes_out_of_range_raise_naming_them(sizes: dict[str, int], match: str) -> None:
    """A task split with no training example or a negative held-out count raises ValueError naming the size."""
    with pytest.raises(ValueError, match=match):
        make_task("copy", **sizes)


@spec(kind="error")
def test_unknown_task_error_lists_the_known_tasks() -> None:
    """An unknown task name raises ValueError listing every built-in task."""
    with pytest.raises(ValueError, match="unknown task 'french'") as info:
        make_task("french")
    for name in task_names():
        assert name in str(info.value)


# --------------------------------------------------------------------------- TSV


@spec(kind="equivalence")
def test_read_tsv_reads_pairs_and_skips_blank_lines(tmp_path: pytest.TempPathFactory) -> None:
    """Each 'source<TAB>target' line is one pair; blank lines and CRLF endings are fine."""
    path = tmp_path / "corpus.tsv"  # type: ignore[operator]
    path.write_bytes("hallo welt\thello world\r\n\r\nkatze\tcat\r\nstraße\tstreet\r\n".encode())
    assert read_tsv(path) == [
        ("hallo welt", "hello world"),
        ("katze", "cat"),
        ("straße", "street"),
    ]


@spec(kind="equivalence")
def test_read_tsv_drops_a_leading_byte_order_mark(tmp_path: pytest.TempPathFactory) -> None:
    """A file saved as "UTF-8 with BOM" reads as the same pairs as without it: the mark is not part of the first source (which would make it a source of its own in the held-out split)."""
    path = tmp_path / "bom.tsv"  # type: ignore[operator]
    path.write_bytes("\ufeffhello\tbonjour\nhello\tsalut\n".encode())
    assert read_tsv(path) == [("hello", "bonjour"), ("hello", "salut")]


@spec(kind="error")
@pytest.mark.parametrize(
    "bad_line",
    ["no tab here", "one\ttwo\tthree", "source only\t", "\ttarget only", "\t"],
)
def test_read_tsv_malformed_line_error_names_file_and_line(
    tmp_path: pytest.TempPathFactory, bad_line: str
) -> None:
    """A line without exactly one tab and text on both sides raises ValueError with its line number."""
    path = tmp_path / "bad.tsv"  # type: ignore[operator]
    path.write_text(f"a\tb\n\n{bad_line}\nc\td\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.tsv, line 3: expected 'source<TAB>target'"):
        read_tsv(path)


@spec(kind="error")
def test_read_tsv_missing_file_raises_file_not_found(tmp_path: pytest.TempPathFactory) -> None:
    """A missing corpus raises FileNotFoundError, not an empty corpus."""
    with pytest.raises(FileNotFoundError):
        read_tsv(tmp_path / "missing.tsv")  # type: ignore[operator]


@spec(kind="error")
def test_read_tsv_empty_file_is_an_error(tmp_path: pytest.TempPathFactory) -> None:
    """A file with no pairs raises ValueError naming the file."""
    path = tmp_path / "empty.tsv"  # type: ignore[operator]
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.tsv: no 'source<TAB>target' lines"):
        read_tsv(path)


@spec(kind="error")
def test_read_tsv_of_a_file_that_is_not_utf8_names_the_file(
    tmp_path: pytest.TempPathFactory,
) -> None:
    """A corpus that is not valid UTF-8 (here Latin-1 bytes) raises ValueError naming the file, not UnicodeDecodeError."""
    path = tmp_path / "latin1.tsv"  # type: ignore[operator]
    path.write_bytes("caf\u00e9\tcoffee\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.tsv: not valid UTF-8"):
        read_tsv(path)


@spec(kind="property")
def test_split_heldout_holds_out_nothing_at_fraction_zero_or_with_one_source() -> None:
    """A held-out fraction of 0 keeps every pair for training, and so does a corpus with a single source whatever the fraction (holding it out would leave nothing to train on)."""
    pairs = [("a", "x"), ("b", "y"), ("a", "z")]
    assert split_heldout(pairs, heldout_fraction=0.0).train == tuple(pairs)
    one_source = [("a", "x"), ("a", "y")]
    split = split_heldout(one_source, heldout_fraction=0.9)
    assert (split.train, split.heldout) == (tuple(one_source), ())


@spec(kind="error")
@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_split_heldout_rejects_a_fraction_outside_unit_interval(fraction: float) -> None:
    """A held-out fraction outside [0, 1) raises ValueError naming it (1.0 would leave nothing to train on)."""
    with pytest.raises(ValueError, match=rf"heldout_fraction must be in \[0, 1\), got {fraction}"):
        split_heldout([("a", "b"), ("c", "d")], heldout_fraction=fraction)


@spec(kind="property")
def test_split_heldout_keeps_every_source_on_one_side() -> None:
    """Pairs sharing a source are never split across train and held-out; the split is seeded."""
    rng = random.Random(0)
    pairs = [(f"s{rng.randrange(60)}", f"t{i}") for i in range(400)]
    split = split_heldout(pairs, heldout_fraction=0.2, seed=4)
    assert sorted(split.train + split.heldout) == sorted(pairs)
    assert not {s for s, _ in split.train} & {s for s, _ in split.heldout}
    n_sources = len({s for s, _ in pairs})
    assert len({s for s, _ in split.heldout}) == round(0.2 * n_sources)
    assert split_heldout(pairs, heldout_fraction=0.2, seed=4) == split
    assert split_heldout(pairs, heldout_fraction=0.2, seed=5) != split


# --------------------------------------------------------------------------- batches

PAD, BOS, EOS = 0, 1, 2


@spec(kind="shape")
def test_batch_pads_right_and_shifts_the_target_by_one() -> None:
    """tgt_in is <bos> y, tgt_out is y <eos>, both right-padded with pad_id (§3 shifted right)."""
    batch = make_batch([([5, 6, 7], [8]), ([9], [10, 11, 12])], pad_id=PAD, bos_id=BOS, eos_id=EOS)
    assert batch.src.tolist() == [[5, 6, 7], [9, PAD, PAD]]
    assert batch.tgt_in.tolist() == [[BOS, 8, PAD, PAD], [BOS, 10, 11, 12]]
    assert batch.tgt_out.tolist() == [[8, EOS, PAD, PAD], [10, 11, 12, EOS]]
    assert batch.src.dtype == torch.long
    assert batch.n_tokens == 6


def _examples(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        src = [rng.randrange(4, 30) for _ in range(rng.randint(1, 40))]
        tgt = [rng.randrange(4, 30) for _ in range(rng.randint(1, 40))]
        out.append((src, tgt))
    return out


def _pads(batches: list[list[int]], examples: list[tuple[list[int], list[int]]]) -> int:
    total = 0
    for indices in batches:
        lengths = [len(examples[i][1]) for i in indices]
        total += max(lengths) * len(lengths) - sum(lengths)
    return total


@spec(kind="property")
def test_bucket_batcher_serves_every_example_once_per_epoch() -> None:
    """An epoch is a partition of the examples into batches of at most batch_size (awkward 7)."""
    examples = _examples(97, seed=1)
    batcher = BucketBatcher(examples, 7, pad_id=PAD, bos_id=BOS, eos_id=EOS, seed=3, pool_batches=4)
    for epoch in range(3):
        order = batcher.epoch_order(epoch)
        assert sorted(i for b in order for i in b) == list(range(97))
        assert all(1 <= len(b) <= 7 for b in order)


@spec(kind="property")
def test_bucketing_pads_far_less_than_random_batches() -> None:
    """Sorting each pool by length (§5.1 "batched by approximate length") cuts padding."""
    examples = _examples(500, seed=2)
    batcher = BucketBatcher(examples, 16, pad_id=PAD, bos_id=BOS, eos_id=EOS, seed=0)
    indices = list(range(500))
    random.Random(0).shuffle(indices)
    unbucketed = [indices[i : i + 16] for i in range(0, 500, 16)]
    assert _pads(batcher.epoch_order(0), examples) < _pads(unbucketed, examples) / 4


@spec(kind="equivalence")
def test_batch_order_is_reshuffled_each_epoch_from_the_seed() -> None:
    """Epoch orders differ from each other, and the same seed reproduces them exactly."""
    examples = _examples(200, seed=3)
    make = functools.partial(
        BucketBatcher, examples, 8, pad_id=PAD, bos_id=BOS, eos_id=EOS, pool_batches=5
    )
    a, b, c = make(seed=9), make(seed=9), make(seed=10)
    assert a.epoch_order(0) != a.epoch_order(1)
    assert a.epoch_order(1) == b.epoch_order(1)
    assert a.epoch_order(0) != c.epoch_order(0)


@spec(kind="equivalence")
def test_batcher_state_dict_continues_the_stream_exactly() -> None:
    """A batcher restored from state_dict serves the batches the original would serve next."""
    examples = _examples(61, seed=4)
    make = functools.partial(BucketBatcher, examples, 5, pad_id=PAD, bos_id=BOS, eos_id=EOS, seed=2)
    original = make()
    for _ in range(17):  # 13 batches per epoch: the stop falls inside the second epoch
        next(original)
    restored = make()
    restored.load_state_dict(original.state_dict())
    assert original.state_dict() == {"epoch": 1, "position": 4}
    for _ in range(20):
        x, y = next(original), next(restored)
        assert torch.equal(x.src, y.src)
        assert torch.equal(x.tgt_out, y.tgt_out)


@spec(kind="equivalence")
def test_batcher_is_an_endless_iterator_of_its_stream() -> None:
    """``iter(batcher)`` is the batcher itself, so a for loop (here islice) serves the batches next() would, across epoch ends."""
    examples = _examples(23, seed=6)
    make = functools.partial(BucketBatcher, examples, 4, pad_id=PAD, bos_id=BOS, eos_id=EOS, seed=1)
    looped, stepped = make(), make()
    assert iter(looped) is looped
    for a in itertools.islice(looped, 15):  # 6 batches per epoch: crosses two epoch ends
        b = next(stepped)
        assert torch.equal(a.src, b.src) and torch.equal(a.tgt_in, b.tgt_in)
    assert looped.state_dict() == stepped.state_dict() == {"epoch": 2, "position": 3}


def _token_examples() -> list[tuple[list[int], list[int]]]:
    """300 pairs of 1..40 tokens a side, plus two pairs longer than 120 tokens on one side."""
    return [*_examples(300, seed=7), ([5] * 150, [6] * 3), ([7] * 2, [8] * 130)]


@spec(kind="property")
def test_token_batches_hold_at_most_n_padded_source_and_target_tokens() -> None:
    """With batch_tokens=N every batch's padded source and target tensors hold at most N tokens each (§5.1 batches of ~25000 source and target tokens), but a single pair longer than N, which gets a batch alone; each epoch still serves every pair once."""
    examples, limit = _token_examples(), 120
    batcher = BucketBatcher(
        examples, 1, pad_id=PAD, bos_id=BOS, eos_id=EOS, seed=5, pool_batches=3, batch_tokens=limit
    )
    for epoch in range(2):
        order = batcher.epoch_order(epoch)
        assert sorted(i for b in order for i in b) == list(range(len(examples)))
    over_long = 0
    for _ in range(2 * len(batcher.epoch_order(0))):
        batch = next(batcher)
        assert batch.tgt_in.shape == batch.tgt_out.shape
        if batch.src.numel() > limit or batch.tgt_out.numel() > limit:
            assert batch.src.size(0) == 1, tuple(batch.src.shape)
            over_long += 1
    assert over_long == 2 * 2  # the two over-long pairs, in each of two epochs


@spec(kind="property")
def test_token_batches_group_similar_lengths_and_vary_in_row_count() -> None:
    """Token batches are cut from length-sorted pools (§5.1 "batched together by approximate sequence length"): they pad far less than random batches of the same sizes, and short pairs fill more rows than long ones."""
    examples = _examples(500, seed=2)
    batcher = BucketBatcher(
        examples, 1, pad_id=PAD, bos_id=BOS, eos_id=EOS, seed=0, batch_tokens=200
    )
    order = batcher.epoch_order(0)
    indices = list(range(500))
    random.Random(0).shuffle(indices)
    unbucketed, start = [], 0
    for batch in order:
        unbucketed.append(indices[start : start + len(batch)])
        start += len(batch)
    assert _pads(order, examples) < _pads(unbucketed, examples) / 4
    longest = {len(b): max(len(examples[i][1]) for i in b) for b in order}
    assert max(longest[max(longest)], 1) < longest[min(longest)]


@spec(kind="error")
@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: pad_sequences([], PAD), "pad_sequences: got no sequences"),
        (
            lambda: BucketBatcher([], 4, pad_id=PAD, bos_id=BOS, eos_id=EOS),
            "BucketBatcher: got no examples",
        ),
        (
            lambda: BucketBatcher(_examples(3, 0), 0, pad_id=PAD, bos_id=BOS, eos_id=EOS),
            "batch_size must be at least 1, got 0",
        ),
        (
            lambda: BucketBatcher(
                _examples(3, 0), 2, pad_id=PAD, bos_id=BOS, eos_id=EOS, pool_batches=0
            ),
            "pool_batches must be at least 1, got 0",
        ),
        (
            lambda: BucketBatcher(
                _examples(3, 0), 2, pad_id=PAD, bos_id=BOS, eos_id=EOS
            ).load_state_dict({"epoch": 0, "position": -1}),
            r"invalid state \{'epoch': 0, 'position': -1\}",
        ),
        (
            lambda: BucketBatcher(
                _examples(3, 0), 2, pad_id=PAD, bos_id=BOS, eos_id=EOS, batch_tokens=0
            ),
            "batch_tokens must be at least 1 or None, got 0",
        ),
    ],
    ids=[
        "pad-nothing",
        "no-examples",
        "batch-size-0",
        "pool-0",
        "negative-position",
        "batch-tokens-0",
    ],
)
def test_batching_rejects_empty_input_and_sizes_below_one(build: object, match: str) -> None:
    """Padding no sequences, a batcher without examples, a batch, pool or token size below 1 and a negative stream position raise ValueError saying which."""
    with pytest.raises(ValueError, match=match):
        build()  # type: ignore[operator]


# --------------------------------------------------------------------------- scores by length


@spec(kind="equivalence")
def test_exact_match_by_length_scores_each_input_length_apart() -> None:
    """exact_match_by_length gives, per input length and shortest first, the count and the fraction decoded exactly."""
    sources = ["7", "42", "4213", "10", "999", "1000"]
    references = ["seven", "forty two", "x", "ten", "nine hundred ninety nine", "one thousand"]
    outputs = ["seven", "forty", "x", "ten", "nine hundred ninety nine", "one"]
    scores = exact_match_by_length(sources, outputs, references)
    assert [(s.length, s.n, s.exact_match) for s in scores] == [
        (1, 1, 1.0),
        (2, 2, 0.5),
        (3, 1, 1.0),
        (4, 2, 0.5),
    ]


@spec(kind="error")
def test_exact_match_by_length_rejects_lists_of_unequal_length() -> None:
    """Sources, outputs and references of different lengths raise ValueError naming the three counts."""
    with pytest.raises(ValueError, match="got 2 sources, 1 outputs and 2 references"):
        exact_match_by_length(["1", "2"], ["one"], ["one", "two"])
