"""Batching rules for ``torch.func.vmap`` over every ``torch.ops.qkv_attention`` op.

All of them are registered here, with ``torch.library.register_vmap``. A rule sees the inputs
with their vmapped dimension (``in_dims``) and returns the outputs with theirs. N is the vmapped
size; per-sample shapes are the ops' own, e.g. query (B, H, L, D).

- Without dropout, the attention ops fold the N samples into their batch dimension: one kernel
  call on (N*B, H, L, D), not a loop over samples.
- Dropout follows vmap's ``randomness``: ``"error"`` raises (as torch's ops do), ``"same"`` gives
  every sample the mask of one drawn state, ``"different"`` draws a state per sample. The
  mask of a state depends on the positions (b, h, i, j) in the op's own batch, so samples folded
  into the batch would get other masks than per-sample calls: with dropout the rules call the
  op once per sample, each call a whole fused kernel.
- ``_attention_forward`` and ``_attention_dropout_mask`` are pure functions of their
  ``rng_state`` input: they draw nothing, so ``randomness`` does not apply to them; a batched
  ``rng_state`` gives each sample its own stream.
- The projections fold the samples into their batch when the weights are shared; with weights
  that differ per sample (an ensemble through ``torch.func.functional_call``) they loop.
- The backward ops loop over the samples: their weight and mask gradients are sums over each
  sample's batch, which folding would merge across samples.
- ``attention_with_kv_cache`` writes into its caches: the rule calls the op once per sample on
  that sample's slice of the caches (a view, so the writes land in the caller's tensors). Caches
  without the vmapped dimension would receive every sample's keys at the same positions: that
  raises, as do vmapped ``cache_seqlens`` with caches shared by the samples.
- The variable-length ops (``attention_varlen`` and its forward and backward) loop over the
  samples: each sample's packed rows come with offsets of their own.
"""

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

_ops = torch.ops.qkv_attention


def _first(t: Optional[Tensor], dim: Optional[int]) -> Optional[Tensor]:
    """t with its vmapped dimension moved to the front (None stays None)."""
    if t is None or dim is None:
        return t
    return t.movedim(dim, 0)


def _sample(arg: Any, dim: Optional[int], n: int) -> Any:
    return arg.select(dim, n) if dim is not None else arg


def _per_sample(
    op: Callable,
    batch_size: int,
    in_dims: Sequence[Optional[int]],
    args: Sequence[Any],
    kwargs: dict,
) -> Tuple[Any, Any]:
    """Calls op on each sample and stacks every output along a new dimension 0."""
    results = [
        op(*(_sample(a, d, n) for a, d in zip(args, in_dims)), **kwargs) for n in range(batch_size)
    ]
    if isinstance(results[0], Tensor):
        return torch.stack(results), 0
    outputs = tuple(torch.stack([r[i] for r in results]) for i in range(len(results[0])))
    return outputs, tuple(0 for _ in outputs)


def _fold(t: Tensor, dim: Optional[int], n: int) -> Tensor:
    """(N, B, ...) -> (N*B, ...): the samples folded into the op's batch dimension. An input
    that is not vmapped is repeated for every sample."""
    t = t.movedim(dim, 0) if dim is not None else t.unsqueeze(0).expand(n, *t.shape)
    return t.reshape(n * t.shape[1], *t.shape[2:])


def _unfold(t: Tensor, n: int) -> Tensor:
    """(N*B, ...) -> (N, B, ...)."""
    return t.view(n, t.shape[0] // n if n else 0, *t.shape[1:])


def _fold_attn_mask(
    mask: Optional[Tensor], dim: Optional[int], n: int, batch: int
) -> Optional[Tensor]:
    """attn_mask, broadcastable to (B, H, L, S) per sample, made broadcastable to
    (N*B, H, L, S)."""
    if mask is None:
        return None
    if dim is None:
        if mask.dim() < 4 or mask.shape[0] == 1:
            return mask  # broadcast along the batch already
        return _fold(mask, None, n)
    mask = mask.movedim(dim, 0)  # (N, *per-sample shape)
    per_sample = mask.shape[1:]
    mask = mask.reshape(n, *([1] * (4 - len(per_sample))), *per_sample)  # (N, b, h, l, s)
    return mask.expand(n, batch, *mask.shape[2:]).reshape(n * batch, *mask.shape[2:])


def _random_state(op_name: str, info: Any, dropout_p: float) -> Tuple[Optional[Tensor], bool]:
    """The rng_state a composite attention op draws under vmap, and whether it is batched."""
    if not dropout_p > 0:
        return None, False
    if info.randomness == "error":
        raise RuntimeError(
            f"qkv_attention.{op_name}: vmap: called random operation while in randomness error "
            "mode (dropout_p > 0 draws the dropout stream's state). Please either use the "
            "'same' or 'different' randomness flags on vmap or perform the randomness "
            "operation out of vmap"
        )
    same = info.randomness == "same"
    # Drawn as a plain tensor: vmap's mode key would batch a random op called here itself.
    vmap_mode = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchVmapMode)
    with torch._C._DisableFuncTorch(), torch._C._ExcludeDispatchKeyGuard(vmap_mode):
        state = torch.randint(
            2**63 - 1, (2,) if same else (info.batch_size, 2), dtype=torch.int64, device="cpu"
        )
    return state, not same


