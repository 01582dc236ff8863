"""Token-by-token generation: greedy decoding and beam search (paper section 6.1).

Every search feeds the decoder its own previous outputs one token at a time. Each step
either re-decodes the whole prefix through :meth:`Seq2SeqTransformer.decode`
(``use_cache=False``, the executable spec) or runs only the newest position through the
same method and the same decoder layers, attending to cached keys and values
(``use_cache=True``, with a :class:`~transformer.kv_cache.DecoderCache`):

* self-attention: the keys/values of earlier positions never change (a position sees
  only positions ``<= t``, section 3.2.3), so each step appends one key/value per layer;
* cross-attention: the keys/values are projections of the encoder memory, computed once.

Both paths take their masks from :meth:`Seq2SeqTransformer.masks` and return the same
tokens. Results exclude BOS, keep the EOS where one was generated and are padded with the
model's ``pad_id`` after it. ``pad_id`` itself is never generated (unless it doubles as
``eos_id``): it is not a token but the filler of the result.

Every search runs the model in eval mode under ``torch.inference_mode`` (the model's own
mode is restored after): the returned tokens are ordinary tensors, but anything a hook
keeps from inside a search is an inference tensor (``Tensor.clone()`` it outside to use
it with autograd or change it in place).

The searches: :func:`greedy_decode` (the most probable token) and :func:`beam_search` (the
paper's decoding, section 6.1). Sampling (:func:`~transformer.sampling.sample_decode`, a
draw from the model's distribution reshaped by a temperature and cut to the top-k tokens
and/or the top-p nucleus, and its steps :func:`~transformer.sampling.filter_logits` and
:func:`~transformer.sampling.sample_next`) lives in :mod:`transformer.sampling`; it runs
this module's decoding loop, and its names are re-exported here.

Notation: B batch, K beam size, N decoder rows (B, or B*K in beam search), S source
length, t current position, H heads, D head dim, E ``d_model``, V target vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from transformer._checks import check_bool, check_int, check_real
from transformer.kv_cache import DecoderCache
from transformer.layers import TransformerDecoderLayer
from transformer.model import Seq2SeqTransformer, check_token_ids
from transformer.sampling import filter_logits, sample_decode, sample_next

__all__ = [
    "CachedDecoder",
    "FullDecoder",
    "beam_search",
    "filter_logits",
    "gnmt_length_penalty",
    "greedy_decode",
    "sample_decode",
    "sample_next",
]


def gnmt_length_penalty(length: int, alpha: float) -> float:
    """GNMT's length penalty ``lp(Y) = ((5 + |Y|) / 6) ** alpha`` (paper section 6.1, alpha 0.6).

    Beam search ranks finished hypotheses by ``log P(Y | X) / lp(Y)``, where ``|Y|``
    counts the generated tokens including EOS.
    """
    return ((5.0 + length) / 6.0) ** alpha


# --------------------------------------------------------------------------- arguments


def _check_args(
    model: object,
    src: object,
    max_len: object,
    bos_id: object,
    eos_id: object,
    use_cache: object,
) -> tuple[Seq2SeqTransformer, Tensor, int]:
    """Validate the arguments every search shares; return the model, ``src`` as int64, max_len.

    ``max_len`` may not exceed the model's positional table: the last step decodes a prefix
    of ``max_len`` positions (BOS and ``max_len - 1`` tokens), and a longer one has no
    positional encoding. Checked here, before the first step, not ``max_len`` steps later.
    """
    if not isinstance(model, Seq2SeqTransformer):
        raise TypeError(f"model must be a Seq2SeqTransformer, got {type(model).__name__}")
    vocab = model.config.tgt_vocab_size
    ids = check_token_ids("src", src, model.config.src_vocab_size)
    steps = check_int("max_len", max_len)
    table = model.config.max_len
    if steps > table:
        raise ValueError(
            f"max_len={steps} exceeds the model's positional table of {table} positions "
            f"(its config.max_len): decode at most {table} tokens"
        )
    if ids.size(-1) > table:
        raise ValueError(
            f"src has {ids.size(-1)} tokens per row, more than the model's positional table "
            f"of {table} positions (its config.max_len): shorten or split the source"
        )
    for name, token in (("bos_id", bos_id), ("eos_id", eos_id)):
        token = check_int(name, token, low=0)
        if token >= vocab:
            raise ValueError(f"{name}={token} is outside the target vocabulary of size {vocab}")
    check_bool("use_cache", use_cache)
    return model, ids, steps


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and inference mode for the duration; the mode is restored after.

    ``torch.inference_mode`` rather than ``no_grad``: it also skips the version counters
    and view tracking of every op, which a cached decoding step (hundreds of small ops)
    pays for: about 0.8 ms of a 9 ms base-size step at 2 threads. Tensors made inside are
    inference tensors, so what a search returns is made (or copied) outside it.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _forbid_pad(logits: Tensor, pad_id: int, eos_id: int) -> Tensor:
    """``logits`` ``(N, V)`` with the padding token made impossible (unless it is EOS)."""
    if pad_id == eos_id:
        return logits
    logits = logits.clone()
    logits[:, pad_id] = float("-inf")
    return logits


# --------------------------------------------------------------------------- decoders


class FullDecoder:
    """Step-by-step decoder without a cache: each step re-decodes the whole prefix.

    The executable spec of :class:`CachedDecoder`: ``step`` is
    :meth:`Seq2SeqTransformer.decode` of the prefix, last position. The source is encoded
    once, at construction. Use it (like :class:`CachedDecoder`) in eval mode under
    ``torch.inference_mode()``, as :func:`greedy_decode` and :func:`beam_search` do.

    Args:
        model: the model to decode with.
        src: ``(N, S)`` source ids, one row per decoder row.
    """

    def __init__(self, model: Seq2SeqTransformer, src: Tensor) -> None:
        self.model = model
        self.src = src  # (N, S)
        self.memory = model.encode(src)  # (N, S, E)

    def step(self, prefix: Tensor) -> Tensor:
        """Logits ``(N, V)`` of the next token after ``prefix`` ``(N, t + 1)``."""
        return self.model.decode(prefix, self.memory, self.src)[:, -1]  # (N, V)

    def reorder(self, rows: Tensor) -> None:
        """Nothing is cached per prefix; rows only move within a batch element's beams."""


