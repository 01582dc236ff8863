"""Sampling: temperature, top-k and top-p (nucleus) filtering, drawing, and sample_decode.

:func:`sample_decode` is the third search beside :mod:`transformer.generate`'s greedy
decoding and beam search: at each step it draws the next token from the model's
distribution, reshaped by a temperature and cut to the top-k tokens and/or the top-p
nucleus, reproducible with a ``torch.Generator``. Its two steps are public on their own:
:func:`filter_logits` (the cuts) and :func:`sample_next` (temperature, cuts, one draw per
row). The decoding loop, its argument checks and the KV cache are those of
:mod:`transformer.generate`, which re-exports these names.

Notation: B batch, N rows of logits, S source length, T generated length, V target
vocabulary.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from transformer._checks import check_int, check_real
from transformer.model import Seq2SeqTransformer

__all__ = ["filter_logits", "sample_decode", "sample_next"]


def _check_logits(logits: object) -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating point tensor, got dtype {logits.dtype}")
    if logits.dim() != 2 or logits.size(1) == 0:
        raise ValueError(f"logits must be 2-D (N, V) with V >= 1, got shape {tuple(logits.shape)}")
    return logits


def _check_sampling(
    temperature: object, top_k: object, top_p: object, generator: object
) -> tuple[float, int | None, float | None, torch.Generator | None]:
    """Validate the sampling arguments (shared by :func:`sample_next` and :func:`sample_decode`)."""
    t = check_real("temperature", temperature)
    if t < 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    k = None if top_k is None else check_int("top_k", top_k)
    p: float | None = None
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
            raise TypeError(
                f"top_p must be a real number in (0, 1], got {type(top_p).__name__} {top_p!r}"
            )
        p = float(top_p)
        if not 0.0 < p <= 1.0:  # also refuses NaN
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    return t, k, p, generator


def _probability_dtype(logits: Tensor) -> torch.dtype:
    """float64 for softmax and its cumulative sums, where the device has it."""
    return torch.float32 if logits.device.type == "mps" else torch.float64


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to ``-inf`` every logit outside the top-k tokens and outside the top-p nucleus.

    * **top-k** (Fan et al., 2018): each row keeps its ``top_k`` largest logits; a tie
      with the k-th largest is kept too, and ``top_k >= V`` keeps every token.
    * **top-p, the nucleus** (Holtzman et al., 2020): each row keeps the smallest set of
      most probable tokens whose probabilities under ``softmax(logits)`` sum to at least
      ``top_p`` (a token is kept when the tokens more probable than it hold less than
      ``top_p``, a mass short of ``top_p`` by no more than the rounding of its sum
      counting as reaching it), so the most probable token always stays; ``top_p=1``
      keeps every token.
      With both, top-p applies to what top-k left. Ties at the edge of the nucleus are
      broken by the order of ``torch.sort``.

    Logits already ``-inf`` (a forbidden token) stay so, and count for nothing; NaN and
    ``+inf`` raise ``ValueError``. A temperature, if any, is applied before (see
    :func:`sample_next`).

    Args:
        logits: ``(N, V)`` floating point scores of the next token.
        top_k: a positive int, or ``None`` for no top-k cut.
        top_p: a number in ``(0, 1]``, or ``None`` for no nucleus cut.

    Returns:
        A new ``(N, V)`` tensor of ``logits``' dtype; the input is left as it is.
    """
    logits = _check_logits(logits)
    _, k, p, _ = _check_sampling(1.0, top_k, top_p, None)
    if bool((torch.isnan(logits) | (logits == float("inf"))).any()):
        # A NaN compares false with everything: top-k and the nucleus would keep it.
        raise ValueError("logits must be finite or -inf: got NaN or +inf")
    return _filter(logits, k, p)


