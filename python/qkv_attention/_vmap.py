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
- Every rule reads its arguments and their vmapped dimensions by the names of the op's schema
  (``_Call``), never by position, and the rules that loop over samples are one generic rule
  (``_per_sample_rule``).
- ``attention_with_kv_cache`` writes into its caches: the rule calls the op once per sample on
  that sample's slice of the caches (a view, so the writes land in the caller's tensors). Caches
  without the vmapped dimension would receive every sample's keys at the same positions: that
  raises, as do vmapped ``cache_seqlens`` with caches shared by the samples.
- The variable-length ops (``attention_varlen`` and its forward and backward) loop over the
  samples: each sample's packed rows come with offsets of their own.
"""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .ops import _draw_dropout_rng_state

_ops = torch.ops.qkv_attention


class _Call:
    """One call of an op inside vmap: its arguments and their vmapped dimensions (None where
    not vmapped), keyed by the names of the op's schema; arguments left out take the schema's
    defaults."""

    def __init__(self, op: Any, in_dims: Sequence[Optional[int]], args: Sequence[Any], kwargs):
        schema = op.default._schema.arguments
        self.args: Dict[str, Any] = {
            a.name: a.default_value for a in schema[len(args) :] if a.has_default_value()
        }
        self.args.update(zip((a.name for a in schema), args))
        self.args.update(kwargs)
        self.dims: Dict[str, Optional[int]] = dict(zip((a.name for a in schema), in_dims))

    def dim(self, name: str) -> Optional[int]:
        return self.dims.get(name)


def _in_order(op: Any, values: Dict[str, Any], default: Any = None) -> List[Any]:
    """``values`` as op's positional arguments, in the order of its schema."""
    return [values.get(a.name, default) for a in op.default._schema.arguments]


def _sample(arg: Any, dim: Any, n: int) -> Any:
    # An int[] argument (window_size) comes with one None per element: never vmapped.
    return arg.select(dim, n) if isinstance(dim, int) else arg


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


def _per_sample_rule(op: Callable):
    """The rule of an op that runs once per sample (see the file's opening comment)."""

    def rule(info, in_dims, *args, **kwargs):
        return _per_sample(op, info.batch_size, in_dims, args, kwargs)

    return rule


def _per_sample_call(op: Any, info: Any, call: _Call) -> Tuple[Any, Any]:
    """op once per sample on the (possibly rewritten) arguments of ``call``."""
    return _per_sample(op, info.batch_size, _in_order(op, call.dims), _in_order(op, call.args), {})


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


def _fold_alibi_slopes(
    slopes: Optional[Tensor], dim: Optional[int], n: int, batch: int
) -> Optional[Tensor]:
    """alibi_slopes, (H,) or (B, H) per sample, as (H,) or (N*B, H) for the folded batch."""
    if slopes is None or (dim is None and slopes.dim() == 1):
        return slopes  # one slope per head for every sample and batch entry
    if dim is None:
        return _fold(slopes, None, n)  # (B, H) -> (N*B, H)
    slopes = slopes.movedim(dim, 0)  # (N, H) or (N, B, H)
    if slopes.dim() == 2:
        slopes = slopes.unsqueeze(1).expand(n, batch, slopes.shape[1])
    return slopes.reshape(n * batch, slopes.shape[2])


def _random_state(op_name: str, info: Any, call: _Call) -> None:
    """Draws the rng_state a composite op draws, as vmap's randomness says, into ``call``:
    one state for every sample ("same"), or one per sample ("different", batched)."""
    dropout_p = call.args["dropout_p"]
    call.args["rng_state"], call.dims["rng_state"] = None, None
    if not dropout_p > 0:
        return
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
        state = _draw_dropout_rng_state(dropout_p, None if same else info.batch_size)
    call.args["rng_state"], call.dims["rng_state"] = state, None if same else 0


def _attention_forward_batched(info: Any, call: _Call):
    """_attention_forward's rule on a call by name (also the composite ops' after their draw)."""
    op = _ops._attention_forward
    n = info.batch_size
    args = call.args
    if args["dropout_p"] > 0 or call.dim("sinks") is not None:
        # One call per sample: each sample's mask is the one of its own call (see above); sinks
        # that differ per sample have no place in a folded batch (they are per head only).
        return _per_sample_call(op, info, call)
    query, q_dim = args["query"], call.dim("query")
    batch = query.movedim(q_dim, 0).shape[1] if q_dim is not None else query.shape[0]
    padding = args["key_padding_mask"]
    folded = dict(args)
    folded.update(
        query=_fold(query, q_dim, n),
        key=_fold(args["key"], call.dim("key"), n),
        value=_fold(args["value"], call.dim("value"), n),
        attn_mask=_fold_attn_mask(args["attn_mask"], call.dim("attn_mask"), n, batch),
        key_padding_mask=None
        if padding is None
        else _fold(padding, call.dim("key_padding_mask"), n),
        alibi_slopes=_fold_alibi_slopes(args["alibi_slopes"], call.dim("alibi_slopes"), n, batch),
        rng_state=None,
    )
    output, logsumexp, weights = op(*_in_order(op, folded))
    # (n * B, ...) -> (n, B, ...): per-head (B, H, L, S) or averaged (B, L, S) weights alike.
    need_weights = args["need_weights"]
    weights, weights_dim = (_unfold(weights, n), 0) if need_weights else (weights, None)
    return (_unfold(output, n), _unfold(logsumexp, n), weights), (0, 0, weights_dim)


def _attention_forward_rule(info, in_dims, *args, **kwargs):
    return _attention_forward_batched(info, _Call(_ops._attention_forward, in_dims, args, kwargs))


