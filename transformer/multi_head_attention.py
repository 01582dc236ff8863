"""Multi-head attention (paper section 3.2.2), interchangeable with ``torch.nn.MultiheadAttention``.

.. math::
    \\mathrm{MultiHead}(Q, K, V) = \\mathrm{Concat}(\\mathrm{head}_1, \\dots, \\mathrm{head}_h) W^O,
    \\quad \\mathrm{head}_i = \\mathrm{Attention}(Q W_i^Q, K W_i^K, V W_i^V)

Each head sees its own *learned* projection of the whole embedding (``W_i^Q`` is a
``d_model x d_k`` slice of ``in_proj_weight``), never a slice of the embedding itself.

Constructor, forward signature, defaults, return values and ``state_dict`` keys are
torch's, so ``load_state_dict`` works in both directions. Masks follow torch's module
convention (bool ``True`` = masked out; float added). Departures from torch, each a
guarantee of this package: rows with no key left to attend to give zeros (torch gives
NaN), and bad input raises ``ValueError``/``TypeError`` where torch asserts (the full
list: "Divergences from torch.nn" in :mod:`transformer.layers`).

Notation: B batch, L target length, S source length, E embed_dim (``d_model``),
H num_heads (``h``), D head_dim (``d_k = d_v = E / H``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer._checks import (
    check_bool,
    check_device,
    check_dropout,
    check_dtype,
    check_int,
    check_not_nested,
)
from transformer.attention import attend_prechecked, attention_weights
from transformer.kv_cache import KVCache
from transformer.masks import merge_module_masks
from transformer.matvec import Linear, linear
from transformer.precision import autocast_enabled

__all__ = ["MultiheadAttention"]


def _pad_one_key(mask: Tensor | None) -> Tensor | None:
    """Append one never-masked key column to a module-convention mask (``..., S) -> (..., S+1)``.

    Used for the extra key that ``add_bias_kv`` / ``add_zero_attn`` append: it is
    always visible, whatever the mask's dtype.
    """
    if mask is None:
        return None
    return torch.cat([mask, mask.new_zeros((*mask.shape[:-1], 1))], dim=-1)


#: Compared by identity with the query in ``_check_inputs``: no argument is it.
_NOTHING = object()


def _check_mask_dtype(name: str, mask: Tensor | None) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(
            f"{name} must be bool (True = masked out) or floating point (added to the "
            f"scores), got dtype {mask.dtype}"
        )


class MultiheadAttention(nn.Module):
    """Multi-head attention of section 3.2.2 with ``torch.nn.MultiheadAttention``'s API.

    Args:
        embed_dim: total model dimension ``d_model`` (E).
        num_heads: number of heads ``h``; must divide ``embed_dim``.
        dropout: dropout on the attention weights, active in training mode only.
        bias: add biases to the input and output projections.
        add_bias_kv: append a learned key and value (``bias_k``, ``bias_v``) to the sequence.
        add_zero_attn: append an all-zero key and value (after projection).
        kdim, vdim: feature sizes of key and value (default ``embed_dim``); when either
            differs, separate ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` are used.
        batch_first: inputs are ``(B, L, E)`` instead of ``(L, B, E)``.
        device, dtype: factory keywords of the parameters.

    An argument of the wrong type raises ``TypeError`` (torch fails later, or not at all:
    ``dropout="x"``), a value out of range ``ValueError``; both name it and the value.

    Shape:
        - query ``(L, B, E)`` (``(B, L, E)`` if batch_first) or unbatched ``(L, E)``;
        - key ``(S, B, kdim)``, value ``(S, B, vdim)`` (likewise);
        - key_padding_mask ``(B, S)`` or ``(S,)``; attn_mask ``(L, S)`` or ``(B*H, L, S)``;
        - output like query; weights ``(B, L, S)`` averaged or ``(B, H, L, S)``.

    Incremental decoding (``cache=``, a :class:`~transformer.kv_cache.KVCache`; not in
    torch): ``key``/``value`` are the *new* positions only and are attended to together
    with the cached ones, so ``S`` in the masks' shapes counts cached plus new keys.
    A growing cache (self-attention) appends the new keys/values; a filled static cache
    (cross-attention) is used as it is, and ``key``/``value`` are only checked against
    its length, not projected again.
    """

    __constants__: ClassVar[list[str]] = ["batch_first"]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        embed_dim = check_int("embed_dim", embed_dim)
        num_heads = check_int("num_heads", num_heads)
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, "
                f"num_heads={num_heads}"
            )
        dropout = check_dropout(dropout)
        for name, flag in (
            ("bias", bias),
            ("add_bias_kv", add_bias_kv),
            ("add_zero_attn", add_zero_attn),
            ("batch_first", batch_first),
        ):
            check_bool(name, flag)
        kdim = None if kdim is None else check_int("kdim", kdim)
        vdim = None if vdim is None else check_int("vdim", vdim)
        check_device("device", device)
        check_dtype("dtype", dtype)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads

        self.in_proj_weight: nn.Parameter | None
        self.q_proj_weight: nn.Parameter | None
        self.k_proj_weight: nn.Parameter | None
        self.v_proj_weight: nn.Parameter | None
        if self._qkv_same_embed_dim:
            # W^Q, W^K, W^V of every head, stacked: (3E, E).
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        self.in_proj_bias: nn.Parameter | None
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        # W^O: (E, E).
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.bias_k: nn.Parameter | None
        self.bias_v: nn.Parameter | None
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch's init: xavier-uniform projections, zero biases, xavier-normal bias_k/v."""
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
        if self.out_proj.bias is not None:
            nn.init.constant_(self.out_proj.bias, 0.0)
        for b in (self.bias_k, self.bias_v):
            if b is not None:
                nn.init.xavier_normal_(b)

    def _projection_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(W^Q, W^K, W^V)`` of all heads: ``(E, E)``, ``(E, kdim)``, ``(E, vdim)``."""
        if self.in_proj_weight is not None:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
            return w_q, w_k, w_v
        assert self.q_proj_weight is not None
        assert self.k_proj_weight is not None
        assert self.v_proj_weight is not None
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _in_projection(
        self, query: Tensor, key: Tensor, value: Tensor, same: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Project inputs to ``Q W^Q``, ``K W^K``, ``V W^V`` for every head at once.

        ``(B, L, E), (B, S, kdim), (B, S, vdim) -> (B, L, E), (B, S, E), (B, S, E)``;
        ``same``: the caller passed one tensor as query, key and value (self-attention).
        """
        if self.in_proj_weight is not None and same:
            # Self-attention: one (3E, E) matmul instead of three.
            q, k, v = linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            return q, k, v
        w_q, w_k, w_v = self._projection_weights()
        b_q: Tensor | None
        b_k: Tensor | None
        b_v: Tensor | None
        if self.in_proj_bias is None:
            b_q = b_k = b_v = None
        else:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        return linear(query, w_q, b_q), linear(key, w_k, b_k), linear(value, w_v, b_v)

    def _query_projection(self, query: Tensor) -> Tensor:
        """``Q W^Q`` alone: ``(B, L, E) -> (B, L, E)`` (the keys come from a filled cache)."""
        E = self.embed_dim
        if self.in_proj_weight is not None:
            w_q = self.in_proj_weight[:E]
        else:
            assert self.q_proj_weight is not None
            w_q = self.q_proj_weight
        b_q = None if self.in_proj_bias is None else self.in_proj_bias[:E]
        return linear(query, w_q, b_q)

    def _check_cache(self, cache: KVCache, B: int, S: int) -> int:
        """Check ``cache`` against ``B`` rows of ``S`` new keys; return the keys attended to."""
        if len(cache) == 0:
            return S
        rows, heads = cache.rows_and_heads
        if rows != B or heads != self.num_heads:
            raise ValueError(
                f"cache holds {rows} rows of {heads} heads, but this call has "
                f"batch size {B} and the module {self.num_heads} heads"
            )
        if cache.filled:
            if len(cache) != S:
                raise ValueError(
                    f"the static cache holds the keys of {len(cache)} positions, but key has "
                    f"{S}; pass the same memory at every step"
                )
            return S
        return len(cache) + S

    def _check_inputs(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
    ) -> bool:
        """Validate shapes/dtypes like torch's ``_mha_shape_check``; return ``is_batched``."""
        for name, t, seen in (
            ("query", query, _NOTHING),
            ("key", key, query),
            ("value", value, key),
        ):
            if t is seen:
                continue  # self- or cross-attention passes one tensor twice: checked already
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            check_not_nested(name, t)
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating point tensor, got dtype {t.dtype}")
        # Under autocast the projections cast their inputs themselves, so mixed dtypes are
        # legal there; elsewhere a mismatch would fail deep inside F.linear.
        param_dtype = self.out_proj.weight.dtype
        device_type = "cpu" if query.is_cpu else query.device.type  # no device object
        if not autocast_enabled(device_type) and not (
            query.dtype == key.dtype == value.dtype == param_dtype
        ):
            raise ValueError(
                f"query, key and value must have the module's dtype {param_dtype}, got "
                f"query {query.dtype}, key {key.dtype}, value {value.dtype}"
            )
        _check_mask_dtype("key_padding_mask", key_padding_mask)
        _check_mask_dtype("attn_mask", attn_mask)
        if query.dim() not in (2, 3):
            raise ValueError(
                f"query must be 3-D (batched) or 2-D (unbatched), got shape {tuple(query.shape)}"
            )
        is_batched = query.dim() == 3
        want = query.dim()
        for name, t in (("key", key), ("value", value)):
            if t.dim() != want:
                raise ValueError(
                    f"{name} must be {want}-D like query {tuple(query.shape)}, got {tuple(t.shape)}"
                )
        if key_padding_mask is not None and key_padding_mask.dim() != want - 1:
            raise ValueError(
                f"key_padding_mask must be {want - 1}-D for a {want}-D query, "
                f"got shape {tuple(key_padding_mask.shape)}"
            )
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise ValueError(f"attn_mask must be 2-D or 3-D, got shape {tuple(attn_mask.shape)}")
        for name, t, dim in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if t.size(-1) != dim:
                raise ValueError(
                    f"{name} has {t.size(-1)} features in shape {tuple(t.shape)}, expected {dim}"
                )
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                "key and value must agree in sequence and batch dims, got "
                f"key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        return is_batched

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` to ``key``/``value`` with ``num_heads`` learned projections.

        Args:
            query, key, value: see the class ``Shape`` section.
            key_padding_mask: ``(B, S)``; bool ``True`` marks a key to ignore, float is added.
            need_weights: also return the attention weights (computed explicitly).
            attn_mask: ``(L, S)`` or ``(B*H, L, S)``; bool ``True`` = masked out, float added.
            average_attn_weights: average the returned weights over heads.
            is_causal: a hint that ``attn_mask`` is the causal mask (as in torch, it
                requires ``attn_mask``).
            cache: keys/values of earlier calls to attend to as well (see the class
                docstring); ``None``: attend to ``key``/``value`` alone, as torch does.

        Returns:
            ``(output, weights)``: output shaped like ``query`` with ``E`` features;
            weights ``(B, L, S)`` (or ``(B, H, L, S)``), ``None`` if not ``need_weights``.
        """
        is_batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        check_bool("need_weights", need_weights)
        check_bool("average_attn_weights", average_attn_weights)
        check_bool("is_causal", is_causal)
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache or None, got {type(cache).__name__}")
        if is_causal and attn_mask is None:
            raise ValueError(
                "is_causal=True is a hint that attn_mask is causal and needs attn_mask; "
                "build one with Transformer.generate_square_subsequent_mask"
            )
        same = query is key and key is value  # before the transposes make three tensors
        if not is_batched:
            # (L, E) -> (1, L, E); masks gain the batch dim too.
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            # (L, B, E) -> (B, L, E): work batch first inside.
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)

        B, L, _ = query.shape
        S = key.size(1)
        H, D = self.num_heads, self.head_dim
        if key.size(0) != B:
            raise ValueError(f"query batch size {B} differs from key batch size {key.size(0)}")
        if cache is not None:
            S = self._check_cache(cache, B, S)
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, S):
            shape = (B, S) if is_batched else (S,)
            raise ValueError(
                f"key_padding_mask must have shape {shape}, got "
                f"{tuple(key_padding_mask.shape if is_batched else key_padding_mask.shape[1:])}"
            )
        if attn_mask is not None:
            allowed = [(L, S), (B * H, L, S)]
            if tuple(attn_mask.shape) not in allowed:
                raise ValueError(
                    f"attn_mask must have shape (L, S) = {(L, S)} or (B*num_heads, L, S) = "
                    f"{(B * H, L, S)}, got {tuple(attn_mask.shape)}"
                )

        if cache is not None and cache.filled:
            # The memory's keys/values were projected on the first step: queries only.
            q = self._query_projection(query)
            k, v = cache.keys(), cache.values()  # (B, H, S, D)
        else:
            q, k, v = self._in_projection(query, key, value, same)  # (B, L, E), (B, S_new, E) x 2
            k = k.view(B, k.size(1), H, D).transpose(1, 2)  # (B, H, S_new, D)
            v = v.view(B, v.size(1), H, D).transpose(1, 2)  # (B, H, S_new, D)
            if cache is not None:
                k, v = cache.append(k, v)  # (B, H, S, D): cached positions, then the new
        q = q.view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        if self.bias_k is not None and self.bias_v is not None:
            # In k's dtype: under autocast k is already low precision while the parameter
            # is not, and cat would promote k back (torch's SDPA then casts it down again).
            bias_k = self.bias_k.to(k.dtype).view(1, H, 1, D).expand(B, -1, -1, -1)
            bias_v = self.bias_v.to(v.dtype).view(1, H, 1, D).expand(B, -1, -1, -1)
            k, v = torch.cat([k, bias_k], dim=2), torch.cat([v, bias_v], dim=2)
            attn_mask, key_padding_mask = _pad_one_key(attn_mask), _pad_one_key(key_padding_mask)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros((B, H, 1, D))], dim=2)  # (B, H, S'+1, D)
            v = torch.cat([v, v.new_zeros((B, H, 1, D))], dim=2)
            attn_mask, key_padding_mask = _pad_one_key(attn_mask), _pad_one_key(key_padding_mask)
        S = k.size(2)

        dropout_p = self.dropout if self.training else 0.0
        weights: Tensor | None = None
        if need_weights:
            mask = merge_module_masks(attn_mask, key_padding_mask, B, H, L, S, q.dtype)
            weights = attention_weights(q, k, mask)  # (B, H, L, S)
            attended = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
            out = attended @ v  # (B, H, L, D)
            weights = attended.mean(dim=1) if average_attn_weights else attended
        else:
            # As torch does: with no padding mask the causal hint selects the causal
            # kernel path (cheaper: blocks above the diagonal are skipped). Not when keys
            # were added around the sequence: top-left causal would hide the cached keys
            # before the new queries, and the bias_k/zero key after them, which the mask
            # the hint stands for lets every query see (torch's hint path hides the last).
            use_causal = (
                is_causal
                and key_padding_mask is None
                and cache is None
                and self.bias_k is None
                and not self.add_zero_attn
            )
            mask = (
                None
                if use_causal
                else merge_module_masks(attn_mask, key_padding_mask, B, H, L, S, q.dtype)
            )
            if dropout_p == 1.0:
                # Every weight dropped (torch allows dropout=1.0): the heads output zeros
                # with zero gradients; the kernels take p in [0, 1) only.
                out = attend_prechecked(q, k, v, mask, 0.0, use_causal) * 0.0
            else:
                out = attend_prechecked(q, k, v, mask, dropout_p, use_causal)
            # out: (B, H, L, D)
        # Concat(head_1, ..., head_h): heads side by side along the feature axis.
        out = out.transpose(1, 2).reshape(B, L, H * D)  # (B, L, E)
        out = self.out_proj(out)

        if not is_batched:
            out = out.squeeze(0)  # (L, E)
            if weights is not None:
                weights = weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)  # (L, B, E)
        return out, weights
