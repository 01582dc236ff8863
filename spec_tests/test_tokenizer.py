"""Tokenizer: byte-pair encoding trained locally on the data, shared by source and target (§5.1)."""

from __future__ import annotations

import functools

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from transformer.data import make_task
from transformer.tokenizer import SPECIAL_TOKENS, Tokenizer

spec = functools.partial(pytest.mark.spec, component="data", section="extra")


@functools.cache
def _numbers_and_dates() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) of two built-in tasks, both sides."""
    train: list[str] = []
    heldout: list[str] = []
    for name in ("numbers", "dates"):
        split = make_task(name, seed=0, n_train=2000, n_heldout=200)
        train += [t for pair in split.train for t in pair]
        heldout += [t for pair in split.heldout for t in pair]
    return train, heldout


@functools.cache
def _tokenizer() -> Tokenizer:
    return Tokenizer.train(_numbers_and_dates()[0], vocab_size=300)


@spec(kind="equivalence")
def test_special_tokens_have_fixed_ids_with_pad_zero() -> None:
    """<pad>=0 (the model's default pad_id), <bos>=1, <eos>=2, <unk>=3."""
    tok = _tokenizer()
    assert SPECIAL_TOKENS == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    for token_id in range(4):
        assert tok.encode(SPECIAL_TOKENS[token_id]) != [token_id]  # text never forges specials


@spec(kind="equivalence")
def test_decode_inverts_encode_on_training_and_heldout_texts() -> None:
    """decode(encode(text)) == text, also for held-out texts never seen while training BPE."""
    tok = _tokenizer()
    train, heldout = _numbers_and_dates()
    for text in train[:500] + heldout:
        ids = tok.encode(text)
        assert all(4 <= i < tok.vocab_size for i in ids), text
        assert tok.decode(ids) == text


@spec(kind="equivalence")
def test_digits_are_always_single_tokens() -> None:
    """Numbers are read digit by digit, however often a digit pair occurs in training."""
    tok = Tokenizer.train(["4213 42 42 42 4242 424242"] * 50, vocab_size=100)
    pieces = [tok.decode([i]).strip() for i in tok.encode("4213")]
    assert [p for p in pieces if p] == ["4", "2", "1", "3"]


@spec(kind="equivalence")
def test_frequent_words_become_single_tokens() -> None:
    """BPE merges frequent words into one token each, so targets are short."""
    tok = _tokenizer()
    assert len(tok.encode("four thousand two hundred thirteen")) == 5


@spec(kind="equivalence")
def test_decode_stops_at_eos_and_drops_pad_and_bos() -> None:
    """Generated ids decode up to the first <eos>; padding and <bos> leave no trace."""
    tok = _tokenizer()
    ids = tok.encode("seventh of march")
    junk = tok.encode("nine")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, *junk, tok.pad_id]) == "seventh of march"
    assert tok.decode(torch.tensor([*ids, tok.pad_id, tok.pad_id])) == "seventh of march"


@spec(kind="equivalence")
def test_unseen_characters_map_to_unk() -> None:
    """A character absent from the training texts encodes to <unk> rather than failing."""
    tok = _tokenizer()
    assert tok.unk_id in tok.encode("Ω")
    assert tok.decode(tok.encode("Ω")) == "<unk>"


@spec(kind="equivalence")
def test_to_str_from_str_round_trip_preserves_the_tokenizer() -> None:
    """A tokenizer rebuilt from its JSON string encodes and decodes identically."""
    tok = _tokenizer()
    again = Tokenizer.from_str(tok.to_str())
    assert again.vocab_size == tok.vocab_size
    assert again.to_str() == tok.to_str()
    for text in _numbers_and_dates()[1][:50]:
        assert again.encode(text) == tok.encode(text)


@spec(kind="equivalence")
def test_training_is_deterministic() -> None:
    """The same texts and vocabulary size give the same tokenizer."""
    texts = _numbers_and_dates()[0][:1000]
    assert (
        Tokenizer.train(texts, vocab_size=120).to_str()
        == Tokenizer.train(texts, vocab_size=120).to_str()
    )


