"""Runs HuggingFace transformers models on qkv_attention's operator.

    from qkv_attention.huggingface import register

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=register())
    # or, for a model already loaded:
    model.set_attn_implementation(register())

``register()`` makes the name ``"qkv_attention"`` known to transformers: every model whose
attention goes through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Mistral, Qwen, BERT, ...) then runs
:func:`attention_forward` in each layer, for training and ``generate()`` alike. The variants
that layers pass by keyword are computed by the operator: ``sliding_window`` (Mistral, Qwen2,
Gemma 2/3, Cohere2, gpt-oss), ``softcap`` (Gemma 2) and attention sinks (gpt-oss's ``s_aux``).

transformers is an optional dependency: this module imports it only inside its functions
(:func:`register` and the mask function it registers), and ``import qkv_attention`` never
imports this module.
"""

import logging
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .functional import scaled_dot_product_attention

__all__ = ["NAME", "register", "attention_forward", "build_mask"]

NAME = "qkv_attention"

# Keyword arguments with which some models' layers change what attention computes, and which
# the operator has no counterpart for: refused rather than ignored (sdpa ignores them, which
# computes another function than the model's eager attention).
_UNSUPPORTED = {
    "indices": "sparse attention over the keys an indexer selects (DeepSeek V3.2 and relatives)",
    "block_indices": "block-sparse attention over selected key blocks",
}

_log = logging.getLogger(__name__)
_warned_output_attentions = False


def register() -> str:
    """Registers :func:`attention_forward` and :func:`build_mask` as ``"qkv_attention"``.

    The mask function matters as much as the attention function: for a name without a mask
    function transformers builds no mask at all, so padding would be silently ignored.
    :func:`build_mask` is transformers' ``sdpa_mask`` (4-D bool masks, True = may attend,
    which our operator takes as they are; None where a plain causal or full attention needs no
    mask) except for sliding-window layers, whose band it leaves to the operator's window.

    Returns:
        ``"qkv_attention"``, to pass as ``attn_implementation``. Calling it again is harmless.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as error:
        raise ImportError(
            "qkv_attention.huggingface.register() needs the transformers package (5.x); install "
            "it with a constraint that keeps your torch, e.g. pip install transformers -c "
            "constraints.txt where constraints.txt pins torch"
        ) from error
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, build_mask)
    return NAME


def build_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function: Optional[Callable] = None,
    attention_mask: Optional[Tensor] = None,
    local_size: Optional[int] = None,
    allow_is_causal_skip: bool = True,
    **kwargs,
) -> Optional[Tensor]:
    """The mask function transformers calls once per forward and mask kind (arguments as its
    ``sdpa_mask``): ``sdpa_mask``'s result, except for the layers of a sliding window.

    A sliding-window causal mask (``create_sliding_window_causal_mask``: ``local_size`` = the
    window w) whose keys end at the last query (``q_offset + L == kv_offset + S``, true of
    prefill, decoding and chunked prefill with dynamic caches, and with static ones once full)
    is the causal band of width w aligned bottom-right, which :func:`attention_forward` lets the
    operator apply (``sliding_window``), skipping the key blocks outside the window. Without
    padding among the S keys that is all the mask holds: None is returned and no (B, 1, L, S)
    mask is built. With padding the mask is built and marked (``_BAND``) as holding that band,
    so that the operator can still skip the key blocks outside the window. Every other
    sliding-window mask is built in full and unmarked (a None there would read as that
    alignment), as is any other ``local_size`` mask (chunked attention).
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if mask_function is None:
        mask_function = causal_mask_function
    aligned = False
    if local_size is not None:
        aligned = _aligned_band(q_length, kv_length, q_offset, kv_offset, mask_function, local_size)
        if aligned and allow_is_causal_skip and _no_padding(attention_mask, kv_length, kv_offset):
            return None
        allow_is_causal_skip = False
    mask = sdpa_mask(
        batch_size,
        q_length,
        kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=allow_is_causal_skip,
        **kwargs,
    )
    if aligned and isinstance(mask, Tensor):
        # Lost if a model slices or copies the mask: it is then used as any mask is.
        setattr(mask, _BAND, local_size)
    return mask


