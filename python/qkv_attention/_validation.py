"""The argument checks of ``MultiheadAttention.forward`` and the conversion of its inputs to
what the operators take (batch-first views, masks in the operators' convention), so that the
forward itself reads as projection -> attention -> merge.

Every check keeps the exception type torch's module raises for the same input, with a message
that names the argument. Everything here compiles with ``torch.jit.script`` (the module's
forward is scripted): typed functions, and only what TorchScript supports; what it cannot
compile (naming a non-tensor's type) runs in eager mode only. ``check_dense`` is also
``functional.scaled_dot_product_attention``'s check.
"""

import warnings
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor


class ModuleSpec(NamedTuple):
    """What the checks need to know of a ``MultiheadAttention``: its sizes and layout, and one
    of its parameters (for the dtype it computes in)."""

    embed_dim: int
    kdim: int
    vdim: int
    num_heads: int
    batch_first: bool
    packed: bool  # one packed input projection (kdim = vdim = embed_dim)
    parameter: Tensor


class ForwardInputs(NamedTuple):
    """``MultiheadAttention.forward``'s inputs, checked, as the operators take them.

    Dense inputs: query (B, L, E), key (B, S, Ek), value (B, S, Ev), batch-first views (no
    copies); ``attn_mask`` (L, S) or the view (B, H, L, S), and both masks in the operators'
    convention (bool True = may attend, float cast to ``compute_dtype``).

    Nested inputs (N sequences): the packed rows of every sequence as one batch, query
    (1, total_q, E), key (1, total_k, Ek), value (1, total_k, Ev), with ``cu_seqlens_q`` and
    ``cu_seqlens_k`` the (N + 1,) offsets of the sequences in them and ``max_seqlen_q/k`` the
    longest; no masks. For dense inputs the offsets are None.
    """

    query: Tensor
    key: Tensor
    value: Tensor
    attn_mask: Optional[Tensor]
    key_padding_mask: Optional[Tensor]
    is_batched: bool  # False for unbatched (L, E) inputs, viewed here as a batch of one
    causal: bool  # the operator applies the causal mask itself (torch 2.13's is_causal hint)
    compute_dtype: torch.dtype  # the query's, or the autocast dtype in a CPU autocast region
    cu_seqlens_q: Optional[Tensor]
    cu_seqlens_k: Optional[Tensor]
    max_seqlen_q: int
    max_seqlen_k: int


