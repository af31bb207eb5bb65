"""``MultiheadAttention``: a drop-in replacement for ``torch.nn.MultiheadAttention``.

Same constructor, forward, attributes, parameters, state_dict keys (in torch's order) and
initialisation as torch's module, so a state_dict moves between the two in either direction.
The forward runs on our operators: ``qkv_projection`` -> ``attention`` (or
``attention_with_weights`` when the weights are asked for) -> ``merge_heads``.

Masks keep the conventions of torch's module at the API (bool ``True`` = masked out, float
added) and are converted to our operators' SDPA conventions (bool ``True`` = may attend) without
ever merging ``key_padding_mask`` (B, S) and ``attn_mask`` into one (B, H, L, S) tensor: the
operator takes both.

The one deliberate difference from torch: a query row whose keys are all masked gives zero
attention weights, so its output row is ``out_proj.bias``, and finite gradients, always. torch's
module (2.13) does the same only on its SDPA path (need_weights=False, training or grad) and
gives NaN with need_weights=True and on its inference fast path.

The module runs inside ``torch.autocast("cpu", ...)`` as torch's does (the operators have
AutocastCPU kernels: lower precision, as torch's linear and attention), and compiles with
``torch.jit.script``: the forward and its helpers are typed and use only what TorchScript
supports; what it cannot compile (naming a non-tensor's type) runs in eager mode only.
"""
import copy
import operator
import warnings
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from . import _jagged, ops

__all__ = ["MultiheadAttention"]


def _keep_torch_fast_paths_off(module, args):
    """A forward pre-hook that does nothing.

    ``nn.TransformerEncoderLayer`` in eval mode without grad skips ``self.self_attn(...)``
    and runs ``torch._transformer_encoder_layer_fwd`` on ``self_attn.in_proj_weight`` directly,
    unless some submodule has a forward hook. Holding this hook keeps such a layer on its
    regular path, so our forward really runs wherever the module is placed. Scripted code
    cannot see hooks, so ``__prepare_scriptable__`` leaves this one out (see
    ``replace_attention`` for scripted layers).
    """
    return None


