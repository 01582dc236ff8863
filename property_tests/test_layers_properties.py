"""Laws of the Transformer stacks (paper section 3.1) over random sizes, depths and padding.

Hypothesis draws source/target lengths, batch sizes, layer counts, model widths, the
norm placement, the layout and a padding length per batch row; tiny float64 models
(d_model 8-16) keep every example fast. Laws:

* equivalence: with torch's weights loaded, ``Transformer`` equals ``torch.nn.Transformer``
  (outputs and input gradients) under causal and key padding masks;
* causality: decoder outputs before position t ignore target positions from t on;
* padding invariance: appending padded positions (marked in the key padding masks)
  changes no real position's output, and each row equals that sequence run alone.

Notation: B batch, S source length, T target length, E ``d_model``, H ``nhead``.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import Tensor, nn

from transformer import layers
from transformer.testing import assert_close

spec = functools.partial(pytest.mark.spec, component="layers", kind="property")


@dataclass(frozen=True)
class Case:
    """One drawn configuration: model options, sizes and per-row padding lengths."""

    d_model: int
    nhead: int
    num_encoder_layers: int
    num_decoder_layers: int
    norm_first: bool
    batch_first: bool
    activation: str
    src_lens: tuple[int, ...]  # real length of each row's source
    tgt_lens: tuple[int, ...]  # real length of each row's target
    src_pad: int  # extra padded positions after the longest source
    tgt_pad: int
    seed: int

    @property
    def S(self) -> int:
        return max(self.src_lens) + self.src_pad

    @property
    def T(self) -> int:
        return max(self.tgt_lens) + self.tgt_pad


@st.composite
def cases(draw: st.DrawFn) -> Case:
    d_model, nhead = draw(st.sampled_from([(8, 1), (8, 2), (12, 3), (10, 5), (16, 4)]))
    batch = draw(st.integers(1, 3))
    lengths = st.lists(st.integers(1, 7), min_size=batch, max_size=batch).map(tuple)
    return Case(
        d_model=d_model,
        nhead=nhead,
        num_encoder_layers=draw(st.integers(1, 2)),
        num_decoder_layers=draw(st.integers(1, 2)),
        norm_first=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        activation=draw(st.sampled_from(["relu", "gelu"])),
        src_lens=draw(lengths),
        tgt_lens=draw(lengths),
        src_pad=draw(st.integers(0, 3)),
        tgt_pad=draw(st.integers(0, 3)),
        seed=draw(st.integers(0, 2**16)),
    )


def build(case: Case, lib: object) -> nn.Module:
    """``Transformer`` from ``lib`` (torch.nn or ours) for ``case``, float64, dropout off."""
    with warnings.catch_warnings():  # torch's nested-tensor notices about its fast path
        warnings.simplefilter("ignore", UserWarning)
        return lib.Transformer(  # type: ignore[attr-defined, no-any-return]
            case.d_model,
            case.nhead,
            case.num_encoder_layers,
            case.num_decoder_layers,
            dim_feedforward=2 * case.d_model + 3,
            dropout=0.0,
            activation=case.activation,
            batch_first=case.batch_first,
            norm_first=case.norm_first,
            dtype=torch.float64,
        )


def ours_model(case: Case) -> nn.Module:
    torch.manual_seed(case.seed)
    return build(case, layers)


def key_padding(lens: tuple[int, ...], total: int) -> Tensor:
    """``(B, total)`` bool mask, True from each row's real length on (module convention)."""
    return torch.arange(total)[None, :] >= torch.tensor(lens)[:, None]


def future_mask(T: int) -> Tensor:
    """Bool causal mask, True above the diagonal (masked out), section 3.2.3."""
    return torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)


def batch(case: Case) -> tuple[Tensor, Tensor]:
    """``(B, S, E)`` source and ``(B, T, E)`` target; padded slots hold large garbage."""
    gen = torch.Generator().manual_seed(case.seed)
    B = len(case.src_lens)
    src = torch.randn(B, case.S, case.d_model, generator=gen, dtype=torch.float64)
    tgt = torch.randn(B, case.T, case.d_model, generator=gen, dtype=torch.float64)
    src = torch.where(key_padding(case.src_lens, case.S)[..., None], 1e3 * src, src)
    tgt = torch.where(key_padding(case.tgt_lens, case.T)[..., None], 1e3 * tgt, tgt)
    return src, tgt


