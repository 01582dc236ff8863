"""Spec of token-by-token generation: greedy decoding, beam search and the KV cache.

``greedy_decode``, ``beam_search`` (module ``transformer.generate``) and ``sample_decode``
(module ``transformer.sampling``, re-exported by ``transformer.generate``) feed the decoder its own outputs one token at a time. The suite pins: the KV cache changes nothing (the
tokens of a cached run are exactly those of re-decoding the whole prefix at each step,
and a cached step's logits equal the teacher-forced ones); the result format (no BOS,
EOS kept, ``pad_id`` after it); batch elements finish independently; beam search with
one beam is greedy decoding; a wide enough beam finds the best sequence under GNMT's
length-penalised objective (paper section 6.1), which the test computes by brute force;
the padding token is never generated, even by a model that prefers it above all; sampling
stays inside the top-k and the nucleus, follows ``softmax(logits / T)``, is greedy at
``T = 0`` and is reproducible with a ``torch.Generator``; and the errors on bad arguments.

Random models do not end sequences by themselves, so tests push the EOS logit up
through the output bias until the rows of a batch end at different steps.

Notation: B batch, S source length, T generated length, V target vocabulary.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torch import Tensor

from transformer.generate import CachedDecoder, FullDecoder, beam_search, greedy_decode
from transformer.model import Seq2SeqTransformer
from transformer.sampling import filter_logits, sample_decode, sample_next
from transformer.testing import assert_close

spec = functools.partial(pytest.mark.spec, component="generation", section="extra")

PAD, BOS, EOS = 0, 1, 2
V = 17


def make_model(
    seed: int,
    *,
    vocab: int = V,
    norm_first: bool = False,
    dtype: torch.dtype = torch.float32,
    **overrides: object,
) -> Seq2SeqTransformer:
    """A small random model (head dim 8, untied output so that tokens vary), in eval mode."""
    fields: dict[str, object] = {
        "src_vocab_size": vocab,
        "tgt_vocab_size": vocab,
        "d_model": 24,
        "nhead": 3,
        "num_encoder_layers": 2,
        "num_decoder_layers": 2,
        "dim_feedforward": 40,
        "dropout": 0.0,
        "max_len": 300,
        "tie_output": False,
    }
    fields.update(overrides)
    torch.manual_seed(seed)
    model = Seq2SeqTransformer(**fields)  # type: ignore[arg-type]
    for layer in model.transformer.decoder.layers:
        # The pre-norm variant: every decoder layer's forward reads this one flag.
        layer.norm_first = norm_first
    return model.to(dtype).eval()


def sources(seed: int, lengths: list[int], vocab: int = V) -> Tensor:
    """``(B, max(lengths))`` source ids in ``[3, vocab)``, right-padded with ``PAD``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=gen)
    for b, n in enumerate(lengths):
        ids[b, n:] = PAD
    return ids


def eos_steps(tokens: Tensor) -> list[int | None]:
    """1-based step at which each row generated EOS (``None``: it never did)."""
    return [int(row.tolist().index(EOS)) + 1 if EOS in row.tolist() else None for row in tokens]


def run_search(search: str, model: Seq2SeqTransformer, src: Tensor, max_len: int) -> Tensor:
    """``greedy``, ``beam`` (3 beams) or ``sample`` (temperature 1, generator seed 0)."""
    if search == "greedy":
        return greedy_decode(model, src, max_len, BOS, EOS)
    if search == "beam":
        return beam_search(model, src, max_len, BOS, EOS, beam_size=3)
    assert search == "sample"
    gen = torch.Generator().manual_seed(0)
    return sample_decode(model, src, max_len, BOS, EOS, generator=gen)


def end_rows_at_different_steps(
    model: Seq2SeqTransformer, src: Tensor, max_len: int
) -> list[int | None]:
    """Set the EOS output bias so that the rows of ``src`` end at different steps; return the steps.

    With EOS impossible, greedy decoding follows one trajectory per row; along it,
    ``margin[b, t]`` (best other logit minus the EOS logit) says that EOS is picked at
    the first step where the EOS bias exceeds the margin. The bias is set between two
    margins, where the first-EOS steps of the rows are most varied (some rows may never
    end). The EOS row of the output weight is amplified so that the EOS logit moves
    from step to step.
    """
    with torch.no_grad():
        model.output.weight[EOS] *= 4.0
        model.output.bias[EOS] = -1e4
        trajectory = greedy_decode(model, src, max_len, BOS, EOS, use_cache=False)
        model.output.bias[EOS] = 0.0
        tgt_in = torch.cat([torch.full((src.size(0), 1), BOS), trajectory[:, :-1]], dim=1)
        logits = model(src, tgt_in).double()  # (B, T, V)
    others = logits.clone()
    others[..., [EOS, PAD]] = float("-inf")
    margin = others.max(dim=-1).values - logits[..., EOS]  # (B, T)
    levels = margin.flatten().sort().values.tolist()
    best: tuple[int, float, list[int | None]] | None = None
    for low, high in itertools.pairwise(levels):
        if high - low < 1e-3:  # too close to separate reliably in float32
            continue
        bias = (low + high) / 2
        fired = margin < bias  # (B, T)
        steps = [int(row.nonzero()[0]) + 1 if bool(row.any()) else None for row in fired]
        variety = len(set(steps)) + int(any(s is not None and s > 1 for s in steps))
        if best is None or variety > best[0]:
            best = (variety, bias, steps)
    assert best is not None and best[0] >= 4, (
        f"test setup: rows cannot be made to end apart ({best})"
    )
    with torch.no_grad():
        model.output.bias[EOS] = best[1]
    return best[2]