def forward_inputs(
    spec: ModuleSpec,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor],
    need_weights: bool,
    attn_mask: Optional[Tensor],
    is_causal: bool,
) -> ForwardInputs:
    """Checks ``MultiheadAttention.forward``'s dense arguments as torch's module does (same
    exception types, messages that name the argument) and returns them as the operators take
    them (see ``ForwardInputs``)."""
    # -- what each argument is (a dense tensor), then mask types, as torch's module
    # checks them first.
    check_tensor_argument(query, "query", optional=False)
    check_tensor_argument(key, "key", optional=False)
    check_tensor_argument(value, "value", optional=False)
    check_tensor_argument(key_padding_mask, "key_padding_mask", optional=True)
    check_tensor_argument(attn_mask, "attn_mask", optional=True)
    check_mask_dtype(key_padding_mask, "key_padding_mask")
    if (
        key_padding_mask is not None
        and attn_mask is not None
        and key_padding_mask.dtype != attn_mask.dtype
        and not torch.compiler.is_compiling()  # Dynamo cannot trace warnings.warn
    ):
        warnings.warn(
            "Support for mismatched key_padding_mask and attn_mask is deprecated. "
            "Use same type for both instead.",
            stacklevel=3,  # the caller of MultiheadAttention.forward
        )
    check_mask_dtype(attn_mask, "attn_mask")

    is_batched = check_input_dims(query, key, value, key_padding_mask, attn_mask, spec.num_heads)
    # The caller's shapes, for error messages (formatted only when one is raised).
    given_shapes = [list(query.shape), list(key.shape), list(value.shape)]
    layout = given_layout(is_batched, spec.batch_first)
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
            "module method `generate_square_subsequent_mask` to create this mask."
        )

    # -- batch-first views (B, L, E), (B, S, Ek), (B, S, Ev); no copies.
    if not is_batched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)  # (S,) -> (1, S)
    elif not spec.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    batch, q_len, _ = query.shape
    kv_len = key.size(1)
    check_input_sizes(spec, query, key, value, given_shapes, layout)

    # torch 2.13's reading of the hint: with no padding mask and no weights to return the
    # causal mask itself is used (attn_mask is ignored); otherwise attn_mask is used.
    causal = is_causal and key_padding_mask is None and not need_weights
    if causal:
        attn_mask = None
    if attn_mask is not None:
        attn_mask = attn_mask_as_4d(attn_mask, batch, spec.num_heads, q_len, kv_len)
    if key.size(0) != batch:
        raise RuntimeError(
            f"MultiheadAttention: key and value have batch size {key.size(0)} but query "
            f"has {batch} ({describe_given(given_shapes, layout)})"
        )
    if key_padding_mask is not None and list(key_padding_mask.shape) != [batch, kv_len]:
        if is_batched:
            expected = f"(N, S) = {format_shape([batch, kv_len])}"
            found = format_shape(list(key_padding_mask.shape))
        else:
            expected = f"(S,) = {format_shape([kv_len])}"
            found = format_shape(list(key_padding_mask.shape)[1:])
        raise AssertionError(
            f"MultiheadAttention: key_padding_mask must have shape {expected}, but has "
            f"shape {found} ({describe_given(given_shapes, layout)})"
        )
    compute_dtype = check_dtypes(query, key, value, spec.parameter)
    attn_mask, key_padding_mask = masks_for_op(
        attn_mask, key_padding_mask, query.dtype, compute_dtype, need_weights
    )
    return ForwardInputs(
        query,
        key,
        value,
        attn_mask,
        key_padding_mask,
        is_batched,
        causal,
        compute_dtype,
        None,
        None,
        0,
        0,
    )


def check_dense(op: str, name: str, value: Tensor) -> None:
    """A tensor the operators cannot take (nested, quantized, sparse, mkldnn) raises
    NotImplementedError naming ``op`` and the argument, as the operators' own check
    (csrc/ops/checks.cpp) does, before a reshape or an aten op fails on it naming nothing.
    Attribute reads only: cheap, scriptable and traceable by Dynamo."""
    if value.is_nested:
        raise NotImplementedError(f"{op}: {name} must be a dense tensor, but is a NestedTensor")
    if value.is_quantized:
        raise NotImplementedError(f"{op}: {name} must be a dense tensor, but is a quantized tensor")
    if value.layout != torch.strided:
        # Sparse or mkldnn: torch's module raises RuntimeError (NotImplementedError for
        # masks), which NotImplementedError is.
        raise NotImplementedError(
            f"{op}: {name} must be a dense tensor (layout torch.strided), but has layout "
            f"{layout_name(value)}"
        )


def check_tensor_argument(value: Optional[Tensor], name: str, optional: bool) -> None:
    """A dense (strided) tensor, or None where ``optional``: a message naming the argument
    before anything reads an attribute of a non-tensor (AttributeError, in torch's module) or
    an aten op fails on a sparse, mkldnn or nested tensor without naming it."""
    if value is None:
        if optional:
            return
        raise TypeError(f"MultiheadAttention: {name} must be a Tensor, but got NoneType")
    if not torch.jit.is_scripting():
        # TorchScript has checked the types already (and cannot name a Python type).
        if not isinstance(value, Tensor):
            raise TypeError(
                f"MultiheadAttention: {name} must be a Tensor{' or None' if optional else ''}, "
                f"but got {type(value).__name__}"
            )
    if value.is_nested and not optional:
        # query/key/value: torch's module raises AssertionError outside its fast path (for
        # masks NotImplementedError, from masked_fill: check_dense's).
        raise AssertionError(
            f"MultiheadAttention: {name} is a NestedTensor; qkv_attention."
            "MultiheadAttention takes nested inputs only when query, key and value all are "
            "nested (N, j, E) tensors (and not in TorchScript). "
            "nn.TransformerEncoder makes them in eval mode without grad when given "
            "src_key_padding_mask; set its use_nested_tensor = False (replace_attention "
            "does) to pass padded tensors and the mask instead."
        )
    check_dense("MultiheadAttention", name, value)