def _filter(logits: Tensor, k: int | None, p: float | None) -> Tensor:
    """:func:`filter_logits` on checked arguments (``sample_next`` has checked the values)."""
    out = logits.clone()
    V = logits.size(-1)
    if k is not None and k < V:
        kth = out.topk(k, dim=-1).values[:, -1:]  # (N, 1) the k-th largest of each row
        out = out.masked_fill(out < kth, float("-inf"))
    if p is not None and p < 1.0:
        ranked, order = out.sort(dim=-1, descending=True)  # (N, V) each
        probs = ranked.to(_probability_dtype(out)).softmax(dim=-1)  # (N, V) by rank
        # Mass of the tokens ranked strictly above each token: an exclusive cumulative sum.
        above = torch.cat([probs.new_zeros((probs.size(0), 1)), probs.cumsum(-1)[:, :-1]], -1)
        # A mass short of p only by the rounding of its sum counts as reaching it (0.6 + 0.3
        # is 0.8999999999999999 in float64); a sum of V terms is off by V roundings at most.
        reach = p * (1.0 - V * torch.finfo(probs.dtype).eps)
        drop = torch.empty_like(above, dtype=torch.bool).scatter_(-1, order, above >= reach)
        out = out.masked_fill(drop, float("-inf"))  # (N, V) back in vocabulary order
    return out


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    *,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row from ``softmax(filter_logits(logits / temperature))``.

    The temperature reshapes the distribution first (below 1 sharper, above 1 flatter);
    top-k and top-p then cut it (:func:`filter_logits`), so the nucleus is that of the
    tempered distribution. ``temperature=0`` is the limit: the most probable token, what
    :func:`~transformer.generate.greedy_decode` picks (it is always within the top-k and the
    nucleus). The scaled logits are shifted by their row maximum first, so a tiny
    temperature never overflows into ``inf`` or NaN.

    Args:
        logits: ``(N, V)`` floating point scores; ``-inf`` marks an impossible token. Every
            row needs a finite logit; NaN and ``+inf`` raise ``ValueError``.
        temperature: a finite number >= 0.
        top_k, top_p: as in :func:`filter_logits`.
        generator: the ``torch.Generator`` to draw from (on the logits' device), for
            reproducible draws; ``None`` uses torch's global generator.

    Returns:
        ``(N,)`` int64 token ids.
    """
    logits = _check_logits(logits)
    t, k, p, gen = _check_sampling(temperature, top_k, top_p, generator)
    if gen is not None and gen.device.type != logits.device.type:
        raise ValueError(
            f"generator is on {gen.device} but the logits are on {logits.device}; "
            f"make it with torch.Generator(device={logits.device.type!r})"
        )
    if logits.size(0) == 0:
        return torch.empty(0, dtype=torch.long, device=logits.device)
    nan_or_inf = torch.isnan(logits) | (logits == float("inf"))
    no_finite = (logits == float("-inf")).all(dim=-1)
    if bool(nan_or_inf.any() | no_finite.any()):
        raise ValueError("logits must be finite or -inf, with a finite logit in every row")
    if t == 0.0:
        return logits.argmax(dim=-1)  # (N,)
    # (logits - max) / T <= 0: a tiny T sends the others to -inf, never the maximum to inf.
    shifted = logits.to(_probability_dtype(logits))
    shifted = (shifted - shifted.max(dim=-1, keepdim=True).values) / t  # (N, V)
    probs = _filter(shifted, k, p).softmax(dim=-1)  # (N, V)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]  # (N,)


def sample_decode(
    model: Seq2SeqTransformer,
    src: Tensor,
    max_len: int,
    bos_id: int,
    eos_id: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Sampling: at each step draw the next token from the model's tempered, filtered distribution.

    Each step draws with :func:`sample_next` from ``P(y_t | y_<t, X)`` over the tokens
    other than padding, reshaped by ``temperature`` and cut by ``top_k``/``top_p`` (the
    paper decodes with beam search, section 6.1; sampling is the usual alternative for
    varied outputs). ``temperature=0`` gives :func:`~transformer.generate.greedy_decode`'s
    tokens, and so does ``top_k=1`` except where the largest logits tie exactly (top-k keeps
    every token tied with the k-th, and the draw picks one of them). The same
    ``generator`` state gives the same tokens, cached or not.

    Args:
        model, src, max_len, bos_id, eos_id, use_cache: as in
            :func:`~transformer.generate.greedy_decode`.
        temperature: a finite number >= 0; 1 samples the model's own distribution.
        top_k: keep the ``top_k`` most probable tokens at each step (``None``: all).
        top_p: keep the smallest nucleus of probability >= ``top_p`` (``None``: all).
        generator: a ``torch.Generator`` on the model's device, seeded for reproducible
            output; ``None`` draws from torch's global generator.

    Returns:
        ``(B, T)`` int64, ``T <= max_len``, as :func:`~transformer.generate.greedy_decode`: no BOS,
        EOS kept, ``pad_id`` after it; ``pad_id`` is never drawn unless it is ``eos_id``.
    """
    # Imported on call: transformer.generate imports this module at load time to re-export
    # its names, so importing generate back at load time would be a cycle.
    from transformer.generate import _check_args, _one_token_at_a_time

    model, src, max_len = _check_args(model, src, max_len, bos_id, eos_id, use_cache)
    t, k, p, gen = _check_sampling(temperature, top_k, top_p, generator)
    if gen is not None and gen.device.type != src.device.type:
        raise ValueError(
            f"generator is on {gen.device} but src is on {src.device}; make it with "
            f"torch.Generator(device={src.device.type!r})"
        )

    def draw(logits: Tensor) -> Tensor:
        return sample_next(logits, t, top_k=k, top_p=p, generator=gen)

    return _one_token_at_a_time(model, src, max_len, bos_id, eos_id, use_cache, draw)