# --------------------------------------------------------------------------------------
# The KV cache changes nothing.
# --------------------------------------------------------------------------------------


@spec(kind="equivalence")
@pytest.mark.parametrize("seed", [1, 4, 6])
@pytest.mark.parametrize("norm_first", [False, True])
def test_cached_greedy_returns_exactly_the_tokens_of_full_redecoding(
    seed: int, norm_first: bool
) -> None:
    """Greedy decoding with the KV cache returns exactly the tokens of re-decoding the whole prefix at every step, for a batch whose rows differ in length and end at different steps (post-norm and pre-norm)."""
    model = make_model(seed, norm_first=norm_first)
    src = sources(seed, [9, 1, 6, 4, 7])
    steps = end_rows_at_different_steps(model, src, max_len=15)
    cached = greedy_decode(model, src, 15, BOS, EOS, use_cache=True)
    full = greedy_decode(model, src, 15, BOS, EOS, use_cache=False)
    assert eos_steps(cached) == steps
    assert torch.equal(cached, full), f"cached\n{cached}\nfull\n{full}"


@spec(kind="equivalence")
@pytest.mark.parametrize("norm_first", [False, True])
def test_cached_step_logits_equal_teacher_forced_logits(norm_first: bool) -> None:
    """Each ``CachedDecoder.step`` (one new position, cached keys/values) gives the logits that the teacher-forced ``forward`` gives at that position, as does ``FullDecoder.step``."""
    model = make_model(3, norm_first=norm_first, dtype=torch.float64)
    src = sources(4, [7, 2, 5])
    gen = torch.Generator().manual_seed(5)
    tgt = torch.randint(3, V, (3, 11), generator=gen)
    tgt[:, 0] = BOS
    with torch.no_grad():
        forward = model(src, tgt)  # (B, T, V)
        cached, full = CachedDecoder(model, src), FullDecoder(model, src)
        for t in range(11):
            assert_close(cached.step(tgt[:, : t + 1]), forward[:, t], msg=f"cached, position {t}")
            assert_close(full.step(tgt[:, : t + 1]), forward[:, t], msg=f"full, position {t}")


@spec(kind="equivalence")
@pytest.mark.parametrize("seed", [0, 1])
def test_cached_beam_search_returns_the_tokens_of_uncached_beam_search(seed: int) -> None:
    """Beam search with the KV cache (reordered as beams are re-ranked) returns exactly the result of re-decoding every prefix."""
    model = make_model(seed + 10)
    src = sources(seed, [8, 3, 6])
    end_rows_at_different_steps(model, src, max_len=12)
    cached = beam_search(model, src, 12, BOS, EOS, beam_size=3)
    full = beam_search(model, src, 12, BOS, EOS, beam_size=3, use_cache=False)
    assert torch.equal(cached, full), f"cached\n{cached}\nfull\n{full}"


# --------------------------------------------------------------------------------------
# Result format and batch behaviour.
# --------------------------------------------------------------------------------------


@spec(kind="shape")
@pytest.mark.parametrize("search", ["greedy", "beam", "sample"])
def test_result_starts_after_bos_keeps_eos_and_is_padded_after_it(search: str) -> None:
    """Each row starts with the first generated token (no BOS), holds no padding before its EOS, keeps the EOS, holds only ``pad_id`` after it, and the width is that of the longest row (<= ``max_len``)."""
    model = make_model(6)
    src = sources(7, [5, 8, 2, 6])
    max_len = 14
    steps = end_rows_at_different_steps(model, src, max_len)
    if search == "greedy":
        out = greedy_decode(model, src, max_len, BOS, EOS)
    else:
        out = run_search(search, model, src, max_len)
        steps = eos_steps(out)
    assert out.dtype == torch.int64
    lengths = [max_len if s is None else s for s in steps]
    assert out.shape == (4, max(lengths))
    for row, n, step in zip(out.tolist(), lengths, steps, strict=True):
        assert PAD not in row[:n], row
        assert all(token == PAD for token in row[n:]), row
        if step is not None:
            assert row[n - 1] == EOS and EOS not in row[: n - 1], row
    # No BOS in front: the first token is the argmax after BOS alone.
    with torch.no_grad():
        first = model(src, torch.full((4, 1), BOS))[:, 0]
    first[:, PAD] = float("-inf")
    if search == "greedy":
        assert torch.equal(out[:, 0], first.argmax(dim=-1))


