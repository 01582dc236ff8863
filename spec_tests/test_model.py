"""Spec of the sequence-to-sequence model (paper section 3, figure 1; section 3.4).

``Seq2SeqTransformer`` is embeddings scaled by ``sqrt(d_model)`` + sinusoidal positions +
the encoder-decoder stacks + a pre-softmax linear map tied to the target embedding. The
suite pins the shapes, the scale, the weight sharing of section 3.4, the padding and
causal masks built from ``pad_id`` (the same in training and in inference), numerical
equivalence with a model assembled by hand from ``torch.nn.Transformer`` (forward and
gradients), ``ModelConfig`` and the errors on bad input.

Reference for "by hand": ``torch.nn.Transformer`` with our stack's weights, embeddings
looked up with plain indexing, the sinusoid table of section 3.5 written out below in
float64 and torch's own masks; nothing of the package is used on that side.

Notation: B batch, S source length, T target length, E ``d_model``, V vocabulary.
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

import transformer
from transformer.model import ModelConfig, Seq2SeqTransformer
from transformer.testing import assert_close

spec = functools.partial(pytest.mark.spec, component="model", section="3.4")

PAD, BOS = 0, 1
# Awkward sizes: different vocabularies, head dim 12, feed-forward 50.
SRC_V, TGT_V = 23, 19
E, H, FF = 36, 3, 50


def make_model(
    seed: int = 0, dtype: torch.dtype = torch.float64, **overrides: object
) -> Seq2SeqTransformer:
    """A small random model (dropout off unless overridden), built under ``seed``."""
    fields: dict[str, object] = {
        "src_vocab_size": SRC_V,
        "tgt_vocab_size": TGT_V,
        "d_model": E,
        "nhead": H,
        "num_encoder_layers": 2,
        "num_decoder_layers": 2,
        "dim_feedforward": FF,
        "dropout": 0.0,
        "max_len": 128,
        "pad_id": PAD,
    }
    fields.update(overrides)
    torch.manual_seed(seed)
    model = Seq2SeqTransformer(**fields)  # type: ignore[arg-type]
    with torch.no_grad():
        # Move the zero-initialised output bias off zero so it takes part in every check.
        model.output.bias.normal_(0.0, 0.5)
    return model.to(dtype)


def token_batch(seed: int, lengths: list[int], vocab: int, width: int | None = None) -> Tensor:
    """``(B, width)`` ids in ``[2, vocab)``, row ``b`` real for ``lengths[b]`` then padding."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths) if width is None else width
    ids = torch.randint(2, vocab, (len(lengths), width), generator=gen)
    for b, n in enumerate(lengths):
        ids[b, n:] = PAD
    return ids


def sinusoids(T: int, d: int) -> Tensor:
    """Section 3.5 written out: ``PE[pos, 2i] = sin(pos / 10000^(2i/d))``, ``PE[pos, 2i+1] = cos``."""
    pe = torch.zeros(T, d, dtype=torch.float64)
    for pos in range(T):
        for i in range(0, d, 2):
            angle = pos / 10000 ** (i / d)
            pe[pos, i] = math.sin(angle)
            if i + 1 < d:
                pe[pos, i + 1] = math.cos(angle)
    return pe


