"""``MultiheadAttention``: a drop-in replacement for ``torch.nn.MultiheadAttention``.

Same constructor, forward, attributes, parameters, state_dict keys (in torch's order) and
initialisation as torch's module, so a state_dict moves between the two in either direction.
The forward runs on our operators: ``qkv_projection`` -> ``attention`` (or
``attention_with_weights`` when the weights are asked for, ``attention_varlen`` for nested
inputs) -> ``merge_heads``, one path for dense and nested inputs, whose checks
(``_validation.py``, ``_jagged.py``) hand it a ``ForwardInputs``.

Masks keep the conventions of torch's module at the API (bool ``True`` = masked out, float
added) and are converted to our operators' SDPA conventions (bool ``True`` = may attend) without
ever merging ``key_padding_mask`` (B, S) and ``attn_mask`` into one (B, H, L, S) tensor: the
operator takes both.

One difference from torch (all of them: docs/differences.md): a query row whose keys are all masked gives zero
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
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from . import _jagged, _validation, ops

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
            f"MultiheadAttention: {name} must be an int, but got {type(value).__name__} ({value!r})"
        ) from None


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

    def extra_repr(self) -> str:
        # torch's module prints no fields, so without a marker a model after
        # replace_attention would print exactly as before; the first field says whose it is.
        fields = [
            "implementation=qkv_attention",
            f"embed_dim={self.embed_dim}",
            f"num_heads={self.num_heads}",
        ]
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            fields += [f"kdim={self.kdim}", f"vdim={self.vdim}"]
        fields += [f"dropout={self.dropout}", f"batch_first={self.batch_first}"]
        return ", ".join(fields)

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
            (key, hook)
            for key, hook in self._forward_pre_hooks.items()
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

        Nested inputs: query, key and value all nested (N, j, E) tensors (jagged or strided;
        ``batch_first=True``; not in TorchScript) attend per sequence without padding and return
        a nested output of query's lengths and layout; the dense checks apply (key and value
        must split into the same sequence lengths); no masks. A jagged tensor with holes
        (``torch.nested.narrow``: ``lengths()`` is not None) is read as its lengths say.

        Dtypes: query, key, value and the parameters share one floating dtype, which the
        output and weights have; ``in_proj_bias`` (and ``bias_k``/``bias_v``) may have another
        floating dtype and are cast to it, as torch's module accepts. Inside
        ``torch.autocast("cpu", dtype=...)`` float32, float16 and bfloat16 inputs and
        parameters all count as the autocast dtype, the computation runs in it and output and
        weights come back in it, as from torch's module (float64 is left alone, as by autocast).
        """
        spec = _validation.ModuleSpec(
            self.embed_dim,
            self.kdim,
            self.vdim,
            self.num_heads,
            self.batch_first,
            self._qkv_same_embed_dim,
            self.out_proj.weight,
        )
        inputs: Optional[_validation.ForwardInputs] = None
        if not torch.jit.is_scripting():
            if _jagged.all_nested(query, key, value):
                # Nested (N, j, E) inputs, jagged or strided: their packed rows (_jagged.py).
                inputs = _jagged.module_inputs(
                    spec, query, key, value, key_padding_mask, attn_mask, is_causal
                )
                if need_weights or self.bias_k is not None or self.add_zero_attn:
                    # Per-sequence weights and extra keys: one dense call per sequence.
                    output, weights = _jagged.per_sequence(
                        self, query, key, value, average_attn_weights
                    )
                    return output, (weights if need_weights else None)
        if inputs is None:
            inputs = _validation.forward_inputs(
                spec, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal
            )

        # -- projection into heads: (B, H, L, D), (B, H, S, D), (B, H, S, D); nested inputs are
        # one batch of their packed rows (B = 1, L = total_q, S = total_k).
        q, k, v = self._project(inputs)

        # -- extra key/value columns; masks gain matching columns that every query may see.
        attn_mask, key_padding_mask = inputs.attn_mask, inputs.key_padding_mask
        k, v, extra = self._append_extra_keys(k, v)
        if extra:
            if attn_mask is not None:
                attn_mask = _append_columns(attn_mask, extra)
            if key_padding_mask is not None:
                key_padding_mask = _append_columns(key_padding_mask, extra)

        # -- attention, its output as (L, H, B, D): seen so, the heads make merge_heads write
        # (L, B, E), torch's memory layout in every case, so that the output has torch's
        # strides (batch_first gets the transposed view, as from torch's module).
        # Stride-sensitive ops downstream then behave identically: e.g. nn.Dropout assigns its
        # random draws in memory order, so a seeded run draws the same masks as with torch.
        dropout_p = float(self.dropout) if self.training else 0.0
        weights: Optional[Tensor] = None
        cu_seqlens_q, cu_seqlens_k = inputs.cu_seqlens_q, inputs.cu_seqlens_k
        if cu_seqlens_q is not None and cu_seqlens_k is not None:
            # Each sequence attends to its own keys: (H, total, D) -> (total, H, D) rows.
            heads_out = ops.attention_varlen(
                q[0].transpose(0, 1),
                k[0].transpose(0, 1),
                v[0].transpose(0, 1),
                cu_seqlens_q,
                cu_seqlens_k,
                inputs.max_seqlen_q,
                inputs.max_seqlen_k,
                dropout_p,
                False,
                None,
            ).unsqueeze(2)  # (total_q, H, D) -> (L, H, B, D) with B = 1
        elif need_weights:
            # (B, H, L, D), and (B, L, S') averaged over the heads or (B, H, L, S')
            heads_out, head_weights = ops.attention_with_weights(
                q, k, v, attn_mask, dropout_p, False, None, key_padding_mask, average_attn_weights
            )
            if not inputs.is_batched:
                head_weights = head_weights.squeeze(0)
            weights = head_weights
            heads_out = heads_out.permute(2, 1, 0, 3)  # (L, H, B, D)
        else:
            heads_out = ops.attention(
                q, k, v, attn_mask, dropout_p, inputs.causal, None, key_padding_mask
            ).permute(2, 1, 0, 3)  # (B, H, L, D) -> (L, H, B, D)

        # -- concatenate heads and project out.
        output = ops.merge_heads(heads_out, self.out_proj.weight, self.out_proj.bias)  # (L, B, E)
        if cu_seqlens_q is not None:
            if not torch.jit.is_scripting():
                return _jagged.nested_output(
                    output[:, 0], cu_seqlens_q, inputs.max_seqlen_q, query.layout
                ), None
        if not inputs.is_batched:
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
                    batch, self.num_heads, -1, -1
                )
            merged, mask_type = expanded, 2
            if key_padding_mask is not None:
                padding = key_padding_mask.view(batch, 1, 1, seq_len).expand(
                    -1, self.num_heads, -1, -1
                )
                merged = expanded + padding
        return merged, mask_type

    # -- helpers of forward -------------------------------------------------------------

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
            q_weight, k_weight, v_weight = (
                self.q_proj_weight,
                self.k_proj_weight,
                self.v_proj_weight,
            )
            if q_weight is not None and k_weight is not None and v_weight is not None:
                return q_weight, k_weight, v_weight
            missing = "q_proj_weight, k_proj_weight and v_proj_weight"
        raise RuntimeError(f"MultiheadAttention: {missing} must be set, but is None")

    def _project(self, inputs: _validation.ForwardInputs) -> Tuple[Tensor, Tensor, Tensor]:
        """``qkv_projection`` of the checked inputs: (B, L, E), (B, S, Ek), (B, S, Ev) ->
        q (B, H, L, D), k (B, H, S, D), v (B, H, S, D)."""
        q_weight, k_weight, v_weight = self._projection_weights()
        q_bias: Optional[Tensor] = None
        k_bias: Optional[Tensor] = None
        v_bias: Optional[Tensor] = None
        in_proj_bias = self.in_proj_bias
        if in_proj_bias is not None:
            if in_proj_bias.dtype != inputs.query.dtype and torch.is_floating_point(in_proj_bias):
                # torch's module accepts a bias of another floating dtype (adding it to the
                # projection in the query's dtype) and returns the query's dtype; so do we,
                # in every layout (torch's only where its linear takes the matmul path).
                in_proj_bias = in_proj_bias.to(inputs.compute_dtype)
            biases = in_proj_bias.chunk(3)
            q_bias, k_bias, v_bias = biases[0], biases[1], biases[2]
        return ops.qkv_projection(
            inputs.query,
            inputs.key,
            inputs.value,
            q_weight,
            k_weight,
            v_weight,
            q_bias,
            k_bias,
            v_bias,
            self.num_heads,
        )

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
            k_parts.append(bias_k.to(k.dtype).view(1, heads, 1, head_dim).expand(batch, -1, -1, -1))
            v_parts.append(bias_v.to(v.dtype).view(1, heads, 1, head_dim).expand(batch, -1, -1, -1))
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