@spec(kind="shape")
def test_vocab_size_is_capped_and_counts_special_tokens() -> None:
    """vocab_size never exceeds the requested size and counts every id, specials included."""
    small = Tokenizer.train(_numbers_and_dates()[0], vocab_size=40)
    assert small.vocab_size == 40
    tiny = Tokenizer.train(["a b", "b a"], vocab_size=1000)  # runs out of merges early
    assert tiny.vocab_size == len(SPECIAL_TOKENS) + len({"a", "b", "▁"}) + len({"▁a", "▁b"})


@spec(kind="error")
def test_from_str_rejects_a_damaged_string() -> None:
    """A damaged tokenizer string raises ValueError, not a Rust panic."""
    with pytest.raises(ValueError, match="tokenizer"):
        Tokenizer.from_str(_tokenizer().to_str()[:-20])


@spec(kind="error")
def test_train_rejects_a_vocabulary_without_room() -> None:
    """A vocabulary too small for the special tokens raises ValueError naming vocab_size."""
    with pytest.raises(ValueError, match="vocab_size must be at least 5"):
        Tokenizer.train(["a"], vocab_size=4)


@spec(kind="error")
def test_from_str_rejects_a_tokenizer_whose_special_ids_differ() -> None:
    """A stored tokenizer whose special tokens sit at other ids (here <bos> first) raises ValueError naming the token and both ids, so ids never change meaning."""
    backend = HFTokenizer(models.BPE(unk_token="<unk>"))
    trainer = trainers.BpeTrainer(
        vocab_size=30, special_tokens=["<bos>", "<pad>", "<eos>", "<unk>"], show_progress=False
    )
    backend.train_from_iterator(["a b c", "c b a"], trainer)
    with pytest.raises(ValueError, match="special token <pad> must have id 0, got 1"):
        Tokenizer.from_str(backend.to_str())


@spec(kind="error")
def test_bad_arguments_to_train_and_encode_raise_naming_them() -> None:
    """``min_frequency`` below 1 raises ValueError, and encoding something other than a str (bytes, a list) raises TypeError naming the type."""
    with pytest.raises(ValueError, match="min_frequency must be at least 1, got 0"):
        Tokenizer.train(["a b"], vocab_size=50, min_frequency=0)
    for text in (b"a b", ["a", "b"]):
        with pytest.raises(TypeError, match=f"text must be a str, got {type(text).__name__}"):
            _tokenizer().encode(text)  # type: ignore[arg-type]


@spec(kind="shape")
def test_repr_shows_the_vocabulary_size() -> None:
    """``repr`` of a tokenizer states its vocabulary size, the number the model's embeddings must match."""
    tok = Tokenizer.train(["a b", "b a"], vocab_size=1000)  # 4 specials, a b ▁, ▁a ▁b
    assert repr(tok) == "Tokenizer(vocab_size=9)"


@spec(kind="equivalence")
@pytest.mark.parametrize("special", SPECIAL_TOKENS)
def test_text_spelling_a_special_token_stays_text_even_when_bpe_learned_to_merge_it(
    special: str,
) -> None:
    """Training texts that contain ``<eos>`` (or another special token's spelling) teach BPE to merge those characters; encoding such text still gives no special id, and decoding gives the text back (before, "qux<eos> bar" encoded to ``<eos>``'s id and decoded as "qux"). A tokenizer rebuilt with ``from_str`` from JSON that holds such a merge behaves the same."""
    texts = [f"foo{special}", f"bar{special}", f"baz {special} qux"]
    tokenizer = Tokenizer.train(texts, vocab_size=100)
    text = f"qux{special} bar"
    ids = tokenizer.encode(text)
    assert not set(ids) & {0, 1, 2, 3}, ids
    assert tokenizer.decode(ids) == text
    # The same training without the filter, as a tokenizer saved before it would hold.
    raw = HFTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    raw.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=100, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    raw.train_from_iterator(texts, trainer)
    raw.encode_special_tokens = True  # as the package reads text: no special matching
    merged = raw.encode(text, add_special_tokens=False).ids
    assert SPECIAL_TOKENS.index(special) in merged  # its merges rebuild the special token
    assert Tokenizer.from_str(raw.to_str()).encode(text) == ids
