"""Key/value caches for incremental decoding through the attention modules themselves.

Decoding produces one position at a time, and in a decoder (section 3.2.3) position
``t`` attends only to positions ``<= t``: the keys and values of earlier positions never
change. A cache keeps them, so a step computes the newest position only. The caches are
arguments of :class:`~transformer.multi_head_attention.MultiheadAttention`,
:class:`~transformer.layers.TransformerDecoderLayer`,
:class:`~transformer.layers.TransformerDecoder` and
:meth:`~transformer.model.Seq2SeqTransformer.decode` (keyword ``cache``), so a cached step
runs the very code a full decode runs: the same projections, the same kernel registry,
the same residuals and norms. There is no second copy of the decoder to drift apart.

* :class:`KVCache`: the projected keys/values of one attention. ``static=False`` (self-
  attention) appends the new positions at every call; ``static=True`` (cross-attention)
  keeps what the first call projected from the encoder memory, which decoding never
  changes, and skips the key/value projections from then on.
* :class:`DecoderLayerCache`: the two caches of one decoder layer.
* :class:`DecoderCache`: one per layer of a decoder stack, plus :meth:`DecoderCache.reorder`
  for beam search.

Appends cost O(1) amortised: a buffer has spare capacity and doubles when full, instead
of a ``torch.cat`` that copies the whole cache at every step. :meth:`KVCache.reorder`
gathers rows into the buffers it already has, keeping that capacity, so beam search
does not reallocate at every step either. ``KVCache.allocations`` counts the buffers a
cache has allocated, which is what a test of the growth policy observes.

Greedy decoding by hand, one position per step (what :func:`transformer.greedy_decode`
does, plus EOS handling)::

    memory = model.encode(src)  # (N, S, E)
    cache = DecoderCache.for_decoder(model.transformer.decoder)
    prefix = torch.full((N, 1), bos_id)
    for _ in range(max_len):
        logits = model.decode(prefix, memory, src, cache=cache)[:, -1]  # (N, V)
        prefix = torch.cat([prefix, logits.argmax(-1, keepdim=True)], dim=1)

Notation: N rows (batch, or batch x beams), H heads, T cached positions, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from transformer._checks import check_bool, check_int

__all__ = ["DecoderCache", "DecoderLayerCache", "KVCache"]

#: Positions a buffer holds when first allocated (it doubles from there).
MIN_CAPACITY = 16


class KVCache:
    """The projected keys and values of one attention, ``(N, H, T, D)``, kept between calls.

    Pass it as ``cache=`` to :class:`~transformer.multi_head_attention.MultiheadAttention`.
    Keys and values are stored after the input projections and the split into heads,
    before ``add_bias_kv``/``add_zero_attn`` (those are appended afresh at each call).

    Args:
        static: ``False``: each call appends its keys/values (self-attention while
            decoding). ``True``: the first call fills the cache and later calls reuse it
            without projecting ``key``/``value`` again (cross-attention over the encoder
            memory, which is the same at every step).
    """

    def __init__(self, static: bool = False) -> None:
        self.static = check_bool("static", static)
        self._keys: Tensor | None = None  # (N, H, capacity, D)
        self._values: Tensor | None = None  # (N, H, capacity, Dv)
        self._length = 0
        #: Buffers allocated so far (one per growth, keys and values counted together).
        self.allocations = 0

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        kind = "static" if self.static else "growing"
        return f"KVCache({kind}, length={self._length}, capacity={self.capacity})"

    @property
    def capacity(self) -> int:
        """Positions the buffers hold before the next growth (0 before the first call)."""
        return 0 if self._keys is None else self._keys.size(2)

    @property
    def rows_and_heads(self) -> tuple[int, int]:
        """``(N, H)`` of the cached keys (``(0, 0)`` before the first call)."""
        return (0, 0) if self._keys is None else (self._keys.size(0), self._keys.size(1))

    @property
    def filled(self) -> bool:
        """Whether a static cache holds its keys/values (later calls reuse them)."""
        return self.static and self._keys is not None

    def keys(self) -> Tensor:
        """The cached keys ``(N, H, T, D)``: a view of the buffer, valid until the next call."""
        if self._keys is None:
            raise RuntimeError("the cache is empty: no attention call has filled it yet")
        return self._keys.narrow(2, 0, self._length)

    def values(self) -> Tensor:
        """The cached values ``(N, H, T, Dv)``: a view of the buffer, valid until the next call."""
        if self._values is None:
            raise RuntimeError("the cache is empty: no attention call has filled it yet")
        return self._values.narrow(2, 0, self._length)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the keys ``k`` ``(N, H, T_new, D)`` and values ``v`` ``(N, H, T_new, Dv)``.

        Returns all keys and values so far, ``(N, H, T + T_new, D)`` and ``(..., Dv)``.
        A static cache takes one append only.
        """
        if self.filled:
            raise RuntimeError("a static KVCache is filled once; later calls reuse it")
        t, new = self._length, k.size(2)
        keys, values = self._keys, self._values
        if keys is None or values is None or t + new > keys.size(2):
            want = t + new if self.static else max(MIN_CAPACITY, 2 * (t + new))
            grown_k = k.new_empty((*k.shape[:2], want, k.size(3)))
            grown_v = v.new_empty((*v.shape[:2], want, v.size(3)))
            if keys is not None and values is not None:
                grown_k[:, :, :t] = keys[:, :, :t]
                grown_v[:, :, :t] = values[:, :, :t]
            self._keys, self._values = keys, values = grown_k, grown_v
            self.allocations += 1
        # narrow + copy_ rather than slice assignment: the same copy without the Python
        # indexing machinery (a decoding step makes a dozen appends).
        keys.narrow(2, t, new).copy_(k)
        values.narrow(2, t, new).copy_(v)
        self._length = t + new
        return keys.narrow(2, 0, t + new), values.narrow(2, 0, t + new)

    def reorder(self, rows: Tensor) -> None:
        """Keep rows ``rows`` ``(N,)`` of the cache, in that order (beam search's re-ranking).

        The gathered rows are written back into the same buffers, so their capacity is
        kept and the next append does not reallocate.
        """
        if self._keys is None or self._values is None:
            return
        n = self._length
        if rows.dim() != 1 or rows.numel() != self._keys.size(0):
            raise ValueError(
                f"rows must be 1-D with one entry per cached row ({self._keys.size(0)}), "
                f"got shape {tuple(rows.shape)}"
            )
        # index_select gathers into a temporary: rows may repeat, so in place is unsafe.
        self._keys[:, :, :n] = self._keys[:, :, :n].index_select(0, rows)
        self._values[:, :, :n] = self._values[:, :, :n].index_select(0, rows)


