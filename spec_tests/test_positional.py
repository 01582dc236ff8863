"""Spec of the sinusoidal positional encoding (paper section 3.5).

The reference is the paper's formula evaluated entry by entry with Python's ``math``
in float64, independently of the package:
``PE[pos, 2i] = sin(pos / 10000^(2i/d_model))``, ``PE[pos, 2i+1] = cos(pos / 10000^(2i/d_model))``.

Notation: B batch, T sequence length, E ``d_model``.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import Tensor

from transformer.positional import SinusoidalPositionalEncoding, sinusoidal_table
from transformer.testing import assert_close

spec = functools.partial(pytest.mark.spec, component="positional", section="3.5")


def paper_table(max_len: int, d_model: int, first: int = 0) -> Tensor:
    """Rows ``first..max_len-1`` of section 3.5's table, entry by entry in float64 (no vectorisation to get wrong)."""
    rows = []
    for pos in range(first, max_len):
        row = []
        for col in range(d_model):
            two_i = col - col % 2  # columns 2i and 2i+1 share the angle
            angle = pos / 10000 ** (two_i / d_model)
            row.append(math.sin(angle) if col % 2 == 0 else math.cos(angle))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------------------


@spec(kind="equivalence")
@pytest.mark.parametrize(("max_len", "d_model"), [(97, 12), (50, 59), (7, 1), (3, 2), (200, 7)])
def test_table_matches_the_paper_formula_in_float64(max_len: int, d_model: int) -> None:
    """Every entry of the table is sin/cos(pos / 10000^(2i/d_model)) of section 3.5, for even and odd d_model (float64 against the formula evaluated entry by entry)."""
    table = sinusoidal_table(max_len, d_model, dtype=torch.float64)
    assert table.shape == (max_len, d_model)
    assert table.dtype == torch.float64
    assert_close(table, paper_table(max_len, d_model))


@spec(kind="equivalence")
def test_default_dtype_table_is_the_rounded_float64_table() -> None:
    """Without a dtype the table is torch's default dtype, computed in float64 and rounded once (large positions keep full accuracy)."""
    table = sinusoidal_table(5000, 16)
    assert table.dtype == torch.get_default_dtype()
    exact = sinusoidal_table(5000, 16, dtype=torch.float64)
    assert torch.equal(table, exact.to(table.dtype))
    assert_close(
        table[4999].double(), paper_table(5000, 16, first=4999)[0], scale=10.0
    )  # scale: float32 rounding of values near 1 (6e-8 each)


