"""Laws of token-by-token generation, checked on random small models (hypothesis).

* cached decode equals full decode: greedy decoding with the KV cache returns exactly the
  tokens of re-decoding the whole prefix at every step;
* one beam is greedy: ``beam_search(beam_size=1)`` returns what ``greedy_decode`` returns;
* batch independence: a row decodes the same alone and inside a batch;
* sampling is a function of its generator: the same seed gives the same tokens, with or
  without the KV cache, every token is a real one (never padding before the EOS), and
  ``top_k=1`` is greedy decoding.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from transformer.generate import beam_search, greedy_decode, sample_decode
from transformer.model import Seq2SeqTransformer

spec = functools.partial(pytest.mark.spec, component="generation", section="extra", kind="property")

PAD, BOS, EOS = 0, 1, 2
V = 13


@functools.cache
def random_model(seed: int) -> Seq2SeqTransformer:
    """A small random model (untied output, so generated tokens vary), cached per seed."""
    torch.manual_seed(seed)
    model = Seq2SeqTransformer(
        V,
        V,
        d_model=16,
        nhead=2,
        num_encoder_layers=1,
        num_decoder_layers=2,
        dim_feedforward=24,
        dropout=0.0,
        max_len=64,
        tie_output=False,
    )
    return model.eval()


@st.composite
def decoding_cases(draw: st.DrawFn) -> tuple[Seq2SeqTransformer, Tensor, int, float]:
    """(model, right-padded source batch, max_len, EOS bias)."""
    model = random_model(draw(st.integers(0, 4)))
    lengths = draw(st.lists(st.integers(1, 7), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**16))
    src = torch.randint(
        3, V, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(seed)
    )
    for b, n in enumerate(lengths):
        src[b, n:] = PAD
    return model, src, draw(st.integers(1, 12)), draw(st.floats(-1.0, 3.0))


def with_eos_bias(model: Seq2SeqTransformer, bias: float) -> Seq2SeqTransformer:
    with torch.no_grad():
        model.output.bias.zero_()
        model.output.bias[EOS] = bias
    return model


@spec()
@given(decoding_cases())
def test_cached_decode_equals_full_decode(
    case: tuple[Seq2SeqTransformer, Tensor, int, float],
) -> None:
    """Greedy decoding with the KV cache returns exactly the tokens of full re-decoding, for any batch, lengths, max_len and EOS bias."""
    model, src, max_len, bias = case
    model = with_eos_bias(model, bias)
    cached = greedy_decode(model, src, max_len, BOS, EOS, use_cache=True)
    full = greedy_decode(model, src, max_len, BOS, EOS, use_cache=False)
    assert torch.equal(cached, full)


@spec()
@given(decoding_cases())
def test_one_beam_is_greedy(case: tuple[Seq2SeqTransformer, Tensor, int, float]) -> None:
    """``beam_search`` with ``beam_size=1`` returns exactly the tokens of ``greedy_decode``."""
    model, src, max_len, bias = case
    model = with_eos_bias(model, bias)
    assert torch.equal(
        beam_search(model, src, max_len, BOS, EOS, beam_size=1),
        greedy_decode(model, src, max_len, BOS, EOS),
    )


@spec()
@given(decoding_cases(), st.integers(1, 3))
def test_a_row_decodes_the_same_alone_and_in_a_batch(
    case: tuple[Seq2SeqTransformer, Tensor, int, float], beam_size: int
) -> None:
    """Each row's beam-search result in a batch equals its result decoded alone (padding of other rows never leaks)."""
    model, src, max_len, bias = case
    model = with_eos_bias(model, bias)
    batch = beam_search(model, src, max_len, BOS, EOS, beam_size=beam_size)
    for b in range(src.size(0)):
        n = int((src[b] != PAD).sum())
        alone = beam_search(model, src[b : b + 1, :n], max_len, BOS, EOS, beam_size=beam_size)[0]
        assert torch.equal(batch[b, : alone.numel()], alone)
        assert bool((batch[b, alone.numel() :] == PAD).all())


@spec()
@given(
    decoding_cases(),
    st.integers(0, 2**16),
    st.floats(0.1, 3.0),
    st.one_of(st.none(), st.integers(1, V)),
    st.one_of(st.none(), st.floats(0.05, 1.0)),
)
def test_sampling_is_a_function_of_the_generator_and_draws_real_tokens(
    case: tuple[Seq2SeqTransformer, Tensor, int, float],
    seed: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> None:
    """``sample_decode`` with one generator seed returns the same tokens twice and with or without the KV cache; its tokens are in the vocabulary, padding only after an EOS; with ``top_k=1`` it returns the greedy tokens."""
    model, src, max_len, bias = case
    model = with_eos_bias(model, bias)

    def draw(use_cache: bool = True, **kw: object) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        args = {"temperature": temperature, "top_k": top_k, "top_p": top_p, **kw}
        return sample_decode(
            model,
            src,
            max_len,
            BOS,
            EOS,
            generator=gen,
            use_cache=use_cache,
            **args,  # type: ignore[arg-type]
        )

    out = draw()
    assert torch.equal(draw(), out)
    assert torch.equal(draw(use_cache=False), out)
    assert bool(((out >= 0) & (out < V)).all())
    for row in out.tolist():
        end = row.index(EOS) + 1 if EOS in row else len(row)
        assert PAD not in row[:end] and all(t == PAD for t in row[end:]), row
    assert torch.equal(draw(top_k=1, top_p=None), greedy_decode(model, src, max_len, BOS, EOS))
