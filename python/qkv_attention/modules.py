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
"""
import operator
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from . import ops

__all__ = ["MultiheadAttention"]


def _keep_torch_fast_paths_off(module, args):
    """A forward pre-hook that does nothing.

    ``nn.TransformerEncoderLayer`` in eval mode without grad skips ``self.self_attn(...)``
    and runs ``torch._transformer_encoder_layer_fwd`` on ``self_attn.in_proj_weight`` directly,
    unless some submodule has a forward hook. Holding this hook keeps such a layer on its
    regular path, so our forward really runs wherever the module is placed.
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


def _check_tensor_argument(value, name: str, optional: bool) -> None:
    """A dense (strided) tensor, or None where ``optional``: a message naming the argument
    before anything reads an attribute of a non-tensor (AttributeError, in torch's module) or
    an aten op fails on a sparse, mkldnn or nested tensor without naming it. Attribute reads
    only: cheap, and traceable by Dynamo."""
    if value is None and optional:
        return
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
            f"has layout {value.layout}"
        )


def _check_mask_dtype(mask: Optional[Tensor], name: str) -> None:
    # torch's module raises AssertionError here (F._canonical_mask).
    if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(
            f"MultiheadAttention: only bool and floating types of {name} are supported, "
            f"but {name} has dtype {mask.dtype}"
        )