def _attention_forward_batched(
    info: Any,
    in_dims: Sequence[Optional[int]],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: Optional[float],
    need_weights: bool,
    rng_state: Optional[Tensor] = None,
    average_attn_weights: bool = False,
):
    n = info.batch_size
    args = (
        query,
        key,
        value,
        attn_mask,
        key_padding_mask,
        dropout_p,
        is_causal,
        scale,
        need_weights,
        rng_state,
        average_attn_weights,
    )
    dims = tuple(in_dims) + (None,) * (len(args) - len(in_dims))
    if dropout_p > 0:
        # One call per sample: each sample's mask is the one of its own call (see above).
        return _per_sample(_ops._attention_forward, n, dims, args, {})
    q_dim, k_dim, v_dim, mask_dim, padding_dim = dims[:5]
    batch = query.movedim(q_dim, 0).shape[1] if q_dim is not None else query.shape[0]
    output, logsumexp, weights = _ops._attention_forward(
        _fold(query, q_dim, n),
        _fold(key, k_dim, n),
        _fold(value, v_dim, n),
        _fold_attn_mask(attn_mask, mask_dim, n, batch),
        None if key_padding_mask is None else _fold(key_padding_mask, padding_dim, n),
        dropout_p,
        is_causal,
        scale,
        need_weights,
        None,
        average_attn_weights,
    )
    # (n * B, ...) -> (n, B, ...): per-head (B, H, L, S) or averaged (B, L, S) weights alike.
    weights, weights_dim = (_unfold(weights, n), 0) if need_weights else (weights, None)
    return (_unfold(output, n), _unfold(logsumexp, n), weights), (0, 0, weights_dim)


def _composite_batched(op_name: str, with_weights: bool):
    """The rule of attention / attention_with_weights: draw the dropout state as vmap's
    randomness says, then _attention_forward's rule."""

    def rule(
        info,
        in_dims,
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        key_padding_mask=None,
        average_attn_weights=False,
    ):
        rng_state, rng_batched = _random_state(op_name, info, dropout_p)
        dims = (*in_dims[:4], in_dims[7] if len(in_dims) > 7 else None)
        forward_dims = (*dims, None, None, None, None, 0 if rng_batched else None, None)
        outputs, out_dims = _attention_forward_batched(
            info,
            forward_dims,
            query,
            key,
            value,
            attn_mask,
            key_padding_mask,
            dropout_p,
            is_causal,
            scale,
            with_weights,
            rng_state,
            average_attn_weights,
        )
        if with_weights:
            return (outputs[0], outputs[2]), (out_dims[0], out_dims[2])
        return outputs[0], out_dims[0]

    return rule


def _attention_backward_batched(
    info,
    in_dims,
    grad_output,
    grad_weights,
    query,
    key,
    value,
    output,
    logsumexp,
    attn_mask,
    key_padding_mask,
    dropout_p,
    is_causal,
    scale,
    rng_state,
    attn_mask_requires_grad,
    key_padding_mask_requires_grad,
):
    args = (
        grad_output,
        grad_weights,
        query,
        key,
        value,
        output,
        logsumexp,
        attn_mask,
        key_padding_mask,
        dropout_p,
        is_causal,
        scale,
        rng_state,
        attn_mask_requires_grad,
        key_padding_mask_requires_grad,
    )
    return _per_sample(_ops._attention_backward, info.batch_size, in_dims, args, {})


def _dropout_mask_batched(info, in_dims, rng_state, batch, heads, q_len, kv_len, dropout_p):
    args = (rng_state, batch, heads, q_len, kv_len, dropout_p)
    return _per_sample(_ops._attention_dropout_mask, info.batch_size, in_dims, args, {})


