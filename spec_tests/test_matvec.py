"""Spec of the one-row linear map that cached decoding runs (``transformer.matvec``).

A cached decoder step multiplies one row by each weight matrix. ``transformer.matvec``
splits such a product into one block of weight rows per torch thread, run as one
batched matmul, and leaves every other call to ``F.linear``. Its promises: the same
result as ``torch.nn.functional.linear`` wherever it is used, the split taken only
where it applies (one row on the CPU, outside autograd, autocast and compilation), and
a ``Linear`` module that is torch's ``nn.Linear`` in every visible way.

Whether the split runs at all depends on the kind of CPU (it was measured faster on one
and slower on another): the tests of the split itself turn it on, whatever this
machine's kind, and one test checks that the per-kind switch follows the committed
measurements.

Reference: ``torch.nn.functional.linear`` and ``torch.nn.Linear``.

Notation: I in_features, O out_features.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from transformer import matvec
from transformer.kernel_choice import hardware_kind
from transformer.matvec import SPLIT_MEASURED, Linear, linear
from transformer.testing import assert_close

spec = functools.partial(pytest.mark.spec, component="kv_cache", section="extra")

I, O = 24, 36
REPO = Path(__file__).resolve().parents[1]
#: The switch as the module set it at import, before ``split_on`` patches it.
SPLIT_HERE = matvec._SPLIT_HERE


@pytest.fixture(autouse=True)
def split_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split as on a CPU kind that measured it faster, whatever this machine's kind."""
    monkeypatch.setattr(matvec, "_SPLIT_HERE", True)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


@pytest.fixture
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test with ``request.param`` torch threads, restoring the count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(before)


class OpLog(TorchDispatchMode):
    """Records the name of every aten op that runs inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def ops_of(fn: functools.partial[Tensor]) -> list[str]:
    with OpLog() as log:
        fn()
    return log.ops


# --------------------------------------------------------------------------------------
# Equivalence: the same numbers as F.linear.
# --------------------------------------------------------------------------------------


@spec(kind="equivalence")
@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("lead", [(), (1,), (1, 1), (1, 1, 1)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_one_row_product_equals_torch_linear(
    threads: int, lead: tuple[int, ...], bias: bool, dtype: torch.dtype
) -> None:
    """``linear(x, W, b) == F.linear(x, W, b)`` for one row ``x (*lead, I)``, any thread count.

    ``O = 36`` splits evenly over 1, 2 and 3 threads, so each count takes its own split.
    """
    x = randn(*lead, I, seed=1, dtype=dtype)
    w = randn(O, I, seed=2, dtype=dtype)
    b = randn(O, seed=3, dtype=dtype) if bias else None
    got = linear(x, w, b)
    assert got.shape == (*lead, O)
    assert_close(got, F.linear(x, w, b))


@spec(kind="equivalence")
@pytest.mark.parametrize("threads", [2, 3], indirect=True)
def test_a_row_and_weights_that_are_views_into_larger_tensors_give_torch_linear(
    threads: int,
) -> None:
    """The split reads each operand where it lies: a row taken as a strided column of a
    matrix, and a weight and bias that are slices at an offset of larger parameters (as
    ``MultiheadAttention`` slices ``in_proj_weight`` into ``W^K``) equal ``F.linear``."""
    x = randn(I, 5, seed=20)[:, 3]  # (I,) with stride 5, storage offset 3
    packed_w, packed_b = randn(3 * O, I, seed=21), randn(3 * O, seed=22)
    w, b = packed_w[O : 2 * O], packed_b[O : 2 * O]  # offsets O * I and O
    assert x.stride() == (5,) and w.storage_offset() == O * I and b.storage_offset() == O
    with torch.no_grad():
        assert_close(linear(x, w, b), F.linear(x, w, b))
        assert_close(linear(x[None], w, None), F.linear(x[None], w, None))


@spec(kind="equivalence")
@pytest.mark.parametrize("threads", [2], indirect=True)
@pytest.mark.parametrize("case", ["(1, O) row of a matrix", "(O, 1)", "0-d", "float64"])
def test_a_bias_that_is_not_one_vector_of_out_features_gets_torch_linears_answer(
    threads: int, case: str
) -> None:
    """``F.linear`` broadcasts a ``(1, O)`` or 0-d bias, refuses an ``(O, 1)`` one and a bias of another dtype; ``linear`` on one row gives the same result, or raises the same error (type and message), in each case: the split takes only a 1-D bias of ``O`` numbers in the input's dtype."""
    x, w = randn(1, I, seed=25), randn(O, I, seed=26)
    b = {
        "(1, O) row of a matrix": randn(4, O, seed=27)[2:3],
        "(O, 1)": randn(O, 1, seed=27),
        "0-d": randn(1, seed=27)[0],
        "float64": randn(O, seed=27, dtype=torch.float64),
    }[case]
    try:
        want: Tensor | str = F.linear(x, w, b)
    except RuntimeError as err:
        want = str(err)
    try:
        got: Tensor | str = linear(x, w, b)
    except RuntimeError as err:
        got = str(err)
    if isinstance(want, str):
        assert got == want
    else:
        assert isinstance(got, Tensor)
        assert torch.equal(got, want)


