"""Properties of the ``chunked`` kernel beyond the conformance suite (its promise: O(L + S) memory).

``spec_tests/test_attention.py`` already holds the kernel to equation 1 and to torch's
SDPA. This file pins what makes it *chunked*: the result does not depend on the tile
sizes (online softmax, Milakov & Gimelshein 2018; FlashAttention), the backward pass
keeps no ``(L, S)`` tensor, causal tiles above the diagonal are never computed, dropout
is regenerated exactly in the backward pass, the worker threads change nothing (nor
torch's process-wide thread count, nor what autocast or a dispatch mode sees), a lower-right causal bias is applied as a shifted
diagonal without any ``(L, S)`` tensor, and the peak memory is a small fraction of the
reference kernel's.

Notation: B batch, H heads, L target/query length, S source/key length, E head dim.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

import transformer
from transformer.attention import reference_attention
from transformer.conformance.memory import AllocationLog, track_allocations
from transformer.kernels import _chunked_ops as chunked_ops
from transformer.kernels import _chunked_threads as chunked_threads
from transformer.kernels import _chunked_tiles as chunked_tiles
from transformer.kernels import chunked
from transformer.testing import assert_close

spec = functools.partial(pytest.mark.spec, component="chunked_kernel")

NEG_INF = float("-inf")


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Seeded standard normal tensor."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def forward_backward(
    fn: Callable[..., Tensor], *tensors: Tensor
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Output of ``fn(*tensors)`` and the gradients of every tensor for a seeded upstream gradient."""
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in tensors)
    out = fn(*leaves)
    upstream = randn(*out.shape, seed=4242, dtype=out.dtype)
    return out.detach(), torch.autograd.grad(out, leaves, upstream)


def assert_same(
    actual: tuple[Tensor, tuple[Tensor, ...]], expected: tuple[Tensor, tuple[Tensor, ...]]
) -> None:
    """Outputs and every gradient agree within the dtype's tolerance."""
    assert_close(actual[0], expected[0], msg="output differs")
    for i, (g, g_ref) in enumerate(zip(actual[1], expected[1], strict=True)):
        assert_close(g, g_ref, msg=f"gradient of input {i} differs")


# (name, q/k/v shapes, mask maker, is_causal, enable_gqa): awkward lengths on purpose.
CASES = {
    "plain": ((2, 3, 37, 12), (2, 3, 53, 12), (2, 3, 53, 7), None, False, False),
    "causal-L>S": ((1, 2, 61, 8), (1, 2, 29, 8), (1, 2, 29, 8), None, True, False),
    "causal-L<S": ((2, 1, 29, 8), (2, 1, 61, 8), (2, 1, 61, 5), None, True, False),
    "bool-padding": ((3, 2, 23, 8), (3, 2, 41, 8), (3, 2, 41, 8), "padding", False, False),
    "float-per-head": ((2, 3, 19, 8), (2, 3, 31, 8), (2, 3, 31, 8), "per-head", True, False),
    "float-full": ((2, 2, 17, 8), (2, 2, 23, 8), (2, 2, 23, 4), "full", False, False),
    "gqa": ((2, 6, 21, 8), (2, 2, 33, 8), (2, 2, 33, 8), "per-head-gqa", True, True),
}