def check_mask_dtype(mask: Optional[Tensor], name: str) -> None:
    # torch's module raises AssertionError here (F._canonical_mask).
    if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(
            f"MultiheadAttention: only bool and floating types of {name} are supported, "
            f"but {name} has dtype {mask.dtype}"
        )


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    """A dtype for messages: TorchScript formats a dtype as its number, so this spells it out
    the same way in eager and scripted code."""
    if dtype is None:
        return "None"
    if not torch.jit.is_scripting():
        return str(dtype)
    known = [
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.complex64,
        torch.complex128,
    ]
    names = [
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "bool",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "complex64",
        "complex128",
    ]
    for i in range(len(known)):
        if dtype == known[i]:
            return "torch." + names[i]
    return f"dtype number {dtype}"


def layout_name(t: Tensor) -> str:
    """A layout for messages, as dtype_name a dtype."""
    if not torch.jit.is_scripting():
        return str(t.layout)
    if t.is_sparse:
        return "torch.sparse_coo"
    if t.is_mkldnn:
        return "torch._mkldnn"
    return "not torch.strided"


def format_shape(shape: List[int]) -> str:
    """A shape as Python prints a tuple: (3, 2, 8), (5,), ()."""
    if len(shape) == 1:
        return f"({shape[0]},)"
    return "(" + ", ".join([str(size) for size in shape]) + ")"


def given_layout(is_batched: bool, batch_first: bool) -> str:
    if not is_batched:
        return "(seq, features)"
    return "(N, seq, features)" if batch_first else "(seq, N, features)"


def describe_given(shapes: List[List[int]], layout: str) -> str:
    """The shapes of query, key and value as the caller passed them, and their layout; formatted
    into error messages only when one is raised."""
    return (
        f"query {format_shape(shapes[0])}, key {format_shape(shapes[1])}, "
        f"value {format_shape(shapes[2])} in {layout} layout"
    )


def autocast_dtype(tensor: Tensor) -> Optional[torch.dtype]:
    """The dtype torch's CPU autocast casts ``tensor`` to in the current region (the dtype our
    operators' AutocastCPU kernels compute in), or None outside a region or for a tensor it
    leaves alone: float64, non-floating, not on the CPU."""
    if torch.jit.is_scripting():
        enabled = torch.is_autocast_cpu_enabled()
    else:
        enabled = torch.is_autocast_enabled("cpu")
    if not enabled or tensor.device.type != "cpu":
        return None
    if (
        tensor.dtype == torch.float32
        or tensor.dtype == torch.float16
        or (tensor.dtype == torch.bfloat16)
    ):
        return torch.get_autocast_dtype("cpu")
    return None


def dtype_in_ops(tensor: Tensor) -> torch.dtype:
    """The dtype ``tensor`` reaches the operators in: the autocast dtype inside a CPU autocast
    region (for the dtypes autocast casts), its own otherwise."""
    cast = autocast_dtype(tensor)
    return tensor.dtype if cast is None else cast