class TorchReference(nn.Module):
    """The same model assembled from ``torch.nn.Transformer``, embeddings indexed by hand."""

    def __init__(self, ours: Seq2SeqTransformer) -> None:
        super().__init__()
        config = ours.config
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's nested-tensor notice
            self.transformer = nn.Transformer(
                config.d_model,
                config.nhead,
                config.num_encoder_layers,
                config.num_decoder_layers,
                config.dim_feedforward,
                dropout=0.0,
                batch_first=True,
            )
        self.transformer.load_state_dict(ours.transformer.state_dict(), strict=True)
        self.src_weight = nn.Parameter(ours.src_embedding.weight.detach().clone())
        self.tgt_weight = nn.Parameter(ours.tgt_embedding.weight.detach().clone())
        self.out_weight = nn.Parameter(ours.output.weight.detach().clone())
        self.out_bias = nn.Parameter(ours.output.bias.detach().clone())
        self.pad_id = config.pad_id
        self.to(ours.output.bias.dtype)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        d = self.src_weight.size(1)
        dtype = self.src_weight.dtype
        x = self.src_weight[src] * math.sqrt(d) + sinusoids(src.size(1), d).to(dtype)
        y = self.tgt_weight[tgt_in] * math.sqrt(d) + sinusoids(tgt_in.size(1), d).to(dtype)
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.size(1), dtype=dtype)
        h = self.transformer(
            x,
            y,
            tgt_mask=causal,
            src_key_padding_mask=(src == self.pad_id)
            .to(dtype)
            .masked_fill(src == self.pad_id, float("-inf")),
            tgt_key_padding_mask=(tgt_in == self.pad_id)
            .to(dtype)
            .masked_fill(tgt_in == self.pad_id, float("-inf")),
            memory_key_padding_mask=(src == self.pad_id)
            .to(dtype)
            .masked_fill(src == self.pad_id, float("-inf")),
        )
        return h @ self.out_weight.T + self.out_bias


# --------------------------------------------------------------------------------------
# Shapes and configuration.
# --------------------------------------------------------------------------------------


@spec(kind="shape")
@pytest.mark.parametrize(("B", "S", "T"), [(1, 1, 1), (3, 7, 5), (2, 13, 1), (1, 1, 9)])
def test_forward_returns_batch_first_logits_over_the_target_vocabulary(
    B: int, S: int, T: int
) -> None:
    """``forward(src (B, S), tgt_in (B, T))`` returns logits ``(B, T, tgt_vocab_size)`` and ``encode`` memory ``(B, S, d_model)`` (§3, figure 1)."""
    model = make_model()
    src = token_batch(1, [S] * B, SRC_V)
    tgt = token_batch(2, [T] * B, TGT_V)
    memory = model.encode(src)
    assert memory.shape == (B, S, E)
    assert model(src, tgt).shape == (B, T, TGT_V)
    assert model.decode(tgt, memory, src).shape == (B, T, TGT_V)


@spec(kind="shape")
def test_config_round_trips_through_dict_and_rebuilds_the_same_architecture() -> None:
    """``ModelConfig.to_dict``/``from_dict`` round-trip, and ``from_config`` builds a model whose ``config`` and parameter shapes match."""
    config = ModelConfig(
        SRC_V,
        TGT_V,
        d_model=E,
        nhead=H,
        num_encoder_layers=1,
        num_decoder_layers=3,
        dim_feedforward=FF,
    )
    assert ModelConfig.from_dict(config.to_dict()) == config
    model = Seq2SeqTransformer.from_config(config)
    assert model.config == config
    assert len(model.transformer.encoder.layers) == 1
    assert len(model.transformer.decoder.layers) == 3
    assert model.output.weight.shape == (TGT_V, E)
    assert ModelConfig(SRC_V, TGT_V) == ModelConfig(
        SRC_V, TGT_V, 512, 8, 6, 6, 2048, 0.1, 5000, 0, False, True
    ), "defaults are the paper's base model (table 3)"


# --------------------------------------------------------------------------------------
# Section 3.4: scaled embeddings, shared and tied weights.
# --------------------------------------------------------------------------------------


@spec(kind="equivalence")
def test_encoder_input_is_embedding_times_sqrt_d_model_plus_sinusoids() -> None:
    """The encoder and decoder stacks receive ``Embedding(x) * sqrt(d_model) + PE`` (§3.4 "we multiply those weights by sqrt(d_model)", §3.5)."""
    model = make_model()
    src = token_batch(3, [7, 4], SRC_V)
    tgt = token_batch(4, [5, 5], TGT_V)
    seen: dict[str, Tensor] = {}
    model.transformer.encoder.register_forward_pre_hook(
        lambda m, args: seen.__setitem__("src", args[0])
    )
    model.transformer.decoder.register_forward_pre_hook(
        lambda m, args: seen.__setitem__("tgt", args[0])
    )
    model(src, tgt)
    scale = math.sqrt(E)
    expected_src = model.src_embedding.weight[src] * scale + sinusoids(7, E)
    expected_tgt = model.tgt_embedding.weight[tgt] * scale + sinusoids(5, E)
    assert_close(seen["src"], expected_src)
    assert_close(seen["tgt"], expected_tgt)


