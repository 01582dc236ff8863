"""Linear maps of one row, split over threads: the matrix-vector products of decoding.

A cached decoder step (batch 1) multiplies one row by every weight matrix of the
decoder, so it is bound by how fast the weights stream from memory. For a single row
``F.linear`` on CPU becomes one BLAS matrix-vector product, which MKL ran at the same
speed on 1 and 2 threads of the 2-core AMD EPYC this project is benchmarked on,
reading the decoder's fp32 weights at 9 to 16 GB/s. Cutting the weight's rows into one block
per thread and running the blocks as one batched matmul (``baddbmm``) lets torch give
each thread one block: 1.26x to 1.39x faster at 2 threads on four of the decoder's five
shapes, no faster on ``(512, 512)``, with the same per-row dot products, so the results
equalled ``F.linear``'s bitwise there (``benchmarks/results/cpu-matvec.json``, from
``OMP_NUM_THREADS=2 python benchmarks/model_bench.py matvec``). Greedy decoding of the
base-size model took 2.6 s instead of 3.4 s for 256 tokens at 2 threads.

That was one machine. On 2 cores of an Intel Xeon with AMX the same benchmark found
the split *slower*, 0.74x to 0.90x of ``F.linear`` on all five shapes
(``benchmarks/results/cpu-xeon-amx-matvec.json``): MKL's own matrix-vector product ran
at 31 to 43 GB/s there. So the split runs only on the CPU kinds
(:func:`transformer.kernel_choice.hardware_kind`) whose committed measurement shows it
faster, :data:`SPLIT_MEASURED`; on every other kind ``linear`` is ``F.linear``.

Only a row-major fp32/fp64 weight times one row (its last dim ``in_features``), with no
bias or a 1-D one of ``out_features`` in the input's dtype, on CPU, outside autograd,
autocast and ``torch.compile``, with at least two threads and rows that split evenly
takes the split, and only on those CPU kinds; everything else is ``F.linear`` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.kernel_choice import hardware_kind

__all__ = ["SPLIT_MEASURED", "Linear", "linear"]

_SPLIT_DTYPES = (torch.float32, torch.float64)

#: CPU kind -> (the committed ``model_bench.py matvec`` report, whether the split was
#: faster there). ``spec_tests/test_matvec.py`` checks each flag against its file.
SPLIT_MEASURED: dict[str, tuple[str, bool]] = {
    "x86": ("benchmarks/results/cpu-matvec.json", True),
    "x86-amx": ("benchmarks/results/cpu-xeon-amx-matvec.json", False),
    "x86-avx512-bf16": ("benchmarks/results/cpu-epyc-avx512-bf16-matvec.json", True),
}

# Decided once, at import, like the kernel ranking: traced code may read a constant.
_SPLIT_HERE = SPLIT_MEASURED.get(hardware_kind("cpu"), ("", False))[1]


def _parts(x: Tensor, weight: Tensor, bias: Tensor | None) -> int:
    """How many row blocks ``x @ weight^T`` is cut into; 1 means use ``F.linear``."""
    # Cheapest tests first: most calls (several rows) leave at the first line.
    if weight.dim() != 2 or x.numel() != weight.size(1) or not x.is_cpu:
        return 1
    if x.dim() == 0 or x.size(-1) != weight.size(1):
        return 1  # e.g. (2, in/2): the right size but not one row; F.linear refuses it
    if bias is not None and (
        bias.dim() != 1 or bias.size(0) != weight.size(0) or bias.dtype != x.dtype
    ):
        return 1  # a bias F.linear broadcasts, e.g. (1, out), or one it refuses
    if x.dtype not in _SPLIT_DTYPES or weight.dtype != x.dtype or not weight.is_contiguous():
        return 1
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return 1
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return 1
    parts = torch.get_num_threads()
    if parts < 2 or weight.size(0) % parts:
        return 1
    return parts


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, with a one-row product split over torch's threads.

    Shapes: ``x (..., in)``, ``weight (out, in)``, ``bias (out,)`` -> ``(..., out)``.
    When ``x`` holds one row (all leading dims 1), the split applies and this CPU's kind
    measured it faster (see the module docstring), ``weight`` is viewed as
    ``(k, out / k, in)`` blocks, one per thread, and the blocks are multiplied by the
    row as one batched matmul.
    """
    return _linear(x, weight, bias, _SPLIT_HERE)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, split: bool) -> Tensor:
    """:func:`linear`, splitting where it applies if ``split`` (whatever the CPU kind:
    the benchmark times the split on any machine)."""
    k = _parts(x, weight, bias) if split else 1
    if k == 1:
        return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    block = out_features // k
    # One as_strided per operand instead of a view/transpose/reshape/expand chain: a
    # decoding step makes three dozen of these calls, and each view op costs microseconds.
    # weight (out, in) contiguous -> (k, in, out/k): block j holds rows j*block.., transposed.
    rows = weight.as_strided((k, in_features, block), (block * in_features, 1, in_features))
    # The one row, the same for every block (stride 0 over blocks).
    row = x.as_strided((k, 1, in_features), (0, 0, x.stride(-1)))
    if bias is None:
        y = torch.bmm(row, rows)  # (k, 1, out/k)
    else:
        step = bias.stride(0)
        y = torch.baddbmm(bias.as_strided((k, 1, block), (block * step, 0, step)), row, rows)
    return y.view(*x.shape[:-1], out_features)


class Linear(nn.Linear):
    """torch's :class:`torch.nn.Linear` (same parameters, ``state_dict`` keys and init),
    whose forward is :func:`linear`: one-row inputs take the threaded split.

    Shape: ``(..., in_features) -> (..., out_features)``.
    """

    def forward(self, input: Tensor) -> Tensor:
        """``input @ weight^T + bias``: ``(..., in_features) -> (..., out_features)``."""
        return linear(input, self.weight, self.bias)