def masks_for_op(
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    dtype: torch.dtype,
    compute_dtype: torch.dtype,
    need_weights: bool,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """torch's module masks (bool True = masked out) to the operator's (True = may attend).

    Float masks pass through. torch turns bool masks into float masks of the query's dtype
    and adds the two; when the sum's dtype is not the query's, its matmul path
    (need_weights=True) raises and its SDPA path accepts float32 only. The same rule here,
    then each float mask is cast to the dtype the operator computes in, as it requires.
    Inside a CPU autocast region (``compute_dtype`` differs from the query's ``dtype``)
    torch's autocast casts the sum to the lower precision, so any sum but float64 is accepted.
    """
    merged: Optional[torch.dtype] = None
    any_float = False
    for mask in [attn_mask, key_padding_mask]:
        if mask is not None:
            # The dtype of torch's merged mask: bool masks count as the query's dtype.
            mask_dtype = dtype
            if mask.dtype != torch.bool:
                mask_dtype = mask.dtype
                any_float = True
            merged = mask_dtype if merged is None else torch.promote_types(merged, mask_dtype)
    if any_float and merged is not None:
        if compute_dtype != dtype:
            allowed = merged != torch.float64
            wanted = "any floating dtype but float64 (inside a CPU autocast region)"
        else:
            allowed = merged == dtype or (not need_weights and merged == torch.float32)
            wanted = f"the query's dtype {dtype_name(dtype)}" + (
                ""
                if need_weights or dtype == torch.float32
                else " (or float32 with need_weights=False)"
            )
        if not allowed:
            raise RuntimeError(
                f"MultiheadAttention: float masks must have {wanted}, but the masks add up "
                f"to dtype {dtype_name(merged)} (attn_mask: "
                f"{dtype_name(None if attn_mask is None else attn_mask.dtype)}, "
                "key_padding_mask: "
                f"{dtype_name(None if key_padding_mask is None else key_padding_mask.dtype)})"
            )
    return (mask_for_op(attn_mask, compute_dtype), mask_for_op(key_padding_mask, compute_dtype))


def mask_for_op(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask.logical_not()
    return mask.to(dtype)


def check_input_dims(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor],
    num_heads: int,
) -> bool:
    """Ranks of the inputs and masks, as torch's module checks them (AssertionError).
    Returns whether the input is batched."""
    rank = query.dim()
    if rank != 2 and rank != 3:
        raise AssertionError(
            f"query should be unbatched 2D or batched 3D tensor but received {rank}-D query tensor"
        )
    which = "batched (3-D)" if rank == 3 else "unbatched (2-D)"
    if key.dim() != rank or value.dim() != rank:
        raise AssertionError(
            f"For {which} `query`, expected `key` and `value` to be {rank}-D but found "
            f"{key.dim()}-D and {value.dim()}-D tensors respectively"
        )
    if key_padding_mask is not None and key_padding_mask.dim() != rank - 1:
        raise AssertionError(
            f"For {which} `query`, expected `key_padding_mask` to be `None` or {rank - 1}-D "
            f"but found {key_padding_mask.dim()}-D tensor instead"
        )
    if attn_mask is not None:
        if attn_mask.dim() not in (2, 3):
            raise AssertionError(
                f"For {which} `query`, expected `attn_mask` to be `None`, 2-D or 3-D "
                f"but found {attn_mask.dim()}-D tensor instead"
            )
        expected = [num_heads, query.size(0), key.size(0)]
        if rank == 2 and attn_mask.dim() == 3 and list(attn_mask.shape) != expected:
            raise AssertionError(
                f"Expected `attn_mask` shape to be {format_shape(expected)} "
                f"(num_heads, L, S) but got {format_shape(list(attn_mask.shape))}"
            )
    return rank == 3


def check_input_sizes(
    spec: ModuleSpec,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    given_shapes: List[List[int]],
    given_layout: str,
) -> None:
    """Feature and sequence sizes (inputs already viewed as (N, seq, features)): torch's
    checks and exception types (AssertionError; RuntimeError where torch's linear fails).
    ``given_shapes`` and ``given_layout`` describe the caller's inputs in the messages."""
    embed_dim = spec.embed_dim
    if query.size(-1) != embed_dim:
        raise AssertionError(
            f"was expecting embedding dimension of {embed_dim}, but got "
            f"{query.size(-1)}: query has {query.size(-1)} features, embed_dim is "
            f"{embed_dim} ({describe_given(given_shapes, given_layout)})"
        )
    if spec.packed:
        if key.shape != value.shape:
            raise AssertionError(
                "key shape does not match value shape: with kdim = vdim = embed_dim, key "
                "and value must have the same shape "
                f"({describe_given(given_shapes, given_layout)})"
            )
        if key.size(-1) != embed_dim:
            raise RuntimeError(
                f"MultiheadAttention: key and value have {key.size(-1)} features but "
                f"kdim = vdim = embed_dim = {embed_dim} "
                f"({describe_given(given_shapes, given_layout)})"
            )
    else:
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(
                "key's sequence and batch dims do not match value's: key and value must "
                "have the same batch size and sequence length "
                f"({describe_given(given_shapes, given_layout)})"
            )
        for name, tensor, features in [("key", key, spec.kdim), ("value", value, spec.vdim)]:
            if tensor.size(-1) != features:
                dim_name = "kdim" if name == "key" else "vdim"
                raise AssertionError(
                    f"expecting {name} weights shape of "
                    f"{format_shape([embed_dim, tensor.size(-1)])}, but got "
                    f"{format_shape([embed_dim, features])}: {name} has {tensor.size(-1)} "
                    f"features, {dim_name} is {features} "
                    f"({describe_given(given_shapes, given_layout)})"
                )


def attn_mask_as_4d(
    attn_mask: Tensor, batch: int, num_heads: int, q_len: int, kv_len: int
) -> Tensor:
    """(L, S) stays as is (it broadcasts); (B*H, L, S) becomes the view (B, H, L, S)."""
    if attn_mask.dim() == 2:
        if list(attn_mask.shape) != [q_len, kv_len]:
            raise RuntimeError(
                f"The shape of the 2D attn_mask is torch.Size({list(attn_mask.shape)}), but "
                f"should be {format_shape([q_len, kv_len])} (L, S)."
            )
        return attn_mask
    expected = [batch * num_heads, q_len, kv_len]
    if list(attn_mask.shape) != expected:
        raise RuntimeError(
            f"The shape of the 3D attn_mask is torch.Size({list(attn_mask.shape)}), but "
            f"should be {format_shape(expected)} (N * num_heads, L, S)."
        )
    # Row n * num_heads + h of torch's layout is batch entry n, head h.
    return attn_mask.view(batch, num_heads, q_len, kv_len)


def check_dtypes(query: Tensor, key: Tensor, value: Tensor, parameter: Tensor) -> torch.dtype:
    """One floating dtype for inputs and parameters; torch's linear raises RuntimeError.
    Returns the dtype the operators compute in: the query's, or inside a CPU autocast
    region the autocast dtype, where (as torch's linear there) inputs and parameters of
    float32, float16 and bfloat16 all count as that dtype."""
    if not torch.is_floating_point(query):
        raise RuntimeError(
            f"MultiheadAttention: query must be a floating point tensor, but has dtype "
            f"{dtype_name(query.dtype)}"
        )
    compute_dtype = dtype_in_ops(query)
    for name, tensor in [("key", key), ("value", value)]:
        if dtype_in_ops(tensor) != compute_dtype:
            raise RuntimeError(
                f"MultiheadAttention: {name} has dtype {dtype_name(tensor.dtype)} but query "
                f"has dtype {dtype_name(query.dtype)}; query, key, value and the parameters "
                "must share one dtype"
            )
    if dtype_in_ops(parameter) != compute_dtype:
        raise RuntimeError(
            f"MultiheadAttention: query has dtype {dtype_name(query.dtype)} but the "
            f"module's parameters have dtype {dtype_name(parameter.dtype)}; convert one of "
            f"them (e.g. module.to({dtype_name(query.dtype)}))"
        )
    return compute_dtype
