"""Scaled dot-product attention (paper section 3.2.1, equation 1) and its kernel registry.

.. math:: \\mathrm{Attention}(Q, K, V) = \\mathrm{softmax}\\left(\\frac{QK^T}{\\sqrt{d_k}}\\right) V

:func:`scaled_dot_product_attention` is a drop-in for
``torch.nn.functional.scaled_dot_product_attention``: same arguments, same
broadcasting, same mask convention, plus a ``kernel`` keyword that picks the
implementation. The front door validates every argument once, then hands the
untouched arguments to the chosen kernel, so every kernel shares one signature.

Notation (used in every shape comment): B batch, H heads (Hq query heads, Hk key/value
heads under GQA), L target/query length, S source/key length, E query/key head dim
(``d_k``), Ev value head dim (``d_v``). ``...`` is any number of batch dimensions.

Conventions pinned by the spec suite:

* bool ``attn_mask``: ``True`` = may attend; float ``attn_mask``: added to the scores;
  it broadcasts to ``(..., L, S)``;
* ``is_causal=True`` is the top-left aligned lower-triangular mask; given together with
  ``attn_mask`` both apply (a key must be allowed by each), as in torch >= 2.5 on CPU;
* ``attn_mask`` may be one of torch's attention-bias objects,
  ``torch.nn.attention.bias.causal_upper_left(L, S)`` or ``causal_lower_right(L, S)``
  (a ``CausalBias``): every kernel returns what torch's SDPA returns for it. The front
  door checks that its sizes are the query's ``L`` and the key's ``S`` and refuses it
  together with ``is_causal=True`` (torch's ``CausalBias._dispatch`` raises
  ``ValueError`` for that pair too), then hands the object itself to the kernel;
* a query row with no key it may attend to yields zeros and zero gradients, never NaN.

Non-finite numbers (the contract ``spec_tests/test_numerical_robustness.py`` and
``property_tests/test_hostile_inputs.py`` pin down):

* finite query/key/value with a bool mask, or a float mask of finite values and
  ``-inf`` (``-1e9`` and ``finfo.min`` included), give a finite result and finite
  gradients, as long as the scaled scores ``QK^T * scale`` are themselves finite in
  the working dtype (scores ~1e4 are fine; an overflowing ``QK^T`` is not representable);
* NaN/inf *in* query, key or value propagate as in torch, never into a finite-looking
  wrong answer: an output row whose query holds NaN, or that attends to a key/value
  holding NaN, is non-finite. The damage stays inside its ``(batch, head)`` slice (and a
  NaN query stays in its own row); other slices are bit-for-bit what they would be
  without it. A NaN at a *masked-out* position may still spread within its slice
  (``0 * NaN``), as in torch: mask values, do not rely on masking NaN away.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor

from transformer.kernel_choice import rank_by_speed
from transformer.masks import causal_bias_mask, causal_mask, causal_offset, is_causal_bias

if TYPE_CHECKING:
    from torch.nn.attention.bias import CausalBias

__all__ = [
    "AttentionKernel",
    "attention_weights",
    "available_kernels",
    "reference_attention",
    "register_kernel",
    "scaled_dot_product_attention",
    "torch_attention",
]


class AttentionKernel(Protocol):
    """The signature every kernel shares: ``torch.nn.functional.scaled_dot_product_attention``'s.

    Kernels receive arguments the front door has already validated; ``attn_mask`` may
    be a torch ``CausalBias`` (then ``is_causal`` is False and its sizes are ``L``, ``S``).
    """

    def __call__(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | CausalBias | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor: ...


@dataclass(frozen=True)
class _Entry:
    fn: AttentionKernel
    # Answers "can this kernel run on tensors of this device?"
    is_available: Callable[[torch.device], bool]
    # >= 0: a candidate for ``kernel=None`` (negative: never picked implicitly); among
    # candidates the committed measurements decide, and priority where there are none.
    priority: int


_KERNELS: dict[str, _Entry] = {}


def _always(device: torch.device) -> bool:
    return True


def register_kernel(
    name: str,
    fn: AttentionKernel,
    *,
    is_available: Callable[[torch.device], bool] | None = None,
    priority: int = -1,
) -> None:
    """Register an attention kernel under ``name``.

    Args:
        name: the name passed as ``kernel=`` to :func:`scaled_dot_product_attention`.
        fn: a callable with the signature of ``torch.nn.functional.scaled_dot_product_attention``
            (no ``kernel`` argument). It receives validated arguments.
        is_available: ``device -> bool``; ``None`` means every device.
        priority: ``>= 0`` makes the kernel a candidate for ``kernel=None``; the default
            ``-1`` keeps a user kernel from being picked implicitly. Among the candidates
            available on the call's device, ``kernel=None`` runs the fastest according
            to the committed measurements for that device type, its hardware kind and
            the dtype (:data:`transformer.kernel_choice.MEASURED`, derived from
            ``benchmarks/results/``); candidates with no measurement there rank after
            the measured ones, highest priority first, so where nothing is measured
            (another device, CPU kind or dtype) the priority alone decides.

    Raises:
        TypeError: ``name`` is not a non-empty string or ``fn`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_kernel: name must be a non-empty str, got {name!r}")
    if not callable(fn):
        raise TypeError(f"register_kernel: fn must be callable, got {type(fn).__name__}")
    _KERNELS[name] = _Entry(fn, is_available or _always, priority)


def available_kernels(
    device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> list[str]:
    """Names of the kernels usable on ``device`` (default CPU), in ``kernel=None``'s order.

    First the candidates for ``kernel=None`` (priority ``>= 0``), fastest first by the
    committed measurements for the device type, its hardware kind and ``dtype``
    (default: torch's default dtype; see :func:`transformer.kernel_choice.rank_by_speed`),
    unmeasured ones after them by priority; then the kernels only run when named
    (negative priority), by priority. ``kernel=None`` runs the first name.
    """
    dev = torch.device("cpu" if device is None else device)
    named_only = sorted(
        (-entry.priority, name)
        for name, entry in _KERNELS.items()
        if entry.priority < 0 and entry.is_available(dev)
    )
    ranked = _ranked_candidates(dev, torch.get_default_dtype() if dtype is None else dtype)
    return ranked + [name for _, name in named_only]


def _ranked_candidates(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The candidates for ``kernel=None`` on ``device``, in the order it prefers them."""
    by_priority = sorted(
        (-entry.priority, name)
        for name, entry in _KERNELS.items()
        if entry.priority >= 0 and entry.is_available(device)
    )
    return rank_by_speed([name for _, name in by_priority], device.type, dtype)


def _pick_kernel(kernel: str | None, device: torch.device, dtype: torch.dtype) -> AttentionKernel:
    if kernel is None:
        best = _ranked_candidates(device, dtype)
        if not best:  # pragma: no cover - "reference" is registered below
            raise RuntimeError(f"no attention kernel is available on {device}")
        return _KERNELS[best[0]].fn
    if not isinstance(kernel, str):
        raise TypeError(f"kernel must be a str or None, got {type(kernel).__name__}")
    if kernel not in _KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; known kernels: {sorted(_KERNELS)}")
    entry = _KERNELS[kernel]
    if not entry.is_available(device):
        raise ValueError(
            f"kernel {kernel!r} is not available on device {device}; "
            f"available there: {available_kernels(device)}"
        )
    return entry.fn


# --------------------------------------------------------------------------------------
# Validation: done once, at the front door, so kernels can trust their arguments.
# --------------------------------------------------------------------------------------


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {t.dtype}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (..., seq_len, head_dim), got {_shape(t)}")
    return t


def _check_causal_bias(bias: CausalBias, is_causal: bool, L: int, S: int) -> None:
    """A ``CausalBias`` must describe this call's ``(L, S)`` and not come with ``is_causal``."""
    if is_causal:
        # torch's CausalBias._dispatch raises ValueError("CausalBias should not be used
        # with causal=True"); we refuse the same pair rather than guess which one is meant.
        raise ValueError(
            "attn_mask is a CausalBias, which cannot be combined with is_causal=True "
            "(as in torch); pass one of them"
        )
    if (bias.seq_len_q, bias.seq_len_kv) != (L, S):
        raise ValueError(
            f"attn_mask is a CausalBias of size (seq_len_q, seq_len_kv) = "
            f"({bias.seq_len_q}, {bias.seq_len_kv}) but query has L={L} and key has S={S}"
        )


def _broadcast(*shapes: tuple[int, ...]) -> tuple[int, ...] | None:
    """The broadcast of ``shapes`` by torch's rules, or ``None`` where they do not broadcast.

    ``torch.broadcast_shapes`` gives the same answer but goes through torch's symbolic-
    shape reference implementation: 15 us per call against about 1 us here, paid by
    every call through the front door.
    """
    out: list[int] = []
    for dims in itertools.zip_longest(*(reversed(s) for s in shapes), fillvalue=1):
        size = 1
        for d in dims:
            if d != 1:
                if size not in (1, d):
                    return None
                size = d
        out.append(size)
    return tuple(reversed(out))


def _check_pairing(query: Tensor, key: Tensor, value: Tensor) -> None:
    """Query, key and value fit together: one dtype and device, E shared by query and key,
    S by key and value (shapes ``(..., L, E)``, ``(..., S, E)``, ``(..., S, Ev)``)."""
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            "query, key and value must share a dtype, got "
            f"query {query.dtype}, key {key.dtype}, value {value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            "query, key and value must be on one device, got "
            f"query {query.device}, key {key.device}, value {value.device}"
        )
    if query.size(-1) != key.size(-1):
        raise ValueError(
            "query and key must have the same head dim E: "
            f"query {_shape(query)} has E={query.size(-1)}, key {_shape(key)} has E={key.size(-1)}"
        )
    if key.size(-2) != value.size(-2):
        raise ValueError(
            "key and value must have the same sequence length S: "
            f"key {_shape(key)} has S={key.size(-2)}, value {_shape(value)} has S={value.size(-2)}"
        )


def _autocast_inputs(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Query, key and value in autocast's dtype where autocast is on for their device.

    torch's SDPA is on autocast's lower-precision list, so under ``torch.autocast`` it
    casts its fp32/fp16/bf16 inputs (not fp64) to the autocast dtype; doing the same
    here gives every kernel torch's inputs, output dtype included. The mask keeps its
    dtype: the kernels convert a float mask to their compute dtype themselves.
    """
    device_type = "cpu" if query.is_cpu else query.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return query, key, value
    low = torch.get_autocast_dtype(device_type)

    def cast(t: Tensor) -> Tensor:
        return t.to(low) if t.is_floating_point() and t.dtype != torch.float64 else t

    return cast(query), cast(key), cast(value)


def _check_mask_device(attn_mask: Tensor, query: Tensor) -> None:
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")


def _check_dropout_range(dropout_p: float) -> None:
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _validate(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | CausalBias | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument and what was seen."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t)
    _check_pairing(query, key, value)
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    q_batch, k_batch, v_batch = query.shape[:-2], key.shape[:-2], value.shape[:-2]
    if enable_gqa:
        if query.dim() < 3 or key.dim() < 3 or value.dim() < 3:
            raise ValueError(
                "enable_gqa=True needs a heads dimension (..., H, L, E); got "
                f"query {_shape(query)}, key {_shape(key)}, value {_shape(value)}"
            )
        hq, hk, hv = query.size(-3), key.size(-3), value.size(-3)
        if hk != hv or hk == 0 or hq % hk != 0:
            raise ValueError(
                "enable_gqa=True needs key and value heads equal and dividing the query heads; "
                f"got query heads {hq}, key heads {hk}, value heads {hv}"
            )
        # The heads dims are reconciled by repetition; the rest must broadcast.
        q_batch, k_batch, v_batch = q_batch[:-1], k_batch[:-1], v_batch[:-1]
    batch = _broadcast(tuple(q_batch), tuple(k_batch), tuple(v_batch))
    if batch is None:
        raise ValueError(
            "batch dims of query, key and value do not broadcast: "
            f"query {_shape(query)}, key {_shape(key)}, value {_shape(value)}"
        )
    L, S = query.size(-2), key.size(-2)
    if enable_gqa:
        batch = (*batch, query.size(-3))
    scores_shape = (*batch, L, S)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal_bias(attn_mask):
        # A CausalBias is a Tensor subclass whose data is meaningless (uninitialised
        # storage); only its variant and sizes count, so no tensor check applies to it.
        _check_causal_bias(attn_mask, is_causal, L, S)
    elif attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(
                f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}"
            )
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(
                "attn_mask must be bool (True = may attend) or floating point (added to the "
                f"scores), got dtype {attn_mask.dtype}"
            )
        _check_mask_device(attn_mask, query)
        if _broadcast(tuple(attn_mask.shape), scores_shape) != scores_shape:
            raise ValueError(
                f"attn_mask of shape {_shape(attn_mask)} does not broadcast to the attention "
                f"scores (..., L, S) = {scores_shape}"
            )
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    _check_dropout_range(dropout_p)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale}")


# --------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------


def repeat_kv_heads(query: Tensor, kv: Tensor) -> Tensor:
    """Grouped-query attention: repeat each key/value head for its group of query heads.

    ``(..., Hk, S, E) -> (..., Hq, S, E)``, head ``j`` serving query heads
    ``j*g .. j*g+g-1`` with ``g = Hq // Hk`` (``repeat_interleave``, like torch).
    """
    groups = query.size(-3) // kv.size(-3)
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=-3)


def safe_softmax(scores: Tensor) -> Tensor:
    """Softmax over the last dim that gives an all-zero row where every score is ``-inf``.

    The plain softmax divides 0 by 0 there and returns NaN, which then poisons the
    gradients of every other row sharing a weight. Subtracting the (detached) row
    max leaves the result unchanged (softmax is shift invariant) and keeps ``exp``
    from overflowing. fp16/bf16 scores are normalised in fp32 and rounded once, as
    ``torch.softmax`` does: summing the row in bf16 would round at every term.
    """
    if scores.size(-1) == 0:
        return scores
    if scores.dtype in (torch.float16, torch.bfloat16):
        return safe_softmax(scores.float()).to(scores.dtype)
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    unnormalised = torch.exp(scores - row_max)
    denom = unnormalised.sum(dim=-1, keepdim=True)
    return unnormalised / torch.where(denom == 0, torch.ones_like(denom), denom)


def attention_weights(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | CausalBias | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """The attention weights of equation 1: ``softmax(QK^T / sqrt(d_k) + mask)``.

    Shapes: query ``(..., L, E)``, key ``(..., S, E)``, SDPA-convention ``attn_mask``
    broadcastable to ``(..., L, S)`` or a torch ``CausalBias`` of size ``(L, S)`` (read
    as the bool mask it stands for); returns ``(..., L, S)``, each row summing to one
    (or all zeros where no key is allowed).
    """
    L, S = query.size(-2), key.size(-2)
    if is_causal_bias(attn_mask):
        attn_mask = causal_bias_mask(attn_mask, device=query.device)  # (L, S)
    # 1/sqrt(d_k): "to counteract" the dot products growing large (section 3.2.1).
    # With d_k = 0 every score is an empty sum (0) and any scale gives torch's uniform
    # weights; 1.0 avoids dividing by zero.
    d_k = query.size(-1)
    scale_factor = (1.0 / math.sqrt(d_k) if d_k > 0 else 1.0) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale_factor  # (..., L, S)
    if is_causal:
        scores = scores.masked_fill(~causal_mask(L, S, device=query.device), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    return safe_softmax(scores)


def reference_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | CausalBias | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Equation 1 written plainly: the executable spec every other kernel is held to.

    Materialises the full ``(..., L, S)`` score matrix; clarity over speed.

    Shapes: query ``(..., L, E)``, key ``(..., S, E)``, value ``(..., S, Ev)``,
    attn_mask broadcastable to ``(..., L, S)`` or a torch ``CausalBias`` (materialised
    as its ``(L, S)`` bool mask); returns ``(..., L, Ev)``.
    """
    if enable_gqa:
        key, value = repeat_kv_heads(query, key), repeat_kv_heads(query, value)
    weights = attention_weights(query, key, attn_mask, is_causal, scale)  # (..., L, S)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    return weights @ value  # (..., L, Ev)


def _allowed_rows(attn_mask: Tensor | None, L: int, S: int) -> Tensor | None:
    """``(..., L, 1)`` bool: does the row have at least one key it may attend to?

    ``None`` means every row does (no mask and ``S > 0``). A causal mask must already be
    folded into ``attn_mask`` (causal alone leaves every row key 0).
    """
    if attn_mask is None:
        return None if S > 0 else torch.zeros(L, 1, dtype=torch.bool)
    allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")
    return allowed.any(dim=-1, keepdim=True)


#: From this many keys on, torch's CPU SDPA shows a query's NaN in its output row itself.
#: Its flash kernel takes a row's max with a SIMD max, which propagates NaN, over every
#: full vector of keys, and with a scalar max, which drops NaN, over the rest: a row of
#: fewer keys than one vector (8 fp32/bf16/fp16 or 4 fp64 lanes under AVX2, measured on
#: torch 2.13; twice that under AVX-512) comes out zeros. 64 keys leave a margin, and
#: above it the wrapper adds no pass over the query: on a busy machine each extra
#: OpenMP region of a multi-threaded op (that sum) waits a scheduler slice, 8 ms here.
_CPU_NAN_SAFE_S = 64


def _values_readable(t: Tensor) -> bool:
    """May the wrapper read a value of ``t`` (``.item()``, ``bool()``) to skip a pass?

    Only for a real CPU tensor in eager mode: on a GPU the read would synchronise the
    device, and under ``torch.compile``/``torch.export``, a functorch transform
    (``vmap``, ``grad``) or a ``FakeTensorMode`` it is data-dependent control flow,
    which they refuse. There the pass runs unconditionally instead.
    """
    return (
        t.is_cpu
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and not isinstance(t, FakeTensor)
        # A real tensor under an active FakeTensorMode (a dispatch mode: the stack
        # length costs 0.1 us, detect_fake_mode 8 us, and decoding calls this often).
        and (torch._C._len_torch_dispatch_stack() == 0 or detect_fake_mode() is None)
    )


def _show_nan_rows(out: Tensor, query: Tensor, S: int) -> Tensor:
    """``out`` ``(..., L, Ev)`` with NaN in the rows whose query ``(..., L, E)`` holds one.

    torch's CPU flash kernel returns zeros for a row whose scores are all NaN (a NaN in
    the query) when ``S`` is shorter than one SIMD vector, hiding the NaN; the math path
    and every other kernel show it, so such rows are set to NaN. On the CPU that needs
    checking only for short ``S``, and there, where values can be read
    (:func:`_values_readable`), one sum (NaN wherever any element is) first rules it out
    for an all-finite query, so the row-wise pass runs only when it can matter.
    """
    if query.is_cpu and S >= _CPU_NAN_SAFE_S:
        return out
    if _values_readable(query) and math.isfinite(query.detach().sum().item()):
        return out
    return out.masked_fill(torch.isnan(query).any(dim=-1, keepdim=True), float("nan"))


def torch_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | CausalBias | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """torch's own SDPA, wrapped to honour this package's guarantees.

    The wrapper (a) applies ``is_causal`` together with ``attn_mask``, which older torch
    rejects, (b) repeats GQA heads itself, since ``enable_gqa`` only exists in torch >= 2.5,
    and (c) gives zero output and zero gradient to rows with no allowed key on every
    backend: such rows are given every key (so the softmax is finite) and then zeroed.
    A torch ``CausalBias`` is folded before torch sees it: an upper-left one (or any
    square one) becomes ``is_causal=True``, which is what torch's own dispatch does, and
    a lower-right one becomes its bool mask, which is what torch does on CPU, so that
    its key-less rows (``L > S``) go through (c) instead of torch's NaN warning.

    Shapes: query ``(..., L, E)``, key ``(..., S, E)``, value ``(..., S, Ev)``; returns
    ``(..., L, Ev)``.
    """
    if (
        attn_mask is None
        and not enable_gqa
        and scale is None
        and query.shape[:-2] == key.shape[:-2] == value.shape[:-2]
        and key.size(-2) > 0
        and query.size(-2) > 0
    ):
        # The common case (a module's unmasked or causal call, a decoding step): none of
        # the folds below applies and, with keys present, every row has one (top-left
        # causal leaves key 0 to all), so only the NaN rule can need a pass. Skipping the
        # general path's checks matters where a call is small: a cached step of a 6-layer
        # decoder makes a dozen of them.
        out = F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout_p, is_causal=is_causal
        )
        return _show_nan_rows(out, query, key.size(-2))
    if is_causal_bias(attn_mask):
        if causal_offset(attn_mask) == 0:
            attn_mask, is_causal = None, True
        else:
            attn_mask = causal_bias_mask(attn_mask, device=query.device)  # (L, S)
    if enable_gqa:
        key, value = repeat_kv_heads(query, key), repeat_kv_heads(query, value)
    if not (query.shape[:-2] == key.shape[:-2] == value.shape[:-2]):
        # torch's SDPA sizes its output from the query's batch dims and fails when key or
        # value carry more; expanding all three to the broadcast batch (views) fixes that.
        batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
        query = query.expand(*batch, *query.shape[-2:])  # (..., L, E)
        key = key.expand(*batch, *key.shape[-2:])  # (..., S, E)
        value = value.expand(*batch, *value.shape[-2:])  # (..., S, Ev)
    L, S = query.size(-2), key.size(-2)
    if isinstance(attn_mask, Tensor) and attn_mask.dim() < 2:
        # torch's SDPA rejects masks of fewer than two dims although they broadcast.
        attn_mask = attn_mask.expand(L, S)
    if attn_mask is None and is_causal and scale is not None and scale <= 0.0:
        # torch's causal path multiplies its -inf by the scale: -inf * 0 is NaN and
        # -inf * -1 is +inf. An explicit mask is applied after the scale.
        attn_mask = causal_mask(L, S, device=query.device)
        is_causal = False
    if attn_mask is not None and is_causal:
        causal = causal_mask(L, S, device=query.device)
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & causal
        else:
            attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
        is_causal = False
    if S == 0 or L == 0:
        return reference_attention(query, key, value, attn_mask, dropout_p, is_causal, scale)
    rows = _allowed_rows(attn_mask, L, S)  # is_causal is folded into attn_mask above
    if rows is not None and _values_readable(rows) and bool(rows.all()):
        # No key-less row: nothing to patch (on the CPU this check costs no sync).
        rows = None
    if rows is not None and attn_mask is not None:
        attn_mask = attn_mask.masked_fill(~rows, True if attn_mask.dtype == torch.bool else 0.0)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(query.dtype)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
    )
    out = _show_nan_rows(out, query, S)
    if rows is not None:
        out = out.masked_fill(~rows, 0.0)
    return out


# Both are candidates for kernel=None; "torch" is correct for every call (it keeps every
# guarantee above), so where the measurements show it fastest it is the default.
register_kernel("reference", reference_attention, priority=0)
register_kernel("torch", torch_attention, priority=5)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | CausalBias | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    kernel: str | None = None,
) -> Tensor:
    """Scaled dot-product attention, interchangeable with torch's (section 3.2.1, eq. 1).

    Args:
        query: ``(..., L, E)``.
        key: ``(..., S, E)``; batch dims broadcast with the query's.
        value: ``(..., S, Ev)``.
        attn_mask: broadcastable to ``(..., L, S)``; bool ``True`` = may attend, float is
            added to the scores. Or a torch ``CausalBias`` of size ``(L, S)``
            (``torch.nn.attention.bias.causal_upper_left`` / ``causal_lower_right``),
            passed to the kernel as it is; with ``causal_lower_right`` and ``L > S`` the
            first ``L - S`` rows have no key and are zeros.
        dropout_p: dropout on the attention weights, applied whenever ``> 0`` (like torch's
            functional form, it does not look at a module's training flag).
        is_causal: apply the top-left aligned causal mask (query ``i`` sees keys ``<= i``).
        scale: multiplies ``QK^T``; defaults to ``1/sqrt(E)``.
        enable_gqa: repeat key/value heads (dim ``-3``) to the query's head count.
        kernel: implementation name (see :func:`available_kernels`); ``None`` runs the
            fastest kernel available on the query's device by the project's committed
            measurements for that device type and the query's dtype (see
            :func:`register_kernel`; priority decides where nothing is measured).

    Returns:
        ``(..., L, Ev)``. Rows with no key to attend to are zeros (and get zero gradient).

    Raises:
        TypeError: an argument has the wrong type (e.g. an integer ``query``).
        ValueError: shapes/dtypes do not fit, ``dropout_p`` is outside ``[0, 1)``, a
            ``CausalBias`` has other sizes than ``(L, S)`` or comes with
            ``is_causal=True``, or the kernel name is unknown or unavailable on the device.

    Under ``torch.autocast`` query, key and value are first cast to the autocast dtype
    (fp64 excepted), as torch's SDPA is.
    """
    if isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor):
        query, key, value = _autocast_inputs(query, key, value)
    _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    fn = _pick_kernel(kernel, query.device, query.dtype)
    return fn(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=float(dropout_p),
        is_causal=is_causal,
        scale=None if scale is None else float(scale),
        enable_gqa=enable_gqa,
    )


def attend_prechecked(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
) -> Tensor:
    """``kernel=None`` attention for callers that built their arguments themselves.

    Shapes: query ``(B, H, L, E)``, key ``(B, H, S, E)``, value ``(B, H, S, Ev)``, mask
    broadcastable to ``(B, H, L, S)`` -> ``(B, H, L, Ev)``.

    :class:`~transformer.multi_head_attention.MultiheadAttention` checks its inputs at its
    own front door and then builds query, key, value and mask itself: they are tensors
    of the right rank, the mask has the scores' shape and a bool or float dtype. What it
    cannot vouch for is checked here as :func:`scaled_dot_product_attention` checks it,
    with the same ``ValueError``: query, key and value sharing a dtype, device and head
    dims (a cache filled by another module of another dtype or head dim), the mask's
    device, and ``dropout_p`` in ``[0, 1)`` (the module's ``dropout`` can be changed
    after construction). The rest of the front door's checks (types, ranks, broadcast,
    ``scale``, ``CausalBias``) are skipped: a cached step of a 6-layer decoder makes a
    dozen such calls. The kernel is chosen by the registry, as ``kernel=None`` does, and
    autocast casts the inputs as at the front door.
    """
    query, key, value = _autocast_inputs(query, key, value)
    _check_pairing(query, key, value)
    if attn_mask is not None:
        _check_mask_device(attn_mask, query)
    _check_dropout_range(dropout_p)
    fn = _pick_kernel(None, query.device, query.dtype)
    return fn(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=float(dropout_p),
        is_causal=is_causal,
        scale=None,
        enable_gqa=False,
    )