def make_mask(kind: str | None, case: tuple) -> Tensor | None:
    """A mask for ``case``: a bool key-padding mask or a float mask with -inf holes."""
    q_shape, k_shape = case[0], case[1]
    B, H, L, S = q_shape[0], q_shape[1], q_shape[2], k_shape[2]
    if kind is None:
        return None
    if kind == "padding":
        lengths = torch.tensor([S, S // 2, 1])[:B]
        return (torch.arange(S)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)
    shape = {"per-head": (H, 1, S), "per-head-gqa": (H, 1, S), "full": (B, H, L, S)}[kind]
    values = randn(*shape, seed=7)
    return values.masked_fill(randn(*shape, seed=8) > 1.0, NEG_INF)


def run_case(
    name: str, kernel: Callable[..., Tensor] | None = None, **blocks: int
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Forward and gradients (q, k, v and a float mask) of ``CASES[name]`` in float64.

    ``kernel`` is the chunked kernel (with ``blocks``) unless another is given.
    """
    case = CASES[name]
    q_shape, k_shape, v_shape, kind, causal, gqa = case
    q, k, v = (randn(*s, seed=i) for i, s in enumerate((q_shape, k_shape, v_shape)))
    mask = make_mask(kind, case)
    inputs = [q, k, v]
    if mask is not None and mask.is_floating_point():
        inputs.append(mask)

    run = functools.partial(chunked.chunked_attention, **blocks) if kernel is None else kernel

    def fn(q: Tensor, k: Tensor, v: Tensor, *float_mask: Tensor) -> Tensor:
        m = float_mask[0] if float_mask else mask
        return run(q, k, v, m, is_causal=causal, enable_gqa=gqa)

    return forward_backward(fn, *inputs)


@spec(section="3.2.1", kind="equivalence")
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize(
    ("block_l", "block_s"), [(1, 1), (4, 7), (16, 5), (10, 64)], ids=["1x1", "4x7", "16x5", "10x64"]
)
def test_results_do_not_depend_on_block_sizes(name: str, block_l: int, block_s: int) -> None:
    """Output and gradients (q, k, v, float mask) are the same for any query/key block sizes, including sizes that do not divide L or S (online softmax is exact)."""
    one_tile = run_case(name, block_l=4096, block_s=4096)
    tiled = run_case(name, block_l=block_l, block_s=block_s)
    assert_same(tiled, one_tile)


@spec(section="3.2.1", kind="equivalence")
@pytest.mark.parametrize("name", list(CASES))
def test_one_tile_result_is_equation_one(name: str) -> None:
    """With a single tile the kernel's output and gradients (q, k, v, float mask) equal equation 1 written plainly (the reference kernel) in every case of the block-size test, masks, causal and GQA included, so that test compares against the right answer."""
    one_tile = run_case(name, block_l=4096, block_s=4096)
    assert_same(one_tile, run_case(name, kernel=reference_attention))


def saved_shapes(fn: Callable[..., Tensor], *tensors: Tensor) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd saves for the backward pass of ``fn(*tensors)``."""
    shapes: list[tuple[int, ...]] = []

    def pack(t: Tensor) -> Tensor:
        shapes.append(tuple(t.shape))
        return t

    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*leaves)
    out.sum().backward()
    return shapes


@spec(section="extra", kind="property")
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_backward_saves_no_tensor_with_both_query_and_key_length(causal: bool) -> None:
    """The backward pass saves only O(L + S) tensors (inputs, output, two numbers per row): none has both an L and an S dim, while the reference kernel saves (L, S) ones."""
    L, S = 37, 53
    q, k, v = randn(2, 3, L, 8, seed=0), randn(2, 3, S, 8, seed=1), randn(2, 3, S, 8, seed=2)
    padding = torch.arange(S)[None, None, None, :] < torch.tensor([S, 9])[:, None, None, None]

    def both(shape: tuple[int, ...]) -> bool:
        return L in shape and S in shape

    def run(kernel: str) -> list[tuple[int, ...]]:
        return saved_shapes(
            functools.partial(
                transformer.scaled_dot_product_attention,
                attn_mask=padding,
                is_causal=causal,
                kernel=kernel,
            ),
            q,
            k,
            v,
        )

    # The probe has power: the reference kernel's (B, H, L, S) weights are seen.
    assert any(both(s) for s in run("reference"))
    ours = run("chunked")
    assert ours, "the chunked kernel saved nothing: the hook did not see its backward"
    assert not [s for s in ours if both(s)], ours


@pytest.fixture
def tile_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int, int]]:
    """Records ``(i0, i1, j0, j1)`` of every tile the chunked kernel computes."""
    log: list[tuple[int, int, int, int]] = []
    original = chunked_tiles.scores

    def counting(pb, unit, qb, j0, j1, buf):  # type: ignore[no-untyped-def]
        log.append((unit.i0, unit.i1, j0, j1))
        return original(pb, unit, qb, j0, j1, buf)

    monkeypatch.setattr(chunked_tiles, "scores", counting)
    return log


@spec(section="3.2.3", kind="masking")
def test_causal_tiles_above_the_diagonal_are_never_computed(
    tile_log: list[tuple[int, int, int, int]],
) -> None:
    """Under is_causal no tile whose keys all follow its queries is computed: with 8 x 8 blocks over L = S = 64, forward and backward each compute fewer tiles than half the grid plus its diagonal, and none above it."""
    L = S = 64
    q, k, v = (randn(1, 2, n, 8, seed=i, dtype=torch.float32) for i, n in enumerate((L, S, S)))
    q.requires_grad_(True)
    out = chunked.chunked_attention(q, k, v, is_causal=True, block_l=8, block_s=8)
    forward = list(tile_log)
    out.sum().backward()
    backward = tile_log[len(forward) :]
    grid = (L // 8) * (S // 8)
    for tiles in (forward, backward):
        assert 0 < len(tiles) < grid // 2 + L // 8 + 1, len(tiles)
        assert all(j0 < i1 for i0, i1, j0, j1 in tiles), "a tile above the diagonal was computed"
        # Every allowed (query, key) pair is still covered by some tile.
        covered = torch.zeros(L, S, dtype=torch.bool)
        for i0, i1, j0, j1 in tiles:
            covered[i0:i1, j0:j1] = True
        assert covered.tril().sum() == torch.ones(L, S).tril().sum()
    tile_log.clear()
    chunked.chunked_attention(q.detach(), k, v, is_causal=False, block_l=8, block_s=8)
    assert len(tile_log) == grid  # without is_causal every tile is needed


@spec(section="torch", kind="equivalence")
def test_dropout_gradients_match_finite_differences_under_a_fixed_seed() -> None:
    """With dropout_p > 0 and a fixed torch.manual_seed, the analytic gradients equal finite differences: the backward pass regenerates exactly the forward's dropout mask, tile by tile."""
    q, k, v = randn(1, 2, 9, 4, seed=0), randn(1, 2, 11, 4, seed=1), randn(1, 2, 11, 3, seed=2)
    mask = randn(9, 11, seed=3)

    def dropped(q: Tensor, k: Tensor, v: Tensor, m: Tensor) -> Tensor:
        torch.manual_seed(77)
        return chunked.chunked_attention(q, k, v, m, dropout_p=0.4, block_l=4, block_s=3)

    inputs = tuple(t.requires_grad_(True) for t in (q, k, v, mask))
    # The check has power: dropout really changes the result.
    assert not torch.allclose(dropped(*inputs), chunked.chunked_attention(q, k, v, mask))
    assert torch.autograd.gradcheck(dropped, inputs, eps=1e-6, atol=1e-5)


@spec(section="extra", kind="equivalence")
@pytest.mark.parametrize("name", ["plain", "causal-L>S", "float-full", "gqa"])
def test_worker_threads_give_the_single_thread_result(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Splitting the tiles over worker threads (large problems), for any thread count, gives the same output and gradients as running them in the calling thread."""
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 64)  # many slice chunks and tiles
    inline = run_case(name, block_l=8, block_s=8)
    threads = torch.get_num_threads()
    monkeypatch.setattr(chunked_threads, "PARALLEL_MIN_SCORES", 0)
    try:
        # Several chunks per worker, then one chunk for all; then a new thread count,
        # which replaces the pool of worker threads.
        for workers, tile in ((2, 64), (2, 1 << 20), (3, 64)):
            torch.set_num_threads(workers)
            monkeypatch.setattr(chunked, "TILE_ELEMENTS", tile)
            assert_same(run_case(name, block_l=8, block_s=8), inline)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads


@spec(section="extra", kind="equivalence")
@pytest.mark.parametrize("name", ["plain", "gqa"])
def test_worker_threads_run_under_the_callers_inference_mode(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``torch.inference_mode`` the output buffers are inference tensors, which only code inside inference mode may write; inference mode is per thread, so the worker threads must enter it too. The forward split over 2 workers there gives the result computed in the calling thread."""
    case = CASES[name]
    q, k, v = (randn(*shape, seed=i) for i, shape in enumerate(case[:3]))

    def forward() -> Tensor:
        return chunked.chunked_attention(q, k, v, enable_gqa=case[5], block_l=8, block_s=8)

    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 64)
    with torch.inference_mode():
        inline = forward()
    threads = torch.get_num_threads()
    monkeypatch.setattr(chunked_threads, "PARALLEL_MIN_SCORES", 0)
    try:
        torch.set_num_threads(2)
        with torch.inference_mode():
            split = forward()
    finally:
        torch.set_num_threads(threads)
    assert split.is_inference()
    assert torch.equal(split, inline)


@spec(section="extra", kind="equivalence")
@pytest.mark.parametrize("where", ["calling thread", "worker threads"])
def test_cpu_autocast_changes_nothing_inside_the_kernel(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel does its own precision (fp16/bf16 computed in fp32) and autocast is per thread: under CPU bf16 autocast, fp32 inputs give exactly the output and gradients they give without it, whether the tiles run in the calling thread (where autocast's bf16 products used to meet fp32 accumulators and fail) or in worker threads."""
    case = CASES["plain"]
    q, k, v = (randn(*shape, seed=i, dtype=torch.float32) for i, shape in enumerate(case[:3]))

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return chunked.chunked_attention(q, k, v, block_l=8, block_s=8)  # several key blocks

    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 64)
    if where == "worker threads":
        monkeypatch.setattr(chunked_threads, "PARALLEL_MIN_SCORES", 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        plain = forward_backward(fn, q, k, v)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = forward_backward(fn, q, k, v)
    finally:
        torch.set_num_threads(threads)
    assert autocast[0].dtype == torch.float32
    assert torch.equal(autocast[0], plain[0])
    for got, expected in zip(autocast[1], plain[1], strict=True):
        assert torch.equal(got, expected)


@spec(section="extra", kind="property")
def test_a_dispatch_mode_sees_the_tile_ops_of_problems_large_enough_for_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dispatch modes are per thread, so under one (torch's ``FlopCounterMode`` here) a problem large enough for worker threads runs in the calling thread: the mode counts the same nonzero flops, forward and backward, as for the problem kept in the calling thread."""
    from torch.utils.flop_counter import FlopCounterMode

    case = CASES["plain"]
    q, k, v = (randn(*shape, seed=i, dtype=torch.float32) for i, shape in enumerate(case[:3]))

    def flops() -> int:
        with FlopCounterMode(display=False) as counter:
            forward_backward(
                lambda *t: chunked.chunked_attention(*t, block_l=8, block_s=8), q, k, v
            )
        return counter.get_total_flops()

    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(chunked_threads, "PARALLEL_MIN_SCORES", 1 << 62)
    inline = flops()
    threads = torch.get_num_threads()
    monkeypatch.setattr(chunked_threads, "PARALLEL_MIN_SCORES", 0)
    try:
        torch.set_num_threads(2)
        large = flops()
    finally:
        torch.set_num_threads(threads)
    assert inline > 0
    assert large == inline


@spec(section="extra", kind="property")
def test_worker_threads_leave_torch_thread_count_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker threads run their ops single-threaded without calling torch.set_num_threads (a process-wide setting): the caller and threads started afterwards keep torch's thread count."""
    if chunked_threads.SET_THREAD_COUNT is None:
        pytest.skip("no per-thread OpenMP control here: the kernel runs in the calling thread")
    calls: list[str] = []
    real_set = torch.set_num_threads

    def recording_set(n: int) -> None:
        calls.append(threading.current_thread().name)
        real_set(n)

    seen: list[tuple[str, int]] = []
    real_forward = chunked_ops.forward_units

    def recording_forward(pb, units, out, lse):  # type: ignore[no-untyped-def]
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real_forward(pb, units, out, lse)

    monkeypatch.setattr(chunked_threads, "PARALLEL_MIN_SCORES", 0)
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(chunked_ops, "forward_units", recording_forward)
    threads = torch.get_num_threads()
    try:
        real_set(2)
        monkeypatch.setattr(torch, "set_num_threads", recording_set)
        run_case("plain", block_l=8, block_s=8)
        monkeypatch.setattr(torch, "set_num_threads", real_set)
        later: list[int] = []
        probe = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        probe.start()
        probe.join()
        assert torch.get_num_threads() == 2
        assert later == [2], "a thread started after the kernel got another thread count"
    finally:
        real_set(threads)
    assert calls == [], f"torch.set_num_threads was called from {calls}"
    workers = [n for name, n in seen if name.startswith("chunked-attention")]
    assert len(workers) == 2 and workers == [1, 1], seen


@spec(section="torch", kind="masking")
@pytest.mark.parametrize(("L", "S"), [(37, 53), (53, 37), (9, 40)], ids=["L<S", "L>S", "L<<S"])
def test_lower_right_bias_with_small_blocks_matches_the_reference(L: int, S: int) -> None:
    """torch's causal_lower_right(L, S) (query i sees keys j <= i + S - L) with 4 x 4 tiles gives the reference kernel's output and query/key/value gradients, GQA included, and zero rows where L > S leaves a query without keys."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns of NaNs when L > S
        bias = causal_lower_right(L, S)
    q, k, v = randn(2, 4, L, 8, seed=0), randn(2, 2, S, 8, seed=1), randn(2, 2, S, 5, seed=2)

    def tiled(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return chunked.chunked_attention(q, k, v, bias, enable_gqa=True, block_l=4, block_s=4)

    def reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return transformer.scaled_dot_product_attention(
            q, k, v, bias, enable_gqa=True, kernel="reference"
        )

    ours = forward_backward(tiled, q, k, v)
    assert_same(ours, forward_backward(reference, q, k, v))
    if L > S:
        assert bool((ours[0][..., : L - S, :] == 0).all())


@spec(section="torch", kind="masking")
def test_lower_right_tiles_beyond_the_shifted_diagonal_are_never_computed(
    tile_log: list[tuple[int, int, int, int]],
) -> None:
    """Under causal_lower_right(L, S) no tile whose keys all lie beyond its last query's diagonal i + S - L is computed (forward and backward), query blocks without any key compute no tile, and every allowed pair is still covered."""
    for L, S in ((40, 64), (64, 40)):
        tile_log.clear()
        offset = S - L
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            bias = causal_lower_right(L, S)
        q, k, v = (randn(1, 2, n, 8, seed=i) for i, n in enumerate((L, S, S)))
        q.requires_grad_(True)
        out = chunked.chunked_attention(q, k, v, bias, block_l=8, block_s=8)
        forward = list(tile_log)
        out.sum().backward()
        allowed = torch.ones(L, S, dtype=torch.bool).tril(offset)
        for tiles in (forward, tile_log[len(forward) :]):
            assert tiles, "no tile was computed"
            assert all(j0 < i1 + offset for i0, i1, j0, j1 in tiles), (L, S, tiles)
            covered = torch.zeros(L, S, dtype=torch.bool)
            for i0, i1, j0, j1 in tiles:
                covered[i0:i1, j0:j1] = True
            assert bool(covered[allowed].all()), "an allowed (query, key) pair was skipped"


@spec(section="extra", kind="property")
def test_lower_right_bias_creates_no_tensor_of_query_by_key_size() -> None:
    """With causal_lower_right(L, S) no op of forward or backward creates a tensor of L * S elements or more (the bias is a shifted diagonal, never a materialised mask), while the reference kernel does."""
    # L is longer than a default causal tile (128 query rows): no tile holds L * S scores.
    L, S = 384, 512
    bias = causal_lower_right(L, S)
    q, k, v = randn(1, 1, L, 8, seed=0), randn(1, 1, S, 8, seed=1), randn(1, 1, S, 8, seed=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every op in this thread, where the tracker sees it
    try:
        logs = {}
        for name, kernel in (("chunked", "chunked"), ("reference", "reference")):
            log = AllocationLog()
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
            with track_allocations(log, "forward"):
                out = transformer.scaled_dot_product_attention(
                    *leaves, attn_mask=bias, kernel=kernel
                )
            with track_allocations(log, "backward"):
                out.sum().backward()
            logs[name] = log
    finally:
        torch.set_num_threads(threads)
    assert logs["reference"].at_least(L * S), "the probe has no power"
    chunked_log = logs["chunked"]
    assert {a.phase for a in chunked_log.allocations} == {"forward", "backward"}
    assert not chunked_log.at_least(L * S), chunked_log.at_least(L * S)


# --------------------------------------------------------------------------------------
# Memory: peak resident memory of forward + backward, measured in a fresh process.
# --------------------------------------------------------------------------------------

_MEMORY_PROBE = textwrap.dedent(
    """
    import json, os, resource, sys
    import torch
    import transformer
    kernel, n = sys.argv[1], int(sys.argv[2])

    def peak_kib():
        # VmHWM is this process's own high-water mark. ru_maxrss is not: on Linux it
        # keeps the parent's peak across fork + exec, which hides everything below it.
        if os.path.exists("/proc/self/status"):
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def run(L):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 1, L, 64, generator=g).requires_grad_(True) for _ in range(3))
        out = transformer.scaled_dot_product_attention(q, k, v, kernel=kernel)
        out.sum().backward()

    run(64)  # warm up: libraries, allocator pools
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 1, n, 64, generator=g) for _ in range(6)]  # q, k, v and grads
    base = peak_kib()
    del inputs
    run(n)
    peak = peak_kib()
    print(json.dumps({"extra_kib": peak - base}))
    """
)


def extra_memory_kib(kernel: str, n: int) -> int:
    """Peak resident memory (KiB) of forward + backward at B = H = 1, L = S = n, E = 64, beyond the inputs and their gradients."""
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, kernel, str(n)],
        capture_output=True,
        text=True,
        check=True,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )
    return int(json.loads(result.stdout.strip().splitlines()[-1])["extra_kib"])


def assert_small_fraction_of_reference(n: int) -> None:
    reference = extra_memory_kib("reference", n)
    # The probe has power: the reference holds (L, S) fp32 matrices of n * n * 4 bytes.
    assert reference > n * n * 4 // 1024, reference
    ours = extra_memory_kib("chunked", n)
    assert ours < 0.1 * reference, f"chunked {ours} KiB vs reference {reference} KiB"


@spec(section="extra", kind="property")
def test_peak_memory_is_under_a_tenth_of_reference_at_2048() -> None:
    """At L = S = 2048 (B = H = 1, E = 64, fp32) the extra peak memory of forward + backward is under 10% of the reference kernel's (max RSS in a fresh process)."""
    assert_small_fraction_of_reference(2048)


@pytest.mark.slow
@spec(section="extra", kind="property")
def test_peak_memory_is_under_a_tenth_of_reference_at_8192() -> None:
    """At L = S = 8192 (B = H = 1, E = 64, fp32) the extra peak memory of forward + backward is under 10% of the reference kernel's, which materialises 256 MiB score matrices."""
    assert_small_fraction_of_reference(8192)


# --------------------------------------------------------------------------------------
# Shapes and bad arguments of the kernel's own keywords.
# --------------------------------------------------------------------------------------


@spec(section="3.2.1", kind="shape")
@pytest.mark.parametrize(
    ("q_shape", "k_shape", "v_shape", "gqa", "expected"),
    [
        ((7, 16), (9, 16), (9, 24), False, (7, 24)),
        ((2, 7, 16), (1, 9, 16), (2, 9, 8), False, (2, 7, 8)),
        ((2, 3, 70, 16), (2, 3, 130, 16), (2, 3, 130, 5), False, (2, 3, 70, 5)),
        ((1, 6, 5, 32), (1, 2, 11, 32), (1, 2, 11, 16), True, (1, 6, 5, 16)),
        ((2, 0, 16), (2, 9, 16), (2, 9, 8), False, (2, 0, 8)),
        ((2, 4, 16), (2, 0, 16), (2, 0, 8), False, (2, 4, 8)),
    ],
    ids=["unbatched-Ev24", "broadcast-batch", "multi-tile", "gqa-6-over-2", "L0", "S0"],
)
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "bool-mask"])
def test_output_has_query_rows_and_value_features(
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    gqa: bool,
    expected: tuple[int, ...],
    masked: bool,
) -> None:
    """query (..., L, E), key (..., S, E), value (..., S, Ev) give (..., L, Ev) with batch dims broadcast, heads kept under GQA and zero lengths allowed (rows without keys are zeros), in the query's dtype (§3.2.1)."""
    q = randn(*q_shape, seed=1, dtype=torch.float32)
    k = randn(*k_shape, seed=2, dtype=torch.float32)
    v = randn(*v_shape, seed=3, dtype=torch.float32)
    mask = torch.ones(q_shape[-2], k_shape[-2], dtype=torch.bool) if masked else None
    out = chunked.chunked_attention(q, k, v, mask, enable_gqa=gqa, block_l=4, block_s=4)
    assert out.shape == expected
    assert out.dtype == q.dtype
    if k_shape[-2] == 0:
        assert bool((out == 0).all()), "rows with no key must be zeros"


@spec(section="extra", kind="error")
@pytest.mark.parametrize(("block_l", "block_s"), [(0, 8), (8, 0), (-1, -1)])
def test_tile_sizes_below_one_raise_value_error_naming_them(block_l: int, block_s: int) -> None:
    """block_l and block_s below 1 raise ValueError naming both, instead of looping forever or returning an empty result."""
    q = randn(1, 4, 8, seed=0, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"block_l and block_s must be >= 1"):
        chunked.chunked_attention(q, q, q, block_l=block_l, block_s=block_s)


@spec(section="extra", kind="error")
def test_bad_input_through_the_front_door_is_refused_before_the_kernel_runs() -> None:
    """The front door validates for the kernel: a key with another head dim raises ValueError naming key, with kernel='chunked' as with any kernel."""
    q, k = randn(1, 4, 8, seed=0), randn(1, 5, 7, seed=1)
    with pytest.raises(ValueError, match="key"):
        transformer.scaled_dot_product_attention(q, k, k, kernel="chunked")


@spec(section="3.2.1", kind="equivalence")
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_zero_head_dim_gives_the_mean_of_the_allowed_values(causal: bool) -> None:
    """With head dim E = 0 every score is an empty dot product, 0, so each row is the plain mean of the values it may attend to (causal row i: values 0..i)."""
    L, S = 9, 13
    q, k = torch.empty(2, L, 0, dtype=torch.float64), torch.empty(2, S, 0, dtype=torch.float64)
    v = randn(2, S, 5, seed=9)
    out = chunked.chunked_attention(q, k, v, is_causal=causal, block_l=4, block_s=4)
    expected = torch.stack([v[:, : (i + 1 if causal else S)].mean(dim=1) for i in range(L)], dim=1)
    assert_close(out, expected)


@spec(section="3.2.3", kind="masking")
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_expanded_mask_gives_the_result_of_the_materialised_mask(kind: str) -> None:
    """A mask whose batch, head and query dims are stride-0 expansions (``mask.expand(...)``) gives the output of the same mask copied into memory."""
    q, k, v = randn(2, 3, 11, 8, seed=1), randn(2, 3, 17, 8, seed=2), randn(2, 3, 17, 8, seed=3)
    scores = randn(2, 1, 1, 17, seed=4)  # (B, 1, 1, S)
    hidden = scores < -0.5
    per_key = ~hidden if kind == "bool" else scores.masked_fill(hidden, NEG_INF)
    expanded = per_key.expand(2, 3, 11, 17)
    assert expanded.stride()[1:3] == (0, 0)
    out = chunked.chunked_attention(q, k, v, expanded, block_l=4, block_s=4)
    copied = chunked.chunked_attention(q, k, v, expanded.contiguous(), block_l=4, block_s=4)
    assert_close(out, copied)


@spec(section="3.2.1", kind="equivalence")
@pytest.mark.parametrize("block_s", [5, 10], ids=["two-key-blocks", "one-key-block"])
def test_rows_whose_max_jumps_between_key_blocks_match_the_reference(block_s: int) -> None:
    """Scores far from 0 (a float mask of +300, -1e9 or -inf on some rows, in the first or only the second key block) give the reference's output and gradients: the base-2 online merge rescales exactly across huge jumps of a row's max, and rows with nothing in a block add nothing."""
    L, S = 6, 10
    q, k, v = randn(1, 2, L, 4, seed=0), randn(1, 2, S, 4, seed=1), randn(1, 2, S, 3, seed=2)
    mask = torch.zeros(L, S, dtype=torch.float64)
    mask[0, 7:] = 300.0  # row 0: small first block, a huge max in the second one
    mask[1, :5] = NEG_INF  # row 1: nothing in the first block, then ordinary scores
    mask[2, :5] = NEG_INF  # row 2: nothing in the first block, then only ~ -1e9
    mask[2, 5:] = -1e9
    mask[3, :] = -1e9  # row 3: every score ~ -1e9
    mask[4, 2] = 200.0  # row 4: a huge max in the first block
    expected = forward_backward(reference_attention, q, k, v, mask)
    ours = forward_backward(
        lambda q, k, v, m: chunked.chunked_attention(q, k, v, m, block_l=3, block_s=block_s),
        q,
        k,
        v,
        mask,
    )
    assert_same(ours, expected)