class CachedDecoder:
    """Step-by-step decoder with a KV cache: each step runs only the newest position.

    A step is :meth:`Seq2SeqTransformer.decode` of the prefix with a
    :class:`~transformer.kv_cache.DecoderCache`: the same decoder layers, attention modules
    and kernels as :class:`FullDecoder` runs, restricted to the newest query. Each layer's
    cache keeps the self-attention keys/values of the positions decoded so far (one more
    per step) and the cross-attention keys/values of the memory (projected on the first
    step). Calls to ``step`` must pass the growing prefix, one token longer each time.

    Args:
        model: the model to decode with (its decoder layers must be this package's
            :class:`~transformer.layers.TransformerDecoderLayer`).
        src: ``(N, S)`` source ids, one row per decoder row.
    """

    def __init__(self, model: Seq2SeqTransformer, src: Tensor) -> None:
        layers = model.transformer.decoder.layers
        assert isinstance(layers, nn.ModuleList)
        for layer in layers:
            if not isinstance(layer, TransformerDecoderLayer):
                raise TypeError(
                    f"the KV cache runs through transformer.TransformerDecoderLayer, got "
                    f"{type(layer).__name__}; decode with use_cache=False"
                )
        self.model = model
        self.src = src  # (N, S)
        self.memory = model.encode(src)  # (N, S, E)
        self.cache = DecoderCache.for_decoder(model.transformer.decoder)

    def step(self, prefix: Tensor) -> Tensor:
        """Logits ``(N, V)`` of the next token after ``prefix`` ``(N, t + 1)``.

        The cache must hold positions ``0..t-1`` of this same prefix.
        """
        return self.model.decode(prefix, self.memory, self.src, cache=self.cache)[:, -1]

    def reorder(self, rows: Tensor) -> None:
        """Keep the caches of decoder rows ``rows`` ``(N,)`` (beam search's re-ranking)."""
        self.cache.reorder(rows)


