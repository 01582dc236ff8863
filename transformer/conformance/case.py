"""One conformance case: the inputs of one call, how to build them and how to call a kernel.

A :class:`Case` is plain data (shapes, dtype, flags), so it prints as a sentence a kernel
author can reproduce. :func:`build_inputs` makes its seeded tensors on a device and
:func:`call_kernel` calls the kernel under test with only the arguments the case sets, so a
kernel whose signature lacks ``enable_gqa`` (say) still runs every case that does not use it.

Exceptions a kernel raises are sorted by :func:`invoke`: ``NotImplementedError``,
``TypeError`` and ``ValueError`` mean "this feature is not supported" (:class:`Unsupported`);
anything else, a wrong answer included, is a :class:`Failure`.

Notation: B batch, H heads (Hq query, Hk key/value), L query length, S key length, E
query/key head dim, Ev value head dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from transformer.conformance.reference import MaskSpec

__all__ = [
    "DTYPES",
    "BackwardUnsupported",
    "Case",
    "Failure",
    "Inputs",
    "Settings",
    "Unsupported",
    "build_inputs",
    "call_kernel",
    "invoke",
    "kernel_kwargs",
]

#: Short names of the dtypes the suite knows.
DTYPES: dict[str, torch.dtype] = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
_SHORT = {dtype: name for name, dtype in DTYPES.items()}

Kernel = Callable[..., Tensor]
T = TypeVar("T")


class Failure(AssertionError):
    """The kernel broke the property on this case; the message says where and by how much."""


class FollowsFromAnother(Failure):
    """A failure that another property explains better: the report does not start here.

    Raised, e.g., by ``default-scale`` when the output is wrong with the scale given
    explicitly too, so that the scale is not the cause and ``forward`` should lead.
    """


class Unsupported(Exception):
    """The kernel refused a feature of this case (it raised NotImplementedError, TypeError or ValueError)."""


class BackwardUnsupported(Unsupported):
    """The kernel's forward is right on this case but it refused the backward."""


@dataclass(frozen=True)
class Settings:
    """What a run covers: ``tier`` (quick, full, thorough), the dtypes and the device.

    ``memory_length`` is L = S of the memory cases: longer than any fixed tile budget of
    the kernel (the chunked kernel's 2^20-score tile is a quarter of 2048 x 2048), and
    shorter for kernels that are slow to run (the Triton kernel under its interpreter).
    """

    tier: str = "full"
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    device: str = "cpu"
    memory_length: int = 2048

    @property
    def big(self) -> bool:
        """Full and thorough tiers add lengths that cross several 512-wide blocks."""
        return self.tier in ("full", "thorough")


