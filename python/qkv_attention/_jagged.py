"""Nested-tensor inputs of ``functional.scaled_dot_product_attention`` and
``MultiheadAttention``, computed by ``attention_varlen`` without padding.

A jagged nested tensor cannot enter a custom op (its dispatch key has no kernel there), so its
packed ``values()`` and ``offsets()`` go in instead, and the result is wrapped again with
``torch.nested.nested_tensor_from_jagged``; autograd flows through ``values()``.

Shapes: B sequences, sequence b of L_b queries and S_b keys; H heads, D features per head,
E embedding features; ``total_q`` = sum of L_b, ``total_k`` = sum of S_b.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import ops


def is_jagged(t) -> bool:
    return isinstance(t, Tensor) and t.is_nested and t.layout == torch.jagged


def all_nested(*tensors) -> bool:
    return all(isinstance(t, Tensor) and t.is_nested for t in tensors)


def _offsets_and_max(nested: Tensor) -> Tuple[Tensor, int]:
    offsets = nested.offsets()
    max_len = nested._maybe_max_seqlen if hasattr(nested, "_maybe_max_seqlen") else None
    if max_len is None:
        max_len = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
    return offsets, int(max_len)


def _packed_heads(name: str, t: Tensor) -> Tensor:
    """(B, H, j, D) jagged (ragged dimension 2, as torch's SDPA takes it) -> its packed values
    (total, H, D)."""
    if not is_jagged(t):
        kind = "a nested tensor with layout torch.strided" if t.is_nested else "a dense tensor"
        raise RuntimeError(
            "scaled_dot_product_attention: with jagged nested inputs, query, key and value must "
            f"all be jagged nested tensors (layout=torch.jagged), but {name} is {kind}"
        )
    if t.dim() != 4 or t._ragged_idx != 2:
        raise RuntimeError(
            f"scaled_dot_product_attention: {name} must be a jagged tensor of shape "
            f"(B, H, j, D), the ragged dimension third (a (B, j, H, D) tensor transposed with "
            f".transpose(1, 2)), but has shape {tuple(t.shape)} with its ragged dimension at "
            f"index {t._ragged_idx}"
        )
    return t.transpose(1, 2).values()  # (B, j, H, D) -> values (total, H, D)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: Optional[float],
    enable_gqa: bool,
) -> Tensor:
    """SDPA on jagged (B, H, j, D) query/key/value; returns a jagged (B, H, j, Dv) tensor with
    query's offsets."""
    if attn_mask is not None:
        raise RuntimeError(
            "scaled_dot_product_attention: attn_mask is not supported with jagged nested "
            "inputs (as in torch's); the sequence lengths already say which keys exist"
        )
    q, k, v = (_packed_heads(n, t) for n, t in (("query", query), ("key", key), ("value", value)))
    if q.size(1) != k.size(1) and not enable_gqa:
        raise RuntimeError(
            f"scaled_dot_product_attention: query has {q.size(1)} heads and key has "
            f"{k.size(1)}; pass enable_gqa=True for grouped-query attention"
        )
    offsets_q, max_q = _offsets_and_max(query.transpose(1, 2))
    offsets_k, max_k = _offsets_and_max(key.transpose(1, 2))
    value_offsets = value.transpose(1, 2).offsets()
    if value_offsets is not offsets_k and not torch.equal(value_offsets, offsets_k):
        raise RuntimeError(
            "scaled_dot_product_attention: key and value must have the same sequence lengths "
            f"(offsets {offsets_k.tolist()} and {value_offsets.tolist()})"
        )
    if offsets_q.numel() != offsets_k.numel():
        raise RuntimeError(
            f"scaled_dot_product_attention: query has {offsets_q.numel() - 1} sequences and "
            f"key has {offsets_k.numel() - 1}"
        )
    out = ops.attention_varlen(
        q, k, v, offsets_q, offsets_k, max_q, max_k, dropout_p, is_causal, scale
    )  # (total_q, H, Dv)
    return torch.nested.nested_tensor_from_jagged(out, offsets_q, max_seqlen=max_q).transpose(1, 2)


def _as_jagged(name: str, t: Tensor) -> Tuple[Tensor, Tensor, int]:
    """A nested (B, j, E) tensor as (values (total, E), offsets, longest length)."""
    if t.dim() != 3:
        raise AssertionError(
            f"MultiheadAttention: {name} must be a nested tensor of shape (N, j, E), but has "
            f"{t.dim()} dimensions"
        )
    if t.layout == torch.jagged:
        if t._ragged_idx != 1:
            raise AssertionError(
                f"MultiheadAttention: {name} must be a jagged tensor (N, j, E) with its ragged "
                f"dimension second, but it is at index {t._ragged_idx}"
            )
        offsets, max_len = _offsets_and_max(t)
        return t.values(), offsets, max_len
    parts = t.unbind()
    lengths = [p.size(0) for p in parts]
    offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    values = torch.cat(parts) if parts else t.new_empty(0, t.size(-1))
    return values, offsets, max(lengths, default=0)


def multihead_attention(
    module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor],
    need_weights: bool,
    attn_mask: Optional[Tensor],
    average_attn_weights: bool,
    is_causal: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    """``MultiheadAttention.forward`` on nested (N, j, E) inputs (batch_first): a nested
    output of query's layout and lengths. Jagged or strided nested inputs; training or eval."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 3:  # e.g. torch.nested.nested_tensor([]), which is 1-D
            raise AssertionError(
                f"{name} should be unbatched 2D or batched 3D tensor but received "
                f"{t.dim()}-D {name} tensor (nested inputs are (N, j, E))"
            )
    if not module.batch_first:
        raise AssertionError(
            "MultiheadAttention: nested inputs need batch_first=True (they are (N, j, E))"
        )
    for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if mask is not None:
            raise NotImplementedError(
                f"MultiheadAttention: {name} is not supported with nested inputs; the "
                "sequence lengths already say which keys exist"
            )
    if is_causal:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint (attn_mask is not supported with "
            "nested inputs; use functional.scaled_dot_product_attention(is_causal=True) on "
            "jagged tensors for per-sequence causal attention)"
        )
    layout = query.layout
    if need_weights or module.bias_k is not None or module.add_zero_attn:
        # One dense call per sequence: the weights of each sequence, zero-padded to
        # (N, L_max, S_max) as torch's module returns them for nested input; and the extra
        # key/value columns of add_bias_kv / add_zero_attn, which belong to each sequence.
        output, weights = _per_sequence_with_weights(
            module, query, key, value, average_attn_weights
        )
        return output, (weights if need_weights else None)

    q_values, q_offsets, max_q = _as_jagged("query", query)
    if key is query:
        k_values, k_offsets, max_k = q_values, q_offsets, max_q
    else:
        k_values, k_offsets, max_k = _as_jagged("key", key)
    v_values = k_values if value is key else _as_jagged("value", value)[0]
    if q_offsets.numel() != k_offsets.numel():
        raise AssertionError(
            f"MultiheadAttention: query has {q_offsets.numel() - 1} sequences and key has "
            f"{k_offsets.numel() - 1}"
        )
    q_weight, k_weight, v_weight = module._projection_weights()
    bias = module.in_proj_bias
    q_bias = k_bias = v_bias = None
    if bias is not None:
        q_bias, k_bias, v_bias = bias.to(q_values.dtype).chunk(3)
    # The packed rows as one batch of total rows: (1, total, E) -> (1, H, total, D) each. The
    # same tensor where the inputs are one (self-attention: one GEMM for all three).
    q_in = q_values.unsqueeze(0)
    k_in = q_in if k_values is q_values else k_values.unsqueeze(0)
    v_in = k_in if v_values is k_values else v_values.unsqueeze(0)
    q, k, v = ops.qkv_projection(
        q_in, k_in, v_in, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias, module.num_heads
    )
    dropout_p = float(module.dropout) if module.training else 0.0
    heads_out = ops.attention_varlen(
        q[0].transpose(0, 1),
        k[0].transpose(0, 1),
        v[0].transpose(0, 1),
        q_offsets,
        k_offsets,
        max_q,
        max_k,
        dropout_p,
        False,
        None,
    )  # (total_q, H, D)
    output = ops.merge_heads(
        heads_out.transpose(0, 1).unsqueeze(0), module.out_proj.weight, module.out_proj.bias
    )[0]  # (total_q, E)
    return _nested_like(output, q_offsets, max_q, layout), None


def _nested_like(values: Tensor, offsets: Tensor, max_len: int, layout) -> Tensor:
    if layout == torch.jagged:
        return torch.nested.nested_tensor_from_jagged(values, offsets, max_seqlen=max_len)
    bounds = offsets.tolist()
    parts = [values[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]
    return torch.nested.as_nested_tensor(parts, layout=torch.strided)


def _per_sequence_with_weights(
    module, query: Tensor, key: Tensor, value: Tensor, average_attn_weights: bool
) -> Tuple[Tensor, Tensor]:
    queries, keys, values = query.unbind(), key.unbind(), value.unbind()
    if len(queries) != len(keys) or len(keys) != len(values):
        raise AssertionError(
            f"MultiheadAttention: query has {len(queries)} sequences, key {len(keys)} and value "
            f"{len(values)}"
        )
    outputs: List[Tensor] = []
    weights: List[Tensor] = []
    for q, k, v in zip(queries, keys, values):
        out, w = module(q, k, v, need_weights=True, average_attn_weights=average_attn_weights)
        outputs.append(out)
        weights.append(w)  # (L_b, S_b) or (H, L_b, S_b)
    max_q = max((w.size(-2) for w in weights), default=0)
    max_k = max((w.size(-1) for w in weights), default=0)
    padded = (
        torch.stack(
            [
                torch.nn.functional.pad(w, (0, max_k - w.size(-1), 0, max_q - w.size(-2)))
                for w in weights
            ]
        )
        if weights
        else query.new_zeros(0, max_q, max_k)
    )
    lengths = [o.size(0) for o in outputs]
    offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    values_out = torch.cat(outputs) if outputs else query.new_zeros(0, module.embed_dim)
    return _nested_like(values_out, offsets, max(lengths, default=0), query.layout), padded
