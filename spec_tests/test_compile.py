"""``torch.compile`` gives the eager results: kernels, multi-head attention, the model.

A user who wraps attention or the whole model in ``torch.compile`` must get the numbers
of eager mode, in the forward pass and in the gradients. The default suite compiles
with the ``aot_eager`` backend: it runs TorchDynamo's tracing and AOTAutograd's
forward/backward split (where graph breaks, data-dependent branches and custom autograd
functions go wrong) but no code generation, so it is fast and needs no C++ compiler.
The full ``inductor`` backend, which generates and compiles C++, runs in the tests
marked ``slow``; they skip, saying why, where a trivial function cannot be compiled
(e.g. no C++ compiler on the machine).

``fullgraph=True`` turns every graph break into an error: the chunked kernel (tile
loops, a thread pool, a dropout seed read with ``.item()``) must reach the compiler as
one op, not as Python the compiler gives up on.

Notation: B batch, H heads, L target length, S source length, E head dim / d_model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import transformer
from transformer import MultiheadAttention
from transformer.testing import assert_close

spec = functools.partial(pytest.mark.spec, section="extra", kind="equivalence")

#: Kernels that run as plain PyTorch on the CPU (the Triton kernel is compiled by Triton).
KERNELS = [name for name in transformer.available_kernels("cpu") if name != "triton"]


@pytest.fixture(scope="session")
def inductor() -> str:
    """``"inductor"`` if this machine can compile a trivial function with it, else skip."""
    try:
        fn = torch.compile(lambda x: torch.sin(x) + 1.0, backend="inductor")
        x = torch.arange(4.0)
        torch.testing.assert_close(fn(x), torch.sin(x) + 1.0)
    except Exception as err:  # any failure means: this platform cannot run inductor
        pytest.skip(f"torch.compile(backend='inductor') does not work here: {err!r:.200}")
    return "inductor"


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    """Each test compiles from scratch, so one test's cache cannot hide another's failure."""
    torch._dynamo.reset()


def randn(*shape: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen)


def forward_backward(fn: Callable[..., Tensor], *inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``fn(*inputs)`` and the gradients of every input for a fixed upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(randn(*out.shape, seed=99))
    return out.detach(), [leaf.grad for leaf in leaves if leaf.grad is not None]


def assert_same(compiled: tuple[Tensor, list[Tensor]], eager: tuple[Tensor, list[Tensor]]) -> None:
    assert_close(compiled[0], eager[0], msg="forward")
    assert len(compiled[1]) == len(eager[1])
    for i, (c, e) in enumerate(zip(compiled[1], eager[1], strict=True)):
        assert_close(c, e, msg=f"gradient of input {i}")


def attention_inputs() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q ``(2, 3, 7, 12)``, k ``(2, 3, 9, 12)``, v ``(2, 3, 9, 5)``, an additive mask ``(7, 9)``."""
    mask = torch.zeros(7, 9).masked_fill(randn(7, 9, seed=3) > 0.5, float("-inf"))
    mask[4] = float("-inf")  # a row with no key: zeros, zero gradient, also when compiled
    return randn(2, 3, 7, 12, seed=0), randn(2, 3, 9, 12, seed=1), randn(2, 3, 9, 5, seed=2), mask


def attention_fn(kernel: str, is_causal: bool) -> Callable[..., Tensor]:
    def fn(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        return transformer.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, kernel=kernel
        )

    return fn


def tiny_model() -> transformer.Seq2SeqTransformer:
    torch.manual_seed(0)
    return transformer.Seq2SeqTransformer.from_config(transformer.ModelConfig.tiny(17)).eval()


def model_inputs() -> tuple[Tensor, Tensor]:
    """src ``(3, 8)`` and tgt_in ``(3, 6)`` with padding (id 0) at the ends of some rows."""
    gen = torch.Generator().manual_seed(5)
    src = torch.randint(1, 17, (3, 8), generator=gen)
    tgt = torch.randint(1, 17, (3, 6), generator=gen)
    src[1, 5:] = 0
    tgt[2, 4:] = 0
    return src, tgt


# --------------------------------------------------------------------------------------
# Default suite: TorchDynamo + AOTAutograd, no code generation.
# --------------------------------------------------------------------------------------


@spec(component="attention")
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
def test_compiled_kernel_matches_eager_forward_and_gradients(kernel: str, is_causal: bool) -> None:
    """torch.compile (aot_eager) of scaled_dot_product_attention gives eager's output and gradients for every CPU kernel, a fully masked row included."""
    fn = attention_fn(kernel, is_causal)
    inputs = attention_inputs()
    compiled = torch.compile(fn, backend="aot_eager")
    assert_same(forward_backward(compiled, *inputs), forward_backward(fn, *inputs))


@spec(component="attention")
def test_reference_kernel_traces_into_one_graph() -> None:
    """The reference kernel (the executable spec of §3.2.1) compiles with fullgraph=True, no graph break, and gives eager's output."""
    fn = attention_fn("reference", is_causal=True)
    inputs = attention_inputs()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert_close(compiled(*inputs), fn(*inputs))


@spec(component="attention")
@pytest.mark.parametrize("is_causal", [False, True])
def test_chunked_kernel_compiles_into_one_graph_forward_and_backward(is_causal: bool) -> None:
    """torch.compile(fullgraph=True) of attention on the chunked kernel raises no graph break and gives eager's output and gradients of query, key, value and a float mask (a fully masked row included)."""
    fn = attention_fn("chunked", is_causal)
    inputs = attention_inputs()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert_same(forward_backward(compiled, *inputs), forward_backward(fn, *inputs))