@spec(kind="error")
@pytest.mark.parametrize("threads", [2], indirect=True)
def test_an_input_of_the_right_size_but_not_one_row_is_refused_as_torch_does(
    threads: int,
) -> None:
    """``x`` of shape ``(2, I/2)`` holds ``I`` numbers but its rows have ``I/2`` features:
    ``F.linear`` raises its ``RuntimeError`` ("shapes cannot be multiplied"), and so must
    ``linear``: the split must not take it for one row of ``I``."""
    x, w = randn(2, I // 2, seed=23), randn(O, I, seed=24)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        F.linear(x, w)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        linear(x, w)


@spec(kind="equivalence")
@pytest.mark.parametrize("threads", [2], indirect=True)
@pytest.mark.parametrize(
    "shape",
    [(3, I), (2, 1, I), (1, 4, I), (0, I)],
    ids=["3 rows", "2 batches of 1", "1 batch of 4", "no row"],
)
def test_several_rows_give_torch_linear_unsplit(threads: int, shape: tuple[int, ...]) -> None:
    """More (or fewer) than one row: ``linear`` is ``F.linear``, the same op and numbers."""
    x, w, b = randn(*shape, seed=4), randn(O, I, seed=5), randn(O, seed=6)
    assert "bmm" not in ops_of(functools.partial(linear, x, w, b))
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))