@dataclass(frozen=True)
class Case:
    """The arguments of one call.

    ``mask`` is ``None``, ``"bool"``, ``"float"`` (additive, with some ``-inf``),
    ``"float-grad"`` (the same, its gradient compared too) or a :class:`MaskSpec`
    (a torch attention-bias object). ``mask_shape`` is the mask tensor's shape, which
    may broadcast to ``(..., L, S)``. ``empty_rows`` forbids every key to some rows.
    ``layout`` is how query, key and value are laid out in memory: ``"contiguous"``,
    ``"transposed"`` (made as ``(B, L, H, E)`` and transposed, as a fused QKV
    projection gives them), ``"sliced"`` (every other element of the last dim) or
    ``"expanded"`` (key and value broadcast over heads with stride 0).
    """

    q: tuple[int, ...]
    k: tuple[int, ...]
    v: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    mask: str | MaskSpec | None = None
    mask_shape: tuple[int, ...] | None = None
    empty_rows: bool = False
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False
    dropout_p: float = 0.0
    layout: str = "contiguous"
    grads: bool = True
    seed: int = 0

    def replace(self, **changes: Any) -> Case:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def L(self) -> int:
        return self.q[-2]

    @property
    def S(self) -> int:
        return self.k[-2]

    def describe(self) -> str:
        """The case in words: shapes, dtype and every flag it sets."""
        parts = [f"query {self.q}, key {self.k}, value {self.v}, {_SHORT[self.dtype]}"]
        if isinstance(self.mask, MaskSpec):
            parts.append(f"attn_mask=causal_{self.mask.variant}({self.mask.L}, {self.mask.S})")
        elif self.mask is not None:
            rows = " with rows of no allowed key" if self.empty_rows else ""
            parts.append(f"{self.mask} attn_mask {self.mask_shape}{rows}")
        for flag in ("is_causal", "enable_gqa"):
            if getattr(self, flag):
                parts.append(f"{flag}=True")
        if self.scale is not None:
            parts.append(f"scale={self.scale:g}")
        if self.dropout_p:
            parts.append(f"dropout_p={self.dropout_p:g}")
        if self.layout != "contiguous":
            parts.append(f"{self.layout} inputs")
        parts.append("forward and backward" if self.grads else "forward")
        return ", ".join(parts)

    @property
    def id(self) -> str:
        """A short id for pytest: ``b2x3-L97-S130-E59-fp32-bool-causal``.

        ``b`` is the query's batch dims (``b-`` for none); ``kb``/``vb`` follow when the
        key's or the value's differ from the query's, so cases that differ only in their
        (broadcast) batch dims get different ids.
        """

        def dims(shape: tuple[int, ...]) -> str:
            return "x".join(map(str, shape[:-2])) or "-"

        bits = [f"b{dims(self.q)}"]
        if self.k[:-2] != self.q[:-2]:
            bits.append(f"kb{dims(self.k)}")
        if self.v[:-2] != self.k[:-2]:
            bits.append(f"vb{dims(self.v)}")
        bits += [f"L{self.L}", f"S{self.S}", f"E{self.q[-1]}"]
        if self.k[-1] != self.q[-1]:
            bits.append(f"Ek{self.k[-1]}")  # mismatched head dims (a bad input)
        if self.v[-2] != self.S:
            bits.append(f"Sv{self.v[-2]}")  # mismatched key/value lengths (a bad input)
        if self.v[-1] != self.q[-1]:
            bits.append(f"Ev{self.v[-1]}")
        bits.append(_SHORT[self.dtype])
        if isinstance(self.mask, MaskSpec):
            bits.append(self.mask.variant)
        elif self.mask is not None:
            bits.append(f"{self.mask}{'x'.join(map(str, self.mask_shape or ()))}")
        flags = {
            "empty": self.empty_rows,
            "causal": self.is_causal,
            "gqa": self.enable_gqa,
            f"scale{self.scale}": self.scale is not None,
            f"p{self.dropout_p}": bool(self.dropout_p),
            self.layout: self.layout != "contiguous",
            "fwd": not self.grads,
        }
        bits += [name for name, on in flags.items() if on]
        return "-".join(bits)


@dataclass
class Inputs:
    """A case's tensors on the device: what the kernel gets, and what the reference reads.

    ``attn_mask`` is what is passed to the kernel (a tensor, a bias object or ``None``);
    ``reference_mask`` is what :func:`~transformer.conformance.reference.reference_attention`
    reads (a tensor or the :class:`MaskSpec`). ``grad_inputs`` are the tensors whose
    gradients the case compares (query, key, value and maybe the mask), with their names.
    """

    query: Tensor
    key: Tensor
    value: Tensor
    attn_mask: object
    reference_mask: Tensor | MaskSpec | None
    grad_inputs: list[tuple[str, Tensor]]


def _randn(shape: Sequence[int], seed: int, dtype: torch.dtype, device: str) -> Tensor:
    """Seeded normal values drawn on the CPU (every device sees the same numbers)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _laid_out(
    shape: tuple[int, ...],
    layout: str,
    seed: int,
    dtype: torch.dtype,
    device: str,
    is_kv: bool,
    grad: bool,
) -> Tensor:
    """The view the kernel receives, of a leaf that holds the numbers (gradients are taken
    with respect to the view, which keeps its leaf alive)."""
    if layout == "transposed" and len(shape) == 4:
        b, h, n, e = shape
        base = _randn((b, n, h, e), seed, dtype, device).requires_grad_(grad)
        return base.transpose(1, 2)  # (B, H, n, E), strided
    if layout == "sliced":
        base = _randn((*shape[:-1], 2 * shape[-1]), seed, dtype, device).requires_grad_(grad)
        return base[..., ::2]  # last-dim stride 2
    if layout == "expanded" and is_kv and len(shape) >= 3:
        base = _randn((*shape[:-3], 1, *shape[-2:]), seed, dtype, device).requires_grad_(grad)
        return base.expand(shape)  # stride 0 over heads
    base = _randn(shape, seed, dtype, device).requires_grad_(grad)
    return base


def _bool_mask(shape: tuple[int, ...], seed: int, empty_rows: bool) -> Tensor:
    """Random True = may attend, each row keeping a key unless ``empty_rows`` empties some."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(*shape, generator=gen) < 0.6
    keep = torch.randint(shape[-1], (*shape[:-1], 1), generator=gen)
    mask = mask.scatter(-1, keep, True)
    if empty_rows and shape[-2] > 1:
        mask[..., 1::3, :] = False  # every third row, from row 1, sees no key
    return mask