def _int_argument(value, name: str) -> int:
    """A constructor size as an int: anything with ``__index__`` (int, bool, numpy ints), as
    torch's constructor accepts. Anything else raises TypeError, as in torch's constructor,
    but with a message naming the argument and what it got."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"MultiheadAttention: {name} must be an int, but got {type(value).__name__} "
            f"({value!r})"
        ) from None


def _check_tensor_argument(value: Optional[Tensor], name: str, optional: bool) -> None:
    """A dense (strided) tensor, or None where ``optional``: a message naming the argument
    before anything reads an attribute of a non-tensor (AttributeError, in torch's module) or
    an aten op fails on a sparse, mkldnn or nested tensor without naming it. Attribute reads
    only: cheap, and traceable by Dynamo."""
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
    if value.is_nested:
        if not optional:
            # query/key/value: torch's module raises AssertionError outside its fast path.
            raise AssertionError(
                f"MultiheadAttention: {name} is a NestedTensor; qkv_attention."
                "MultiheadAttention does not support NestedTensor inputs. "
                "nn.TransformerEncoder makes them in eval mode without grad when given "
                "src_key_padding_mask; set its use_nested_tensor = False (replace_attention "
                "does) to pass padded tensors and the mask instead."
            )
        # Masks: torch's module raises NotImplementedError (from masked_fill).
        raise NotImplementedError(
            f"MultiheadAttention: {name} must be a dense tensor, but is a NestedTensor"
        )
    if value.layout != torch.strided:
        # Sparse or mkldnn: torch raises RuntimeError (NotImplementedError for masks), which
        # NotImplementedError is.
        raise NotImplementedError(
            f"MultiheadAttention: {name} must be a dense tensor (layout torch.strided), but "
            f"has layout {_layout_name(value)}"
        )


def _check_mask_dtype(mask: Optional[Tensor], name: str) -> None:
    # torch's module raises AssertionError here (F._canonical_mask).
    if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(
            f"MultiheadAttention: only bool and floating types of {name} are supported, "
            f"but {name} has dtype {mask.dtype}"
        )


def _dtype_name(dtype: Optional[torch.dtype]) -> str:
    """A dtype for messages: TorchScript formats a dtype as its number, so this spells it out
    the same way in eager and scripted code."""
    if dtype is None:
        return "None"
    if not torch.jit.is_scripting():
        return str(dtype)
    known = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.bool,
             torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.complex64,
             torch.complex128]
    names = ["float64", "float32", "float16", "bfloat16", "bool", "uint8", "int8", "int16",
             "int32", "int64", "complex64", "complex128"]
    for i in range(len(known)):
        if dtype == known[i]:
            return "torch." + names[i]
    return f"dtype number {dtype}"


def _layout_name(t: Tensor) -> str:
    """A layout for messages, as _dtype_name a dtype."""
    if not torch.jit.is_scripting():
        return str(t.layout)
    if t.is_sparse:
        return "torch.sparse_coo"
    if t.is_mkldnn:
        return "torch._mkldnn"
    return "not torch.strided"


def _format_shape(shape: List[int]) -> str:
    """A shape as Python prints a tuple: (3, 2, 8), (5,), ()."""
    if len(shape) == 1:
        return f"({shape[0]},)"
    return "(" + ", ".join([str(size) for size in shape]) + ")"


def _given_layout(is_batched: bool, batch_first: bool) -> str:
    if not is_batched:
        return "(seq, features)"
    return "(N, seq, features)" if batch_first else "(seq, N, features)"


def _describe_given(shapes: List[List[int]], layout: str) -> str:
    """The shapes of query, key and value as the caller passed them, and their layout; formatted
    into error messages only when one is raised."""
    return (f"query {_format_shape(shapes[0])}, key {_format_shape(shapes[1])}, "
            f"value {_format_shape(shapes[2])} in {layout} layout")


def _autocast_dtype(tensor: Tensor) -> Optional[torch.dtype]:
    """The dtype torch's CPU autocast casts ``tensor`` to in the current region (the dtype our
    operators' AutocastCPU kernels compute in), or None outside a region or for a tensor it
    leaves alone: float64, non-floating, not on the CPU."""
    if torch.jit.is_scripting():
        enabled = torch.is_autocast_cpu_enabled()
    else:
        enabled = torch.is_autocast_enabled("cpu")
    if not enabled or tensor.device.type != "cpu":
        return None
    if tensor.dtype == torch.float32 or tensor.dtype == torch.float16 or (
        tensor.dtype == torch.bfloat16
    ):
        return torch.get_autocast_dtype("cpu")
    return None


def _dtype_in_ops(tensor: Tensor) -> torch.dtype:
    """The dtype ``tensor`` reaches the operators in: the autocast dtype inside a CPU autocast
    region (for the dtypes autocast casts), its own otherwise."""
    cast = _autocast_dtype(tensor)
    return tensor.dtype if cast is None else cast


def _masks_for_op(
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
            wanted = f"the query's dtype {_dtype_name(dtype)}" + (
                "" if need_weights or dtype == torch.float32 else
                " (or float32 with need_weights=False)")
        if not allowed:
            raise RuntimeError(
                f"MultiheadAttention: float masks must have {wanted}, but the masks add up "
                f"to dtype {_dtype_name(merged)} (attn_mask: "
                f"{_dtype_name(None if attn_mask is None else attn_mask.dtype)}, "
                "key_padding_mask: "
                f"{_dtype_name(None if key_padding_mask is None else key_padding_mask.dtype)})"
            )
    return (_mask_for_op(attn_mask, compute_dtype),
            _mask_for_op(key_padding_mask, compute_dtype))


def _mask_for_op(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask.logical_not()
    return mask.to(dtype)


def _append_columns(mask: Tensor, count: int) -> Tensor:
    """Appends ``count`` columns that let every query see the extra keys (add_bias_kv and
    add_zero_attn): True for a bool mask in our convention (may attend), 0 for a float one."""
    shape = list(mask.shape[:-1]) + [count]
    extra = mask.new_ones(shape) if mask.dtype == torch.bool else mask.new_zeros(shape)
    return torch.cat([mask, extra], dim=-1)


class MultiheadAttention(nn.Module):
    r"""Multi-head attention running on ``torch.ops.qkv_attention``, a drop-in for
    :class:`torch.nn.MultiheadAttention`.

    Args:
        embed_dim: E, the model dimension (query features and output features).
        num_heads: H; must divide E. Each head has E // H features.
        dropout: dropout probability on the attention weights (training mode only).
        bias: adds biases to the input and output projections.
        add_bias_kv: appends a learned key and value (``bias_k``, ``bias_v``) to the sequence.
        add_zero_attn: appends a key and value of zeros to the sequence.
        kdim, vdim: key and value features (default E). When either differs from E the input
            projection is three weights ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``
            instead of one packed ``in_proj_weight`` (3E, E).
        batch_first: inputs and output are (N, L, E) instead of (L, N, E).
        device, dtype: where and how the parameters are created.

    Forward: see :meth:`forward`. Masks follow torch's module: a bool ``True`` masks a position
    out, a float mask is added to the scores.
    """

    __constants__ = ["batch_first"]
    bias_k: Optional[Tensor]
    bias_v: Optional[Tensor]

    def __init__(
        self,
        embed_dim,
        num_heads,
        dropout=0.0,
        bias=True,
        add_bias_kv=False,
        add_zero_attn=False,
        kdim=None,
        vdim=None,
        batch_first=False,
        device=None,
        dtype=None,
    ) -> None:
        # The same exception types as torch's constructor (and its message for sizes <= 0),
        # with messages naming the argument where torch's do not.
        embed_dim = _int_argument(embed_dim, "embed_dim")
        num_heads = _int_argument(num_heads, "num_heads")
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                "embed_dim and num_heads must be greater than 0, "
                f"got embed_dim={embed_dim} and num_heads={num_heads} instead"
            )
        kdim = None if kdim is None else _int_argument(kdim, "kdim")
        vdim = None if vdim is None else _int_argument(vdim, "vdim")
        for name, size in (("kdim", kdim), ("vdim", vdim)):
            # 0 is valid (inputs of no features); torch.empty raises RuntimeError for < 0.
            if size is not None and size < 0:
                raise RuntimeError(
                    f"MultiheadAttention: {name} must be None or >= 0, but got {size}"
                )
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise AssertionError(
                f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim} "
                f"and num_heads={num_heads}"
            )

        # Registration order fixes the state_dict order; it follows torch's module.
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        # torch's class for the output projection (a plain Linear that quantization tooling
        # leaves alone); its own initialisation draws from the generator here, as in torch.
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn

        self._reset_parameters()
        self.register_forward_pre_hook(_keep_torch_fast_paths_off)

    def _reset_parameters(self) -> None:
        """torch's initialisation, drawing from the generator in the same order, so the same
        seed gives the same parameters as ``torch.nn.MultiheadAttention``."""
        if self._qkv_same_embed_dim:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            xavier_normal_(self.bias_v)

    def __prepare_scriptable__(self) -> "MultiheadAttention":
        """What ``torch.jit.script`` compiles: this module without our forward pre-hook.

        TorchScript would compile the hook with forward and then, when the scripted module
        is called with fewer than all eight arguments, fail to match the hook's input to
        forward's full signature; and a scripted ``TransformerEncoderLayer`` cannot see hooks,
        so it would serve no purpose there. The copy shares parameters, buffers and
        submodules with this module; other hooks stay. Scripting a model that holds this
        module puts the copy in the model's place for it, in the eager model too (torch's
        protocol); layers prepared by ``replace_attention`` stay off torch's fused path
        without the hook.
        """
        scriptable = copy.copy(self)
        scriptable._forward_pre_hooks = OrderedDict(
            (key, hook) for key, hook in self._forward_pre_hooks.items()
            if hook is not _keep_torch_fast_paths_off
        )
        return scriptable

    def __setstate__(self, state):
        # Pickles of torch's module from v1.1.0 lack this flag; they always had packed weights.
        state.setdefault("_qkv_same_embed_dim", True)
        super().__setstate__(state)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        r"""Attends from ``query`` to ``key``/``value``; the signature of torch's module.

        Args:
            query: (L, N, E) or (N, L, E) with ``batch_first``, or unbatched (L, E).
            key: (S, N, kdim) / (N, S, kdim) / (S, kdim).
            value: (S, N, vdim) / (N, S, vdim) / (S, vdim).
            key_padding_mask: (N, S), or (S,) unbatched; bool ``True`` = ignore this key,
                or float, added to the scores.
            need_weights: also return the attention weights (after dropout: the weights that
                produced the output). With ``False`` nothing of size L x S is computed.
            attn_mask: (L, S), or (N * num_heads, L, S) with batch-major, head-minor order
                ((num_heads, L, S) unbatched); bool ``True`` = may not attend, or float, added.
            average_attn_weights: average the returned weights over heads.
            is_causal: as torch 2.13: a hint that ``attn_mask`` is the causal mask, which must
                then be given. Without ``key_padding_mask`` and with ``need_weights=False`` the
                causal mask is applied directly and ``attn_mask`` is not read; otherwise
                ``attn_mask`` is applied.

        Returns:
            ``(output, weights)``: output (L, N, E) / (N, L, E) / (L, E); weights (N, L, S) or,
            with ``average_attn_weights=False``, (N, num_heads, L, S) (no N when unbatched),
            S counting the keys appended by ``add_bias_kv``/``add_zero_attn``; or None.
            A query row with every key masked gives zero weights and the output row
            ``out_proj.bias``, with finite gradients, in every mode (torch's module does so
            only on its SDPA path, need_weights=False with grad or in training; it gives NaN
            with need_weights=True and on its inference fast path).

        Dtypes: query, key, value and the parameters share one floating dtype, which the
        output and weights have; ``in_proj_bias`` (and ``bias_k``/``bias_v``) may have another
        floating dtype and are cast to it, as torch's module accepts. Inside
        ``torch.autocast("cpu", dtype=...)`` float32, float16 and bfloat16 inputs and
        parameters all count as the autocast dtype, the computation runs in it and output and
        weights come back in it, as from torch's module (float64 is left alone, as by autocast).
        """
        if not torch.jit.is_scripting():
            if _jagged.all_nested(query, key, value):
                # Nested (N, j, E) inputs, jagged or strided: without padding (_jagged.py).
                return _jagged.multihead_attention(
                    self, query, key, value, key_padding_mask, need_weights, attn_mask,
                    average_attn_weights, is_causal)
        # -- what each argument is (a dense tensor), then mask types, as torch's module
        # checks them first.
        _check_tensor_argument(query, "query", optional=False)
        _check_tensor_argument(key, "key", optional=False)
        _check_tensor_argument(value, "value", optional=False)
        _check_tensor_argument(key_padding_mask, "key_padding_mask", optional=True)
        _check_tensor_argument(attn_mask, "attn_mask", optional=True)
        _check_mask_dtype(key_padding_mask, "key_padding_mask")
        if (
            key_padding_mask is not None
            and attn_mask is not None
            and key_padding_mask.dtype != attn_mask.dtype
            and not torch.compiler.is_compiling()  # Dynamo cannot trace warnings.warn
        ):
            warnings.warn(
                "Support for mismatched key_padding_mask and attn_mask is deprecated. "
                "Use same type for both instead.",
                stacklevel=2,
            )
        _check_mask_dtype(attn_mask, "attn_mask")

        is_batched = self._check_input_dims(query, key, value, key_padding_mask, attn_mask)
        # The caller's shapes, for error messages (formatted only when one is raised).
        given_shapes = [list(query.shape), list(key.shape), list(value.shape)]
        given_layout = _given_layout(is_batched, self.batch_first)
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
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, q_len, _ = query.shape
        kv_len = key.size(1)
        self._check_input_sizes(query, key, value, given_shapes, given_layout)

        # torch 2.13's reading of the hint: with no padding mask and no weights to return the
        # causal mask itself is used (attn_mask is ignored); otherwise attn_mask is used.
        causal = is_causal and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None
        if attn_mask is not None:
            attn_mask = self._attn_mask_as_4d(attn_mask, batch, q_len, kv_len)
        if key.size(0) != batch:
            raise RuntimeError(
                f"MultiheadAttention: key and value have batch size {key.size(0)} but query "
                f"has {batch} ({_describe_given(given_shapes, given_layout)})"
            )
        if key_padding_mask is not None and list(key_padding_mask.shape) != [batch, kv_len]:
            if is_batched:
                expected = f"(N, S) = {_format_shape([batch, kv_len])}"
                found = _format_shape(list(key_padding_mask.shape))
            else:
                expected = f"(S,) = {_format_shape([kv_len])}"
                found = _format_shape(list(key_padding_mask.shape)[1:])
            raise AssertionError(
                f"MultiheadAttention: key_padding_mask must have shape {expected}, but has "
                f"shape {found} ({_describe_given(given_shapes, given_layout)})"
            )
        compute_dtype = self._check_dtypes(query, key, value)
        attn_mask, key_padding_mask = _masks_for_op(
            attn_mask, key_padding_mask, query.dtype, compute_dtype, need_weights
        )

        # -- projection into heads: (B, H, L, D), (B, H, S, D), (B, H, S, D).
        q_weight, k_weight, v_weight = self._projection_weights()
        q_bias: Optional[Tensor] = None
        k_bias: Optional[Tensor] = None
        v_bias: Optional[Tensor] = None
        in_proj_bias = self.in_proj_bias
        if in_proj_bias is not None:
            if in_proj_bias.dtype != query.dtype and torch.is_floating_point(in_proj_bias):
                # torch's module accepts a bias of another floating dtype (adding it to the
                # projection in the query's dtype) and returns the query's dtype; so do we,
                # in every layout (torch's only where its linear takes the matmul path).
                in_proj_bias = in_proj_bias.to(compute_dtype)
            biases = in_proj_bias.chunk(3)
            q_bias, k_bias, v_bias = biases[0], biases[1], biases[2]
        q, k, v = ops.qkv_projection(
            query, key, value, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias,
            self.num_heads,
        )

        # -- extra key/value columns; masks gain matching columns that every query may see.
        k, v, extra = self._append_extra_keys(k, v)
        if extra:
            if attn_mask is not None:
                attn_mask = _append_columns(attn_mask, extra)
            if key_padding_mask is not None:
                key_padding_mask = _append_columns(key_padding_mask, extra)

        dropout_p = float(self.dropout) if self.training else 0.0
        weights: Optional[Tensor] = None
        if need_weights:
            # (B, H, L, D), and (B, L, S') averaged over the heads or (B, H, L, S')
            heads_out, head_weights = ops.attention_with_weights(
                q, k, v, attn_mask, dropout_p, False, None, key_padding_mask, average_attn_weights
            )
            if not is_batched:
                head_weights = head_weights.squeeze(0)
            weights = head_weights
        else:
            heads_out = ops.attention(
                q, k, v, attn_mask, dropout_p, causal, None, key_padding_mask
            )  # (B, H, L, D)

        # -- concatenate heads and project out. Seen as (L, H, B, D), the heads make
        # merge_heads write (L, B, E): torch's memory layout in every case, so that the output
        # has torch's strides (batch_first gets the transposed view, as from torch's module).
        # Stride-sensitive ops downstream then behave identically: e.g. nn.Dropout assigns its
        # random draws in memory order, so a seeded run draws the same masks as with torch.
        output = ops.merge_heads(
            heads_out.permute(2, 1, 0, 3), self.out_proj.weight, self.out_proj.bias
        )  # (L, B, E)
        if not is_batched:
            output = output.squeeze(1)  # (L, E)
        elif self.batch_first:
            output = output.transpose(0, 1)  # (B, L, E), a view
        return output, weights

    def merge_masks(
        self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], query: Tensor
    ) -> Tuple[Optional[Tensor], Optional[int]]:
        """torch's public helper, with its behaviour: one (N, H, L, S) mask and its type.

        Returns ``(key_padding_mask, 1)`` for a padding mask alone, ``(attn_mask as
        (N, H, L, S), 2)`` for an attention mask ((L, S) or (N * H, L, S)), their sum (a
        logical or for bool masks) when both are given, and ``(None, None)`` for neither.
        ``query`` is batch-first (N, L, E), as in torch's fused paths that call this. Our
        forward never merges masks; this exists for code written against torch's module.
        """
        merged: Optional[Tensor] = None
        mask_type: Optional[int] = None
        if key_padding_mask is not None:
            merged, mask_type = key_padding_mask, 1
        if attn_mask is not None:
            batch, seq_len, _ = query.shape
            if attn_mask.dim() == 3:
                expanded = attn_mask.view(batch, -1, seq_len, seq_len)
            else:
                expanded = attn_mask.view(1, 1, seq_len, seq_len).expand(
                    batch, self.num_heads, -1, -1)
            merged, mask_type = expanded, 2
            if key_padding_mask is not None:
                padding = key_padding_mask.view(batch, 1, 1, seq_len).expand(
                    -1, self.num_heads, -1, -1)
                merged = expanded + padding
        return merged, mask_type

    # -- helpers of forward -------------------------------------------------------------

    def _check_input_dims(self, query: Tensor, key: Tensor, value: Tensor,
                          key_padding_mask: Optional[Tensor],
                          attn_mask: Optional[Tensor]) -> bool:
        """Ranks of the inputs and masks, as torch's module checks them (AssertionError).
        Returns whether the input is batched."""
        if query.dim() == 3:
            if key.dim() != 3 or value.dim() != 3:
                raise AssertionError(
                    "For batched (3-D) `query`, expected `key` and `value` to be 3-D but found "
                    f"{key.dim()}-D and {value.dim()}-D tensors respectively"
                )
            if key_padding_mask is not None and key_padding_mask.dim() != 2:
                raise AssertionError(
                    "For batched (3-D) `query`, expected `key_padding_mask` to be `None` or 2-D "
                    f"but found {key_padding_mask.dim()}-D tensor instead"
                )
            if attn_mask is not None and attn_mask.dim() not in (2, 3):
                raise AssertionError(
                    "For batched (3-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D "
                    f"but found {attn_mask.dim()}-D tensor instead"
                )
            return True
        if query.dim() == 2:
            if key.dim() != 2 or value.dim() != 2:
                raise AssertionError(
                    "For unbatched (2-D) `query`, expected `key` and `value` to be 2-D but "
                    f"found {key.dim()}-D and {value.dim()}-D tensors respectively"
                )
            if key_padding_mask is not None and key_padding_mask.dim() != 1:
                raise AssertionError(
                    "For unbatched (2-D) `query`, expected `key_padding_mask` to be `None` or "
                    f"1-D but found {key_padding_mask.dim()}-D tensor instead"
                )
            if attn_mask is not None:
                if attn_mask.dim() not in (2, 3):
                    raise AssertionError(
                        "For unbatched (2-D) `query`, expected `attn_mask` to be `None`, 2-D or "
                        f"3-D but found {attn_mask.dim()}-D tensor instead"
                    )
                expected = [self.num_heads, query.size(0), key.size(0)]
                if attn_mask.dim() == 3 and list(attn_mask.shape) != expected:
                    raise AssertionError(
                        f"Expected `attn_mask` shape to be {_format_shape(expected)} "
                        f"(num_heads, L, S) but got {_format_shape(list(attn_mask.shape))}"
                    )
            return False
        raise AssertionError(
            "query should be unbatched 2D or batched 3D tensor but received "
            f"{query.dim()}-D query tensor"
        )

    def _check_input_sizes(self, query: Tensor, key: Tensor, value: Tensor,
                           given_shapes: List[List[int]], given_layout: str) -> None:
        """Feature and sequence sizes (inputs already viewed as (N, seq, features)): torch's
        checks and exception types (AssertionError; RuntimeError where torch's linear fails).
        ``given_shapes`` and ``given_layout`` describe the caller's inputs in the messages."""
        if query.size(-1) != self.embed_dim:
            raise AssertionError(
                f"was expecting embedding dimension of {self.embed_dim}, but got "
                f"{query.size(-1)}: query has {query.size(-1)} features, embed_dim is "
                f"{self.embed_dim} ({_describe_given(given_shapes, given_layout)})"
            )
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(
                    "key shape does not match value shape: with kdim = vdim = embed_dim, key "
                    "and value must have the same shape "
                    f"({_describe_given(given_shapes, given_layout)})"
                )
            if key.size(-1) != self.embed_dim:
                raise RuntimeError(
                    f"MultiheadAttention: key and value have {key.size(-1)} features but "
                    f"kdim = vdim = embed_dim = {self.embed_dim} "
                    f"({_describe_given(given_shapes, given_layout)})"
                )
        else:
            if key.shape[:2] != value.shape[:2]:
                raise AssertionError(
                    "key's sequence and batch dims do not match value's: key and value must "
                    "have the same batch size and sequence length "
                    f"({_describe_given(given_shapes, given_layout)})"
                )
            for name, tensor, features, weight in [
                ("key", key, self.kdim, self.k_proj_weight),
                ("value", value, self.vdim, self.v_proj_weight),
            ]:
                if tensor.size(-1) != features:
                    weight_shape = "None" if weight is None else _format_shape(list(weight.shape))
                    dim_name = "kdim" if name == "key" else "vdim"
                    raise AssertionError(
                        f"expecting {name} weights shape of "
                        f"{_format_shape([self.embed_dim, tensor.size(-1)])}, but got "
                        f"{weight_shape}: {name} has {tensor.size(-1)} features, {dim_name} is "
                        f"{features} ({_describe_given(given_shapes, given_layout)})"
                    )

    def _attn_mask_as_4d(self, attn_mask: Tensor, batch: int, q_len: int, kv_len: int) -> Tensor:
        """(L, S) stays as is (it broadcasts); (B*H, L, S) becomes the view (B, H, L, S)."""
        if attn_mask.dim() == 2:
            if list(attn_mask.shape) != [q_len, kv_len]:
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is torch.Size({list(attn_mask.shape)}), but "
                    f"should be {_format_shape([q_len, kv_len])} (L, S)."
                )
            return attn_mask
        expected = [batch * self.num_heads, q_len, kv_len]
        if list(attn_mask.shape) != expected:
            raise RuntimeError(
                f"The shape of the 3D attn_mask is torch.Size({list(attn_mask.shape)}), but "
                f"should be {_format_shape(expected)} (N * num_heads, L, S)."
            )
        # Row n * num_heads + h of torch's layout is batch entry n, head h.
        return attn_mask.view(batch, self.num_heads, q_len, kv_len)

    def _check_dtypes(self, query: Tensor, key: Tensor, value: Tensor) -> torch.dtype:
        """One floating dtype for inputs and parameters; torch's linear raises RuntimeError.
        Returns the dtype the operators compute in: the query's, or inside a CPU autocast
        region the autocast dtype, where (as torch's linear there) inputs and parameters of
        float32, float16 and bfloat16 all count as that dtype."""
        if not torch.is_floating_point(query):
            raise RuntimeError(
                f"MultiheadAttention: query must be a floating point tensor, but has dtype "
                f"{_dtype_name(query.dtype)}"
            )
        compute_dtype = _dtype_in_ops(query)
        for name, tensor in [("key", key), ("value", value)]:
            if _dtype_in_ops(tensor) != compute_dtype:
                raise RuntimeError(
                    f"MultiheadAttention: {name} has dtype {_dtype_name(tensor.dtype)} but query "
                    f"has dtype {_dtype_name(query.dtype)}; query, key, value and the parameters "
                    "must share one dtype"
                )
        parameter = self.out_proj.weight
        if _dtype_in_ops(parameter) != compute_dtype:
            raise RuntimeError(
                f"MultiheadAttention: query has dtype {_dtype_name(query.dtype)} but the "
                f"module's parameters have dtype {_dtype_name(parameter.dtype)}; convert one of "
                f"them (e.g. module.to({_dtype_name(query.dtype)}))"
            )
        return compute_dtype

    def _projection_weights(self) -> Tuple[Tensor, Tensor, Tensor]:
        """q_weight, k_weight, v_weight: row blocks of the packed weight (views, no copies) or
        the three separate weights."""
        if self._qkv_same_embed_dim:
            packed = self.in_proj_weight
            if packed is not None:
                blocks = packed.chunk(3)
                return blocks[0], blocks[1], blocks[2]
            missing = "in_proj_weight"
        else:
            q_weight, k_weight, v_weight = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            if q_weight is not None and k_weight is not None and v_weight is not None:
                return q_weight, k_weight, v_weight
            missing = "q_proj_weight, k_proj_weight and v_proj_weight"
        raise RuntimeError(f"MultiheadAttention: {missing} must be set, but is None")

    def _append_extra_keys(self, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, int]:
        """Appends the add_bias_kv key/value (bias_k, bias_v are (1, 1, E)) and the
        add_zero_attn zeros after the S projected keys: (B, H, S, D) -> (B, H, S + extra, D)."""
        batch, heads, _, head_dim = k.shape
        k_parts: List[Tensor] = [k]
        v_parts: List[Tensor] = [v]
        bias_k, bias_v = self.bias_k, self.bias_v
        if bias_k is not None and bias_v is not None:
            # (1, 1, E) -> (1, H, 1, D): head h owns features h*D .. (h+1)*D - 1. In the
            # projection's dtype, as torch's concatenation promotes a bias of lower precision.
            k_parts.append(
                bias_k.to(k.dtype).view(1, heads, 1, head_dim).expand(batch, -1, -1, -1))
            v_parts.append(
                bias_v.to(v.dtype).view(1, heads, 1, head_dim).expand(batch, -1, -1, -1))
        elif bias_k is not None or bias_v is not None:
            which = "bias_k" if bias_k is not None else "bias_v"
            raise AssertionError(f"MultiheadAttention: {which} is set but the other is None")
        if self.add_zero_attn:
            k_parts.append(k.new_zeros(batch, heads, 1, head_dim))
            v_parts.append(v.new_zeros(batch, heads, 1, v.size(-1)))
        extra = len(k_parts) - 1
        if extra == 0:
            return k, v, 0
        return torch.cat(k_parts, dim=2), torch.cat(v_parts, dim=2), extra
