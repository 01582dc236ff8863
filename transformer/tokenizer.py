"""Subword tokenizer: byte-pair encoding trained locally on the data (paper §5.1).

The paper encodes sentences with byte-pair encoding into a shared source-target
vocabulary; we do the same with the ``tokenizers`` package, trained on our own
training texts (both sides), so nothing is downloaded. Words are split at spaces
SentencePiece-style (a space becomes the ``▁`` marker of the next piece), which
makes ``decode(encode(text)) == text`` for text made of characters seen in training.
Digits are always split into single tokens, so a number is read digit by digit.

Special tokens have fixed ids: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3.
The whole tokenizer serialises to one JSON string, stored inside the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from torch import Tensor

__all__ = ["SPECIAL_TOKENS", "Tokenizer"]

#: Special tokens, in id order: the padding id is 0, as ``Seq2SeqTransformer`` defaults to.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def _without_special_merges(backend: _HFTokenizer) -> _HFTokenizer:
    """``backend`` without the BPE merges whose result spells a special token.

    BPE learns such merges from text that contains, say, ``<eos>`` (a TSV line may), and
    the merged piece then looks up the special token's id: the text would end a target
    early or turn into padding. Without the merge the same characters stay ordinary
    pieces (``<eos`` and ``>``).
    """
    spec = json.loads(backend.to_str())
    merges = spec.get("model", {}).get("merges")
    if not merges:
        return backend

    def result(merge: list[str] | str) -> str:
        return "".join(merge) if isinstance(merge, list) else merge.replace(" ", "", 1)

    kept = [m for m in merges if result(m) not in SPECIAL_TOKENS]
    if len(kept) == len(merges):
        return backend
    spec["model"]["merges"] = kept
    return _HFTokenizer.from_str(json.dumps(spec))


class Tokenizer:
    """A BPE tokenizer with fixed special ids; build it with :meth:`train` or :meth:`from_str`."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    unk_id = 3

    def __init__(self, backend: _HFTokenizer) -> None:
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            found = backend.token_to_id(token)
            if found != expected_id:
                raise ValueError(
                    f"tokenizer: special token {token} must have id {expected_id}, got {found}"
                )
        # Text that happens to spell "<eos>" must stay text, never end a sequence early:
        # the special strings are not matched in the text, and no merge may build one.
        backend = _without_special_merges(backend)
        backend.encode_special_tokens = True
        self._backend = backend

    @classmethod
    def train(
        cls, texts: Iterable[str], *, vocab_size: int = 1000, min_frequency: int = 1
    ) -> Tokenizer:
        """Learn BPE merges on ``texts`` until ``vocab_size`` tokens (specials included).

        Deterministic: the same texts and sizes give the same vocabulary and merges.
        The vocabulary may end smaller than ``vocab_size`` when the texts run out of
        pairs to merge (tiny alphabets).
        """
        if vocab_size < len(SPECIAL_TOKENS) + 1:
            raise ValueError(
                f"vocab_size must be at least {len(SPECIAL_TOKENS) + 1}, got {vocab_size}"
            )
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
        backend = _HFTokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)]
        )
        backend.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (the model's vocabulary size)."""
        return int(self._backend.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without ``<bos>``/``<eos>``; unseen characters become ``<unk>``."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Text of a generated id sequence (L,): stops at the first ``<eos>``, drops
        ``<pad>`` and ``<bos>``; an ``<unk>`` shows as ``<unk>``."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        kept: list[int] = []
        for token in values:
            if token == self.eos_id:
                break
            if token not in (self.pad_id, self.bos_id):
                kept.append(int(token))
        return str(self._backend.decode(kept, skip_special_tokens=False))

    def to_str(self) -> str:
        """The tokenizer as one JSON string (vocabulary, merges, pre-tokenizer, decoder)."""
        return str(self._backend.to_str())

    @classmethod
    def from_str(cls, data: str) -> Tokenizer:
        """Rebuild a tokenizer from :meth:`to_str`; a damaged string raises ``ValueError``."""
        try:
            backend = _HFTokenizer.from_str(data)
        except Exception as err:  # the Rust side raises a bare Exception on bad JSON
            raise ValueError(f"tokenizer: cannot parse the stored tokenizer JSON ({err})") from err
        return cls(backend)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"