@spec(kind="equivalence")
def test_batch_elements_finish_independently() -> None:
    """Decoding a batch gives each row what decoding it alone gives: a row that ended early neither stops nor changes the others."""
    model = make_model(8)
    src = sources(9, [6, 3, 7, 5])
    max_len = 12
    end_rows_at_different_steps(model, src, max_len)
    for search in (greedy_decode, functools.partial(beam_search, beam_size=3)):
        batch = search(model, src, max_len, BOS, EOS)
        for b in range(4):
            n = int((src[b] != PAD).sum())
            alone = search(model, src[b : b + 1, :n], max_len, BOS, EOS)[0]
            row = batch[b]
            assert torch.equal(row[: alone.numel()], alone), f"row {b}"
            assert bool((row[alone.numel() :] == PAD).all()), f"row {b}"


@spec(kind="shape")
def test_rows_without_eos_run_to_max_len_and_pad_is_never_generated() -> None:
    """Without EOS a row has exactly ``max_len`` tokens; the padding token is never generated even when its logit is the largest."""
    model = make_model(11)
    with torch.no_grad():
        model.output.bias[EOS] = -1e4
        model.output.bias[PAD] = 1e4
    src = sources(12, [4, 2])
    for out in (
        greedy_decode(model, src, 9, BOS, EOS),
        beam_search(model, src, 9, BOS, EOS, beam_size=2),
    ):
        assert out.shape == (2, 9)
        assert not bool((out == PAD).any())
        assert not bool((out == EOS).any())


@spec(kind="equivalence")
def test_generation_runs_in_eval_mode_without_autograd_and_restores_the_mode() -> None:
    """A model in training mode with dropout decodes deterministically (eval mode inside), builds no autograd graph, and is back in training mode afterwards; the tokens returned are an ordinary tensor, not one of ``torch.inference_mode``'s inference tensors (which could not be changed in place or used by autograd later)."""
    model = make_model(13, dropout=0.5).train()
    src = sources(14, [5, 3])
    grad_inside: list[bool] = []
    model.output.register_forward_hook(lambda *_: grad_inside.append(torch.is_grad_enabled()))
    first = greedy_decode(model, src, 8, BOS, EOS)
    assert grad_inside and not any(grad_inside), "a decoding step recorded autograd"
    assert model.training
    assert all(m.training for m in model.modules())
    second = beam_search(model, src, 8, BOS, EOS, beam_size=1)
    assert model.training
    assert torch.equal(first, second)
    assert not first.requires_grad
    assert not first.is_inference() and not second.is_inference()
    first += 0  # in place, outside inference mode: refused for an inference tensor


# --------------------------------------------------------------------------------------
# Beam search (section 6.1: beam size 4, length penalty alpha = 0.6).
# --------------------------------------------------------------------------------------


@spec(kind="equivalence")
@pytest.mark.parametrize("seed", [0, 1, 2, 4])
def test_beam_search_with_one_beam_returns_the_greedy_tokens(seed: int) -> None:
    """``beam_search(beam_size=1)`` returns exactly what ``greedy_decode`` returns, whatever the length penalty."""
    model = make_model(seed + 20)
    src = sources(seed, [7, 2, 9, 4])
    end_rows_at_different_steps(model, src, max_len=13)
    greedy = greedy_decode(model, src, 13, BOS, EOS)
    for alpha in (0.0, 0.6, 2.0):
        beam = beam_search(model, src, 13, BOS, EOS, beam_size=1, length_penalty=alpha)
        assert torch.equal(beam, greedy), f"alpha {alpha}\nbeam\n{beam}\ngreedy\n{greedy}"


def objective(model: Seq2SeqTransformer, src: Tensor, hypothesis: list[int], alpha: float) -> float:
    """GNMT's ranking score ``log P(Y | X) / ((5 + |Y|) / 6) ** alpha``, written out (§6.1).

    ``P`` is the model's distribution over tokens other than padding (never generated);
    ``|Y|`` counts the tokens including EOS.
    """
    tgt_in = torch.tensor([[BOS, *hypothesis[:-1]]])
    with torch.no_grad():
        logits = model(src, tgt_in)[0].double()  # (T, V)
    logits[:, PAD] = float("-inf")
    logp = logits.log_softmax(dim=-1)
    total = sum(float(logp[t, token]) for t, token in enumerate(hypothesis))
    return total / ((5 + len(hypothesis)) / 6) ** alpha


def every_hypothesis(vocab: int, max_len: int) -> list[list[int]]:
    """Every output of at most ``max_len`` tokens: ending at its first EOS, or EOS-free at ``max_len``."""
    tokens = [t for t in range(vocab) if t not in (PAD, EOS)]
    out: list[list[int]] = []
    for n in range(max_len):
        out += [[*prefix, EOS] for prefix in itertools.product(tokens, repeat=n)]
    out += [list(seq) for seq in itertools.product(tokens, repeat=max_len)]
    return out