# The attribute build_mask sets on a mask that holds the causal band of this width, aligned
# bottom-right, and padding: the window can then be given to the operator beside the mask.
_BAND = "_qkv_attention_sliding_window"


def _aligned_band(q_length, kv_length, q_offset, kv_offset, mask_function, window) -> bool:
    """Whether the mask ``build_mask`` was asked for is the causal band of width ``window``,
    aligned bottom-right over the S keys (and padding): the mask function
    ``create_sliding_window_causal_mask`` passes when nothing is combined with it,
    ``sliding_window_causal_mask_function(window)``, and keys that end at the last query.

    False while tracing (a traced offset has no value to read): the mask is then built and
    used as it is."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if _sliding_window_of(mask_function) != window:
        return False
    return int(q_offset) + q_length == int(kv_offset) + kv_length


def _no_padding(padding_mask: Optional[Tensor], kv_length: int, kv_offset) -> bool:
    """Whether the 2-D padding mask (B, positions) lets every one of the S keys be seen."""
    if padding_mask is None:
        return True
    from transformers.masking_utils import prepare_padding_mask

    # (B, positions) -> the S keys' columns; positions past the given mask are padding.
    padding_mask = prepare_padding_mask(padding_mask, kv_length, int(kv_offset))
    return bool(padding_mask[:, int(kv_offset) : int(kv_offset) + kv_length].all())


def _closure(function) -> dict:
    """A nested function's captured variables by name (empty for anything else)."""
    code, cells = getattr(function, "__code__", None), getattr(function, "__closure__", None)
    if code is None or cells is None:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}