@spec(kind="equivalence")
def test_output_layer_reuses_the_target_embedding_parameter() -> None:
    """With ``tie_output`` the pre-softmax weight IS the target embedding Parameter (§3.4 "share the same weight matrix ... and the pre-softmax linear transformation")."""
    model = make_model()
    assert model.output.weight is model.tgt_embedding.weight
    params = list(model.parameters())
    assert sum(p is model.tgt_embedding.weight for p in params) == 1, "counted once"
    untied = make_model(tie_output=False)
    assert untied.output.weight is not untied.tgt_embedding.weight
    assert sum(p.numel() for p in params) + TGT_V * E == sum(p.numel() for p in untied.parameters())


@spec(kind="equivalence")
def test_tied_weight_gradient_sums_embedding_and_output_gradients() -> None:
    """The tied matrix receives the sum of the gradients of its two uses, as two untied copies with the same values would (§3.4)."""
    tied = make_model(seed=5)
    untied = make_model(seed=5, tie_output=False)
    untied.load_state_dict({**tied.state_dict()}, strict=True)
    src = token_batch(6, [6, 3], SRC_V)
    tgt = token_batch(7, [4, 2], TGT_V)
    weights = torch.randn(
        2, 4, TGT_V, dtype=torch.float64, generator=torch.Generator().manual_seed(8)
    )
    (tied(src, tgt) * weights).sum().backward()
    (untied(src, tgt) * weights).sum().backward()
    assert tied.tgt_embedding.weight.grad is not None
    assert untied.tgt_embedding.weight.grad is not None and untied.output.weight.grad is not None
    assert_close(
        tied.tgt_embedding.weight.grad, untied.tgt_embedding.weight.grad + untied.output.weight.grad
    )


@spec(kind="equivalence")
def test_shared_embeddings_use_one_matrix_for_source_and_target() -> None:
    """``share_embeddings`` makes source, target and (tied) output one matrix, so a source token and the same target token embed identically (§3.4)."""
    model = make_model(src_vocab_size=TGT_V, share_embeddings=True)
    assert model.src_embedding is model.tgt_embedding
    assert model.output.weight is model.src_embedding.weight
    separate = make_model(src_vocab_size=TGT_V)
    assert sum(p.numel() for p in model.parameters()) + TGT_V * E == sum(
        p.numel() for p in separate.parameters()
    )


# --------------------------------------------------------------------------------------
# Masks built from pad_id; the same in training (forward) and inference (decode).
# --------------------------------------------------------------------------------------


@spec(kind="masking")
@pytest.mark.parametrize("extra", [1, 6])
def test_padding_appended_to_the_source_changes_no_logit(extra: int) -> None:
    """Appending ``pad_id`` columns to the source leaves every logit and the memory at real positions unchanged: padding is masked in encoder self-attention and in cross-attention (§3.2.3)."""
    model = make_model()
    src = token_batch(9, [7, 3, 5], SRC_V)
    tgt = token_batch(10, [4, 4, 4], TGT_V)
    padded = torch.cat([src, src.new_full((3, extra), PAD)], dim=1)
    assert_close(model(padded, tgt), model(src, tgt))
    real = src != PAD
    assert_close(model.encode(padded)[:, :7][real], model.encode(src)[real])