@spec(kind="equivalence")
def test_rows_are_positions_and_columns_are_frequencies() -> None:
    """Rows index positions and columns frequencies, not the other way round: row 0 is (0, 1, 0, 1, ...), column 0 is sin(pos) and column 1 is cos(pos) (catches a table built over the wrong axis, even when it is square)."""
    for max_len, d_model in ((9, 6), (6, 9), (8, 8)):
        table = sinusoidal_table(max_len, d_model, dtype=torch.float64)
        pos = torch.arange(max_len, dtype=torch.float64)
        expected_row0 = torch.tensor([float(c % 2) for c in range(d_model)], dtype=torch.float64)
        assert torch.equal(table[0], expected_row0)
        assert_close(table[:, 0], torch.sin(pos))
        if d_model > 1:
            assert_close(table[:, 1], torch.cos(pos))
        # The slowest frequency has wavelength 10000 * 2 * pi: its column barely moves.
        last_sin = 2 * ((d_model - 1) // 2)
        assert table[:, last_sin].abs().max() < 0.05


@spec(kind="equivalence")
@pytest.mark.parametrize("d_model", [7, 59])
def test_odd_d_model_ends_with_a_sin_column(d_model: int) -> None:
    """For odd d_model the last column d_model - 1 is even, so it is the sin column of the lowest frequency, with no cos partner."""
    table = sinusoidal_table(40, d_model, dtype=torch.float64)
    pos = torch.arange(40, dtype=torch.float64)
    angle = pos / 10000 ** ((d_model - 1) / d_model)
    assert_close(table[:, -1], torch.sin(angle))


@spec(kind="property")
def test_encoding_at_pos_plus_k_is_a_linear_function_of_encoding_at_pos() -> None:
    """PE[pos + k] is a fixed rotation of PE[pos] for every pos (section 3.5: "PE_{pos+k} can be represented as a linear function of PE_pos")."""
    d_model, k = 12, 5
    table = sinusoidal_table(60, d_model, dtype=torch.float64)
    freqs = 1.0 / 10000 ** (torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    cos_k, sin_k = torch.cos(k * freqs), torch.sin(k * freqs)
    sin_pos, cos_pos = table[:-k, 0::2], table[:-k, 1::2]
    # sin(a + b) = sin a cos b + cos a sin b; cos(a + b) = cos a cos b - sin a sin b.
    assert_close(table[k:, 0::2], sin_pos * cos_k + cos_pos * sin_k)
    assert_close(table[k:, 1::2], cos_pos * cos_k - sin_pos * sin_k)


@spec(kind="error")
@pytest.mark.parametrize(
    ("max_len", "d_model", "error", "match"),
    [
        (0, 4, ValueError, "max_len must be a positive int, got 0"),
        (4, 0, ValueError, "d_model must be a positive int, got 0"),
        (4, 2.5, TypeError, r"d_model must be an int, got float 2\.5"),
    ],
)
def test_table_rejects_non_positive_sizes(
    max_len: int, d_model: int, error: type[Exception], match: str
) -> None:
    """Sizes must be positive ints: below 1 raises ValueError, a non-int TypeError, naming the argument and the value."""
    with pytest.raises(error, match=match):
        sinusoidal_table(max_len, d_model)


@spec(kind="error")
def test_table_and_module_arguments_of_the_wrong_type_raise_type_error_naming_them() -> None:
    """A non-float table dtype, a str dropout and a non-bool batch_first raise TypeError naming the argument and the value seen (torch-style code would otherwise fail deep inside a comparison)."""
    with pytest.raises(
        TypeError, match=r"dtype must be a real floating point dtype, got torch\.int64"
    ):
        sinusoidal_table(4, 8, dtype=torch.long)
    with pytest.raises(TypeError, match=r"dropout must be a real number in \[0, 1\], got str 'x'"):
        SinusoidalPositionalEncoding(8, dropout="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="batch_first must be a bool, got int 0"):
        SinusoidalPositionalEncoding(8, batch_first=0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# The module.
# --------------------------------------------------------------------------------------


@spec(kind="shape")
@pytest.mark.parametrize("batch_first", [True, False])
def test_module_adds_the_table_along_the_time_axis(batch_first: bool) -> None:
    """Position t of every batch element gets PE[t] added, with (B, T, E) for batch_first and (T, B, E) otherwise (B != T, so adding along the batch axis fails)."""
    B, T, d_model = 3, 7, 10
    pe = SinusoidalPositionalEncoding(d_model, max_len=20, dropout=0.0, batch_first=batch_first)
    x = randn(B, T, d_model, seed=0, dtype=torch.float32)
    inp = x if batch_first else x.transpose(0, 1)
    out = pe(inp)
    assert out.shape == inp.shape
    out = out if batch_first else out.transpose(0, 1)  # (B, T, E)
    expected = x + paper_table(T, d_model).float()
    assert_close(out, expected)


@spec(kind="shape")
def test_module_accepts_unbatched_sequences() -> None:
    """An unbatched (T, E) sequence gets PE[:T] added, whatever batch_first says."""
    for batch_first in (True, False):
        pe = SinusoidalPositionalEncoding(6, max_len=10, dropout=0.0, batch_first=batch_first)
        assert_close(pe(torch.zeros(4, 6)), paper_table(4, 6).float())


@spec(kind="equivalence")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_module_output_keeps_the_input_dtype(dtype: torch.dtype) -> None:
    """A float64, bfloat16 or float16 input gives an output of its own dtype, holding the table in that dtype (the float32 table is cast to the input's dtype, not the input promoted)."""
    pe = SinusoidalPositionalEncoding(8, max_len=16, dropout=0.0)
    out = pe(torch.zeros(2, 16, 8, dtype=dtype))
    assert out.dtype == dtype
    # scale: the stored table is float32, one rounding away from float64's.
    assert_close(out[1], paper_table(16, 8).to(dtype), scale=1e2 if dtype == torch.float64 else 1)


@spec(kind="equivalence")
def test_table_is_a_non_persistent_buffer() -> None:
    """The table is a buffer that follows ``.to()`` but stays out of state_dict (it is rebuilt from the arguments), so checkpoints hold no positional table."""
    pe = SinusoidalPositionalEncoding(8, max_len=16)
    assert dict(pe.state_dict()) == {}
    assert any(b is pe.pe for b in pe.buffers())
    assert pe.double().pe.dtype == torch.float64
    fresh = SinusoidalPositionalEncoding(8, max_len=16)
    fresh.load_state_dict(pe.state_dict(), strict=True)


@spec(section="5.4", kind="equivalence")
def test_dropout_applies_to_the_sum_in_training_only() -> None:
    """Dropout is applied to the sum of input and encoding (section 5.4) in training mode; eval mode adds the table deterministically."""
    pe = SinusoidalPositionalEncoding(16, max_len=32, dropout=0.5)
    x = randn(2, 32, 16, seed=1, dtype=torch.float32)
    exact = x + paper_table(32, 16).float()
    torch.manual_seed(0)
    out = pe(x)
    dropped = out == 0
    assert 0.3 < dropped.float().mean() < 0.7
    assert_close(out[~dropped], 2.0 * exact[~dropped])  # kept entries are scaled by 1/(1-p)
    pe.eval()
    assert_close(pe(x), exact)


@spec(kind="error")
def test_sequence_longer_than_max_len_raises_value_error() -> None:
    """A sequence longer than max_len raises ValueError naming both lengths; exactly max_len is fine."""
    pe = SinusoidalPositionalEncoding(8, max_len=5, dropout=0.0)
    assert pe(torch.zeros(1, 5, 8)).shape == (1, 5, 8)
    with pytest.raises(ValueError, match=r"sequence length 6 exceeds max_len=5"):
        pe(torch.zeros(1, 6, 8))
    seq_first = SinusoidalPositionalEncoding(8, max_len=5, dropout=0.0, batch_first=False)
    with pytest.raises(ValueError, match=r"sequence length 6 exceeds max_len=5"):
        seq_first(torch.zeros(6, 1, 8))


@spec(kind="error")
def test_module_rejects_bad_arguments_and_inputs() -> None:
    """Bad constructor arguments (dropout outside [0, 1], non-positive sizes) and inputs of the wrong rank or feature size raise ValueError naming what was wrong."""
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\], got 1.5"):
        SinusoidalPositionalEncoding(8, dropout=1.5)
    with pytest.raises(ValueError, match=r"d_model must be a positive int, got 0"):
        SinusoidalPositionalEncoding(0)
    with pytest.raises(ValueError, match=r"max_len must be a positive int, got -1"):
        SinusoidalPositionalEncoding(8, max_len=-1)
    pe = SinusoidalPositionalEncoding(8, max_len=10)
    with pytest.raises(
        ValueError, match=r"x has 7 features in shape \(2, 3, 7\), expected d_model=8"
    ):
        pe(torch.zeros(2, 3, 7))
    with pytest.raises(ValueError, match=r"x must be .* got shape \(8,\)"):
        pe(torch.zeros(8))


@spec(kind="error")
@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        ([[0.0] * 8], TypeError, "x must be a Tensor, got list"),
        (torch.ones(3, 8, dtype=torch.long), TypeError, "x must be a floating point.*int64"),
        (torch.ones(3, 8, dtype=torch.bool), TypeError, "x must be a floating point.*bool"),
    ],
    ids=["list", "int64-ids", "bool"],
)
def test_non_tensor_or_integer_input_raises_type_error_naming_x(
    x: object, error: type[Exception], match: str
) -> None:
    """Token ids (int64) or a list passed where embeddings belong raise TypeError naming x and what was seen, instead of silently adding a float table to integers."""
    pe = SinusoidalPositionalEncoding(8, max_len=10, dropout=0.0)
    with pytest.raises(error, match=match):
        pe(x)


@spec(section="torch", kind="shape")
def test_module_repr_names_its_sizes_and_layout() -> None:
    """The module's repr states d_model, max_len and batch_first (and its dropout child), as torch modules show their configuration."""
    pe = SinusoidalPositionalEncoding(12, max_len=50, dropout=0.25, batch_first=False)
    text = repr(pe)
    assert text.startswith("SinusoidalPositionalEncoding(")
    assert "d_model=12, max_len=50, batch_first=False" in text
    assert "(dropout): Dropout(p=0.25" in text


@spec(kind="equivalence")
@pytest.mark.parametrize("batch_first", [True, False])
def test_offset_adds_the_rows_of_the_positions_the_steps_sit_at(batch_first: bool) -> None:
    """With offset=k the T steps get PE[k], ..., PE[k + T - 1]: the last step of a prefix embedded alone equals that step of the whole prefix (what a KV-cache decoder relies on)."""
    B, T, d_model, k = 2, 3, 10, 5
    pe = SinusoidalPositionalEncoding(d_model, max_len=20, dropout=0.0, batch_first=batch_first)
    x = randn(B, k + T, d_model, seed=1, dtype=torch.float32)  # (B, k + T, E)
    tail = x[:, k:]
    inp = tail if batch_first else tail.transpose(0, 1)
    out = pe(inp, offset=k)
    out = out if batch_first else out.transpose(0, 1)  # (B, T, E)
    assert_close(out, tail + paper_table(k + T, d_model)[k:].float())
    whole = pe(x if batch_first else x.transpose(0, 1))
    whole = whole if batch_first else whole.transpose(0, 1)
    assert torch.equal(out, whole[:, k:])


@spec(kind="error")
@pytest.mark.parametrize(
    ("offset", "error", "match"),
    [
        (-1, ValueError, "offset must be an int >= 0, got -1"),
        (1.0, TypeError, r"offset must be an int, got float 1\.0"),
        (True, TypeError, "offset must be an int, got bool True"),
        ("2", TypeError, "offset must be an int, got str '2'"),
    ],
    ids=["negative", "float", "bool", "str"],
)
def test_offset_that_is_not_a_non_negative_int_raises_an_error_naming_it(
    offset: object, error: type[Exception], match: str
) -> None:
    """A negative offset raises ValueError, and one that is not an int TypeError, naming offset and the value seen."""
    pe = SinusoidalPositionalEncoding(8, max_len=10, dropout=0.0)
    with pytest.raises(error, match=match):
        pe(torch.zeros(1, 2, 8), offset=offset)  # type: ignore[arg-type]


@spec(kind="error")
def test_steps_past_max_len_at_an_offset_raise_value_error_naming_both() -> None:
    """offset + T > max_len raises ValueError giving the length, the offset and max_len (the table has no row for those positions)."""
    pe = SinusoidalPositionalEncoding(8, max_len=10, dropout=0.0)
    pe(torch.zeros(1, 2, 8), offset=8)  # positions 8 and 9: the last rows
    with pytest.raises(ValueError, match=r"sequence length 2 at offset 9 exceeds max_len=10"):
        pe(torch.zeros(1, 2, 8), offset=9)