@spec(kind="equivalence")
@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5, 3.0])
def test_wide_beam_finds_the_best_sequence_under_the_length_penalty(alpha: float) -> None:
    """A beam wide enough to keep every hypothesis returns the sequence with the highest ``log P / lp`` over all outputs (found by brute force), so it never scores below greedy decoding (§6.1)."""
    vocab, max_len = 6, 3
    model = make_model(31, vocab=vocab, dtype=torch.float64)
    with torch.no_grad():
        model.output.bias[EOS] += 1.0  # EOS competitive, so lengths 1..3 all matter
    src = sources(32, [4], vocab=vocab)
    candidates = every_hypothesis(vocab, max_len)
    scores = [objective(model, src, h, alpha) for h in candidates]
    best = candidates[max(range(len(candidates)), key=scores.__getitem__)]
    beam = beam_search(
        model, src, max_len, BOS, EOS, beam_size=len(candidates), length_penalty=alpha
    )
    found = [t for t in beam[0].tolist() if t != PAD]
    assert found == best, (
        f"beam {found} ({objective(model, src, found, alpha):.6f}), best {best} ({max(scores):.6f})"
    )
    greedy = [t for t in greedy_decode(model, src, max_len, BOS, EOS)[0].tolist() if t != PAD]
    assert objective(model, src, found, alpha) >= objective(model, src, greedy, alpha)


@spec(kind="equivalence")
def test_length_penalty_changes_which_length_wins() -> None:
    """The length penalty takes part in the ranking: across alphas 0 and 3 the exhaustive beam's choice follows the brute-force optimum, which differs in length between them (§6.1)."""
    vocab, max_len = 6, 3
    candidates = every_hypothesis(vocab, max_len)
    chosen: dict[float, list[int]] = {}
    for seed in range(40, 60):
        model = make_model(seed, vocab=vocab, dtype=torch.float64)
        with torch.no_grad():
            model.output.bias[EOS] += 1.0
        src = sources(seed, [3], vocab=vocab)
        for alpha in (0.0, 3.0):
            out = beam_search(
                model, src, max_len, BOS, EOS, beam_size=len(candidates), length_penalty=alpha
            )
            chosen[alpha] = [t for t in out[0].tolist() if t != PAD]
        if len(chosen[0.0]) != len(chosen[3.0]):
            break
    else:
        raise AssertionError("no seed made the length penalty matter")
    for alpha, found in chosen.items():
        scores = [objective(model, src, h, alpha) for h in candidates]
        assert found == candidates[max(range(len(candidates)), key=scores.__getitem__)], alpha
    assert len(chosen[3.0]) > len(chosen[0.0]), "a larger alpha favours longer outputs"


# --------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------


@spec(kind="error")
def test_bad_arguments_raise_errors_naming_them() -> None:
    """``max_len < 1``, ``beam_size < 1``, a negative or non-numeric length penalty, BOS/EOS outside the vocabulary and a source that is not 2-D integer ids raise ``ValueError``/``TypeError`` naming the argument."""
    model = make_model(0)
    src = sources(1, [3])
    with pytest.raises(ValueError, match="max_len must be a positive int, got 0"):
        greedy_decode(model, src, 0, BOS, EOS)
    with pytest.raises(ValueError, match="beam_size must be a positive int, got 0"):
        beam_search(model, src, 5, BOS, EOS, beam_size=0)
    with pytest.raises(ValueError, match="length_penalty must be a number >= 0"):
        beam_search(model, src, 5, BOS, EOS, length_penalty=-0.5)
    with pytest.raises(TypeError, match=r"length_penalty must be a real number, got str '0\.6'"):
        beam_search(model, src, 5, BOS, EOS, length_penalty="0.6")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=f"eos_id={V} is outside the target vocabulary of size {V}"
    ):
        greedy_decode(model, src, 5, BOS, V)
    with pytest.raises(TypeError, match="src must hold integer token ids"):
        greedy_decode(model, src.float(), 5, BOS, EOS)
    with pytest.raises(ValueError, match=r"src must be 2-D \(B, T\)"):
        beam_search(model, src[0], 5, BOS, EOS)
    with pytest.raises(TypeError, match=r"max_len must be an int, got float 5\.0"):
        greedy_decode(model, src, 5.0, BOS, EOS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="use_cache must be a bool, got str 'no'"):
        greedy_decode(model, src, 5, BOS, EOS, use_cache="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model must be a Seq2SeqTransformer"):
        greedy_decode(model.transformer, src, 5, BOS, EOS)  # type: ignore[arg-type]


@spec(kind="shape")
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_empty_batch_gives_zero_rows_of_zero_tokens(use_cache: bool) -> None:
    """A batch of no source rows ``(0, S)`` gives ``(0, 0)`` int64 from greedy, beam search and sampling alike (the longest of no rows is empty), without running the decoder."""
    model = make_model(21)
    src = torch.zeros((0, 5), dtype=torch.long)
    for out in (
        greedy_decode(model, src, 6, BOS, EOS, use_cache=use_cache),
        beam_search(model, src, 6, BOS, EOS, beam_size=3, use_cache=use_cache),
        sample_decode(model, src, 6, BOS, EOS, use_cache=use_cache),
    ):
        assert out.shape == (0, 0)
        assert out.dtype == torch.int64