@spec(kind="masking")
@pytest.mark.parametrize("t", [0, 3, 5])  # T = 7: position 6 follows each of them
def test_logits_at_t_ignore_target_tokens_after_t(t: int) -> None:
    """Logits at position ``t`` depend on ``tgt_in[:, :t+1]`` only: changing later target tokens leaves them unchanged, changing an earlier one does not (§3.2.3 masking of illegal connections)."""
    model = make_model()
    src = token_batch(11, [5, 7], SRC_V)
    tgt = token_batch(12, [7, 7], TGT_V)
    changed_after = tgt.clone()
    changed_after[:, t + 1 :] = (tgt[:, t + 1 :] - 2 + 1) % (TGT_V - 2) + 2
    logits = model(src, tgt)
    assert_close(model(src, changed_after)[:, : t + 1], logits[:, : t + 1])
    changed_at = tgt.clone()
    changed_at[:, t] = (tgt[:, t] - 2 + 1) % (TGT_V - 2) + 2
    assert (model(src, changed_at)[:, t] - logits[:, t]).abs().max() > 1e-6, (
        "position t must see token t"
    )


@spec(kind="masking")
def test_teacher_forced_logits_equal_step_by_step_decoding_logits() -> None:
    """The logits of one teacher-forced ``forward`` (training) equal those of decoding the prefixes one step at a time (inference): both use the same masks (§3.2.3)."""
    model = make_model()
    src = token_batch(13, [6, 2, 4], SRC_V)
    tgt = token_batch(14, [7, 7, 7], TGT_V)
    tgt[:, 0] = BOS
    forward = model(src, tgt)
    memory = model.encode(src)
    for t in range(7):
        step = model.decode(tgt[:, : t + 1], memory, src)[:, -1]
        assert_close(step, forward[:, t], msg=f"position {t}")


@spec(kind="masking")
def test_padding_inside_the_target_changes_no_earlier_logit() -> None:
    """Right-padding the target (a batch of different lengths) leaves the logits of every real target position unchanged (§3.2.3)."""
    model = make_model()
    src = token_batch(15, [5, 5], SRC_V)
    tgt = token_batch(16, [3, 6], TGT_V, width=6)
    logits = model(src, tgt)
    assert_close(logits[0, :3], model(src[:1], tgt[:1, :3])[0])


@spec(kind="masking")
def test_target_padding_before_real_positions_is_masked_like_torch() -> None:
    """``pad_id`` in the target before real positions (left padding, or one between real tokens), which the causal mask alone would let later positions see, is masked by the target key padding mask built from ``pad_id``: every real position's logits equal those of the ``torch.nn.Transformer`` assembly given ``tgt_key_padding_mask = tgt_in == pad_id`` (§3.2.3)."""
    model = make_model(seed=21)
    reference = TorchReference(model)
    src = token_batch(22, [5, 4], SRC_V)
    tgt = token_batch(23, [6, 6], TGT_V)
    tgt[0, :2] = PAD  # left padding
    tgt[1, 3] = PAD  # a pad between real tokens
    real = tgt != PAD
    assert_close(model(src, tgt)[real], reference(src, tgt)[real])


# --------------------------------------------------------------------------------------
# Equivalence with a model assembled from torch.nn.Transformer.
# --------------------------------------------------------------------------------------


@spec(kind="equivalence")
@pytest.mark.parametrize("share", [False, True])
def test_matches_torch_transformer_assembled_by_hand_forward_and_gradients(share: bool) -> None:
    """With the same weights the model equals ``torch.nn.Transformer`` + scaled embeddings + sinusoids + tied output, in logits and in the gradients of every weight (§3, §3.4, §3.5)."""
    overrides: dict[str, object] = (
        {"src_vocab_size": TGT_V, "share_embeddings": True} if share else {}
    )
    model = make_model(seed=17, **overrides)
    reference = TorchReference(model)
    src = token_batch(18, [7, 4, 1], model.config.src_vocab_size)
    tgt = token_batch(19, [5, 2, 5], TGT_V)
    ours = model(src, tgt)
    theirs = reference(src, tgt)
    real = tgt != PAD
    assert_close(ours[real], theirs[real])
    weights = torch.randn(
        theirs.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(20)
    )
    weights = weights * real[..., None]
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    ours_params = dict(model.transformer.named_parameters())
    for name, p in reference.transformer.named_parameters():
        assert p.grad is not None
        assert_close(ours_params[name].grad, p.grad, msg=name)
    assert_close(model.output.bias.grad, reference.out_bias.grad)
    # Every use of a shared matrix adds its gradient to the one Parameter.
    uses = [reference.tgt_weight.grad, reference.out_weight.grad]
    if share:
        uses.append(reference.src_weight.grad)
    else:
        assert_close(model.src_embedding.weight.grad, reference.src_weight.grad)
    assert_close(model.tgt_embedding.weight.grad, sum(uses))


