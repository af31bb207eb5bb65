"""Typed wrappers around ``torch.ops.qkv_attention``.

Each function calls the registered C++ operator through the dispatcher, so it gets our C++
autograd, runs under ``torch.compile`` (the operators have Meta kernels) and passes
``torch.library.opcheck``. Shapes use B = batch, H = query heads, Hkv = key/value heads
(dividing H: grouped-query attention), L = query positions, S = key/value positions,
D = features per head, E = embedding size.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _C

__all__ = [
    "qkv_projection",
    "attention",
    "attention_with_weights",
    "attention_varlen",
    "merge_heads",
    "attention_with_kv_cache",
]

_ops = torch.ops.qkv_attention


def _none_given(op: str, names: List[str], tensors: List[Optional[Tensor]]) -> str:
    """The message for None given for a required tensor (the dispatcher would pass it on as an
    undefined tensor, and the op's check would say so without the Python type): a TypeError,
    as for any other wrong type, naming the first such argument."""
    for i in range(len(names)):
        if tensors[i] is None:
            return f"{op}: {names[i]} must be a Tensor, but got None"
    return f"{op}: a required tensor is None"


def qkv_projection(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    v_weight: Tensor,
    q_bias: Optional[Tensor],
    k_bias: Optional[Tensor],
    v_bias: Optional[Tensor],
    num_heads: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Projects query, key and value and splits them into heads.

    Args:
        query: (B, L, Eq).  key: (B, S, Ek).  value: (B, S, Ev).
        q_weight: (E, Eq).  k_weight: (E, Ek).  v_weight: (E, Ev).
        q_bias, k_bias, v_bias: (E,) or None.
        num_heads: H; must divide E.

    Returns:
        q (B, H, L, E/H), k (B, H, S, E/H), v (B, H, S, E/H): ``query @ q_weight.T + q_bias``
        with its E features split into H heads, and likewise for k and v.
    """
    if (
        query is None
        or key is None
        or value is None
        or q_weight is None
        or k_weight is None
        or v_weight is None
    ):
        raise TypeError(
            _none_given(
                "qkv_projection",
                ["query", "key", "value", "q_weight", "k_weight", "v_weight"],
                [query, key, value, q_weight, k_weight, v_weight],
            )
        )
    return _ops.qkv_projection(
        query, key, value, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias, num_heads
    )


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """``softmax(query @ key.T * scale + mask) @ value``, with dropout on the weights.

    Args:
        query: (B, H, L, D).  key: (B, Hkv, S, D).  value: (B, Hkv, S, Dv), with Hkv dividing
            H (grouped-query attention: query head h reads key/value head h // (H // Hkv)).
        attn_mask: broadcastable to (B, H, L, S); bool (True = may attend) or the query's
            float dtype (added to the scores), as in ``F.scaled_dot_product_attention``.
        dropout_p: probability of dropping a weight; kept weights are scaled by 1/(1-p).
            The mask comes from a counter-based stream seeded from torch's default generator:
            ``torch.manual_seed`` reproduces a call, and backward regenerates the same mask.
        is_causal: query i may attend to keys 0..i only (top-left aligned); combines with
            attn_mask when both are given.
        scale: multiplies the scores; defaults to 1/sqrt(D).
        key_padding_mask: (B, S), a second mask with attn_mask's conventions (bool True = may
            attend, or float added), applied to every head and query. Passing it separately
            spares merging it with attn_mask into a (B, H, L, S) tensor.
        window_size: (left, right), a sliding window: query i sees keys
            ``i - left .. i + right`` only; -1 leaves that side open. Combines with is_causal
            and the masks. transformers' ``sliding_window=w`` is ``(w - 1, 0)`` with
            ``is_causal=True``. Keys outside the band cost no work.
        softcap: > 0 caps the scaled scores at ``softcap * tanh(score / softcap)`` (Gemma 2),
            before ALiBi and the masks; 0 means no cap.
        alibi_slopes: (H,) or (B, H), float32 or the inputs' dtype: adds
            ``-slope[h] * |i - j|`` to the scores after the cap. Not differentiable.
        sinks: (H,), float32 or the inputs' dtype: one extra logit per head in every row's
            softmax denominator, with no value (gpt-oss's ``s_aux``):
            ``p_j = exp(s_j) / (exp(sinks[h]) + sum_k exp(s_k))``. Differentiable; not scaled,
            capped, masked or dropped out.

    Returns:
        (B, H, L, Dv). A query row that may attend to no key gives zeros (not NaN).
    """
    if query is None or key is None or value is None:
        raise TypeError(_none_given("attention", ["query", "key", "value"], [query, key, value]))
    return _ops.attention(
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        key_padding_mask,
        window_size,
        softcap,
        alibi_slopes,
        sinks,
    )


def attention_with_weights(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
    average_attn_weights: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Like :func:`attention`, and also returns the attention weights (B, H, L, S).

    The weights are the ones that produced the output: after dropout (zeros where dropped,
    the rest scaled by 1/(1-p)). Both outputs are differentiable. With
    ``average_attn_weights=True`` the weights are their mean over the heads, (B, L, S),
    computed without the per-head (B, H, L, S) tensor. With ``sinks`` the weights exclude the
    sink's share: a row sums to less than 1.
    """
    if query is None or key is None or value is None:
        raise TypeError(
            _none_given("attention_with_weights", ["query", "key", "value"], [query, key, value])
        )
    return _ops.attention_with_weights(
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        key_padding_mask,
        average_attn_weights,
        window_size,
        softcap,
        alibi_slopes,
        sinks,
    )


def attention_varlen(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """:func:`attention` over B sequences of different lengths, packed without padding.

    The sequences lie back to back along the first dimension (the layout of
    ``nested.values()`` for a jagged (B, j, H, D) tensor, and of flash-attention's
    ``cu_seqlens``): sequence b is query rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` and
    key/value rows ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]``, and attends to its own keys only.
    The work is the sum over sequences of L_b * S_b, never B times the longest.

    Args:
        query: (total_q, H, D).  key: (total_k, Hkv, D).  value: (total_k, Hkv, Dv), with
            Hkv dividing H (grouped-query attention: query head h reads key/value head
            h // (H // Hkv)).
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 or int64 on the CPU: the offsets, starting
            at 0, non-decreasing, ending at total_q (total_k). Lengths may be 0.
        max_seqlen_q, max_seqlen_k: at least the longest query (key) sequence; a longer one
            raises.
        dropout_p: as :func:`attention`; sequence b's mask is the one a dense call on it alone
            would draw from the stream state (seed, offset + b), so every sequence has its own
            part of the stream and ``torch.manual_seed`` reproduces a call.
        is_causal: query i of a sequence sees that sequence's keys 0..i (top-left aligned).
        scale: multiplies the scores; defaults to 1/sqrt(D).
        window_size, softcap, alibi_slopes, sinks: as :func:`attention`, per sequence
            (top-left aligned); (B, H) slopes give sequence b row b.

    Returns:
        (total_q, H, Dv). A query of a sequence with no keys gives a row of zeros, as a fully
        masked row of :func:`attention` does.
    """
    if (
        query is None
        or key is None
        or value is None
        or cu_seqlens_q is None
        or cu_seqlens_k is None
    ):
        raise TypeError(
            _none_given(
                "attention_varlen",
                ["query", "key", "value", "cu_seqlens_q", "cu_seqlens_k"],
                [query, key, value, cu_seqlens_q, cu_seqlens_k],
            )
        )
    return _ops.attention_varlen(
        query,
        key,
        value,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        is_causal,
        scale,
        window_size,
        softcap,
        alibi_slopes,
        sinks,
    )


def _draw_dropout_rng_state(dropout_p: float, samples: Optional[int] = None) -> Optional[Tensor]:
    """The dropout stream's state for one call, drawn as ``attention`` draws it.

    ``attention``, ``attention_with_weights`` and ``attention_varlen`` draw a (2,) int64 seed
    and offset, each uniform in [0, 2^63 - 1), with ``randint`` on torch's default CPU
    generator (nothing when ``dropout_p`` is 0), and pass it to their forward op, a pure
    function of it. Python code that calls a forward op itself (tests, the vmap rules) draws
    with the same C++ function (``draw_dropout_rng_state`` in csrc/ops/attention.cpp): after the
    same ``torch.manual_seed`` it gets the state, and so the mask, the composite op would have
    used. ``samples``: one state per sample, (samples, 2), for vmap's randomness="different".
    """
    return _C._draw_dropout_rng_state(float(dropout_p), samples)


def merge_heads(x: Tensor, out_weight: Tensor, out_bias: Optional[Tensor] = None) -> Tensor:
    """Concatenates the heads of ``x`` and applies the output projection.

    Args:
        x: (B, H, L, D).  out_weight: (Eout, H*D).  out_bias: (Eout,) or None.

    Returns:
        (B, L, Eout) = ``concat_heads(x) @ out_weight.T + out_bias``.
    """
    if x is None or out_weight is None:
        raise TypeError(_none_given("merge_heads", ["x", "out_weight"], [x, out_weight]))
    return _ops.merge_heads(x, out_weight, out_bias)


def attention_with_kv_cache(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    key: Optional[Tensor] = None,
    value: Optional[Tensor] = None,
    cache_seqlens: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = True,
    scale: Optional[float] = None,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    k_cache_scale: Optional[Tensor] = None,
    v_cache_scale: Optional[Tensor] = None,
) -> Tensor:
    """One inference step against a key/value cache: writes the new keys and values into the
    caches in place, then attends over each sequence's valid prefix.

    Args:
        query: (B, H, L, D).
        k_cache: (B, Hkv, S_max, D), written in place.  v_cache: (B, Hkv, S_max, Dv), written
            in place. Hkv must divide H (grouped-query attention: query head h reads cache head
            h // (H // Hkv)).
        key: (B, Hkv, L_new, D) and value: (B, Hkv, L_new, Dv), both or neither: the new
            entries, written at positions ``cache_seqlens[b] .. cache_seqlens[b] + L_new - 1``
            of each sequence b. Nothing else in the caches changes.
        cache_seqlens: (B,) int32 or int64, each sequence's valid entries before this call.
            Not modified: the caller advances it (see :class:`qkv_attention.KVCache`). None
            means all S_max entries are valid (key and value must then be None).
        attn_mask: broadcastable to (B, H, L, S_max); bool (True = may attend) or the query's
            float dtype (added to the scores). Only the valid columns are read.
        is_causal: aligned bottom-right: query i sees keys
            ``j <= cache_seqlens[b] + L_new - L + i`` (new queries follow the cached keys).
        scale: multiplies the scores; defaults to 1/sqrt(D).
        window_size, softcap, alibi_slopes, sinks: as :func:`attention`, aligned bottom-right
            like is_causal (query i's window is centred on key ``n_b + L_new - L + i``): with
            ``window_size=(w - 1, 0)`` a decoding step reads only the last w valid entries.
        k_cache_scale, v_cache_scale: for quantized caches (k_cache and v_cache both int8,
            ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``): float32 (B, Hkv, S_max), one
            scale per cached position and head, written in place at the new positions. A cached
            element is ``stored * scale``; key and value (query's dtype) are quantized per
            (position, head) as they are written: ``s = max|x| / top`` over the features (top
            127, 448, 57344), ``stored = round-to-nearest-even(x / s)`` (saturating; s = 0
            stores zeros). Attention dequantizes inside the kernel, accumulates in float32 and
            returns query's dtype. Float caches take no scales.

    Returns:
        (B, H, L, Dv). Sequence b attends to its first ``cache_seqlens[b] + L_new`` entries
        only; the rest of the caches is never read (it may hold garbage, NaN or inf). A query
        row that sees no key gives zeros.

    Inference only: with grad mode on, an input that requires grad raises. A call that raises
    (a sequence that would overflow S_max, a negative length, a wrong shape or dtype) has
    written nothing.
    """
    if query is None or k_cache is None or v_cache is None:
        raise TypeError(
            _none_given(
                "attention_with_kv_cache",
                ["query", "k_cache", "v_cache"],
                [query, k_cache, v_cache],
            )
        )
    return _ops.attention_with_kv_cache(
        query,
        k_cache,
        v_cache,
        key,
        value,
        cache_seqlens,
        attn_mask,
        is_causal,
        scale,
        window_size,
        softcap,
        alibi_slopes,
        sinks,
        k_cache_scale,
        v_cache_scale,
    )