def _qkv_projection_batched(
    info,
    in_dims,
    query,
    key,
    value,
    q_weight,
    k_weight,
    v_weight,
    q_bias,
    k_bias,
    v_bias,
    num_heads,
):
    n = info.batch_size
    args = (query, key, value, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias, num_heads)
    if any(d is not None for d in in_dims[3:9]):
        return _per_sample(_ops.qkv_projection, n, in_dims, args, {})
    # Fold each distinct input once: self-attention passes one tensor as query, key and value,
    # and the op recognises that (one GEMM against the stacked weights) only if it still is.
    folded: List[Tuple[Tensor, Optional[int], Tensor]] = []

    def fold_once(t: Tensor, dim: Optional[int]) -> Tensor:
        for original, original_dim, result in folded:
            if original is t and original_dim == dim:
                return result
        result = _fold(t, dim, n)
        folded.append((t, dim, result))
        return result

    q, k, v = _ops.qkv_projection(
        fold_once(query, in_dims[0]),
        fold_once(key, in_dims[1]),
        fold_once(value, in_dims[2]),
        q_weight,
        k_weight,
        v_weight,
        q_bias,
        k_bias,
        v_bias,
        num_heads,
    )
    return (_unfold(q, n), _unfold(k, n), _unfold(v, n)), (0, 0, 0)


def _merge_heads_batched(info, in_dims, x, out_weight, out_bias):
    n = info.batch_size
    if in_dims[1] is not None or (len(in_dims) > 2 and in_dims[2] is not None):
        return _per_sample(_ops.merge_heads, n, in_dims, (x, out_weight, out_bias), {})
    return _unfold(_ops.merge_heads(_fold(x, in_dims[0], n), out_weight, out_bias), n), 0


def _attention_varlen_batched(
    info,
    in_dims,
    query,
    key,
    value,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
):
    """attention_varlen: the dropout state as vmap's randomness says, then one
    _attention_varlen_forward call per sample (a sample's packed rows and offsets are a batch
    of their own; folding samples would need offsets rebuilt for every sample)."""
    rng_state, rng_batched = _random_state("attention_varlen", info, dropout_p)
    args = (
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
        rng_state,
    )
    dims = (*in_dims[:5], None, None, None, None, None, 0 if rng_batched else None)
    outputs, out_dims = _per_sample(_ops._attention_varlen_forward, info.batch_size, dims, args, {})
    return outputs[0], out_dims[0]


def _backward_batched(op: Callable):
    def rule(info, in_dims, *args):
        return _per_sample(op, info.batch_size, in_dims, args, {})

    return rule


def _attention_with_kv_cache_batched(
    info,
    in_dims,
    query,
    k_cache,
    v_cache,
    key=None,
    value=None,
    cache_seqlens=None,
    attn_mask=None,
    is_causal=True,
    scale=None,
):
    args = (query, k_cache, v_cache, key, value, cache_seqlens, attn_mask, is_causal, scale)
    dims = tuple(in_dims) + (None,) * (len(args) - len(in_dims))
    k_dim, v_dim = dims[1], dims[2]
    writes = key is not None
    if (k_dim is None) != (v_dim is None) or (k_dim is None and (writes or dims[5] is not None)):
        raise RuntimeError(
            "qkv_attention.attention_with_kv_cache: vmap: k_cache and v_cache must both be "
            "vmapped (one cache per sample) when either is, when key/value are written, or when "
            "cache_seqlens is vmapped; here k_cache is "
            f"{'not ' if k_dim is None else ''}vmapped and v_cache is "
            f"{'not ' if v_dim is None else ''}vmapped. Shared caches would receive every "
            "sample's entries at the same positions: fold the samples into the batch "
            "dimension B instead"
        )
    # One call per sample on views of its caches: the op writes through them in place.
    outputs = [
        _ops.attention_with_kv_cache(*(_sample(a, d, n) for a, d in zip(args, dims)))
        for n in range(info.batch_size)
    ]
    return torch.stack(outputs), 0


def register() -> None:
    """Registers the rules; called once, when qkv_attention is imported."""
    rules = {
        "attention": _composite_batched("attention", with_weights=False),
        "attention_with_weights": _composite_batched("attention_with_weights", with_weights=True),
        "_attention_forward": _attention_forward_batched,
        "_attention_backward": _attention_backward_batched,
        "_attention_dropout_mask": _dropout_mask_batched,
        "qkv_projection": _qkv_projection_batched,
        "qkv_projection_backward": _backward_batched(_ops.qkv_projection_backward),
        "merge_heads": _merge_heads_batched,
        "merge_heads_backward": _backward_batched(_ops.merge_heads_backward),
        "attention_with_kv_cache": _attention_with_kv_cache_batched,
        "attention_varlen": _attention_varlen_batched,
        "_attention_varlen_forward": _backward_batched(_ops._attention_varlen_forward),
        "_attention_varlen_backward": _backward_batched(_ops._attention_varlen_backward),
    }
    for name, rule in rules.items():
        torch.library.register_vmap(f"qkv_attention::{name}", rule)
