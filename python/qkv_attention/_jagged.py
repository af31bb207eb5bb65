"""Nested-tensor inputs of ``functional.scaled_dot_product_attention`` and
``MultiheadAttention``, computed by ``attention_varlen`` without padding.

A jagged nested tensor cannot enter a custom op (its dispatch key has no kernel there), so its
packed rows and offsets go in instead, and the result is wrapped again with
``torch.nested.nested_tensor_from_jagged``; autograd flows through ``values()``. The functional
runs here whole; for the module this file only checks nested inputs and turns them into the
packed rows that ``MultiheadAttention.forward`` projects, attends and merges on its one path.

Shapes: B sequences, sequence b of L_b queries and S_b keys; H heads, D features per head,
E embedding features; ``total_q`` = sum of L_b, ``total_k`` = sum of S_b.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _validation, ops
from ._validation import ForwardInputs, ModuleSpec


def is_jagged(t) -> bool:
    return isinstance(t, Tensor) and t.is_nested and t.layout == torch.jagged


def all_nested(query, key, value) -> bool:
    """Whether query, key and value all are nested tensors (spelt out: called on every call)."""
    return (
        isinstance(query, Tensor)
        and query.is_nested
        and isinstance(key, Tensor)
        and key.is_nested
        and isinstance(value, Tensor)
        and value.is_nested
    )


def _rows(t: Tensor) -> Tuple[Tensor, Tensor, int]:
    """A nested (N, j, ...) tensor, its ragged dimension second (jagged, or strided nested), as
    ``(rows (total, ...), offsets (N + 1,), longest length)``: sequence b is rows
    ``offsets[b]:offsets[b + 1]``, back to back.

    A jagged tensor with holes (from ``torch.nested.narrow``: ``lengths()`` is not None)
    keeps sequence b at ``values()[offsets[b] : offsets[b] + lengths[b]]``, with unused rows
    between sequences; those rows are gathered here into packed rows without the holes (the
    kernels take packed rows), so each sequence is attended over its own ``lengths[b]`` rows.
    """
    if t.layout != torch.jagged:
        parts = t.unbind()
        lengths = [p.size(0) for p in parts]
        offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
        rows = torch.cat(parts) if parts else t.new_empty([0] + list(t.shape[2:]))
        return rows, offsets, max(lengths, default=0)
    offsets, rows, lengths = t.offsets(), t.values(), t.lengths()
    if lengths is None:
        max_len = getattr(t, "_maybe_max_seqlen", None)
        if max_len is None:
            max_len = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
        return rows, offsets, int(max_len)
    packed = torch.zeros_like(offsets)  # (N + 1,): the offsets without the holes
    torch.cumsum(lengths, 0, out=packed[1:])
    # Packed row r of sequence b is row r - packed[b] + offsets[b] of values().
    shift = torch.repeat_interleave(offsets[:-1] - packed[:-1], lengths)
    index = shift + torch.arange(shift.numel(), dtype=shift.dtype, device=shift.device)
    max_len = int(lengths.max()) if lengths.numel() > 0 else 0
    return rows.index_select(0, index), packed, max_len


def _same_lengths(
    what: str, first: str, second: str, first_offsets: Tensor, second_offsets: Tensor
) -> None:
    """Raises RuntimeError (AssertionError in the module, as its dense check) when two nested
    inputs do not split into sequences alike: count and lengths."""
    if first_offsets is second_offsets or torch.equal(first_offsets, second_offsets):
        return
    if first_offsets.numel() != second_offsets.numel():
        found = (
            f"{first} has {first_offsets.numel() - 1} sequences and {second} has "
            f"{second_offsets.numel() - 1}"
        )
    else:
        found = (
            f"{first}'s sequence lengths are {torch.diff(first_offsets).tolist()} and "
            f"{second}'s are {torch.diff(second_offsets).tolist()}"
        )
    error = AssertionError if what == "MultiheadAttention" else RuntimeError
    raise error(f"{what}: {first} and {second} must have the same sequence lengths, but {found}")


def _packed_heads(name: str, t: Tensor) -> Tuple[Tensor, Tensor, int]:
    """(B, H, j, D) jagged (ragged dimension 2, as torch's SDPA takes it) -> its packed rows
    (total, H, D), offsets and longest length (``_rows``)."""
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
    return _rows(t.transpose(1, 2))  # (B, j, H, D) -> rows (total, H, D)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: Optional[float],
    enable_gqa: bool,
    **variants,
) -> Tensor:
    """SDPA on jagged (B, H, j, D) query/key/value; returns a jagged (B, H, j, Dv) tensor with
    query's offsets. ``variants``: the functional's keyword-only arguments (window_size,
    softcap, alibi_slopes, sinks), given to ``attention_varlen`` as they are."""
    if attn_mask is not None:
        raise RuntimeError(
            "scaled_dot_product_attention: attn_mask is not supported with jagged nested "
            "inputs (as in torch's); the sequence lengths already say which keys exist"
        )
    q, offsets_q, max_q = _packed_heads("query", query)
    k, offsets_k, max_k = _packed_heads("key", key)
    v, offsets_v, _ = _packed_heads("value", value)
    if q.size(1) != k.size(1) and not enable_gqa:
        raise RuntimeError(
            f"scaled_dot_product_attention: query has {q.size(1)} heads and key has "
            f"{k.size(1)}; pass enable_gqa=True for grouped-query attention"
        )
    name = "scaled_dot_product_attention"
    _same_lengths(name, "key", "value", offsets_k, offsets_v)
    if offsets_q.numel() != offsets_k.numel():
        raise RuntimeError(
            f"{name}: query has {offsets_q.numel() - 1} sequences and key has "
            f"{offsets_k.numel() - 1}"
        )
    out = ops.attention_varlen(
        q, k, v, offsets_q, offsets_k, max_q, max_k, dropout_p, is_causal, scale, **variants
    )  # (total_q, H, Dv)
    return torch.nested.nested_tensor_from_jagged(out, offsets_q, max_seqlen=max_q).transpose(1, 2)


def module_inputs(
    spec: ModuleSpec,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor],
    is_causal: bool,
) -> ForwardInputs:
    """``MultiheadAttention.forward``'s checks for nested (N, j, E) inputs (batch_first), with
    the dense path's rules and exception types, and the inputs as the operators take them:
    the packed rows of all sequences as one batch with their offsets (``ForwardInputs``)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 3:  # e.g. torch.nested.nested_tensor([]), which is 1-D
            raise AssertionError(
                f"{name} should be unbatched 2D or batched 3D tensor but received "
                f"{t.dim()}-D {name} tensor (nested inputs are (N, j, E))"
            )
        if t.layout == torch.jagged and t._ragged_idx != 1:
            raise AssertionError(
                f"MultiheadAttention: {name} must be a jagged tensor (N, j, E) with its ragged "
                f"dimension second, but it is at index {t._ragged_idx}"
            )
    if not spec.batch_first:
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
    q_rows, q_offsets, max_q = _rows(query)
    # One tensor passed as several inputs (self-attention) stays one: the projection then
    # runs one GEMM for all three.
    k_rows, k_offsets, max_k = (q_rows, q_offsets, max_q) if key is query else _rows(key)
    if value is key:
        v_rows, v_offsets = k_rows, k_offsets
    else:
        v_rows, v_offsets, _ = _rows(value)
    if q_offsets.numel() != k_offsets.numel():
        raise AssertionError(
            f"MultiheadAttention: query has {q_offsets.numel() - 1} sequences and key has "
            f"{k_offsets.numel() - 1}"
        )
    _same_lengths("MultiheadAttention", "key", "value", k_offsets, v_offsets)
    # The dense checks of features and dtypes, on the packed rows as one batch (1, total, E).
    q_in = q_rows.unsqueeze(0)
    k_in = q_in if k_rows is q_rows else k_rows.unsqueeze(0)
    v_in = k_in if v_rows is k_rows else v_rows.unsqueeze(0)
    count = q_offsets.numel() - 1
    given = [[count, max_q, q_rows.size(-1)], [count, max_k, k_rows.size(-1)]]
    given.append([count, max_k, v_rows.size(-1)])
    _validation.check_input_sizes(spec, q_in, k_in, v_in, given, "nested (N, longest, features)")
    compute_dtype = _validation.check_dtypes(q_in, k_in, v_in, spec.parameter)
    return ForwardInputs(
        q_in, k_in, v_in, None, None, True, False, compute_dtype, q_offsets, k_offsets, max_q, max_k
    )


def nested_output(rows: Tensor, offsets: Tensor, max_len: int, layout) -> Tensor:
    """The module's output rows (total, E) as a nested (N, j, E) tensor in ``layout``, sequence
    b being rows ``offsets[b]:offsets[b + 1]``."""
    if layout == torch.jagged:
        return torch.nested.nested_tensor_from_jagged(rows, offsets, max_seqlen=max_len)
    bounds = offsets.tolist()
    parts = [rows[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]
    return torch.nested.as_nested_tensor(parts, layout=torch.strided)


def per_sequence(
    module, query: Tensor, key: Tensor, value: Tensor, average_attn_weights: bool
) -> Tuple[Tensor, Tensor]:
    """The module on each sequence, a dense call each (inputs already checked by
    ``module_inputs``): for the weights of each sequence, zero-padded to (N, L_max, S_max) as
    torch's module returns them for nested input, and for the extra key/value columns of
    add_bias_kv / add_zero_attn, which belong to each sequence."""
    outputs: List[Tensor] = []
    weights: List[Tensor] = []
    for q, k, v in zip(query.unbind(), key.unbind(), value.unbind()):
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
    rows = torch.cat(outputs) if outputs else query.new_zeros(0, module.embed_dim)
    return nested_output(rows, offsets, max(lengths, default=0), query.layout), padded
