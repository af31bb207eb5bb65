"""``scaled_dot_product_attention`` with the signature of torch's, running on our operator."""

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor
from torch.nn.attention.bias import CausalBias, CausalVariant

from . import _jagged, ops
from ._errors import InputDtypeError
from ._validation import check_dense

__all__ = ["scaled_dot_product_attention"]


def _to_4d(t: Tensor, batch_shape) -> Tensor:
    """(*batch, N, F) -> (B, H, N, F) with H the last batch dim and B the product of the rest.

    A view whenever the strides allow it (always for contiguous inputs and for broadcast
    masks whose leading dims are all expanded).
    """
    t = t.expand(*batch_shape, *t.shape[-2:])
    if len(batch_shape) == 0:
        return t.reshape(1, 1, *t.shape[-2:])
    if len(batch_shape) == 1:
        return t.unsqueeze(0)
    return t.reshape(math.prod(batch_shape[:-1]), batch_shape[-1], *t.shape[-2:])


def _check_tensor(name: str, t, optional: bool) -> None:
    """A message naming the argument, before expand/reshape below fail on it without one."""
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(
            f"scaled_dot_product_attention: {name} must be a Tensor, but is {type(t).__name__}"
        )
    check_dense("scaled_dot_product_attention", name, t)


def _causal_bias(
    bias: CausalBias, is_causal: bool, variants: dict
) -> Tuple[Optional[Tensor], bool]:
    """torch's ``CausalBias`` (``torch.nn.attention.bias.causal_upper_left`` /
    ``causal_lower_right``) as ``(attn_mask, is_causal)`` with torch's meaning: upper-left, or
    any variant with L = S, is ``is_causal``; lower-right lets query i see keys
    ``j <= i + S - L`` (aligned bottom-right). torch raises for a bias with ``is_causal``.
    ``variants`` (the keyword-only arguments given) only to refuse a lower-right bias with a
    window or ALiBi slopes: those are measured from ``i`` (top-left), so the two alignments
    would disagree."""
    if is_causal:
        raise ValueError("CausalBias should not be used with causal=True")
    q_len, kv_len = bias.seq_len_q, bias.seq_len_kv
    if bias.variant == CausalVariant.UPPER_LEFT or q_len == kv_len:
        return None, True
    if bias.variant != CausalVariant.LOWER_RIGHT:
        raise ValueError(
            f"CausalBias.variant must be a CausalVariant type, but found: {bias.variant}"
        )
    if (
        variants.get("window_size", (-1, -1)) != (-1, -1)
        or variants.get("alibi_slopes") is not None
    ):
        raise ValueError(
            "scaled_dot_product_attention: window_size and alibi_slopes are measured from query "
            f"i (top-left), so they cannot be combined with causal_lower_right({q_len}, {kv_len}) "
            "where L != S; give the band as attn_mask, or use ops.attention_with_kv_cache, "
            "whose alignment is bottom-right"
        )
    # Bottom-right alignment is not an argument of the public attention op (only
    # attention_with_kv_cache aligns its causal mask so), so the (L, S) bool mask is built
    # here, True on and below the diagonal at offset S - L, as torch's CPU path builds it.
    # Rows that see no key (L > S) give zeros, as from torch 2.13 on the CPU.
    ones = torch.ones(q_len, kv_len, dtype=torch.bool)
    return ones.tril(kv_len - q_len), False


def _slopes_4d(slopes, batch_shape) -> Tensor:
    """ALiBi slopes for the operator's (B, H) heads from the call's batch dims (*outer, H):
    (H,) as it is, (*outer, H) flattened to (B, H) like the inputs (a view)."""
    if isinstance(slopes, Tensor) and slopes.dim() > 1:
        if slopes.shape != batch_shape:
            raise RuntimeError(
                "scaled_dot_product_attention: alibi_slopes must be (H,) or the batch dims of "
                f"query {tuple(batch_shape)}, but has shape {tuple(slopes.shape)}"
            )
        return slopes.reshape(-1, batch_shape[-1])  # (*outer, H) -> (B, H)
    return slopes


# What torch's function accepts for its scalar arguments (anything else: TypeError).
_SCALAR_KINDS = (
    ("dropout_p", 4, (float, int)),
    ("is_causal", 5, (bool,)),
    ("scale", 6, (float, int, type(None))),
)


