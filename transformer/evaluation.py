"""Evaluation: token-by-token translation (§6.1), exact-match accuracy and corpus BLEU.

A trained model is compared with the untrained baseline of the same architecture on
held-out pairs, decoding with :mod:`transformer.generate` (greedy or beam search).
Imports the model, data, tokenizer and decoding; knows nothing of training.

Notation: B batch, S source length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from transformer.data import Pair, pad_sequences, source_length
from transformer.generate import beam_search, greedy_decode
from transformer.model import Seq2SeqTransformer
from transformer.tokenizer import Tokenizer

__all__ = ["EvalResult", "LengthScore", "evaluate", "exact_match_by_length", "translate"]


@torch.no_grad()
def translate(
    model: Seq2SeqTransformer,
    tokenizer: Tokenizer,
    sources: Sequence[str],
    *,
    max_len: int,
    beam_size: int = 1,
    batch_size: int = 128,
) -> list[list[int]]:
    """Generated token ids of each source, token by token (greedy or beam search, §6.1).

    Sources are batched in input order; each result stops before its ``<eos>``.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    was_training = model.training
    model.eval()
    results: list[list[int]] = []
    try:
        for start in range(0, len(sources), batch_size):
            chunk = sources[start : start + batch_size]
            src = pad_sequences(
                [tokenizer.encode(s) or [tokenizer.unk_id] for s in chunk], tokenizer.pad_id
            )  # (B, S)
            if beam_size == 1:
                out = greedy_decode(model, src, max_len, tokenizer.bos_id, tokenizer.eos_id)
            else:
                out = beam_search(
                    model, src, max_len, tokenizer.bos_id, tokenizer.eos_id, beam_size=beam_size
                )
            for row in out.tolist():
                ids: list[int] = []
                for token in row:
                    if token in (tokenizer.eos_id, tokenizer.pad_id):
                        break
                    ids.append(token)
                results.append(ids)
    finally:
        model.train(was_training)
    return results


@dataclass(frozen=True)
class LengthScore:
    """Exact match of the examples of one input length."""

    #: Input length (:func:`transformer.data.source_length` unless told otherwise).
    length: int
    #: Number of examples of this length.
    n: int
    #: Fraction of them decoded exactly, in [0, 1].
    exact_match: float


def exact_match_by_length(
    sources: Sequence[str],
    outputs: Sequence[str],
    references: Sequence[str],
    *,
    length: Callable[[str], int] = source_length,
) -> tuple[LengthScore, ...]:
    """Exact match per input length ``length(source)``, shortest first (absent lengths omitted)."""
    if not len(sources) == len(outputs) == len(references):
        raise ValueError(
            f"exact_match_by_length: got {len(sources)} sources, {len(outputs)} outputs "
            f"and {len(references)} references"
        )
    hits: dict[int, list[bool]] = {}
    for source, output, reference in zip(sources, outputs, references, strict=True):
        hits.setdefault(length(source), []).append(output == reference)
    return tuple(
        LengthScore(length=n, n=len(h), exact_match=sum(h) / len(h))
        for n, h in sorted(hits.items())
    )


@dataclass(frozen=True)
class EvalResult:
    """Scores of one model on held-out pairs."""

    #: Fraction of outputs equal to the reference, in [0, 1].
    exact_match: float
    #: Corpus BLEU (sacrebleu, 0..100).
    bleu: float
    #: Number of examples scored.
    n: int
    #: The decoded outputs, in the order of the pairs.
    outputs: list[str]
    #: Exact match per input length, shortest first (see :func:`exact_match_by_length`).
    by_length: tuple[LengthScore, ...] = ()


def evaluate(
    model: Seq2SeqTransformer,
    tokenizer: Tokenizer,
    pairs: Sequence[Pair],
    *,
    max_len: int,
    beam_size: int = 1,
    length: Callable[[str], int] = source_length,
) -> EvalResult:
    """Exact-match accuracy, corpus BLEU and exact match per input length of ``model`` on ``pairs``.

    ``length`` maps a source to its input length for the breakdown (default: digits of a
    number, letters of a letter string, words of a sentence).
    """
    import sacrebleu

    if not pairs:
        raise ValueError("evaluate: got no examples")
    ids = translate(model, tokenizer, [s for s, _ in pairs], max_len=max_len, beam_size=beam_size)
    outputs = [tokenizer.decode(x) for x in ids]
    references = [t for _, t in pairs]
    exact = sum(o == r for o, r in zip(outputs, references, strict=True)) / len(pairs)
    bleu = float(sacrebleu.corpus_bleu(outputs, [references]).score)
    by_length = exact_match_by_length([s for s, _ in pairs], outputs, references, length=length)
    return EvalResult(
        exact_match=exact, bleu=bleu, n=len(pairs), outputs=outputs, by_length=by_length
    )