def _decoder(
    model: Seq2SeqTransformer, src: Tensor, use_cache: bool
) -> CachedDecoder | FullDecoder:
    return CachedDecoder(model, src) if use_cache else FullDecoder(model, src)


# --------------------------------------------------------------------------- searches


def _one_token_at_a_time(
    model: Seq2SeqTransformer,
    src: Tensor,
    max_len: int,
    bos_id: int,
    eos_id: int,
    use_cache: bool,
    choose: Callable[[Tensor], Tensor],
) -> Tensor:
    """The loop of greedy decoding and sampling: ``choose`` maps logits ``(B, V)`` to ``(B,)``.

    The arguments are checked by the caller. ``choose`` never sees the padding token as
    possible (unless it is EOS); rows that generated EOS get ``pad_id`` from then on.
    """
    pad_id = model.pad_id
    if src.size(0) == 0:
        return src.new_empty((0, 0))  # no rows: the longest row has length 0
    with _inference(model):
        decoder = _decoder(model, src, use_cache)
        B = src.size(0)
        prefix = src.new_full((B, 1), bos_id)  # (B, 1)
        finished = torch.zeros(B, dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            logits = _forbid_pad(decoder.step(prefix), pad_id, eos_id)  # (B, V)
            token = choose(logits)  # (B,)
            token = token.masked_fill(finished, pad_id)
            prefix = torch.cat([prefix, token[:, None]], dim=1)  # (B, t + 2)
            finished |= token == eos_id
            if bool(finished.all()):
                break
    return prefix[:, 1:].clone()  # a normal tensor: usable with autograd and in place


def greedy_decode(
    model: Seq2SeqTransformer,
    src: Tensor,
    max_len: int,
    bos_id: int,
    eos_id: int,
    use_cache: bool = True,
) -> Tensor:
    """Greedy decoding: at each step emit the most probable next token (section 6.1 uses beams).

    Args:
        model: the trained model; it runs in eval mode without autograd, its mode is restored.
        src: ``(B, S)`` source ids, padded with the model's ``pad_id``.
        max_len: the most tokens generated per sequence (EOS included), from 1 to the
            model's positional table size ``model.config.max_len`` (``ValueError`` beyond,
            before any step).
        bos_id: the token the decoder starts from (not part of the result).
        eos_id: ends a sequence; each batch element finishes on its own.
        use_cache: attend with cached keys/values; ``False`` re-decodes the prefix at every
            step (same tokens, quadratic cost).

    Returns:
        ``(B, T)`` int64 with ``T <= max_len``: the generated tokens, EOS kept, ``pad_id``
        after it; ``T`` is the length of the longest row.
    """
    model, src, max_len = _check_args(model, src, max_len, bos_id, eos_id, use_cache)
    return _one_token_at_a_time(
        model, src, max_len, bos_id, eos_id, use_cache, lambda logits: logits.argmax(dim=-1)
    )


def beam_search(
    model: Seq2SeqTransformer,
    src: Tensor,
    max_len: int,
    bos_id: int,
    eos_id: int,
    beam_size: int = 4,
    length_penalty: float = 0.6,
    *,
    use_cache: bool = True,
) -> Tensor:
    """Beam search with GNMT's length penalty (section 6.1: beam size 4, alpha 0.6).

    Each step extends every live hypothesis by every token and keeps the ``beam_size``
    best by ``log P``, minus one slot per hypothesis already finished: a hypothesis that
    picks EOS leaves the beam and waits, scored ``log P(Y | X) / lp(Y)`` (see
    :func:`gnmt_length_penalty`). A batch element stops when no hypothesis is live, when none
    can still beat its best finished one, or at ``max_len`` (live hypotheses then count as
    finished). With ``beam_size=1`` this is greedy decoding, token for token.

    Args:
        model, src, max_len, bos_id, eos_id: as in :func:`greedy_decode`.
        beam_size: hypotheses kept per batch element (K), at least 1.
        length_penalty: alpha >= 0; 0 ranks by plain log-probability.
        use_cache: decode with the KV cache (same result either way).

    Returns:
        ``(B, T)`` int64, ``T <= max_len``: the best hypothesis of each batch element,
        EOS kept, padded with ``pad_id``.
    """
    model, src, max_len = _check_args(model, src, max_len, bos_id, eos_id, use_cache)
    K = check_int("beam_size", beam_size)
    alpha = check_real("length_penalty", length_penalty)
    if alpha < 0.0:
        raise ValueError(f"length_penalty must be a number >= 0, got {length_penalty!r}")
    pad_id = model.pad_id
    B, device = src.size(0), src.device
    if B == 0:
        return src.new_empty((0, 0))  # as greedy_decode: no rows, width 0
    with _inference(model):
        decoder = _decoder(model, src.repeat_interleave(K, dim=0), use_cache)  # N = B*K rows
        prefix = src.new_full((B * K, 1), bos_id)  # (B*K, 1)
        # log P of each live hypothesis, in float64 so that adding a long prefix's score
        # cannot merge two candidates; -inf marks an empty slot (only beam 0 at start).
        scores = torch.full((B, K), float("-inf"), dtype=torch.float64, device=device)
        scores[:, 0] = 0.0
        slots = torch.full((B,), K, dtype=torch.long, device=device)  # K - finished count
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        best = torch.full((B,), float("-inf"), dtype=torch.float64, device=device)
        rank = torch.arange(K, device=device)[None, :]  # (1, K)
        base = (torch.arange(B, device=device) * K)[:, None]  # (B, 1) first row of element b
        last_lp = gnmt_length_penalty(max_len, alpha)
        for t in range(max_len):
            logits = _forbid_pad(decoder.step(prefix), pad_id, eos_id)  # (B*K, V)
            logp = logits.double().log_softmax(dim=-1)  # (B*K, V)
            V = logp.size(-1)
            candidates = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
            top, index = candidates.topk(K, dim=1)  # (B, K) best first
            beam, token = index // V, index % V  # (B, K) each
            chosen = (rank < slots[:, None]) & torch.isfinite(top)  # (B, K)
            ended = chosen & (token == eos_id)
            if t == max_len - 1:
                ended = chosen  # out of room: live hypotheses count as finished
            live = chosen & ~ended
            rows = (base + beam).view(-1)  # (B*K,) source row of each candidate
            for b, k in ended.nonzero().tolist():
                tokens = [*prefix[rows[b * K + k], 1:].tolist(), int(token[b, k])]
                score = float(top[b, k]) / gnmt_length_penalty(len(tokens), alpha)
                finished[b].append((score, tokens))
                best[b] = max(float(best[b]), score)
            slots -= ended.sum(dim=1)
            # Move live candidates to the front of each row, keeping their order.
            order = torch.argsort((~live).to(torch.int8), dim=1, stable=True)  # (B, K)
            live = live.gather(1, order)
            scores = top.gather(1, order).masked_fill(~live, float("-inf"))
            rows = (base + beam.gather(1, order)).view(-1)  # (B*K,)
            token = token.gather(1, order).masked_fill(~live, pad_id).view(-1, 1)
            # No live hypothesis can end above its score / lp(max_len): log P only falls
            # and lp only grows (alpha >= 0). Stop elements whose best finished is higher.
            hopeless = scores.max(dim=1).values / last_lp <= best  # (B,)
            scores = scores.masked_fill(hopeless[:, None], float("-inf"))
            if not bool(torch.isfinite(scores).any()):
                break
            decoder.reorder(rows)
            prefix = torch.cat([prefix.index_select(0, rows), token], dim=1)  # (B*K, t + 2)
    results = [max(hyps, key=lambda h: h[0])[1] for hyps in finished]
    width = max(len(r) for r in results)
    out = src.new_full((B, width), pad_id)
    for b, tokens in enumerate(results):
        out[b, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out