@spec(kind="equivalence")
def test_float32_model_matches_float64_model_within_tolerance() -> None:
    """The float32 model agrees with the same weights in float64 (default fp32 tolerances, scaled 10x for the stack of 4 layers and a vocabulary projection)."""
    model64 = make_model(seed=21)
    model32 = make_model(seed=21, dtype=torch.float32)
    src = token_batch(22, [7, 5], SRC_V)
    tgt = token_batch(23, [6, 6], TGT_V)
    assert_close(model32(src, tgt), model64(src, tgt), scale=10.0)


@spec(kind="equivalence")
def test_dropout_acts_in_training_mode_only() -> None:
    """With dropout > 0 two training-mode passes differ and two eval-mode passes are identical (§5.4 residual dropout is a training regulariser)."""
    model = make_model(dropout=0.3)
    src = token_batch(24, [5], SRC_V)
    tgt = token_batch(25, [4], TGT_V)
    model.train()
    assert not torch.equal(model(src, tgt), model(src, tgt))
    model.eval()
    assert torch.equal(model(src, tgt), model(src, tgt))


# --------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------


@spec(kind="error")
@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (SRC_V, f"src holds token id {SRC_V}, outside the vocabulary of size {SRC_V}"),
        (-1, "src holds token id -1"),
    ],
)
def test_source_id_outside_vocabulary_raises_value_error_naming_it(bad: int, match: str) -> None:
    """A source id outside ``[0, src_vocab_size)`` raises ``ValueError`` naming ``src``, the id and the vocabulary size (not an index error from inside the embedding)."""
    model = make_model()
    src = token_batch(26, [4], SRC_V)
    src[0, 2] = bad
    with pytest.raises(ValueError, match=match):
        model(src, token_batch(27, [3], TGT_V))


@spec(kind="error")
def test_target_id_outside_vocabulary_raises_value_error_naming_tgt_in() -> None:
    """A target id ``>= tgt_vocab_size`` (here a valid source id) raises ``ValueError`` naming ``tgt_in``."""
    model = make_model()
    tgt = token_batch(28, [3], TGT_V)
    tgt[0, 1] = SRC_V - 1
    with pytest.raises(
        ValueError,
        match=f"tgt_in holds token id {SRC_V - 1}, outside the vocabulary of size {TGT_V}",
    ):
        model(token_batch(29, [4], SRC_V), tgt)


@spec(kind="error")
def test_non_integer_or_wrongly_shaped_ids_raise() -> None:
    """Float ids raise ``TypeError``; ids that are not ``(B, T)`` or have no position raise ``ValueError``; a memory of the wrong shape raises ``ValueError``."""
    model = make_model()
    src = token_batch(30, [4], SRC_V)
    tgt = token_batch(31, [3], TGT_V)
    with pytest.raises(TypeError, match="src must hold integer token ids"):
        model(src.double(), tgt)
    with pytest.raises(ValueError, match=r"tgt_in must be 2-D \(B, T\)"):
        model(src, tgt[0])
    with pytest.raises(ValueError, match="src must have at least one position"):
        model(src[:, :0], tgt)
    with pytest.raises(ValueError, match=r"memory must have shape \(B, S, E\)"):
        model.decode(tgt, torch.zeros(1, 4, E + 1, dtype=torch.float64), src)