@dataclass
class DecoderLayerCache:
    """The caches of one :class:`~transformer.layers.TransformerDecoderLayer`.

    Attributes:
        self_attn: the target positions' keys/values, one more per decoded position.
        cross_attn: the encoder memory's keys/values, projected on the first step.
    """

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=lambda: KVCache(static=True))


class DecoderCache:
    """The caches of a decoder stack, one :class:`DecoderLayerCache` per layer.

    Pass it as ``cache=`` to :meth:`~transformer.model.Seq2SeqTransformer.decode` (or
    :class:`~transformer.layers.TransformerDecoder`); ``len(cache)`` is the number of
    target positions it holds.

    Args:
        num_layers: the depth of the decoder stack it serves.
    """

    def __init__(self, num_layers: int) -> None:
        num_layers = check_int("num_layers", num_layers)
        self.layers = [DecoderLayerCache() for _ in range(num_layers)]

    @classmethod
    def for_decoder(cls, decoder: nn.Module) -> DecoderCache:
        """An empty cache for ``decoder`` (a :class:`~transformer.layers.TransformerDecoder`)."""
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(
                f"decoder must hold its layers in an nn.ModuleList 'layers', got "
                f"{type(decoder).__name__}"
            )
        return cls(len(layers))

    def __len__(self) -> int:
        return len(self.layers[0].self_attn)

    def __repr__(self) -> str:
        return f"DecoderCache(layers={len(self.layers)}, length={len(self)})"

    def reorder(self, rows: Tensor) -> None:
        """Keep decoder rows ``rows`` ``(N,)`` of every cache (beam search's re-ranking).

        Static (memory) caches are gathered too, so any reordering is correct; when rows
        move only among one source's beams their memory rows are equal anyway.
        """
        if not isinstance(rows, Tensor) or rows.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"rows must be an integer (int64 or int32) tensor, got {rows!r}")
        for layer in self.layers:
            layer.self_attn.reorder(rows)
            layer.cross_attn.reorder(rows)