@spec(kind="equivalence")
def test_eos_that_is_the_padding_id_may_be_generated() -> None:
    """When EOS and padding share an id the search may emit it (it ends the row), and cached and uncached decoding still agree; only a separate padding id is forbidden."""
    model = make_model(22)
    with torch.no_grad():
        model.output.bias[PAD] = 1e4  # the shared PAD/EOS id wins at once
    src = sources(23, [4, 3])
    for use_cache in (True, False):
        assert greedy_decode(model, src, 5, BOS, PAD, use_cache=use_cache).tolist() == [[PAD]] * 2
        beam = beam_search(model, src, 5, BOS, PAD, beam_size=2, use_cache=use_cache)
        assert beam.tolist() == [[PAD]] * 2
        drawn = sample_decode(model, src, 5, BOS, PAD, use_cache=use_cache)
        assert drawn.tolist() == [[PAD]] * 2


@spec(kind="equivalence")
@pytest.mark.parametrize("extra", ["add_bias_kv", "add_zero_attn"])
def test_cached_decoding_with_extra_keys_returns_the_tokens_of_full_redecoding(
    extra: str,
) -> None:
    """Decoder attentions with ``add_bias_kv`` or ``add_zero_attn`` (torch's extra key appended after the real ones) decode with the KV cache to exactly the tokens of re-decoding the prefix: the extra key is appended at each call, not cached as a position."""
    from transformer import MultiheadAttention

    model = make_model(24)
    src = sources(25, [4, 7])
    torch.manual_seed(24)
    for layer in model.transformer.decoder.layers:
        layer.self_attn = MultiheadAttention(24, 3, batch_first=True, **{extra: True}).eval()
        layer.multihead_attn = MultiheadAttention(24, 3, batch_first=True, **{extra: True}).eval()
    cached = greedy_decode(model, src, 9, BOS, EOS, use_cache=True)
    full = greedy_decode(model, src, 9, BOS, EOS, use_cache=False)
    assert torch.equal(cached, full), f"cached\n{cached}\nfull\n{full}"


@spec(kind="error")
def test_kv_cache_refuses_a_decoder_layer_that_is_not_ours_and_points_to_use_cache_false() -> None:
    """A decoder layer that is not our ``TransformerDecoderLayer`` (torch's takes no cache) makes the KV cache raise TypeError pointing to ``use_cache=False``, which still decodes."""
    model = make_model(26)
    src = sources(25, [4])
    model.transformer.decoder.layers[1] = torch.nn.TransformerDecoderLayer(
        24, 3, 40, 0.0, batch_first=True
    ).eval()
    with pytest.raises(TypeError, match="use_cache=False"):
        CachedDecoder(model, src)
    with pytest.raises(TypeError, match="use_cache=False"):
        greedy_decode(model, src, 3, BOS, EOS, use_cache=True)
    assert greedy_decode(model, src, 3, BOS, EOS, use_cache=False).shape[0] == 1


# --------------------------------------------------------------------------------------
# The padding token is never generated (unless it is EOS), by any search.
# --------------------------------------------------------------------------------------

SEARCHES = ("greedy", "beam", "sample")


def assert_no_padding_before_the_end(out: Tensor, max_len: int) -> None:
    """Each row holds no ``PAD`` up to its EOS (or over all ``max_len`` tokens without one)."""
    for row in out.tolist():
        end = row.index(EOS) + 1 if EOS in row else max_len
        assert len(row) >= end and PAD not in row[:end], f"padding generated: {row}"
        assert all(token == PAD for token in row[end:]), row


@spec(kind="masking")
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("search", SEARCHES)
def test_a_model_that_prefers_padding_above_all_never_generates_it(
    search: str, use_cache: bool
) -> None:
    """The padding token is never generated when it is not EOS, even by a model whose output bias makes it win by far at every step: every other logit is about -100 and padding's 10^4, so setting padding's logit to 0 (or any value the other tokens do not beat) instead of -inf would be caught by greedy, beam search and sampling alike."""
    model = make_model(29)
    with torch.no_grad():
        model.output.bias.fill_(-100.0)  # every real token (EOS included) far below 0 ...
        model.output.bias[PAD] = 1e4  # ... and padding far above all of them
    src = sources(30, [5, 2, 7])
    max_len = 8
    gen = torch.Generator().manual_seed(1)
    if search == "greedy":
        out = greedy_decode(model, src, max_len, BOS, EOS, use_cache=use_cache)
    elif search == "beam":
        out = beam_search(model, src, max_len, BOS, EOS, beam_size=3, use_cache=use_cache)
    else:
        out = sample_decode(model, src, max_len, BOS, EOS, generator=gen, use_cache=use_cache)
    assert_no_padding_before_the_end(out, max_len)


