"""Which tensors a kernel creates: the FlashAttention memory promise, checked op by op.

FlashAttention's promise is O(L + S) extra memory per ``(batch, head)``: the ``(L, S)``
score matrix is never held. :func:`track_allocations` runs code under a
``TorchDispatchMode`` that sees every ATen op dispatched in the calling thread (the
forward and, for CPU tensors, the backward, which autograd runs in the caller) and
records the storage each op creates. A view, an in-place op or an ``out=`` op creates
no storage and is not recorded.

What this cannot see, said in every report that uses it:

* buffers a compiled kernel allocates inside itself (a C++/CUDA/Triton kernel's scratch:
  torch's own fused SDPA kernels, for instance, are one op whose output is all it sees);
* ops dispatched on threads the kernel starts itself (a Python thread pool); the
  conformance property runs kernels with one torch thread, so that a kernel that sizes
  its pool by ``torch.get_num_threads()`` stays in the calling thread.

Notation: L query length, S key length.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LIMITS", "Allocation", "AllocationLog", "track_allocations"]

#: What the memory property cannot see, for reports.
LIMITS = (
    "buffers allocated inside one compiled op (C++/CUDA/Triton scratch) are not seen op "
    "by op; ops run on threads the kernel starts itself are not seen op by op (the check "
    "runs with one torch thread); the CPU peak counts torch's allocator on every thread "
    "but not memory taken outside it (BLAS/oneDNN workspaces, a Triton interpreter's "
    "NumPy arrays)"
)


@dataclass(frozen=True)
class Allocation:
    """One storage an op created: the op's name, the tensor's shape and its element count."""

    op: str
    shape: tuple[int, ...]
    elements: int
    phase: str


@dataclass
class AllocationLog:
    """Every storage created while tracking, in order."""

    allocations: list[Allocation] = field(default_factory=list)

    def largest(self) -> Allocation | None:
        """The allocation with the most elements, or ``None`` when nothing was created."""
        return max(self.allocations, key=lambda a: a.elements, default=None)

    def at_least(self, elements: int) -> list[Allocation]:
        """The allocations holding ``elements`` elements or more."""
        return [a for a in self.allocations if a.elements >= elements]


class _Recorder(TorchDispatchMode):
    def __init__(self, log: AllocationLog, phase: str) -> None:
        super().__init__()
        self.log = log
        self.phase = phase

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if getattr(func, "is_view", False):
            return out
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, Tensor) and t.device.type != "meta"
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in inputs or storage.nbytes() == 0:
                continue
            elements = storage.nbytes() // max(1, t.element_size())
            self.log.allocations.append(
                Allocation(str(func.overloadpacket.__name__), tuple(t.shape), elements, self.phase)
            )
        return out


@contextmanager
def track_allocations(log: AllocationLog, phase: str = "forward") -> Iterator[AllocationLog]:
    """Record into ``log`` every storage an op creates in this thread while the block runs.

    ``phase`` labels the records (``"forward"``, ``"backward"``). Example::

        log = AllocationLog()
        with track_allocations(log, "forward"):
            out = kernel(q, k, v)
        with track_allocations(log, "backward"):
            out.sum().backward()
        assert not log.at_least(L * S)
    """
    with _Recorder(log, phase):
        yield log