def _sliding_window_of(mask_function) -> Optional[int]:
    """w if ``mask_function`` is transformers' ``sliding_window_causal_mask_function(w)``, that
    is ``and_masks(sliding_window_overlay(w), causal_mask_function)``; None otherwise."""
    from transformers.masking_utils import causal_mask_function

    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return None
    parts = _closure(mask_function).get("mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2 or parts[1] is not causal_mask_function:
        return None
    if getattr(parts[0], "__qualname__", "") != "sliding_window_overlay.<locals>.inner_mask":
        return None
    window = _closure(parts[0]).get("sliding_window")
    return window if isinstance(window, int) else None


def _position_bias_mask(
    position_bias: Tensor, attention_mask: Optional[Tensor], is_causal, query: Tensor, key: Tensor
) -> Tensor:
    """One additive float mask from a learned position bias and the mask or causality.

    Masked positions get the dtype's lowest finite value (not -inf), as transformers' sdpa
    path does, so that the two give the same result even on rows with every key masked.
    """
    lowest = torch.finfo(key.dtype).min
    if attention_mask is None:
        if not is_causal:
            return position_bias.contiguous()
        q_length, kv_length = query.shape[2], key.shape[2]
        positions = torch.arange(max(q_length, kv_length), device=key.device)
        causal = positions[:q_length, None] >= positions[None, :kv_length]  # (L, S), top-left
        return torch.where(causal, position_bias, lowest).contiguous()
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, lowest).contiguous()
    return (position_bias + attention_mask).contiguous()


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    position_bias: Optional[Tensor] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    s_aux: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    **kwargs,
) -> Tuple[Tensor, None]:
    """The attention function transformers calls in each layer, with sdpa's conventions.

    Takes what transformers passes to its own ``sdpa_attention_forward`` and treats each
    argument the way that function does, computing with ``qkv_attention``'s operator, plus the
    variants that sdpa refuses or ignores, computed as the models' eager attention computes them:

    Args:
        module: the attention layer; ``module.num_key_value_groups`` > 1 means grouped-query
            attention (key/value have H / groups heads, used without repeating them), and
            ``module.is_causal`` is used when ``is_causal`` is None (True when absent).
        query: (B, H, L, D).  key: (B, Hkv, S, D).  value: (B, Hkv, S, Dv).
        attention_mask: None, or broadcastable to (B, H, L, S): bool (True = may attend, what
            the mask function builds) or float (added to the scores).
        dropout: dropout probability on the attention weights.
        scaling: multiplies the scores; None means 1/sqrt(D).
        is_causal: causal only when the query has more than one token and no mask is given,
            as in sdpa (a one-token decoding step attends to the whole cache).
        position_bias: optional additive bias broadcastable to (B, H, L, S), merged with the
            mask or causality into one float mask as sdpa does.
        sliding_window: w: query at position p sees the keys at positions p - w < j <= p. With
            a mask, the mask already holds the band (it is built whenever the band is not all
            it holds, see :func:`build_mask`); without one, or with the mask build_mask marks
            as the band and padding, the S keys end at the last query (bottom-right): the
            operator applies causality and the window itself, reading only the last
            L + w - 1 keys.
        softcap: the scores become softcap * tanh(score / softcap) before the masks (Gemma 2).
        s_aux, sinks: (H,) attention sinks (gpt-oss passes ``s_aux``): one logit per head in
            every row's softmax denominator, with no value; differentiable.
        **kwargs: the rest of the layer's keyword arguments. Ignored, as sdpa ignores them
            (cache positions, the packed-sequence lengths its masks already express), except
            ``output_attentions`` (True: a warning, once, that no weights are returned) and
            those that change the attention computed and have no counterpart here
            (``indices``, ``block_indices``: ValueError).

    Returns:
        (output (B, L, H, Dv) contiguous, None).
    """
    for name, meaning in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(
                f"qkv_attention attention does not support {name} ({meaning}); use "
                "attn_implementation='eager' for this model"
            )
    global _warned_output_attentions
    if kwargs.get("output_attentions", False) and not _warned_output_attentions:
        _warned_output_attentions = True
        _log.warning(
            "qkv_attention attention does not return attention weights "
            "(output_attentions=True); use attn_implementation='eager' for them"
        )
    if not (_is_4d(query) and _is_4d(key) and _is_4d(value)):
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not _is_4d(t):
                found = f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"qkv_attention attention: {name} must be (batch, heads, "
                    f"positions, features), but has {found}"
                )
    sinks = _head_sinks(s_aux, sinks, query.shape[1])
    variants = {}
    if softcap is not None:
        variants["softcap"] = float(softcap)
    if sinks is not None:
        variants["sinks"] = sinks

    enable_gqa = False
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        if key.shape[1] * groups != query.shape[1] or value.shape[1] != key.shape[1]:
            raise ValueError(
                f"qkv_attention attention: module.num_key_value_groups is {groups}, so query's "
                f"heads ({query.shape[1]}) must be {groups} x key's ({key.shape[1]}) and "
                f"value's ({value.shape[1]})"
            )
        enable_gqa = True

    q_length, kv_length = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    band_mask = (
        sliding_window is not None
        and attention_mask is not None
        and getattr(attention_mask, _BAND, None) == sliding_window
    )
    if sliding_window is not None and is_causal and (attention_mask is None or band_mask):
        # No mask, or build_mask's band with padding: the window is aligned bottom-right.
        key, value, position_bias, attention_mask, is_causal, window = _bottom_right_band(
            key, value, position_bias, attention_mask, q_length, sliding_window
        )
        if window != (-1, -1):
            variants["window_size"] = window
    else:
        # The shape test comes first so that, under torch.compile with dynamic shapes, a false
        # one ends the expression before `is_causal` (a Python bool) is combined with a SymBool.
        is_causal = q_length > 1 and attention_mask is None and is_causal
        if torch.jit.is_tracing() and isinstance(is_causal, Tensor):
            is_causal = bool(is_causal.item())

        # Only a prefill into an empty static cache gets here with S > L and no mask: our
        # causal mask is top-left aligned like sdpa's, so the keys past L are masked anyway;
        # dropping them spares computing them.
        if is_causal and kv_length > q_length:
            key = key[:, :, :q_length]  # (B, Hkv, L, D)
            value = value[:, :, :q_length]
            if position_bias is not None:
                position_bias = position_bias[..., :q_length]

    if position_bias is not None:
        attention_mask = _position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False

    heads = query.shape[1]
    if enable_gqa and q_length == 1 and sinks is None and not torch.compiler.is_compiling():
        # A decoding step: the `groups` query heads that share a key/value head become that
        # head's `groups` query positions, (B, H, 1, D) -> (B, Hkv, groups, D), a view. Each
        # key/value head is then read once for its whole group, as sdpa does here too (never
        # causal, no window: L = 1). A mask over all heads (head dim 1) serves every row as it
        # is. Not with sinks, which are per query head.
        query = _pack_heads(query, groups)
        attention_mask = _pack_heads(attention_mask, groups)
        enable_gqa = False

    output = scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        is_causal=bool(is_causal),
        scale=scaling,
        enable_gqa=enable_gqa,
        **variants,
    )  # (B, H, L, Dv) or, packed, (B, Hkv, groups, Dv); B broadcast from q, k, v as in sdpa
    output = output.reshape(output.shape[0], heads, q_length, value.shape[-1])  # (B, H, L, Dv)
    return output.transpose(1, 2).contiguous(), None  # (B, L, H, Dv)