@spec(kind="equivalence")
@pytest.mark.parametrize("threads", [2], indirect=True)
def test_gradients_flow_as_through_torch_linear(threads: int) -> None:
    """With autograd recording, ``linear`` is ``F.linear``: same output and gradients."""
    x = randn(1, I, seed=7).requires_grad_()
    w, b = randn(O, I, seed=8).requires_grad_(), randn(O, seed=9).requires_grad_()
    linear(x, w, b).square().sum().backward()
    got = [t.grad for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    F.linear(x, w, b).square().sum().backward()
    for g, want in zip(got, (x.grad, w.grad, b.grad), strict=True):
        assert g is not None and want is not None
        assert torch.equal(g, want)


# --------------------------------------------------------------------------------------
# Property: where the split is taken, and where it is not.
# --------------------------------------------------------------------------------------


@spec(kind="property")
@pytest.mark.parametrize("threads", [2, 3], indirect=True)
def test_a_one_row_product_runs_as_one_batched_matmul_of_a_block_per_thread(
    threads: int,
) -> None:
    """Under ``no_grad`` with ``threads`` threads, the product is one ``baddbmm`` (``bmm``
    without bias) of ``threads`` blocks of ``O / threads`` weight rows, and no ``addmm``."""
    x, w, b = randn(1, 1, I, seed=10), randn(O, I, seed=11), randn(O, seed=12)
    seen: list[tuple[int, ...]] = []

    class Shapes(OpLog):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func.overloadpacket.__name__ in ("baddbmm", "bmm"):
                seen.append(tuple(args[-1].shape))
            return super().__torch_dispatch__(func, types, args, kwargs)

    with torch.no_grad():
        with Shapes() as log:
            linear(x, w, b)
        assert "baddbmm" in log.ops and "addmm" not in log.ops
        with Shapes() as log:
            linear(x, w)
        assert "bmm" in log.ops and "mm" not in log.ops
    assert seen == [(threads, I, O // threads)] * 2


@spec(kind="property")
@pytest.mark.parametrize("threads", [2], indirect=True)
@pytest.mark.parametrize(
    "case",
    ["one thread", "rows do not split evenly", "bf16", "needs grad", "autocast", "strided"],
)
def test_the_split_is_left_to_torch_linear_where_it_does_not_apply(threads: int, case: str) -> None:
    """One thread, ``O`` not a multiple of the thread count, a dtype other than fp32/fp64,
    autograd recording, CPU autocast, or a weight that is not row-major: ``F.linear`` runs
    (an ``addmm``, no ``bmm``) and gives its own result."""
    out_features = O + 1 if case == "rows do not split evenly" else O
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    x, w = randn(1, I, seed=13, dtype=dtype), randn(out_features, I, seed=14, dtype=dtype)
    b = randn(out_features, seed=15, dtype=dtype)
    if case == "strided":
        w = randn(I, out_features, seed=14).t()  # (O, I) with column-major storage
    if case == "needs grad":
        x.requires_grad_()
    if case == "one thread":
        torch.set_num_threads(1)
    call = functools.partial(linear, x, w, b)
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ops, got, want = ops_of(call), call(), F.linear(x, w, b)
    else:
        ops, got, want = ops_of(call), call(), F.linear(x, w, b)
    assert not {"bmm", "baddbmm"} & set(ops), ops
    assert torch.equal(got, want)


@spec(kind="property")
@pytest.mark.parametrize("threads", [2], indirect=True)
def test_the_split_traces_under_torch_compile_fullgraph(threads: int) -> None:
    """``torch.compile(fullgraph=True)`` of a ``Linear`` on one row traces without a
    graph break (the thread count is not read in traced code) and gives eager's result."""
    torch._dynamo.reset()
    layer = Linear(I, O)
    x = randn(1, I, seed=16)
    with torch.no_grad():
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        assert_close(compiled(x), F.linear(x, layer.weight, layer.bias))


# --------------------------------------------------------------------------------------
# Equivalence: Linear is torch's nn.Linear.
# --------------------------------------------------------------------------------------


@spec(kind="equivalence")
@pytest.mark.parametrize("threads", [2], indirect=True)
def test_linear_is_a_torch_linear_with_its_keys_init_and_hooks(threads: int) -> None:
    """``Linear`` is an ``nn.Linear``: the same ``state_dict`` keys and shapes, torch's
    init from one seed, a torch ``Linear``'s weights load into it with the same outputs,
    and forward hooks see its calls."""
    torch.manual_seed(0)
    ours = Linear(I, O)
    torch.manual_seed(0)
    theirs = nn.Linear(I, O)
    assert isinstance(ours, nn.Linear)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    theirs.weight.data.normal_()
    ours.load_state_dict(theirs.state_dict())
    calls: list[Tensor] = []
    ours.register_forward_hook(lambda module, args, out: calls.append(out))
    x = randn(1, 1, I, seed=17)
    with torch.no_grad():
        got = ours(x)
        assert_close(got, theirs(x))
    assert len(calls) == 1 and calls[0] is got


# --------------------------------------------------------------------------------------
# Property: the split runs on the CPU kinds that measured it faster, and only there.
# --------------------------------------------------------------------------------------


@spec(kind="property")
@pytest.mark.parametrize("threads", [2], indirect=True)
def test_on_a_cpu_kind_where_the_split_was_slower_a_one_row_product_is_torch_linear(
    threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the split off for this CPU kind, a one-row product that the split would take
    (fp32, 2 threads, rows that divide) runs ``F.linear`` (no ``bmm``/``baddbmm``) and
    gives its result bit for bit."""
    monkeypatch.setattr(matvec, "_SPLIT_HERE", False)
    x, w, b = randn(1, 1, I, seed=17), randn(O, I, seed=18), randn(O, seed=19)
    with torch.no_grad():
        call = functools.partial(linear, x, w, b)
        ops = ops_of(call)
        assert not {"bmm", "baddbmm"} & set(ops), ops
        assert torch.equal(call(), F.linear(x, w, b))


@spec(kind="equivalence")
@pytest.mark.parametrize("kind", sorted(SPLIT_MEASURED))
def test_the_split_is_on_for_a_cpu_kind_exactly_when_its_committed_measurement_shows_it_faster(
    kind: str,
) -> None:
    """For each measured CPU kind, the committed ``model_bench.py matvec`` report it cites
    gives a geometric-mean speed-up of the split over ``F.linear`` above 1 exactly when
    ``SPLIT_MEASURED`` turns the split on there (a report that records its
    ``hardware_kind`` records this one); this machine's switch is its kind's flag, off
    for an unmeasured kind."""
    source, faster = SPLIT_MEASURED[kind]
    path = REPO / source
    if not path.exists():
        pytest.skip(f"{source} is not in this checkout (an installed package)")
    report = json.loads(path.read_text())
    assert report["environment"].get("hardware_kind", kind) == kind
    speedups = [row["speedup"] for row in report["rows"]]
    mean = math.exp(sum(math.log(r) for r in speedups) / len(speedups))
    assert (mean > 1.0) == faster, (kind, speedups)
    here = SPLIT_MEASURED.get(hardware_kind("cpu"), ("", False))[1]
    assert SPLIT_HERE is here