def _shape(t: Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


class _GivenShapes:
    """The shapes of query, key and value as the caller passed them, and their layout;
    formatted into error messages only when one is raised."""

    def __init__(self, query: Tensor, key: Tensor, value: Tensor, is_batched: bool,
                 batch_first: bool):
        self.shapes = (_shape(query), _shape(key), _shape(value))
        self.layout = ("(N, seq, features)" if is_batched and batch_first else
                       "(seq, N, features)" if is_batched else "(seq, features)")

    def __str__(self) -> str:
        query, key, value = self.shapes
        return f"query {query}, key {key}, value {value} in {self.layout} layout"


def _append_columns(mask: Tensor, count: int) -> Tensor:
    """Appends ``count`` columns that let every query see the extra keys (add_bias_kv and
    add_zero_attn): True for a bool mask in our convention (may attend), 0 for a float one."""
    fill = True if mask.dtype == torch.bool else 0.0
    extra = mask.new_full((*mask.shape[:-1], count), fill)
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
        """
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
        given = _GivenShapes(query, key, value, is_batched, self.batch_first)
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
        self._check_input_sizes(query, key, value, given)

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
                f"has {batch} ({given})"
            )
        if key_padding_mask is not None and _shape(key_padding_mask) != (batch, kv_len):
            expected = f"(N, S) = {(batch, kv_len)}" if is_batched else f"(S,) = {(kv_len,)}"
            found = _shape(key_padding_mask) if is_batched else _shape(key_padding_mask)[1:]
            raise AssertionError(
                f"MultiheadAttention: key_padding_mask must have shape {expected}, but has "
                f"shape {found} ({given})"
            )
        self._check_dtypes(query, key, value)
        attn_mask, key_padding_mask = self._masks_for_op(
            attn_mask, key_padding_mask, query.dtype, need_weights
        )

        # -- projection into heads: (B, H, L, D), (B, H, S, D), (B, H, S, D).
        if self._qkv_same_embed_dim:
            # Row blocks of the packed weight: views, no copies.
            q_weight, k_weight, v_weight = self.in_proj_weight.chunk(3)
        else:
            q_weight, k_weight, v_weight = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        if self.in_proj_bias is not None:
            q_bias, k_bias, v_bias = self.in_proj_bias.chunk(3)
        else:
            q_bias = k_bias = v_bias = None
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

        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            heads_out, weights = ops.attention_with_weights(
                q, k, v, attn_mask, dropout_p, False, None, key_padding_mask
            )  # (B, H, L, D), (B, H, L, S')
            if average_attn_weights:
                weights = weights.mean(dim=1)  # (B, L, S')
            if not is_batched:
                weights = weights.squeeze(0)
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

    def _check_input_dims(self, query, key, value, key_padding_mask, attn_mask) -> bool:
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
                expected = (self.num_heads, query.size(0), key.size(0))
                if attn_mask.dim() == 3 and _shape(attn_mask) != expected:
                    raise AssertionError(
                        f"Expected `attn_mask` shape to be {expected} (num_heads, L, S) but got "
                        f"{_shape(attn_mask)}"
                    )
            return False
        raise AssertionError(
            "query should be unbatched 2D or batched 3D tensor but received "
            f"{query.dim()}-D query tensor"
        )

    def _check_input_sizes(self, query: Tensor, key: Tensor, value: Tensor,
                           given: "_GivenShapes") -> None:
        """Feature and sequence sizes (inputs already viewed as (N, seq, features)): torch's
        checks and exception types (AssertionError; RuntimeError where torch's linear fails)."""
        if query.size(-1) != self.embed_dim:
            raise AssertionError(
                f"was expecting embedding dimension of {self.embed_dim}, but got "
                f"{query.size(-1)}: query has {query.size(-1)} features, embed_dim is "
                f"{self.embed_dim} ({given})"
            )
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(
                    "key shape does not match value shape: with kdim = vdim = embed_dim, key "
                    f"and value must have the same shape ({given})"
                )
            if key.size(-1) != self.embed_dim:
                raise RuntimeError(
                    f"MultiheadAttention: key and value have {key.size(-1)} features but "
                    f"kdim = vdim = embed_dim = {self.embed_dim} ({given})"
                )
        else:
            if key.shape[:2] != value.shape[:2]:
                raise AssertionError(
                    "key's sequence and batch dims do not match value's: key and value must "
                    f"have the same batch size and sequence length ({given})"
                )
            if key.size(-1) != self.kdim:
                raise AssertionError(
                    f"expecting key weights shape of {(self.embed_dim, key.size(-1))}, but got "
                    f"{_shape(self.k_proj_weight)}: key has {key.size(-1)} features, kdim is "
                    f"{self.kdim} ({given})"
                )
            if value.size(-1) != self.vdim:
                raise AssertionError(
                    f"expecting value weights shape of {(self.embed_dim, value.size(-1))}, but "
                    f"got {_shape(self.v_proj_weight)}: value has {value.size(-1)} features, "
                    f"vdim is {self.vdim} ({given})"
                )

    def _attn_mask_as_4d(self, attn_mask: Tensor, batch: int, q_len: int, kv_len: int) -> Tensor:
        """(L, S) stays as is (it broadcasts); (B*H, L, S) becomes the view (B, H, L, S)."""
        if attn_mask.dim() == 2:
            if _shape(attn_mask) != (q_len, kv_len):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                    f"{(q_len, kv_len)} (L, S)."
                )
            return attn_mask
        expected = (batch * self.num_heads, q_len, kv_len)
        if _shape(attn_mask) != expected:
            raise RuntimeError(
                f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                f"{expected} (N * num_heads, L, S)."
            )
        # Row n * num_heads + h of torch's layout is batch entry n, head h.
        return attn_mask.view(batch, self.num_heads, q_len, kv_len)

    @staticmethod
    def _masks_for_op(attn_mask, key_padding_mask, dtype, need_weights):
        """torch's module masks (bool True = masked out) to the operator's (True = may attend).

        Float masks pass through. torch turns bool masks into float masks of the query's dtype
        and adds the two; when the sum's dtype is not the query's, its matmul path
        (need_weights=True) raises and its SDPA path accepts float32 only. The same rule here,
        then each float mask is cast to the query's dtype, as the operator requires.
        """
        present = [m for m in (attn_mask, key_padding_mask) if m is not None]
        if any(m.dtype != torch.bool for m in present):
            # The dtype of torch's merged mask: bool masks count as the query's dtype.
            merged = None
            for mask in present:
                mask_dtype = dtype if mask.dtype == torch.bool else mask.dtype
                merged = mask_dtype if merged is None else torch.promote_types(merged, mask_dtype)
            allowed = (dtype,) if need_weights else (dtype, torch.float32)
            if merged not in allowed:
                raise RuntimeError(
                    f"MultiheadAttention: float masks must have the query's dtype {dtype}"
                    + ("" if need_weights or dtype == torch.float32 else
                       " (or float32 with need_weights=False)")
                    + f", but the masks add up to dtype {merged} (attn_mask: "
                    f"{None if attn_mask is None else attn_mask.dtype}, key_padding_mask: "
                    f"{None if key_padding_mask is None else key_padding_mask.dtype})"
                )

        def convert(mask):
            if mask is None:
                return None
            if mask.dtype == torch.bool:
                return mask.logical_not()
            return mask.to(dtype)

        return convert(attn_mask), convert(key_padding_mask)

    def _check_dtypes(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        """One floating dtype for inputs and parameters; torch's linear raises RuntimeError."""
        if not torch.is_floating_point(query):
            raise RuntimeError(
                f"MultiheadAttention: query must be a floating point tensor, but has dtype "
                f"{query.dtype}"
            )
        for name, tensor in (("key", key), ("value", value)):
            if tensor.dtype != query.dtype:
                raise RuntimeError(
                    f"MultiheadAttention: {name} has dtype {tensor.dtype} but query has dtype "
                    f"{query.dtype}; query, key, value and the parameters must share one dtype"
                )
        parameter_dtype = self.out_proj.weight.dtype
        if query.dtype != parameter_dtype:
            raise RuntimeError(
                f"MultiheadAttention: query has dtype {query.dtype} but the module's parameters "
                f"have dtype {parameter_dtype}; convert one of them (e.g. module.to("
                f"{query.dtype}))"
            )

    def _append_extra_keys(self, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, int]:
        """Appends the add_bias_kv key/value (bias_k, bias_v are (1, 1, E)) and the
        add_zero_attn zeros after the S projected keys: (B, H, S, D) -> (B, H, S + extra, D)."""
        batch, heads, _, head_dim = k.shape
        k_parts: List[Tensor] = [k]
        v_parts: List[Tensor] = [v]
        if self.bias_k is not None and self.bias_v is not None:
            # (1, 1, E) -> (1, H, 1, D): head h owns features h*D .. (h+1)*D - 1.
            k_parts.append(self.bias_k.view(1, heads, 1, head_dim).expand(batch, -1, -1, -1))
            v_parts.append(self.bias_v.view(1, heads, 1, head_dim).expand(batch, -1, -1, -1))
        elif self.bias_k is not None or self.bias_v is not None:
            which = "bias_k" if self.bias_k is not None else "bias_v"
            raise AssertionError(f"MultiheadAttention: {which} is set but the other is None")
        if self.add_zero_attn:
            k_parts.append(k.new_zeros(batch, heads, 1, head_dim))
            v_parts.append(v.new_zeros(batch, heads, 1, v.size(-1)))
        extra = len(k_parts) - 1
        if extra == 0:
            return k, v, 0
        return torch.cat(k_parts, dim=2), torch.cat(v_parts, dim=2), extra