@spec(kind="error")
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"d_model": 10, "nhead": 4}, "d_model must be divisible by nhead"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"pad_id": 19}, "pad_id must be a valid id of both vocabularies"),
        ({"share_embeddings": True}, "share_embeddings needs src_vocab_size == tgt_vocab_size"),
        ({"num_decoder_layers": 0}, "num_decoder_layers must be a positive int"),
        ({"src_vocab_size": 2.5}, "src_vocab_size must be a positive int"),
        ({"dropout": "0.1"}, "dropout must be a number, got '0.1'"),
        ({"dropout": True}, "dropout must be a number, got True"),
        ({"pad_id": -1}, "pad_id must be a non-negative int, got -1"),
        ({"pad_id": False}, "pad_id must be a non-negative int, got False"),
        ({"tie_output": 1}, "tie_output must be a bool, got 1"),
    ],
)
def test_invalid_config_raises_value_error_naming_the_field(
    overrides: dict[str, object], match: str
) -> None:
    """``ModelConfig`` (and so the model) validates its fields and names the offending one in a ``ValueError``."""
    fields: dict[str, object] = {"src_vocab_size": SRC_V, "tgt_vocab_size": TGT_V, **overrides}
    with pytest.raises(ValueError, match=match):
        ModelConfig(**fields)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        Seq2SeqTransformer(**fields)  # type: ignore[arg-type]


@spec(kind="error")
def test_config_from_dict_rejects_unknown_and_missing_keys_by_name() -> None:
    """``ModelConfig.from_dict`` names unknown and missing keys in its ``ValueError``."""
    data = ModelConfig(SRC_V, TGT_V).to_dict()
    with pytest.raises(ValueError, match=r"unknown keys \['heads'\]"):
        ModelConfig.from_dict({**data, "heads": 8})
    del data["tie_output"]
    with pytest.raises(ValueError, match=r"missing keys \['tie_output'\]"):
        ModelConfig.from_dict(data)


@spec(kind="error")
def test_from_dict_and_from_config_reject_objects_of_the_wrong_type() -> None:
    """``ModelConfig.from_dict`` of a non-mapping and ``Seq2SeqTransformer.from_config`` of a plain dict raise ``TypeError`` naming the type received."""
    with pytest.raises(TypeError, match="from_dict: expected a mapping, got list"):
        ModelConfig.from_dict([("d_model", 8)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="from_config: expected a ModelConfig, got dict"):
        Seq2SeqTransformer.from_config(ModelConfig(SRC_V, TGT_V).to_dict())  # type: ignore[arg-type]


@spec(kind="error")
def test_source_and_target_batches_of_different_sizes_raise() -> None:
    """A ``tgt_in`` batch of another size than ``src``'s raises ``ValueError`` naming both sizes, instead of broadcasting the memory."""
    model = make_model()
    with pytest.raises(ValueError, match="tgt_in batch size 3 differs from src batch size 2"):
        model(token_batch(32, [4, 4], SRC_V), token_batch(33, [3, 3, 3], TGT_V))


@spec(section="extra", kind="equivalence")
def test_package_exports_every_public_name_and_lists_it_in_dir() -> None:
    """Every name of ``transformer.__all__`` is in ``dir(transformer)`` and is the object its defining module holds (the lazily imported ones included); an unknown name raises AttributeError naming it."""
    listed = dir(transformer)
    for name in transformer.__all__:
        assert name in listed, name
        value = getattr(transformer, name)
        module = importlib.import_module(value.__module__)
        assert getattr(module, name) is value, name
    assert {"Seq2SeqTransformer", "load_checkpoint", "beam_search"} <= set(transformer.__all__)
    with pytest.raises(AttributeError, match="module 'transformer' has no attribute 'Transfomer'"):
        transformer.Transfomer  # noqa: B018