@spec(component="attention")
def test_compiled_chunked_dropout_is_eager_dropout_under_one_seed() -> None:
    """Under one torch.manual_seed the fullgraph-compiled chunked kernel draws the dropout of eager mode: same output and gradients with dropout_p = 0.3."""

    def fn(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        return transformer.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=0.3, kernel="chunked"
        )

    def seeded(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def run(*args: Tensor) -> Tensor:
            torch.manual_seed(7)  # outside the compiled code: dynamo does not trace it
            return f(*args)

        return run

    inputs = attention_inputs()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    eager = forward_backward(seeded(fn), *inputs)
    assert not torch.allclose(eager[0], forward_backward(fn, *inputs)[0]), "seed has no effect"
    assert_same(forward_backward(seeded(compiled), *inputs), eager)


@pytest.mark.slow
@spec(component="attention")
def test_inductor_fullgraph_chunked_kernel_matches_eager_forward_and_gradients(
    inductor: str,
) -> None:
    """torch.compile(backend="inductor", fullgraph=True) of a module around the chunked kernel compiles without a graph break and gives eager's output and gradients (causal, float mask)."""

    class Attend(torch.nn.Module):
        def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
            out = transformer.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=True, kernel="chunked"
            )
            return out * 2.0 + 1.0  # ops around the kernel, for inductor to fuse

    module = Attend()
    inputs = attention_inputs()
    compiled = torch.compile(module, backend=inductor, fullgraph=True)
    assert_same(forward_backward(compiled, *inputs), forward_backward(module, *inputs))


@spec(component="multi_head_attention", section="3.2.2")
def test_compiled_mha_matches_eager_output_weights_and_gradients() -> None:
    """torch.compile (aot_eager) of MultiheadAttention gives eager's output, attention weights and input gradients with a key padding mask."""
    torch.manual_seed(0)
    mha = MultiheadAttention(24, 4, batch_first=True)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    q, kv = randn(2, 7, 24, seed=1), randn(2, 9, 24, seed=2)

    def fn(query: Tensor, memory: Tensor) -> Tensor:
        out, weights = mha(query, memory, memory, key_padding_mask=padding)
        assert weights is not None
        return out + weights.sum()  # both returns reach the gradient

    compiled = torch.compile(fn, backend="aot_eager")
    assert_same(forward_backward(compiled, q, kv), forward_backward(fn, q, kv))


@spec(component="model", section="3.1")
def test_compiled_model_matches_eager_logits() -> None:
    """torch.compile (aot_eager) of a tiny Seq2SeqTransformer gives eager's logits on padded batches."""
    model = tiny_model()
    src, tgt = model_inputs()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(src, tgt), model(src, tgt))


# --------------------------------------------------------------------------------------
# Slow: the full inductor backend (C++ code generation).
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@spec(component="attention")
@pytest.mark.parametrize("kernel", KERNELS)
def test_inductor_kernel_matches_eager_forward_and_gradients(kernel: str, inductor: str) -> None:
    """torch.compile with the inductor backend gives eager's attention output and gradients for every CPU kernel (fp32 tolerances)."""
    fn = attention_fn(kernel, is_causal=True)
    inputs = attention_inputs()
    compiled = torch.compile(fn, backend=inductor)
    assert_same(forward_backward(compiled, *inputs), forward_backward(fn, *inputs))


@pytest.mark.slow
@spec(component="attention")
@pytest.mark.parametrize("kernel", KERNELS)
def test_inductor_dynamic_shapes_match_eager_at_every_length(kernel: str, inductor: str) -> None:
    """One compiled attention function (dynamic=True) gives eager's output at query/key lengths 1, 7 and 97."""
    fn = attention_fn(kernel, is_causal=False)
    compiled = torch.compile(fn, backend=inductor, dynamic=True)
    for n in (1, 7, 97):
        q, k, v = (
            randn(2, n, 12, seed=n),
            randn(2, n + 2, 12, seed=n + 1),
            randn(2, n + 2, 5, seed=3),
        )
        mask = torch.zeros(n, n + 2)
        assert_close(compiled(q, k, v, mask), fn(q, k, v, mask), msg=f"length {n}")


@pytest.mark.slow
@spec(component="multi_head_attention", section="3.2.2")
def test_inductor_mha_matches_eager(inductor: str) -> None:
    """torch.compile with inductor of MultiheadAttention gives eager's output and gradients."""
    torch.manual_seed(0)
    mha = MultiheadAttention(24, 4, batch_first=True)

    def fn(x: Tensor) -> Tensor:
        return mha(x, x, x, need_weights=False)[0]

    compiled = torch.compile(fn, backend=inductor)
    x = randn(2, 7, 24, seed=1)
    assert_same(forward_backward(compiled, x), forward_backward(fn, x))


@pytest.mark.slow
@spec(component="model", section="3.1")
def test_inductor_model_matches_eager_logits_and_gradients(inductor: str) -> None:
    """torch.compile with inductor of a tiny Seq2SeqTransformer gives eager's logits and parameter gradients (scale 10: a 4-layer stack of fused kernels reorders sums)."""
    model = tiny_model()
    src, tgt = model_inputs()
    compiled = torch.compile(model, backend=inductor)
    grads = []
    for m in (compiled, model):
        model.zero_grad()
        logits = m(src, tgt)
        logits.square().mean().backward()
        grads.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    assert_close(grads[0][0], grads[1][0], scale=10.0, msg="logits")
    for c, e in zip(grads[0][1], grads[1][1], strict=True):
        assert_close(c, e, scale=10.0, msg="parameter gradient")