def _run(function: Callable[..., Tensor], args: Tuple, variants: dict) -> Tensor:
    """``function(*args, **variants)`` (the operator, or the jagged path that calls it; args as
    scaled_dot_product_attention's first seven, ``variants`` its keyword-only arguments),
    raising what torch's function raises where the operator's exception type differs: TypeError
    for a scalar argument of the wrong type (the dispatcher raises RuntimeError), RuntimeError
    for a wrong dtype (the operator raises TypeError; ``InputDtypeError`` is both). Costs
    nothing unless something is raised."""
    try:
        return function(*args, **variants)
    except (TypeError, RuntimeError) as error:
        for name, index, kinds in _SCALAR_KINDS:
            if not isinstance(args[index], kinds):
                raise TypeError(
                    f"scaled_dot_product_attention: {name} must be "
                    f"{' or '.join(kind.__name__ for kind in kinds)}, but got "
                    f"{type(args[index]).__name__} ({args[index]!r})"
                ) from error
        if isinstance(error, TypeError) and not isinstance(error, InputDtypeError):
            raise InputDtypeError(str(error)) from error
        raise


def _taken_as_is(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], enable_gqa: bool
) -> bool:
    """Whether the call is one the operator takes without reshaping (the common case, and the
    one a decoding step makes per layer, so it costs only these reads): query (B, H, L, D),
    key (B, Hkv, S, D), value (B, Hkv, S, Dv), tensors of one batch size, Hkv = H or, with
    ``enable_gqa``, a divisor of H; ``attn_mask`` None or of 2 to 4 dims, which the operator
    broadcasts to (B, H, L, S) as torch's function does. Sizes, dtypes and layouts are then
    the operator's to check; any other call takes the general path below."""
    if not (isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)):
        return False
    if query.is_nested or key.is_nested or value.is_nested:  # mixed with dense: the messages below
        return False
    q_shape, k_shape, v_shape = query.shape, key.shape, value.shape
    if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4:
        return False
    if attn_mask is not None and not (
        isinstance(attn_mask, Tensor) and not attn_mask.is_nested and 2 <= attn_mask.dim() <= 4
    ):
        return False
    batch, heads, kv_heads = q_shape[0], q_shape[1], k_shape[1]
    if k_shape[0] != batch or v_shape[0] != batch or v_shape[1] != kv_heads:
        return False
    return kv_heads == heads or (enable_gqa and kv_heads > 0 and heads % kv_heads == 0)