def run(model: nn.Module, case: Case, src: Tensor, tgt: Tensor) -> Tensor:
    """Model output ``(B, T, E)`` with causal and key padding masks, in the case's layout."""
    src_kpm = key_padding(case.src_lens, case.S)
    if not case.batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)  # (S, B, E), (T, B, E)
    out: Tensor = model(
        src,
        tgt,
        tgt_mask=future_mask(case.T),
        src_key_padding_mask=src_kpm,
        tgt_key_padding_mask=key_padding(case.tgt_lens, case.T),
        memory_key_padding_mask=src_kpm,
    )
    return out if case.batch_first else out.transpose(0, 1)  # (B, T, E)


@spec(section="torch")
@given(case=cases())
def test_transformer_equals_torch_for_any_sizes_depths_and_padding(case: Case) -> None:
    """For any sizes, depths, layout, norm placement and padding, the output and the input gradients equal torch.nn.Transformer's after loading its weights."""
    torch.manual_seed(case.seed)
    theirs = build(case, nn)
    ours = build(case, layers)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    src, tgt = batch(case)
    results = []
    for model in (ours, theirs):
        leaves = (src.clone().requires_grad_(True), tgt.clone().requires_grad_(True))
        out = run(model, case, *leaves)
        real = ~key_padding(case.tgt_lens, case.T)
        # Only real target rows: torch's gradients are compared where both are defined.
        grads = torch.autograd.grad(out[real].sum(), leaves)
        results.append((out.detach(), grads))
    (out, grads), (out_ref, grads_ref) = results
    assert_close(out, out_ref)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert_close(grad, grad_ref)


@spec(section="3.2.3")
@given(case=cases(), data=st.data())
def test_decoder_output_before_t_ignores_targets_from_t_on(case: Case, data: st.DataObject) -> None:
    """Changing target positions t..T-1 (0 < t < T: at least one output before t, one position changed) leaves every output before t unchanged (masked decoder self-attention, section 3.2.3)."""
    assume(case.T >= 2)
    model = ours_model(case)
    src, tgt = batch(case)
    t = data.draw(st.integers(1, case.T - 1), label="t")
    changed = tgt.clone()
    changed[:, t:] += torch.randn(
        changed[:, t:].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    assert torch.equal(run(model, case, src, changed)[:, :t], run(model, case, src, tgt)[:, :t])


@spec(section="torch")
@given(case=cases())
def test_each_row_equals_its_unpadded_sequence_run_alone(case: Case) -> None:
    """Padding invariance and batch independence: each row's real outputs equal those of its unpadded source and target run alone, unbatched, whatever the padded slots hold."""
    model = ours_model(case)
    src, tgt = batch(case)
    out = run(model, case, src, tgt)
    assert torch.isfinite(out).all()
    for b, (s, t) in enumerate(zip(case.src_lens, case.tgt_lens, strict=True)):
        alone = model(src[b, :s], tgt[b, :t], tgt_mask=future_mask(t))  # (t, E)
        assert_close(out[b, :t], alone, msg=f"row {b}")


@spec(section="torch")
@given(cases(), st.booleans(), st.booleans())
def test_fast_path_switches_change_no_output(
    case: Case, enable_nested_tensor: bool, mask_check: bool
) -> None:
    """An encoder stack built with any of torch's fast-path switches ``enable_nested_tensor`` / ``mask_check`` gives exactly the output of the default stack with the same weights, in eval mode without gradients (where torch would take its fast path)."""
    model = ours_model(case)
    encoder = model.encoder
    assert isinstance(encoder, layers.TransformerEncoder)
    switched = layers.TransformerEncoder(
        encoder.layers[0],
        encoder.num_layers,
        encoder.norm,
        enable_nested_tensor=enable_nested_tensor,
        mask_check=mask_check,
    )
    switched.load_state_dict(encoder.state_dict())
    src, _ = batch(case)
    if not case.batch_first:
        src = src.transpose(0, 1)
    kpm = key_padding(case.src_lens, case.S)
    with torch.no_grad():
        expected = encoder.eval()(src, src_key_padding_mask=kpm)
        assert torch.equal(switched.eval()(src, src_key_padding_mask=kpm), expected)