# --------------------------------------------------------------------------------------
# max_len is bounded by the positional table (section 3.5), checked before any step.
# --------------------------------------------------------------------------------------


@spec(section="3.5", kind="error")
@pytest.mark.parametrize("search", SEARCHES)
def test_max_len_beyond_the_positional_table_raises_before_the_first_step(
    search: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``max_len`` may fill the model's positional table (the last step decodes BOS and ``max_len - 1`` tokens) but not exceed it: one more raises ValueError naming max_len and the table size before the source is even encoded, instead of failing ``max_len`` steps later; a source longer than the table raises ValueError naming ``src``."""
    model = make_model(27, max_len=6)
    with torch.no_grad():
        model.output.bias[EOS] = -1e4  # no row ends early: every step is taken
    src = sources(28, [4, 2])
    assert run_search(search, model, src, 6).shape == (2, 6)

    def encode(src: Tensor) -> Tensor:
        raise AssertionError("the search started before checking max_len")

    monkeypatch.setattr(model, "encode", encode)
    with pytest.raises(
        ValueError, match=r"max_len=7 exceeds the model's positional table of 6 positions"
    ):
        run_search(search, model, src, 7)
    # A source longer than the table is named as src, not as the search's max_len.
    with pytest.raises(ValueError, match=r"src has 7 tokens per row, more than the model's"):
        run_search(search, model, sources(29, [7, 2]), 3)


# --------------------------------------------------------------------------------------
# Sampling: temperature, top-k (Fan et al., 2018) and top-p (Holtzman et al., 2020).
# --------------------------------------------------------------------------------------


def teacher_forced_logits(model: Seq2SeqTransformer, src: Tensor, out: Tensor) -> Tensor:
    """Float64 logits ``(B, T, V)`` the model gives at each step of ``out``, padding at -inf."""
    tgt_in = torch.cat([torch.full((out.size(0), 1), BOS), out[:, :-1]], dim=1)
    with torch.no_grad():
        logits = model(src, tgt_in).double()
    logits[..., PAD] = float("-inf")
    return logits


def generated_steps(out: Tensor) -> list[tuple[int, int]]:
    """``(row, step)`` of every generated token up to and including each row's EOS."""
    steps = []
    for b, row in enumerate(out.tolist()):
        end = row.index(EOS) + 1 if EOS in row else len(row)
        steps += [(b, t) for t in range(end)]
    return steps


@spec(kind="equivalence")
@pytest.mark.parametrize("top_k", [1, 3])
def test_top_k_samples_never_leave_the_k_most_probable_tokens(top_k: int) -> None:
    """Every token ``sample_decode(top_k=k)`` draws is among the k largest logits the model gives at that step (over 24 rows x 10 steps at temperature 2, which spreads draws over all k; padding excluded), and with k = 3 the draws do use ranks beyond the first."""
    model = make_model(41)
    src = sources(42, [6] * 24)
    gen = torch.Generator().manual_seed(3)
    out = sample_decode(model, src, 10, BOS, EOS, temperature=2.0, top_k=top_k, generator=gen)
    logits = teacher_forced_logits(model, src, out)
    ranks = []
    for b, t in generated_steps(out):
        step = logits[b, t]
        ranks.append(int((step > step[out[b, t]]).sum()))  # 0 = the most probable token
    assert max(ranks) < top_k, f"ranks drawn: {sorted(set(ranks))}"
    if top_k > 1:
        assert max(ranks) > 0, "the draws never left the greedy token"


def nucleus(probs: Tensor, top_p: float) -> set[int]:
    """The smallest set of most probable tokens whose probabilities sum to >= top_p (float64)."""
    order = probs.argsort(descending=True).tolist()
    kept: set[int] = set()
    mass = 0.0
    for token in order:
        kept.add(token)
        mass += float(probs[token])
        if mass >= top_p:
            break
    return kept


@spec(kind="equivalence")
@pytest.mark.parametrize("top_p", [0.3, 0.75])
def test_top_p_samples_never_leave_the_smallest_nucleus(top_p: float) -> None:
    """Every token ``sample_decode(top_p=p)`` draws lies in the nucleus of that step: the smallest set of most probable tokens of ``softmax(logits / T)`` (padding excluded) whose mass reaches p, computed plainly in float64; at p = 0.75 the draws use more than the most probable token."""
    model = make_model(43)
    src = sources(44, [5] * 24)
    gen = torch.Generator().manual_seed(4)
    temperature = 1.5
    out = sample_decode(
        model, src, 10, BOS, EOS, temperature=temperature, top_p=top_p, generator=gen
    )
    probs = (teacher_forced_logits(model, src, out) / temperature).softmax(dim=-1)
    outside, beyond_first = [], 0
    for b, t in generated_steps(out):
        token = int(out[b, t])
        if token not in nucleus(probs[b, t], top_p):
            outside.append((b, t, token))
        beyond_first += int(token != int(probs[b, t].argmax()))
    assert not outside, f"(row, step, token) outside the nucleus: {outside}"
    if top_p > 0.5:
        assert beyond_first > 0, "the draws never left the most probable token"


@spec(kind="equivalence")
def test_filter_logits_keeps_exactly_the_top_k_and_the_smallest_nucleus() -> None:
    """``filter_logits`` sets to -inf exactly the tokens outside the k largest logits, and outside the smallest set of most probable tokens whose probability reaches p (the most probable one always kept), keeps the others' logits unchanged and leaves its input as it was."""
    probs = torch.tensor([0.05, 0.3, 0.02, 0.5, 0.13], dtype=torch.float64)  # ranks 3 1 4 0 2
    logits = probs.log()[None].repeat(2, 1)  # (2, 5)
    before = logits.clone()
    cases: list[tuple[int | None, float | None, set[int]]] = [
        (1, None, {3}),
        (2, None, {3, 1}),
        (4, None, {3, 1, 4, 0}),
        (9, None, set(range(5))),  # k >= V keeps every token
        (None, 0.4, {3}),  # 0.5 >= 0.4 already
        (None, 0.7, {3, 1}),  # 0.8 >= 0.7
        (None, 0.85, {3, 1, 4}),  # 0.93 >= 0.85
        (None, 0.1, {3}),  # the most probable token always stays
        (None, 1.0, set(range(5))),
        (2, 0.9, {3, 1}),  # top-p over what top-k left
    ]
    for top_k, top_p, kept in cases:
        out = filter_logits(logits, top_k=top_k, top_p=top_p)
        finite = set(torch.isfinite(out[0]).nonzero().flatten().tolist())
        assert finite == kept, f"top_k={top_k}, top_p={top_p}: kept {finite}, expected {kept}"
        assert torch.equal(out[:, sorted(kept)], logits[:, sorted(kept)])
        assert torch.equal(out[0], out[1])
    assert torch.equal(logits, before)


@spec(kind="equivalence")
@pytest.mark.parametrize(
    ("probs", "top_p", "kept"),
    [
        ([0.6, 0.3, 0.1], 0.9, {0, 1}),  # 0.6 + 0.3 sums to 0.8999999999999999
        ([0.7, 0.2, 0.1], 0.9, {0, 1}),
        ([0.5, 0.25, 0.25], 0.75, {0, 1}),
        ([1 / 12] * 12, 0.5, set(range(6))),  # ties: the first six by torch.sort
    ],
)
def test_a_nucleus_whose_mass_equals_p_exactly_is_not_extended_by_rounding(
    probs: list[float], top_p: float, kept: set[int]
) -> None:
    """When the most probable tokens hold exactly p, the nucleus is those tokens (their mass reaches p) and not one more, though the float sum of their probabilities lands just below p (Holtzman et al., 2020: the smallest set reaching p)."""
    logits = torch.tensor(probs, dtype=torch.float64).log()[None]  # (1, V)
    finite = set(torch.isfinite(filter_logits(logits, top_p=top_p)[0]).nonzero().flatten().tolist())
    if len(set(probs)) == 1:
        assert len(finite) == len(kept), finite  # which of the tied tokens is torch.sort's
    else:
        assert finite == kept


def binomial_bound(p: Tensor, n: int) -> Tensor:
    """Five standard deviations of a frequency of ``n`` Bernoulli(p) draws, plus one count."""
    return 5.0 * (p * (1.0 - p) / n).sqrt() + 1.0 / n


def reference_distribution(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> Tensor:
    """``softmax(logits / T)`` cut to the top k, then to the nucleus, renormalised (float64, plain loops)."""
    probs = (logits.double() / temperature).softmax(dim=-1)
    keep = set(range(logits.numel()))
    if top_k is not None:
        keep = set(probs.argsort(descending=True)[:top_k].tolist())
    cut = torch.zeros_like(probs)
    cut[sorted(keep)] = probs[sorted(keep)]
    cut /= cut.sum()
    if top_p is not None:
        kept = nucleus(cut, top_p)
        cut = torch.where(
            torch.tensor([t in kept for t in range(cut.numel())]), cut, torch.zeros_like(cut)
        )
        cut /= cut.sum()
    return cut


@spec(kind="equivalence")
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, None, None), (0.5, None, None), (2.5, None, None), (1.3, 4, None), (0.8, None, 0.8)],
)
def test_one_step_sample_frequencies_match_softmax_of_logits_over_temperature(
    temperature: float, top_k: int | None, top_p: float | None
) -> None:
    """Over 40000 one-step draws of ``sample_next``, each token's frequency matches its probability under ``softmax(logits / T)`` (cut to the top k or the nucleus and renormalised) within five binomial standard deviations, and tokens cut away are never drawn."""
    logits = torch.tensor([1.2, -0.4, 2.0, 0.3, -1.5, 0.9, 0.0], dtype=torch.float64)
    n = 40_000
    gen = torch.Generator().manual_seed(11)
    draws = sample_next(logits.expand(n, -1), temperature, top_k=top_k, top_p=top_p, generator=gen)
    assert draws.shape == (n,) and draws.dtype == torch.int64
    freq = torch.bincount(draws, minlength=logits.numel()).double() / n
    expected = reference_distribution(logits, temperature, top_k, top_p)
    assert bool((freq[expected == 0] == 0).all()), f"cut tokens drawn: {freq}"
    error = (freq - expected).abs()
    bound = binomial_bound(expected, n)
    assert bool((error <= bound).all()), (
        f"frequencies {freq.tolist()}\nexpected {expected.tolist()}\nmax error "
        f"{float(error.max()):.2e}, mean {float(error.mean()):.2e}"
    )


