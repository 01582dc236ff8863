"""Spec of the KV cache: incremental decoding through the attention modules themselves.

A decoder position attends only to earlier positions (section 3.2.3), so the keys and
values of earlier positions never change while decoding. ``transformer.kv_cache`` keeps
them between calls of ``MultiheadAttention``, ``TransformerDecoderLayer``,
``TransformerDecoder`` and ``Seq2SeqTransformer.decode`` (keyword ``cache``). The suite
pins: attending in chunks with a cache equals one call over the whole sequence (masks
covering cached plus new keys); a static (memory) cache is projected once and reused;
decoding with a cache runs its attention through the kernel registry; appends and beam
reordering keep the buffers (counted by the buffers' addresses, a count shown to see a
planted reallocation); bad caches are refused by name.
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import pytest
import torch
from torch import Tensor

from transformer import MultiheadAttention, attention, kernel_registry
from transformer.generate import beam_search, greedy_decode
from transformer.kv_cache import MIN_CAPACITY, DecoderCache, KVCache
from transformer.masks import square_subsequent_mask
from transformer.model import Seq2SeqTransformer
from transformer.testing import assert_close

spec = functools.partial(pytest.mark.spec, component="kv_cache", section="extra")

E, H = 24, 3
PAD, BOS, EOS = 0, 1, 2
V = 19


def make_mha(seed: int, **kwargs: object) -> MultiheadAttention:
    torch.manual_seed(seed)
    return MultiheadAttention(E, H, dtype=torch.float64, **kwargs).eval()  # type: ignore[arg-type]


def make_model(seed: int, *, dtype: torch.dtype = torch.float64) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    model = Seq2SeqTransformer(
        src_vocab_size=V,
        tgt_vocab_size=V,
        d_model=E,
        nhead=H,
        num_encoder_layers=2,
        num_decoder_layers=3,
        dim_feedforward=40,
        dropout=0.0,
        max_len=128,
        tie_output=False,
    )
    return model.to(dtype).eval()


def ids(seed: int, shape: tuple[int, int]) -> Tensor:
    return torch.randint(3, V, shape, generator=torch.Generator().manual_seed(seed))


CHUNKS = [1, 3, 1, 4, 2]  # new positions per call; 11 in all


# --------------------------------------------------------------------------------------
# Equivalence: a cache changes nothing.
# --------------------------------------------------------------------------------------


@spec(kind="equivalence")
@pytest.mark.parametrize("layout", ["batch_first", "seq_first", "unbatched"])
def test_self_attention_in_chunks_with_a_cache_equals_one_causal_call(layout: str) -> None:
    """``MultiheadAttention`` fed a sequence in chunks, each attending to a growing cache with its rows of the causal mask ``(T_new, T)``, returns the output of one call over the whole sequence with the ``(T, T)`` causal mask (section 3.2.3), in every input layout."""
    mha = make_mha(0, batch_first=layout == "batch_first")
    T = sum(CHUNKS)
    x = torch.randn(2, T, E, dtype=torch.float64)  # (B, T, E)
    if layout == "seq_first":
        x = x.transpose(0, 1)  # (T, B, E)
    elif layout == "unbatched":
        x = x[0]  # (T, E)
    seq = 1 if layout == "batch_first" else 0
    causal = square_subsequent_mask(T, dtype=torch.bool)  # True above the diagonal
    full = mha(x, x, x, attn_mask=causal, need_weights=False)[0]
    cache, parts, t = KVCache(), [], 0
    for n in CHUNKS:
        new = x.narrow(seq, t, n)
        parts.append(mha(new, new, new, attn_mask=causal[t : t + n, : t + n], cache=cache)[0])
        t += n
    assert len(cache) == T
    assert_close(torch.cat(parts, dim=seq), full)


@spec(kind="masking")
def test_key_padding_mask_covers_cached_and_new_keys() -> None:
    """With a cache, ``key_padding_mask`` is ``(B, T_cached + T_new)``: a padded *cached* key is ignored exactly as in one call over the whole sequence with the same mask (torch's key padding convention, True = ignore)."""
    mha = make_mha(1, batch_first=True)
    T = sum(CHUNKS)
    x = torch.randn(2, T, E, dtype=torch.float64)
    padding = torch.zeros(2, T, dtype=torch.bool)
    padding[0, [1, 5]] = True  # keys cached by the time later chunks attend
    padding[1, 0] = True
    causal = square_subsequent_mask(T, dtype=torch.bool)
    full = mha(x, x, x, attn_mask=causal, key_padding_mask=padding, need_weights=False)[0]
    cache, parts, t = KVCache(), [], 0
    for n in CHUNKS:
        new = x[:, t : t + n]
        mask = causal[t : t + n, : t + n]
        parts.append(mha(new, new, new, attn_mask=mask, key_padding_mask=padding[:, : t + n], cache=cache)[0])  # fmt: skip
        t += n
    assert_close(torch.cat(parts, dim=1), full)
    # The mask matters: without it the cached padded keys would be attended to.
    unmasked = mha(x, x, x, attn_mask=causal, need_weights=False)[0]
    assert not torch.allclose(unmasked[0, 6:], full[0, 6:])


@spec(kind="equivalence")
def test_static_cache_is_projected_on_the_first_call_and_reused_after() -> None:
    """A static ``KVCache`` (cross-attention) gives at every call the output of attending to the memory without a cache, and after the first call never projects ``key``/``value`` again: passing another memory of the same length changes nothing, as documented."""
    mha = make_mha(2, batch_first=True)
    memory = torch.randn(2, 7, E, dtype=torch.float64)
    cache = KVCache(static=True)
    for step in range(4):
        q = torch.randn(2, 1, E, dtype=torch.float64)
        want = mha(q, memory, memory, need_weights=False)[0]
        assert_close(mha(q, memory, memory, cache=cache)[0], want, msg=f"step {step}")
    assert len(cache) == 7 and cache.allocations == 1
    other = torch.randn_like(memory)
    q = torch.randn(2, 1, E, dtype=torch.float64)
    assert_close(mha(q, other, other, cache=cache)[0], mha(q, memory, memory)[0])


@spec(kind="equivalence")
def test_a_cache_filled_outside_autocast_serves_steps_under_it() -> None:
    """Keys cached in fp32 (the memory projected outside autocast) meet a bf16 query under ``torch.autocast``: attention casts them as torch's SDPA casts its inputs, so the step gives the bf16 output of the same step without a cache under autocast."""
    mha = make_mha(5, batch_first=True).float()
    memory = torch.randn(2, 7, E)
    cache = KVCache(static=True)
    with torch.no_grad():
        mha(torch.randn(2, 1, E), memory, memory, cache=cache)  # projects the memory in fp32
        q = torch.randn(2, 1, E)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = mha(q, memory, memory, need_weights=False, cache=cache)[0]
            want = mha(q, memory, memory, need_weights=False)[0]
    assert got.dtype == want.dtype == torch.bfloat16
    assert_close(got, want)


@spec(kind="equivalence")
@pytest.mark.parametrize("extra", ["add_bias_kv", "add_zero_attn"])
def test_extra_keys_are_appended_at_each_call_not_cached(extra: str) -> None:
    """With ``add_bias_kv``/``add_zero_attn`` the extra key/value is appended after the cached and new keys at every call (torch appends it after the real keys), so chunked calls with a cache equal one call; the cache holds real positions only."""
    mha = make_mha(3, batch_first=True, **{extra: True})
    T = sum(CHUNKS)
    x = torch.randn(2, T, E, dtype=torch.float64)
    causal = square_subsequent_mask(T, dtype=torch.bool)
    full = mha(x, x, x, attn_mask=causal, need_weights=False)[0]
    cache, parts, t = KVCache(), [], 0
    for n in CHUNKS:
        new = x[:, t : t + n]
        parts.append(mha(new, new, new, attn_mask=causal[t : t + n, : t + n], cache=cache)[0])
        t += n
    assert len(cache) == T
    assert_close(torch.cat(parts, dim=1), full)


@spec(kind="equivalence")
def test_decode_in_chunks_with_a_cache_returns_the_teacher_forced_logits() -> None:
    """``Seq2SeqTransformer.decode(prefix, memory, src, cache=...)`` computes only the positions after the cached ones and returns their logits, equal to the teacher-forced ``forward`` at those positions, for a batch with padded sources and a padded target row."""
    model = make_model(4)
    src = ids(5, (3, 8))
    src[1, 5:] = PAD
    tgt = ids(6, (3, 12))
    tgt[:, 0] = BOS
    tgt[2, 9:] = PAD
    with torch.no_grad():
        want = model(src, tgt)  # (B, T, V)
        memory = model.encode(src)
        cache = DecoderCache.for_decoder(model.transformer.decoder)
        got, t = [], 0
        for end in (1, 4, 5, 9, 12):
            logits = model.decode(tgt[:, :end], memory, src, cache=cache)
            assert logits.shape == (3, end - t, V)
            assert len(cache) == end
            got.append(logits)
            t = end
    assert_close(torch.cat(got, dim=1), want)


@spec(kind="equivalence")
def test_cached_decoding_runs_attention_through_the_kernel_registry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cached decoding step reaches attention through ``scaled_dot_product_attention``'s registry: a kernel registered to win ``kernel=None`` runs every self- and cross-attention of every step (one query each), and the tokens equal those of uncached decoding."""
    monkeypatch.setattr(kernel_registry, "_KERNELS", dict(kernel_registry._KERNELS))
    calls: list[tuple[int, int]] = []

    def spy(query: Tensor, key: Tensor, value: Tensor, *args: object, **kw: object) -> Tensor:
        calls.append((query.size(-2), key.size(-2)))
        return attention.reference_attention(query, key, value, *args, **kw)  # type: ignore[arg-type]

    attention.register_kernel("spy", spy, priority=1000)  # fp64: priority decides
    model = make_model(7)
    src = ids(8, (1, 6))
    with torch.no_grad():
        model.output.bias[EOS] = -1e9  # run all steps
    steps = 5
    cached = greedy_decode(model, src, steps, BOS, EOS, use_cache=True)
    decoder_calls = [c for c in calls if c[0] == 1]
    layers = model.config.num_decoder_layers
    assert len(decoder_calls) == 2 * layers * steps
    self_keys = sorted({s for _, s in decoder_calls if s != src.size(1)})
    assert self_keys == [t for t in range(1, steps + 1) if t != src.size(1)]
    assert torch.equal(cached, greedy_decode(model, src, steps, BOS, EOS, use_cache=False))


# --------------------------------------------------------------------------------------
# Growth: appends are amortised O(1), reordering keeps the buffers.
# --------------------------------------------------------------------------------------


@spec(kind="property")
def test_appends_reallocate_only_when_the_capacity_doubles() -> None:
    """200 one-position appends reallocate the buffers only when full, doubling them (amortised O(1) per append instead of a whole-cache copy per step): the buffer's address changes as many times as ``allocations`` counts, at most ``1 + ceil(log2(200 / 16))``."""
    cache = KVCache()
    addresses = set()
    for t in range(200):
        k = torch.full((2, H, 1, 8), float(t))
        keys, _ = cache.append(k, k + 0.5)
        addresses.add(keys.data_ptr())
        assert keys.shape == (2, H, t + 1, 8)
    assert torch.equal(cache.keys()[0, 0, :, 0], torch.arange(200, dtype=torch.float32))
    assert len(addresses) == cache.allocations <= 1 + math.ceil(math.log2(200 / MIN_CAPACITY))
    assert cache.capacity >= 200


class _RecordingCache(DecoderCache):
    """A DecoderCache that counts, per layer, how often its self-attention key buffer moved.

    The buffer's address is read before and after every reorder: a change before it is a
    growth during the appends since the last reorder, a change across it a reallocation
    by the reorder itself. (Counting distinct addresses would undercount: the allocator
    hands freed blocks out again.)
    """

    instances: ClassVar[list[_RecordingCache]] = []

    def __init__(self, num_layers: int) -> None:
        super().__init__(num_layers)
        self.moves = [0] * num_layers
        self.last: list[int | None] = [None] * num_layers
        self.reorders = 0
        _RecordingCache.instances.append(self)

    def _look(self) -> None:
        for i, layer in enumerate(self.layers):
            address = layer.self_attn.keys().data_ptr()
            if address != self.last[i]:
                self.moves[i] += 1
                self.last[i] = address

    def reorder(self, rows: Tensor) -> None:
        self._look()
        super().reorder(rows)
        self._look()
        self.reorders += 1


def _reallocating_reorder(self: KVCache, rows: Tensor) -> None:
    """A planted fault: the reorder of slicing plus ``index_select``, dropping the capacity."""
    n = len(self)
    self._keys = self._keys[:, :, :n].index_select(0, rows)  # type: ignore[index]
    self._values = self._values[:, :, :n].index_select(0, rows)  # type: ignore[index]


@spec(kind="property")
@pytest.mark.parametrize("planted", [False, True], ids=["ours", "planted-reallocating-reorder"])
def test_beam_reorder_keeps_the_buffers_and_their_capacity(
    planted: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 60-step beam search reorders the cache at every step but each layer's self-attention buffer moves only as the doubling policy allocates (at most ``1 + ceil(log2(60 / 16))`` times); the count, by the buffer's address before and after each reorder, sees a planted reorder that reallocates (a move at every step)."""
    import transformer.generate as generate

    monkeypatch.setattr(generate, "DecoderCache", _RecordingCache)
    _RecordingCache.instances = []
    if planted:
        monkeypatch.setattr(KVCache, "reorder", _reallocating_reorder)
    model = make_model(9, dtype=torch.float32)
    with torch.no_grad():
        model.output.bias[EOS] = -1e9  # no hypothesis ends: all 60 steps run
    steps = 60
    beam_search(model, ids(10, (2, 5)), steps, BOS, EOS, beam_size=3)
    (cache,) = _RecordingCache.instances
    assert cache.reorders == steps - 1
    doubling = 1 + math.ceil(math.log2(steps / MIN_CAPACITY))
    if planted:
        assert min(cache.moves) >= steps - 1, "the count must see a reorder that reallocates"
    else:
        assert max(cache.moves) <= doubling, cache.moves
        assert all(layer.self_attn.allocations <= doubling for layer in cache.layers)


@spec(kind="equivalence")
def test_reorder_gathers_rows_in_the_given_order() -> None:
    """``KVCache.reorder(rows)`` leaves row ``i`` holding what row ``rows[i]`` held, repeats included (two beams may continue one hypothesis), and keeps the capacity."""
    cache = KVCache()
    k = torch.arange(4.0).view(4, 1, 1, 1).expand(4, H, 5, 8).contiguous()
    cache.append(k, -k)
    capacity = cache.capacity
    cache.reorder(torch.tensor([2, 2, 0, 3]))
    assert cache.keys()[:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0, 3.0]
    assert cache.values()[:, 0, 0, 0].tolist() == [-2.0, -2.0, -0.0, -3.0]
    assert cache.capacity == capacity


# --------------------------------------------------------------------------------------
# Shapes and errors.
# --------------------------------------------------------------------------------------


@spec(kind="shape")
def test_cached_call_returns_the_new_positions_and_the_cache_holds_all() -> None:
    """A cached call returns outputs for its new positions only, ``(B, T_new, E)``; the cache then holds ``(B, H, T_cached + T_new, D)`` keys and values."""
    mha = make_mha(11, batch_first=True)
    cache = KVCache()
    x = torch.randn(2, 3, E, dtype=torch.float64)
    mha(x, x, x, cache=cache, attn_mask=square_subsequent_mask(3, dtype=torch.bool))
    new = torch.randn(2, 1, E, dtype=torch.float64)
    out, weights = mha(new, new, new, cache=cache)
    assert out.shape == (2, 1, E)
    assert weights is not None and weights.shape == (2, 1, 4)  # need_weights: over all keys
    assert cache.keys().shape == cache.values().shape == (2, H, 4, E // H)


@spec(kind="error")
def test_bad_caches_are_refused_naming_the_problem() -> None:
    """A cache of the wrong type (TypeError), of another batch size, a static cache given a memory of another length, or a decode whose prefix is not longer than the cache (ValueError) are refused before any work, naming what was seen."""
    mha = make_mha(12, batch_first=True)
    x = torch.randn(2, 3, E, dtype=torch.float64)
    with pytest.raises(TypeError, match="cache must be a KVCache or None, got dict"):
        mha(x, x, x, cache={})
    cache = KVCache()
    mha(x, x, x, cache=cache)
    with pytest.raises(ValueError, match="cache holds 2 rows of 3 heads, but this call has batch size 1"):  # fmt: skip
        mha(x[:1], x[:1], x[:1], cache=cache)
    static = KVCache(static=True)
    mha(x, x, x, cache=static)
    y = torch.randn(2, 5, E, dtype=torch.float64)
    with pytest.raises(ValueError, match="static cache holds the keys of 3 positions, but key has 5"):  # fmt: skip
        mha(x, y, y, cache=static)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 4\)"):
        mha(x[:, :1], x[:, :1], x[:, :1], cache=cache, key_padding_mask=torch.zeros(2, 1).bool())

    model = make_model(13)
    src, tgt = ids(14, (2, 4)), ids(15, (2, 3))
    memory = model.encode(src)
    cache3 = DecoderCache.for_decoder(model.transformer.decoder)
    model.decode(tgt, memory, src, cache=cache3)
    with pytest.raises(ValueError, match="cache holds 3 positions, so tgt_in must be longer"):
        model.decode(tgt, memory, src, cache=cache3)
    with pytest.raises(ValueError, match="cache has 2 layers, the decoder 3"):
        model.decode(tgt, memory, src, cache=DecoderCache(2))
    with pytest.raises(TypeError, match="cache must be a DecoderCache or None, got KVCache"):
        model.decode(tgt, memory, src, cache=KVCache())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        DecoderCache(0)
    with pytest.raises(TypeError, match="rows must be an integer"):
        cache3.reorder(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"rows must be 1-D with one entry per cached row \(2\)"):
        cache3.reorder(torch.tensor([0, 1, 1]))
    with pytest.raises(RuntimeError, match="a static KVCache is filled once"):
        static.append(torch.zeros(2, H, 1, 8), torch.zeros(2, H, 1, 8))
    with pytest.raises(TypeError, match="static must be a bool"):
        KVCache(static="yes")  # type: ignore[arg-type]