def _composite_batched(op_name: str, with_weights: bool):
    """The rule of attention / attention_with_weights: draw the dropout state as vmap's
    randomness says, then _attention_forward's rule on the same arguments by name."""
    op = getattr(_ops, op_name)

    def rule(info, in_dims, *args, **kwargs):
        call = _Call(op, in_dims, args, kwargs)
        _random_state(op_name, info, call)
        call.args["need_weights"] = with_weights
        call.args.setdefault("average_attn_weights", False)
        outputs, out_dims = _attention_forward_batched(info, call)
        if with_weights:
            return (outputs[0], outputs[2]), (out_dims[0], out_dims[2])
        return outputs[0], out_dims[0]

    return rule


def _qkv_projection_batched(info, in_dims, *args, **kwargs):
    op = _ops.qkv_projection
    call = _Call(op, in_dims, args, kwargs)
    n = info.batch_size
    parameters = ("q_weight", "k_weight", "v_weight", "q_bias", "k_bias", "v_bias")
    if any(call.dim(name) is not None for name in parameters):
        return _per_sample_call(op, info, call)
    # Fold each distinct input once: self-attention passes one tensor as query, key and value,
    # and the op recognises that (one GEMM against the stacked weights) only if it still is.
    folded: List[Tuple[Tensor, Optional[int], Tensor]] = []

    def fold_once(name: str) -> Tensor:
        t, dim = call.args[name], call.dim(name)
        for original, original_dim, result in folded:
            if original is t and original_dim == dim:
                return result
        result = _fold(t, dim, n)
        folded.append((t, dim, result))
        return result

    values = dict(call.args, query=fold_once("query"), key=fold_once("key"))
    values["value"] = fold_once("value")
    q, k, v = op(*_in_order(op, values))
    return (_unfold(q, n), _unfold(k, n), _unfold(v, n)), (0, 0, 0)


def _merge_heads_batched(info, in_dims, *args, **kwargs):
    op = _ops.merge_heads
    call = _Call(op, in_dims, args, kwargs)
    n = info.batch_size
    if call.dim("out_weight") is not None or call.dim("out_bias") is not None:
        return _per_sample_call(op, info, call)
    values = dict(call.args, x=_fold(call.args["x"], call.dim("x"), n))
    return _unfold(op(*_in_order(op, values)), n), 0


def _attention_varlen_batched(info, in_dims, *args, **kwargs):
    """attention_varlen: the dropout state as vmap's randomness says, then one
    _attention_varlen_forward call per sample (a sample's packed rows and offsets are a batch
    of their own; folding samples would need offsets rebuilt for every sample)."""
    call = _Call(_ops.attention_varlen, in_dims, args, kwargs)
    _random_state("attention_varlen", info, call)
    outputs, out_dims = _per_sample_call(_ops._attention_varlen_forward, info, call)
    return outputs[0], out_dims[0]


def _attention_with_kv_cache_batched(info, in_dims, *args, **kwargs):
    op = _ops.attention_with_kv_cache
    call = _Call(op, in_dims, args, kwargs)
    k_dim, v_dim = call.dim("k_cache"), call.dim("v_cache")
    writes = call.args["key"] is not None
    shared = k_dim is None and (writes or call.dim("cache_seqlens") is not None)
    if (k_dim is None) != (v_dim is None) or shared:
        raise RuntimeError(
            "qkv_attention.attention_with_kv_cache: vmap: k_cache and v_cache must both be "
            "vmapped (one cache per sample) when either is, when key/value are written, or when "
            "cache_seqlens is vmapped; here k_cache is "
            f"{'not ' if k_dim is None else ''}vmapped and v_cache is "
            f"{'not ' if v_dim is None else ''}vmapped. Shared caches would receive every "
            "sample's entries at the same positions: fold the samples into the batch "
            "dimension B instead"
        )
    # A quantized cache's scales are written beside it: vmapped exactly when the caches are.
    for name in ("k_cache_scale", "v_cache_scale"):
        if call.args.get(name) is not None and (call.dim(name) is None) != (k_dim is None):
            raise RuntimeError(
                f"qkv_attention.attention_with_kv_cache: vmap: {name} must be vmapped exactly "
                "when the caches are (one scale tensor per cache); here the caches are "
                f"{'not ' if k_dim is None else ''}vmapped and {name} is "
                f"{'not ' if call.dim(name) is None else ''}vmapped"
            )
    # One call per sample on views of its caches: the op writes through them in place.
    return _per_sample_call(op, info, call)


def register() -> None:
    """Registers the rules; called once, when qkv_attention is imported."""
    rules = {
        "attention": _composite_batched("attention", with_weights=False),
        "attention_with_weights": _composite_batched("attention_with_weights", with_weights=True),
        "_attention_forward": _attention_forward_rule,
        "qkv_projection": _qkv_projection_batched,
        "merge_heads": _merge_heads_batched,
        "attention_with_kv_cache": _attention_with_kv_cache_batched,
        "attention_varlen": _attention_varlen_batched,
    }
    # Ops whose samples run one call each: the backward ops (their weight and mask gradients
    # are sums over each sample's batch), the dropout mask, and the variable-length forward.
    for name in (
        "_attention_backward",
        "_attention_dropout_mask",
        "qkv_projection_backward",
        "merge_heads_backward",
        "_attention_varlen_forward",
        "_attention_varlen_backward",
    ):
        rules[name] = _per_sample_rule(getattr(_ops, name))
    for name, rule in rules.items():
        torch.library.register_vmap(f"qkv_attention::{name}", rule)