@spec(kind="equivalence")
def test_temperature_zero_a_tiny_temperature_and_top_k_one_give_the_greedy_tokens() -> None:
    """``sample_decode`` with ``temperature=0`` (documented as greedy), with a tiny temperature (1e-6: the distribution collapses onto the most probable token) or with ``top_k=1`` returns exactly the tokens of ``greedy_decode``, rows ending at different steps."""
    model = make_model(45)
    src = sources(46, [7, 3, 5, 6])
    end_rows_at_different_steps(model, src, max_len=12)
    greedy = greedy_decode(model, src, 12, BOS, EOS)
    for kw in ({"temperature": 0.0}, {"temperature": 1e-6}, {"top_k": 1, "temperature": 5.0}):
        gen = torch.Generator().manual_seed(0)
        drawn = sample_decode(model, src, 12, BOS, EOS, generator=gen, **kw)  # type: ignore[arg-type]
        assert torch.equal(drawn, greedy), f"{kw}\nsampled\n{drawn}\ngreedy\n{greedy}"


@spec(kind="equivalence")
def test_the_same_generator_seed_gives_the_same_tokens_and_another_seed_differs() -> None:
    """Sampling is a function of the ``torch.Generator``'s state: the same seed gives the same tokens, with and without the KV cache; another seed gives other tokens; torch's global generator is neither used nor advanced."""
    model = make_model(47)
    src = sources(48, [6, 4, 7, 5, 3, 6])

    def draw(seed: int, use_cache: bool = True) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return sample_decode(
            model,
            src,
            10,
            BOS,
            EOS,
            temperature=1.5,
            top_p=0.95,
            generator=gen,
            use_cache=use_cache,
        )

    global_state = torch.get_rng_state()
    first = draw(7)
    assert torch.equal(torch.get_rng_state(), global_state), "the global generator moved"
    assert torch.equal(draw(7), first)
    assert torch.equal(draw(7, use_cache=False), first)
    assert not torch.equal(draw(8), first)


