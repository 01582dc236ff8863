"""torch's function transforms and tracers run our modules as they run torch.nn's.

Code written for ``torch.nn`` maps a module over a batch with ``torch.vmap`` (per-sample
gradients with ``vmap(grad(...))``), exports it with ``torch.export``, compiles it with
``fullgraph=True``, or runs it on ``meta`` tensors or under a ``FakeTensorMode`` to learn
shapes without computing. None of them lets Python read a tensor's value
(``.item()``, ``bool(t)``): the attention wrapper's shortcuts that read one (is any
query NaN? has every row a key?) must give way to branch-free passes there, with the
same results, and the kernel registry must not send ``meta`` tensors to a kernel that
needs values. Results are compared with eager runs of the same module.

Notation: B batch, L target length, S source length, E d_model.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call, grad

import transformer
from transformer.testing import assert_close

spec = functools.partial(pytest.mark.spec, section="torch", kind="equivalence")
# functorch runs torch's CPU flash-attention op call by call under vmap, and says so.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

E, H, FF = 8, 2, 16
B, L = 3, 5  # L < 64: the wrapper's NaN-row rule applies (see torch_kernel._show_nan_rows)


def _randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@spec(component="multi_head_attention")
def test_vmap_over_a_batch_of_calls_equals_the_calls_one_by_one() -> None:
    """``torch.vmap`` of ``MultiheadAttention(need_weights=False)`` over 4 independent (L, B, E) inputs equals the 4 calls made one by one, and a NaN in one query row still shows as NaN in that row's output (the NaN rule, branch-free under vmap)."""
    torch.manual_seed(0)
    mha = transformer.MultiheadAttention(E, H)
    x = _randn(4, L, B, E, seed=1)
    x[2, 1, 0, 3] = float("nan")  # call 2, position 1, batch row 0

    def call(q: Tensor) -> Tensor:
        return mha(q, q, q, need_weights=False)[0]

    mapped = torch.vmap(call)(x)
    one_by_one = torch.stack([call(q) for q in x])
    # The NaN reaches every position of its batch row (each attends to position 1).
    assert torch.isnan(mapped[2, :, 0]).all() and not torch.isnan(mapped[[0, 1, 3]]).any()
    assert torch.equal(torch.isnan(mapped), torch.isnan(one_by_one))
    assert_close(mapped.nan_to_num(), one_by_one.nan_to_num())


@spec(component="multi_head_attention")
def test_per_sample_gradients_by_vmap_of_grad_equal_a_loop_of_backward_passes() -> None:
    """``vmap(grad(loss))`` over 4 samples gives each sample's parameter gradients, equal to 4 separate ``backward`` passes (torch.func's per-sample-gradient recipe)."""
    torch.manual_seed(0)
    mha = transformer.MultiheadAttention(E, H)
    params = {name: p.detach() for name, p in mha.named_parameters()}
    x = _randn(4, L, B, E, seed=2)

    def loss(p: dict[str, Tensor], q: Tensor) -> Tensor:
        return functional_call(mha, p, (q, q, q), {"need_weights": False})[0].square().sum()

    per_sample = torch.vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i, q in enumerate(x):
        mha.zero_grad()
        mha(q, q, q, need_weights=False)[0].square().sum().backward()
        for name, p in mha.named_parameters():
            assert p.grad is not None
            assert_close(per_sample[name][i], p.grad, msg=f"sample {i}, {name}")


@spec(component="layers")
@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "key-padding-mask"])
def test_exported_encoder_layer_gives_the_eager_output(padded: bool) -> None:
    """``torch.export.export`` of an eval-mode ``TransformerEncoderLayer`` succeeds (with and without ``src_key_padding_mask``), and the exported program's output equals the eager module's."""
    torch.manual_seed(0)
    layer = transformer.TransformerEncoderLayer(E, H, FF).eval()
    x = _randn(L, B, E, seed=3)
    kwargs = {}
    if padded:
        kpm = torch.zeros(B, L, dtype=torch.bool)
        kpm[0, 3:] = True
        kwargs = {"src_key_padding_mask": kpm}
    program = torch.export.export(layer, (x,), kwargs)
    assert_close(program.module()(x, **kwargs), layer(x, **kwargs))


@spec(component="layers")
def test_fullgraph_compiled_encoder_layer_gives_the_eager_output() -> None:
    """``torch.compile(layer, fullgraph=True)`` (``aot_eager``) of a ``TransformerEncoderLayer`` compiles without a graph break and gives the eager output."""
    torch.manual_seed(0)
    layer = transformer.TransformerEncoderLayer(E, H, FF, dropout=0.0)
    x = _randn(L, B, E, seed=4)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert_close(compiled(x), layer(x))


@spec(component="layers", kind="shape")
@pytest.mark.parametrize("mode", ["meta-device", "fake-tensor-mode"])
def test_shape_only_runs_give_torchs_output_shape(mode: str) -> None:
    """A ``TransformerEncoderLayer`` built and run on the ``meta`` device (training mode, dropout on), or run under a ``FakeTensorMode`` (training mode, dropout on, bf16, on a fake and on a real input), with and without a key padding mask, returns the output shape torch.nn's layer returns, without computing values."""
    kpm = torch.zeros(B, L, dtype=torch.bool)
    for module in (transformer, torch.nn):
        if mode == "meta-device":
            with torch.device("meta"):
                layer = module.TransformerEncoderLayer(E, H, FF)
                shapes = [layer(torch.randn(L, B, E)).shape]
                shapes.append(
                    layer(torch.randn(L, B, E), src_key_padding_mask=kpm.to("meta")).shape
                )
        else:
            # Training mode with dropout, in bf16: the kernel choice and the dropout seed
            # must not read values either.
            layer = module.TransformerEncoderLayer(E, H, FF, dtype=torch.bfloat16).train()
            real = torch.randn(L, B, E, dtype=torch.bfloat16)  # made outside the mode
            with FakeTensorMode(allow_non_fake_inputs=True):
                shapes = [layer(torch.randn(L, B, E, dtype=torch.bfloat16)).shape]
                shapes.append(layer(real, src_key_padding_mask=kpm).shape)
        assert shapes == [torch.Size([L, B, E])] * 2, (module.__name__, shapes)
