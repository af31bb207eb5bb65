"""Runs HuggingFace transformers models on qkv_attention's operator.

    from qkv_attention.huggingface import register

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=register())
    # or, for a model already loaded:
    model.set_attn_implementation(register())

``register()`` makes the name ``"qkv_attention"`` known to transformers: every model whose
attention goes through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Mistral, Qwen, BERT, ...) then runs
:func:`attention_forward` in each layer, for training and ``generate()`` alike.

transformers is an optional dependency: this module imports it only inside :func:`register`,
and ``import qkv_attention`` never imports this module.
"""

import logging
from typing import Optional, Tuple

import torch
from torch import Tensor

from .functional import scaled_dot_product_attention

__all__ = ["NAME", "register", "attention_forward"]

NAME = "qkv_attention"

_log = logging.getLogger(__name__)
_warned_output_attentions = False


def register() -> str:
    """Registers :func:`attention_forward` and transformers' ``sdpa_mask`` as ``"qkv_attention"``.

    The mask function matters as much as the attention function: for a name without a mask
    function transformers builds no mask at all, so padding would be silently ignored.
    ``sdpa_mask`` builds the 4-D bool masks (True = may attend) that our operator takes as they
    are, and returns None where a plain causal or full attention needs no mask, which
    :func:`attention_forward` then handles with ``is_causal`` exactly as transformers' sdpa does.

    Returns:
        ``"qkv_attention"``, to pass as ``attn_implementation``. Calling it again is harmless.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as error:
        raise ImportError(
            "qkv_attention.huggingface.register() needs the transformers package (5.x); install "
            "it with a constraint that keeps your torch, e.g. pip install transformers -c "
            "constraints.txt where constraints.txt pins torch"
        ) from error
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


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
    **kwargs,
) -> Tuple[Tensor, None]:
    """The attention function transformers calls in each layer, with sdpa's conventions.

    Takes what transformers passes to its own ``sdpa_attention_forward`` and treats each
    argument the way that function does, computing with ``qkv_attention``'s operator:

    Args:
        module: the attention layer; ``module.num_key_value_groups`` > 1 means grouped-query
            attention (key/value have H / groups heads, used without repeating them), and
            ``module.is_causal`` is used when ``is_causal`` is None (True when absent).
        query: (B, H, L, D).  key: (B, Hkv, S, D).  value: (B, Hkv, S, Dv).
        attention_mask: None, or broadcastable to (B, H, L, S): bool (True = may attend, what
            ``sdpa_mask`` builds) or float (added to the scores).
        dropout: dropout probability on the attention weights.
        scaling: multiplies the scores; None means 1/sqrt(D).
        is_causal: causal only when the query has more than one token and no mask is given,
            as in sdpa (a one-token decoding step attends to the whole cache).
        position_bias: optional additive bias broadcastable to (B, H, L, S), merged with the
            mask or causality into one float mask as sdpa does.
        **kwargs: the rest of the layer's keyword arguments. Ignored, as sdpa ignores them,
            except ``softcap`` (not None: ValueError, as sdpa) and ``output_attentions`` (True:
            a warning, once, that no weights are returned).

    Returns:
        (output (B, L, H, Dv) contiguous, None).
    """
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"qkv_attention attention does not support softcap (got softcap={kwargs['softcap']}); "
            "like transformers' sdpa, it computes plain softmax attention. Use "
            "attn_implementation='eager' or 'flex_attention' for models with logit soft-capping"
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
    # The shape test comes first so that, under torch.compile with dynamic shapes, a false one
    # ends the expression before `is_causal` (a Python bool) is combined with a SymBool.
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if torch.jit.is_tracing() and isinstance(is_causal, Tensor):
        is_causal = bool(is_causal.item())

    # Only a prefill into an empty static cache gets here with S > L and no mask: our causal
    # mask is top-left aligned like sdpa's, so the keys past L are masked anyway; dropping them
    # spares computing them.
    if is_causal and kv_length > q_length:
        key = key[:, :, :q_length]  # (B, Hkv, L, D)
        value = value[:, :, :q_length]
        if position_bias is not None:
            position_bias = position_bias[..., :q_length]

    if position_bias is not None:
        attention_mask = _position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False

    heads = query.shape[1]
    if enable_gqa and q_length == 1 and not torch.compiler.is_compiling():
        # A decoding step: the `groups` query heads that share a key/value head become that
        # head's `groups` query positions, (B, H, 1, D) -> (B, Hkv, groups, D), a view. Each
        # key/value head is then read once for its whole group, as sdpa does here too (never
        # causal: L = 1). A mask over all heads (head dim 1) serves every row as it is.
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
    )  # (B, H, L, Dv) or, packed, (B, Hkv, groups, Dv); B broadcast from q, k, v as in sdpa
    output = output.reshape(output.shape[0], heads, q_length, value.shape[-1])  # (B, H, L, Dv)
    return output.transpose(1, 2).contiguous(), None  # (B, L, H, Dv)


def _is_4d(t) -> bool:
    return isinstance(t, Tensor) and t.dim() == 4


def _pack_heads(t: Optional[Tensor], groups: int) -> Optional[Tensor]:
    """(B, H, 1, X) -> (B, H / groups, groups, X). None, masks of fewer than 4 dims and masks
    with head dim 1 broadcast over the packed (B, Hkv, groups, S) as they are."""
    if t is None or t.dim() < 4 or t.shape[1] == 1:
        return t
    return t.reshape(t.shape[0], t.shape[1] // groups, groups, t.shape[-1])