@spec(kind="error")
def test_bad_sampling_arguments_raise_errors_naming_them() -> None:
    """A temperature that is negative, NaN or not a number, a top_k that is not a positive int, a top_p outside (0, 1], a generator that is not a ``torch.Generator`` and logits that are not ``(N, V)`` floats with a finite entry per row (NaN or ``+inf`` anywhere, for ``filter_logits`` too) raise ``ValueError``/``TypeError`` naming the argument and the value seen."""
    model = make_model(49)
    src = sources(50, [3])
    bad: list[tuple[dict[str, object], type[Exception], str]] = [
        ({"temperature": -0.5}, ValueError, r"temperature must be >= 0 \(0 = greedy\), got -0.5"),
        ({"temperature": float("nan")}, ValueError, "temperature must be finite, got nan"),
        ({"temperature": "hot"}, TypeError, "temperature must be a real number, got str 'hot'"),
        ({"top_k": 0}, ValueError, "top_k must be a positive int, got 0"),
        ({"top_k": 2.0}, TypeError, "top_k must be an int, got float 2.0"),
        ({"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\], got 1.5"),
        ({"top_p": "0.9"}, TypeError, r"top_p must be a real number in \(0, 1\], got str '0.9'"),
        ({"generator": 123}, TypeError, "generator must be a torch.Generator or None, got int"),
    ]
    for kw, error, match in bad:
        with pytest.raises(error, match=match):
            sample_decode(model, src, 4, BOS, EOS, **kw)  # type: ignore[arg-type]
        with pytest.raises(error, match=match):
            sample_next(torch.zeros(2, 5), **kw)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="logits must be a floating point tensor, got dtype"):
        sample_next(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must be 2-D \(N, V\).*got shape \(5,\)"):
        filter_logits(torch.zeros(5), top_k=2)
    row_of_inf = torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]])
    with pytest.raises(ValueError, match="a finite logit in every row"):
        sample_next(row_of_inf)
    with pytest.raises(ValueError, match="logits must be finite or -inf"):
        sample_next(torch.tensor([[0.0, float("nan")]]))
    for bad_logit in (float("nan"), float("inf")):
        # A NaN compares false with every threshold: a cut would keep it silently.
        with pytest.raises(ValueError, match="logits must be finite or -inf: got NaN or"):
            filter_logits(torch.tensor([[bad_logit, 1.0, 2.0]]), top_k=1)