def _gqa_hint(query: Tensor, key: Tensor, enable_gqa: bool) -> str:
    """A hint for batch dims that do not broadcast because key/value have fewer heads."""
    if enable_gqa or query.dim() < 3 or key.dim() < 3:
        return ""
    heads, kv_heads = query.size(-3), key.size(-3)
    if kv_heads == heads or kv_heads == 0 or heads % kv_heads != 0:
        return ""
    return (
        f"; query has {heads} heads (dim -3) and key/value {kv_heads}: pass enable_gqa=True "
        "for grouped-query attention"
    )


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``, plus the attention
    variants of recent models as keyword-only arguments.

    Args:
        query: (..., L, E).  key: (..., S, E).  value: (..., S, Ev); the leading batch dims
            broadcast against each other.
        attn_mask: broadcastable to (..., L, S); bool (True = may attend) or float (added);
            or torch's ``CausalBias`` (``torch.nn.attention.bias.causal_upper_left(L, S)``
            / ``causal_lower_right(L, S)``), with torch's meaning.
        dropout_p: dropout on the attention weights (applied whenever it is > 0, as torch's).
        is_causal: top-left causal mask; combines with attn_mask, as torch 2.13's does on the CPU.
        scale: defaults to 1/sqrt(E).
        enable_gqa: key/value may have fewer heads (dim -3) than query, which must be a
            multiple; each key/value head serves a group of query heads.

    Keyword-only, as the operators take them (``docs/api.md``); H is query's head dim (-3):
        window_size: ``(left, right)``: query i sees key j only if
            ``i - left <= j <= i + right`` (-1 leaves a side open); combines with ``is_causal``
            and ``attn_mask``. transformers' ``sliding_window = w`` is ``(w - 1, 0)`` with
            ``is_causal=True``.
        softcap: > 0 replaces each score s (after ``scale``) by ``softcap * tanh(s / softcap)``
            (Gemma 2), before the masks.
        alibi_slopes: (H,) or (*batch, H) (query's batch dims), float32 or the inputs' dtype:
            adds ``-slope * |i - j|`` to the scores after the cap. Not differentiable.
        sinks: (H,), float32 or the inputs' dtype: one extra logit per head in every row's
            softmax denominator, with no value (gpt-oss); differentiable.

    Jagged nested tensors (``layout=torch.jagged``) are accepted as torch's function takes
    them: query (B, H, j, D), key and value (B, Hkv, j, D) / (B, Hkv, j, Dv), each a
    (B, j, H, D) jagged tensor transposed with ``.transpose(1, 2)``. Each sequence attends to
    its own keys, without padding (``ops.attention_varlen``); ``is_causal`` is top-left within
    each sequence; no ``attn_mask``. The result is jagged (B, H, j, Dv) with query's lengths,
    differentiable through the inputs' ``values()``. A jagged tensor with holes (from
    ``torch.nested.narrow``: ``lengths()`` is not None) is read as its ``lengths()`` say
    (torch's function raises for it); the result has no holes.

    With jagged inputs the variants apply within each sequence (``ops.attention_varlen``);
    ``alibi_slopes`` is then (H,) or (B, H).

    Returns:
        (..., L, Ev). Rows with no key to attend to are zeros, as in torch's function.

    Raises what torch's function raises for the same input where that is a RuntimeError:
    a wrong dtype raises ``InputDtypeError``, a ``TypeError`` (as our operators raise it) and a
    ``RuntimeError`` (as torch's function raises it).
    """
    if isinstance(window_size, list):
        window_size = tuple(window_size)
    variants = {}
    if window_size != (-1, -1) or softcap != 0.0 or alibi_slopes is not None or sinks is not None:
        # Only when given, so that the plain call stays exactly the operator's plain call.
        variants = dict(
            window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks
        )
    if isinstance(attn_mask, CausalBias):
        attn_mask, is_causal = _causal_bias(attn_mask, is_causal, variants)
    if _jagged.all_nested(query, key, value):
        # Jagged (B, H, j, D) inputs: packed values and offsets, no padding.
        return _run(
            _jagged.scaled_dot_product_attention,
            (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa),
            variants,
        )
    if _taken_as_is(query, key, value, attn_mask, enable_gqa):
        # What the operator takes as it is: nothing to reshape, and it checks the rest.
        return _run(
            ops.attention, (query, key, value, attn_mask, dropout_p, is_causal, scale), variants
        )
    for name, t in (("query", query), ("key", key), ("value", value), ("attn_mask", attn_mask)):
        _check_tensor(name, t, optional=name == "attn_mask")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 2:
            raise RuntimeError(
                f"scaled_dot_product_attention: {name} must have at least 2 dims (..., N, F), "
                f"but has shape {tuple(t.shape)}"
            )
    grouped = enable_gqa and query.dim() >= 3 and key.size(-3) != query.size(-3)
    if grouped:
        heads, kv_heads = query.size(-3), key.size(-3)
        if kv_heads == 0 or heads % kv_heads != 0:
            raise RuntimeError(
                "scaled_dot_product_attention: with enable_gqa, query's heads "
                f"({heads}) must be a multiple of key's heads ({kv_heads})"
            )
    # With grouped heads the batch dims broadcast except the head dim, which the op reads
    # grouped (query head h uses key/value head h // (heads // kv_heads)): no copy of key/value.
    try:
        if grouped:
            outer = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
            if value.size(-3) != key.size(-3):
                raise RuntimeError("value's heads differ from key's")
            batch_shape = torch.Size((*outer, query.size(-3)))
            kv_batch_shape = torch.Size((*outer, key.size(-3)))
        else:
            batch_shape = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
            kv_batch_shape = batch_shape
    except RuntimeError as error:
        raise RuntimeError(
            "scaled_dot_product_attention: the batch dims of query "
            f"{tuple(query.shape[:-2])}, key {tuple(key.shape[:-2])} and value "
            f"{tuple(value.shape[:-2])} do not broadcast{_gqa_hint(query, key, enable_gqa)}"
        ) from error
    L, S = query.size(-2), key.size(-2)
    mask4 = None
    if attn_mask is not None:
        try:
            mask_full = attn_mask.expand(*batch_shape, L, S)
        except RuntimeError as error:
            raise RuntimeError(
                f"scaled_dot_product_attention: attn_mask of shape {tuple(attn_mask.shape)} "
                f"cannot be broadcast to the scores' shape {(*batch_shape, L, S)}"
            ) from error
        mask4 = _to_4d(mask_full, batch_shape)
    if variants.get("alibi_slopes") is not None:
        variants["alibi_slopes"] = _slopes_4d(variants["alibi_slopes"], batch_shape)
    out = _run(
        ops.attention,
        (
            _to_4d(query, batch_shape),
            _to_4d(key, kv_batch_shape),
            _to_4d(value, kv_batch_shape),
            mask4,
            dropout_p,
            is_causal,
            scale,
        ),
        variants,
    )
    return out.reshape(*batch_shape, L, value.size(-1))