def build_inputs(case: Case, device: str) -> Inputs:
    """The case's seeded tensors on ``device``; they require grad when the case checks gradients
    (a forward-only kernel can still take the forward cases)."""
    g = case.grads
    q = _laid_out(case.q, case.layout, case.seed, case.dtype, device, False, g)
    k = _laid_out(case.k, case.layout, case.seed + 1, case.dtype, device, True, g)
    v = _laid_out(case.v, case.layout, case.seed + 2, case.dtype, device, True, g)
    grads: list[tuple[str, Tensor]] = [("query", q), ("key", k), ("value", v)]
    mask: object = None
    reference: Tensor | MaskSpec | None = None
    if isinstance(case.mask, MaskSpec):
        mask, reference = case.mask.build(), case.mask
    elif case.mask is not None:
        shape = case.mask_shape or (case.L, case.S)
        allowed = _bool_mask(shape, case.seed + 3, case.empty_rows)
        if case.mask == "bool":
            reference = allowed.to(device)
        elif case.mask == "int":  # bad input, for the errors section
            reference = allowed.to(device=device, dtype=torch.int64)
        else:
            values = _randn(shape, case.seed + 4, case.dtype, "cpu")
            reference = values.masked_fill(~allowed, float("-inf")).to(device)
            if case.mask == "float-grad" and case.grads:
                reference.requires_grad_(True)
                grads.append(("attn_mask", reference))
        mask = reference
    return Inputs(q, k, v, mask, reference, grads)


def call_kernel(
    kernel: Kernel,
    case: Case,
    inputs: Inputs,
    *,
    any_error_unsupported: bool = False,
    check_inputs: bool = True,
) -> Tensor:
    """``kernel(query, key, value, **only the arguments the case sets)``, sorted by :func:`invoke`.

    With ``check_inputs`` the tensors passed are copied first and compared after the
    call: a kernel that writes into its inputs fails here, naming the input, before its
    mutated inputs could feed the reference (which would then judge a right output
    wrong, or a wrong one right). The memory properties, which compare with no
    reference, skip the copies so that they do not count them.
    """
    kwargs = kernel_kwargs(case, inputs)
    passed = {"query": inputs.query, "key": inputs.key, "value": inputs.value}
    if isinstance(inputs.attn_mask, Tensor):
        passed["attn_mask"] = inputs.attn_mask
    before = {name: t.detach().clone() for name, t in passed.items()} if check_inputs else {}
    out = invoke(
        lambda: kernel(inputs.query, inputs.key, inputs.value, **kwargs),
        any_error_unsupported=any_error_unsupported,
    )
    for name, copy in before.items():
        if not _same_values(passed[name].detach(), copy):
            raise Failure(
                f"the kernel wrote into its input {name} (in place): torch's SDPA leaves "
                f"its arguments as they were, and callers rely on it; work on a copy"
                f"\n    case: {case.describe()}"
            )
    return returned_tensor(out)


def returned_tensor(out: object) -> Tensor:
    """``out`` if the kernel returned a Tensor; a :class:`Failure` naming what it returned.

    torch's SDPA returns the output alone; a kernel returning, say, ``(out, lse)`` fails
    here instead of breaking the check that reads its result.
    """
    if not isinstance(out, Tensor):
        raise Failure(f"the kernel returned {type(out).__name__}, not a Tensor")
    return out


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Equal shape and elements, a NaN equal to a NaN (inputs may hold NaN on purpose)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def kernel_kwargs(case: Case, inputs: Inputs) -> dict[str, Any]:
    """The keyword arguments the case sets (the others keep torch's defaults)."""
    kwargs: dict[str, Any] = {}
    if inputs.attn_mask is not None:
        kwargs["attn_mask"] = inputs.attn_mask
    if case.dropout_p:
        kwargs["dropout_p"] = case.dropout_p
    if case.is_causal:
        kwargs["is_causal"] = True
    if case.scale is not None:
        kwargs["scale"] = case.scale
    if case.enable_gqa:
        kwargs["enable_gqa"] = True
    return kwargs


def invoke(call: Callable[[], T], *, any_error_unsupported: bool = False) -> T:
    """Run ``call``; a refusal becomes :class:`Unsupported`, any other exception a :class:`Failure`.

    With ``any_error_unsupported`` (used for the extensions, which a kernel implementing
    torch's semantics only may refuse in any way) every exception is a refusal.
    """
    try:
        return call()
    except (Failure, Unsupported):
        raise
    except (NotImplementedError, TypeError, ValueError) as err:
        raise Unsupported(f"{type(err).__name__}: {_first_line(err)}") from err
    except Exception as err:
        if any_error_unsupported:
            raise Unsupported(f"{type(err).__name__}: {_first_line(err)}") from err
        raise Failure(f"the kernel raised {type(err).__name__}: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else "(no message)"