def _head_sinks(s_aux, sinks, heads: int) -> Optional[Tensor]:
    """The (H,) sinks from ``s_aux`` (gpt-oss and most) or ``sinks`` (the name some use); a
    per-token or per-batch sink (another shape) has no counterpart in the operator."""
    if s_aux is not None and sinks is not None:
        raise ValueError("qkv_attention attention: got both s_aux and sinks; pass one of them")
    name, value = ("s_aux", s_aux) if s_aux is not None else ("sinks", sinks)
    if value is None:
        return None
    if not isinstance(value, Tensor) or value.shape != (heads,):
        found = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)
        raise ValueError(
            f"qkv_attention attention: {name} must be one sink logit per query head, shape "
            f"({heads},), but has {found}; per-token sinks are not supported, use "
            "attn_implementation='eager' for this model"
        )
    return value


def _bottom_right_band(key, value, position_bias, mask, q_length: int, window: int):
    """The causal band of width ``window`` for L queries that are the last L of the S keys'
    positions, as the operator takes it: only the last S' = min(S, L + window - 1) keys can
    be seen, so the others are dropped (and the mask's columns for them, if there is a mask:
    build_mask's band with padding, which the window then only repeats); then query i (key
    position i + S' - L) sees i + S' - L - (window - 1) <= j <= i + S' - L, which is
    ``window_size = (window - 1 - d, d)`` with d = S' - L and is_causal only when d = 0
    (top-left and bottom-right then agree).

    Returns (key, value, position_bias, mask, is_causal, window_size); (-1, -1) where nothing
    is hidden (one query over at most ``window`` keys)."""
    kv_length = key.shape[2]
    if not isinstance(window, int) or window < 1:
        raise ValueError(
            f"qkv_attention attention: sliding_window must be a positive int, but got {window!r}"
        )
    if kv_length < q_length:
        raise ValueError(
            f"qkv_attention attention: with sliding_window (and no mask of its own) the "
            f"{q_length} queries must be the last positions of the keys, but there are only "
            f"{kv_length} keys"
        )
    kept = min(kv_length, q_length + window - 1)
    if kept < kv_length:
        key = key[:, :, kv_length - kept :]  # (B, Hkv, S', D)
        value = value[:, :, kv_length - kept :]
        if position_bias is not None:
            position_bias = position_bias[..., kv_length - kept :]
        if mask is not None:
            mask = mask[..., kv_length - kept :]  # (B, 1, L, S')
    shift = kept - q_length
    if q_length == 1:
        return key, value, position_bias, mask, False, (-1, -1)
    return key, value, position_bias, mask, shift == 0, (window - 1 - shift, shift)


def _is_4d(t) -> bool:
    return isinstance(t, Tensor) and t.dim() == 4


def _pack_heads(t: Optional[Tensor], groups: int) -> Optional[Tensor]:
    """(B, H, 1, X) -> (B, H / groups, groups, X). None, masks of fewer than 4 dims and masks
    with head dim 1 broadcast over the packed (B, Hkv, groups, S) as they are."""
    if t is None or t.dim() < 4 or t.shape[1] == 1:
        return t
    return t.reshape(t.shape[0], t.shape[1] // groups, groups, t.shape[-1])
