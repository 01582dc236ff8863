"""The sequence-to-sequence Transformer of the paper (section 3, figure 1), batch first.

``Seq2SeqTransformer`` = token embeddings scaled by ``sqrt(d_model)`` (section 3.4)
+ sinusoidal positional encodings with dropout (sections 3.5, 5.4)
+ the encoder-decoder stacks (:class:`transformer.layers.Transformer`, section 3.1)
+ a pre-softmax linear map tied to the target embedding (section 3.4).

Every mask the model needs is built from ``pad_id`` in one place,
:meth:`Seq2SeqTransformer.masks`, which training (``forward``), ``decode`` and the
cached decoder of :mod:`transformer.generate` all call.

Notation: B batch, S source length, L target length, E ``d_model``, V vocabulary size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from transformer.kv_cache import DecoderCache
from transformer.layers import Transformer
from transformer.matvec import Linear
from transformer.positional import SinusoidalPositionalEncoding

__all__ = ["Masks", "ModelConfig", "Seq2SeqTransformer", "check_token_ids"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a :class:`Seq2SeqTransformer`; the defaults are the paper's base model (table 3).

    Validated on construction: a bad value raises ``ValueError`` naming the field.
    """

    #: Number of source token ids (ids are ``0 .. src_vocab_size - 1``).
    src_vocab_size: int
    #: Number of target token ids; also the width of the output logits.
    tgt_vocab_size: int
    #: Width E of every embedding and sub-layer output (the paper's d_model).
    d_model: int = 512
    #: Attention heads h of every multi-head attention (section 3.2.2).
    nhead: int = 8
    #: Layers N of the encoder stack (section 3.1).
    num_encoder_layers: int = 6
    #: Layers N of the decoder stack (section 3.1).
    num_decoder_layers: int = 6
    #: Inner width d_ff of the position-wise feed-forward networks (section 3.3).
    dim_feedforward: int = 2048
    #: P_drop of section 5.4: on sub-layer outputs and on embedding + position sums.
    dropout: float = 0.1
    #: Longest sequence the positional table covers (section 3.5).
    max_len: int = 5000
    #: Token id of padding, in both vocabularies; padded positions are masked out.
    pad_id: int = 0
    #: One embedding matrix for source and target (section 3.4; needs equal vocabularies).
    share_embeddings: bool = False
    #: Use the target embedding matrix as the pre-softmax weight (section 3.4).
    tie_output: bool = True

    def __post_init__(self) -> None:
        positive = (
            "src_vocab_size",
            "tgt_vocab_size",
            "d_model",
            "nhead",
            "num_encoder_layers",
            "num_decoder_layers",
            "dim_feedforward",
            "max_len",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig: {name} must be a positive int, got {value!r}")
        if self.d_model % self.nhead != 0:
            raise ValueError(
                f"ModelConfig: d_model must be divisible by nhead, got d_model={self.d_model}, "
                f"nhead={self.nhead}"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"ModelConfig: dropout must be a number, got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig: dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int) or self.pad_id < 0:
            raise ValueError(f"ModelConfig: pad_id must be a non-negative int, got {self.pad_id!r}")
        smallest = min(self.src_vocab_size, self.tgt_vocab_size)
        if self.pad_id >= smallest:
            raise ValueError(
                f"ModelConfig: pad_id must be a valid id of both vocabularies, got pad_id="
                f"{self.pad_id} with src_vocab_size={self.src_vocab_size}, "
                f"tgt_vocab_size={self.tgt_vocab_size}"
            )
        for name in ("share_embeddings", "tie_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig: {name} must be a bool, got {getattr(self, name)!r}")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                "ModelConfig: share_embeddings needs src_vocab_size == tgt_vocab_size, got "
                f"{self.src_vocab_size} and {self.tgt_vocab_size}"
            )

    @classmethod
    def tiny(cls, vocab_size: int, **overrides: Any) -> ModelConfig:
        """A small preset for tests and demos: E=32, 4 heads, 2+2 layers, d_ff=64, no dropout."""
        fields: dict[str, Any] = {
            "src_vocab_size": vocab_size,
            "tgt_vocab_size": vocab_size,
            "d_model": 32,
            "nhead": 4,
            "num_encoder_layers": 2,
            "num_decoder_layers": 2,
            "dim_feedforward": 64,
            "dropout": 0.0,
            "max_len": 512,
        }
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (the inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build from :meth:`to_dict` output; unknown or missing keys raise ``ValueError``."""
        if not isinstance(data, Mapping):
            raise TypeError(f"ModelConfig.from_dict: expected a mapping, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        missing = [k for k in known if k not in data]
        if unknown or missing:
            raise ValueError(
                f"ModelConfig.from_dict: unknown keys {unknown}, missing keys {missing}"
            )
        return cls(**dict(data))


class Masks(NamedTuple):
    """Every mask of one forward pass, in the module convention (bool ``True`` = masked out).

    * ``src_key_padding`` ``(B, S)``: padded source positions, hidden from encoder
      self-attention and from decoder cross-attention;
    * ``tgt_key_padding`` ``(B, L)``: padded target positions, hidden from decoder
      self-attention;
    * ``tgt_causal`` ``(L, L)``: ``True`` above the diagonal, so position ``t`` sees
      only positions ``<= t`` (section 3.2.3).
    """

    src_key_padding: Tensor
    tgt_key_padding: Tensor
    tgt_causal: Tensor


def check_token_ids(name: str, ids: object, vocab_size: int) -> Tensor:
    """Validate a ``(B, T)`` batch of token ids before it reaches an embedding lookup.

    Returns the ids as ``int64``. ``TypeError`` for a non-integer tensor; ``ValueError``
    naming ``name`` for a wrong rank, an empty sequence or an id outside ``[0, vocab_size)``
    (instead of an index error from deep inside the embedding).
    """
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be 2-D (B, T), got shape {tuple(ids.shape)}")
    if ids.size(1) == 0:
        raise ValueError(f"{name} must have at least one position, got shape {tuple(ids.shape)}")
    if ids.numel() > 0:
        low, high = int(ids.min()), int(ids.max())
        bad = low if low < 0 else high
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"{name} holds token id {bad}, outside the vocabulary of size {vocab_size}"
            )
    return ids.long()


def _padding_or_none(key_padding: Tensor) -> Tensor | None:
    """``key_padding`` ``(B, T)``, or ``None`` when it pads no key.

    The attention is the same either way; without a mask the kernels skip the mask
    handling (merging, the zero-row rule), which is most of a decoding step's attention.
    """
    return key_padding if bool(key_padding.any()) else None


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer for sequence transduction (section 3, figure 1).

    Args:
        src_vocab_size, tgt_vocab_size: vocabulary sizes (V_src, V).
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout:
            as in :class:`torch.nn.Transformer` (post-norm, ReLU, the paper's base defaults).
        max_len: longest source or target sequence (length of the positional table).
        pad_id: padding token id; padding masks are built from it inside the model.
        share_embeddings: one embedding module for source and target (``src_embedding is
            tgt_embedding``), as the paper does for its shared BPE vocabulary.
        tie_output: the pre-softmax linear map reuses the target embedding matrix.

    Shape:
        - src ``(B, S)`` and tgt_in ``(B, L)`` integer ids; logits ``(B, L, V)``.

    Submodules (their names are the ``state_dict`` prefixes): ``src_embedding``,
    ``tgt_embedding``, ``positional``, ``transformer`` (keys identical to a batch-first
    ``torch.nn.Transformer``) and ``output``.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        max_len: int = 5000,
        pad_id: int = 0,
        share_embeddings: bool = False,
        tie_output: bool = True,
    ) -> None:
        super().__init__()
        self._config = ModelConfig(
            src_vocab_size=src_vocab_size,
            tgt_vocab_size=tgt_vocab_size,
            d_model=d_model,
            nhead=nhead,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            max_len=max_len,
            pad_id=pad_id,
            share_embeddings=share_embeddings,
            tie_output=tie_output,
        )
        self.pad_id = pad_id
        self.d_model = d_model
        # Section 3.4: "we multiply those weights by sqrt(d_model)".
        self.embed_scale = math.sqrt(d_model)
        self.src_embedding = nn.Embedding(src_vocab_size, d_model)
        # Section 3.4 shares one matrix between the two embeddings (same module, same weight).
        self.tgt_embedding = (
            self.src_embedding if share_embeddings else nn.Embedding(tgt_vocab_size, d_model)
        )
        # Sections 3.5 and 5.4: sinusoids added to the embeddings, then dropout on the sum.
        self.positional = SinusoidalPositionalEncoding(
            d_model, max_len=max_len, dropout=dropout, batch_first=True
        )
        self.transformer = Transformer(
            d_model=d_model,
            nhead=nhead,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            batch_first=True,
        )
        # The pre-softmax linear transformation; its weight is the target embedding's
        # Parameter itself when tied (section 3.4), so one tensor gets both gradients.
        self.output = Linear(d_model, tgt_vocab_size)
        if tie_output:
            self.output.weight = self.tgt_embedding.weight
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Initialise embeddings and the output bias; the stacks keep torch's xavier init.

        Embeddings are drawn from N(0, 1/d_model), so after the sqrt(d_model) scale of
        section 3.4 the embedded tokens have unit variance, like the sinusoids they are
        added to; a tied output layer then starts with logits of unit scale.
        """
        std = self.d_model**-0.5
        nn.init.normal_(self.src_embedding.weight, mean=0.0, std=std)
        nn.init.normal_(self.tgt_embedding.weight, mean=0.0, std=std)
        if self.output.weight is not self.tgt_embedding.weight:
            nn.init.xavier_uniform_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    @classmethod
    def from_config(cls, config: ModelConfig) -> Seq2SeqTransformer:
        """A freshly initialised model of ``config``."""
        if not isinstance(config, ModelConfig):
            raise TypeError(f"from_config: expected a ModelConfig, got {type(config).__name__}")
        return cls(**config.to_dict())

    @property
    def config(self) -> ModelConfig:
        """The :class:`ModelConfig` this model was built from."""
        return self._config

    def masks(self, src: Tensor, tgt_in: Tensor | None = None) -> Masks:
        """All attention masks, from ``pad_id``: the one helper training and inference share.

        ``src`` ``(B, S)``; ``tgt_in`` ``(B, L)`` or ``None`` (encoder only: target masks
        are then empty ``(B, 0)`` and ``(0, 0)``).
        """
        src_key_padding = self.key_padding(src)  # (B, S)
        L = 0 if tgt_in is None else tgt_in.size(1)
        tgt_key_padding = (
            src.new_zeros((src.size(0), 0), dtype=torch.bool)
            if tgt_in is None
            else self.key_padding(tgt_in)
        )  # (B, L)
        tgt_causal = torch.ones(L, L, dtype=torch.bool, device=src.device).triu(1)  # (L, L)
        return Masks(src_key_padding, tgt_key_padding, tgt_causal)

    def key_padding(self, ids: Tensor) -> Tensor:
        """``(B, T)`` bool, True at ``pad_id``: the key padding rule of :meth:`masks`."""
        return ids == self.pad_id

    def embed(self, ids: Tensor, embedding: nn.Embedding, offset: int = 0) -> Tensor:
        """``dropout(embedding(ids) * sqrt(d_model) + PE)``: ``(B, T) -> (B, T, E)`` (3.4, 3.5).

        ``ids`` sit at positions ``offset .. offset + T - 1`` (``offset > 0``: the newest
        tokens of a longer prefix, as a KV-cache decoder feeds them).
        """
        return self.positional(embedding(ids) * self.embed_scale, offset=offset)

    def encode(self, src: Tensor) -> Tensor:
        """Run the encoder stack: ``src`` ``(B, S)`` -> memory ``(B, S, E)``."""
        src = check_token_ids("src", src, self._config.src_vocab_size)
        masks = self.masks(src)
        x = self.embed(src, self.src_embedding)  # (B, S, E)
        memory: Tensor = self.transformer.encoder(x, src_key_padding_mask=masks.src_key_padding)
        return memory

    def decode(
        self, tgt_in: Tensor, memory: Tensor, src: Tensor, *, cache: DecoderCache | None = None
    ) -> Tensor:
        """Run the decoder stack and the output layer: logits ``(B, L, V)``.

        Args:
            tgt_in: ``(B, L)`` target ids shifted right (starting with BOS).
            memory: ``(B, S, E)`` from :meth:`encode`.
            src: ``(B, S)`` the source ids, needed for the cross-attention padding mask.
            cache: incremental decoding (a :class:`~transformer.kv_cache.DecoderCache`
                holding ``t < L`` positions of this same ``tgt_in``): only positions
                ``t .. L - 1`` are computed, attending to the cached ones, and the logits
                are theirs, ``(B, L - t, V)``; the cache then holds all ``L``. The same
                layers run as without a cache, with the same masks restricted to the new
                query rows, so the logits are those of the full decode.
        """
        src = check_token_ids("src", src, self._config.src_vocab_size)
        tgt_in = check_token_ids("tgt_in", tgt_in, self._config.tgt_vocab_size)
        if not isinstance(memory, Tensor):
            raise TypeError(f"memory must be a torch.Tensor, got {type(memory).__name__}")
        expected = (src.size(0), src.size(1), self.d_model)
        if tuple(memory.shape) != expected:
            raise ValueError(
                f"memory must have shape (B, S, E) = {expected} for src of shape "
                f"{tuple(src.shape)}, got {tuple(memory.shape)}"
            )
        if tgt_in.size(0) != src.size(0):
            raise ValueError(
                f"tgt_in batch size {tgt_in.size(0)} differs from src batch size {src.size(0)}"
            )
        if cache is None:
            masks = self.masks(src, tgt_in)
            y = self.embed(tgt_in, self.tgt_embedding)  # (B, L, E)
            h = self.transformer.decoder(
                y,
                memory,
                tgt_mask=masks.tgt_causal,
                tgt_key_padding_mask=_padding_or_none(masks.tgt_key_padding),
                memory_key_padding_mask=_padding_or_none(masks.src_key_padding),
            )  # (B, L, E)
        else:
            h = self._decode_new_positions(tgt_in, memory, src, cache)  # (B, L - t, E)
        logits: Tensor = self.output(h)  # (B, L, V)
        return logits

    def _decode_new_positions(
        self, tgt_in: Tensor, memory: Tensor, src: Tensor, cache: DecoderCache
    ) -> Tensor:
        """The decoder stack on positions ``len(cache) ..`` of ``tgt_in``: ``(B, L - t, E)``."""
        if not isinstance(cache, DecoderCache):
            raise TypeError(f"cache must be a DecoderCache or None, got {type(cache).__name__}")
        t, L = len(cache), tgt_in.size(1)
        if t >= L:
            raise ValueError(
                f"the cache holds {t} positions, so tgt_in must be longer than that (the "
                f"positions to decode come after them), got length {L}"
            )
        # Rows t .. L-1 of the causal mask: a new query at position i sees keys <= i, so
        # the newest one alone (the usual decoding step) sees every key: no mask at all,
        # and no (L, L) mask built at every step just to be sliced to nothing.
        if L - t > 1:
            masks = self.masks(src, tgt_in)
            causal: Tensor | None = masks.tgt_causal[t:]  # (L - t, L)
            src_padding, tgt_padding = masks.src_key_padding, masks.tgt_key_padding
        else:
            causal = None
            src_padding, tgt_padding = self.key_padding(src), self.key_padding(tgt_in)
        y = self.embed(tgt_in[:, t:], self.tgt_embedding, offset=t)  # (B, L - t, E)
        h: Tensor = self.transformer.decoder(
            y,
            memory,
            tgt_mask=causal,
            tgt_key_padding_mask=_padding_or_none(tgt_padding),
            memory_key_padding_mask=_padding_or_none(src_padding),
            cache=cache,
        )
        return h

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits: ``src`` ``(B, S)``, ``tgt_in`` ``(B, L)`` -> ``(B, L, V)``."""
        return self.decode(tgt_in, self.encode(src), src)
