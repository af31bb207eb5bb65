"""The bad-input matrix: every argument of every operator, of
``functional.scaled_dot_product_attention`` and of ``MultiheadAttention``, each way it can be
wrong (rank, each size that must match, dtype, mixed dtypes, meta and cpu tensors mixed, sparse /
quantized / mkldnn / nested layouts, None or a non-tensor, out-of-range and non-finite scalars).

Each case must raise a Python exception whose message names the argument: never a signal, an
abort or a hang. The cases run in a few subprocesses (a crash cannot take pytest down, and is
pinned on the case that was running); each subprocess runs many cases and reports one JSON line
per case. Every case runs three ways: with the floating inputs requiring grad (the Autograd
kernels run first), under torch.no_grad(), and under torch.inference_mode() (the Autograd keys
are skipped, so the backend kernels see the input first).

Run the cases of one op by hand: ``python tests/python/robustness/test_bad_inputs.py --list`` and
``python tests/python/robustness/test_bad_inputs.py --run ID [ID ...]``.
"""

import contextlib
import json
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import pytest
import torch

MODES = ("grad", "no_grad", "inference_mode")

# Exception types a bad input may raise. NotImplementedError (a RuntimeError subclass) is what
# an unsupported layout raises; AssertionError is what torch.nn.MultiheadAttention raises for
# many bad shapes, and our module keeps torch's types (docs/design.md section 2).
ALLOWED_EXCEPTIONS = ("RuntimeError", "TypeError", "ValueError", "IndexError", "AssertionError")


def _ops():
    import qkv_attention  # noqa: F401  (registers torch.ops.qkv_attention)

    return torch.ops.qkv_attention


# ---------------------------------------------------------------------------------------------
# Valid arguments of each op, built fresh for every case (a case may mutate what it is given).
# Sizes are all distinct and > 1 so that every size mutation is unambiguous.


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _variant_args(heads: int) -> Dict[str, Any]:
    """The four variant arguments every attention op ends with, all in use: a sliding window,
    a softcap, (H,) ALiBi slopes and (H,) sinks of the inputs' dtype."""
    return dict(
        window_size=(3, 2),
        softcap=5.0,
        alibi_slopes=torch.rand(heads) * 0.5,
        sinks=_randn(heads),
    )


def _attention_args(average: Optional[bool] = None) -> Dict[str, Any]:
    B, H, L, S, D, Dv = 2, 3, 4, 6, 5, 7
    args = dict(
        query=_randn(B, H, L, D),
        key=_randn(B, H, S, D),
        value=_randn(B, H, S, Dv),
        attn_mask=_randn(B, H, L, S),  # full size, so size + 1 cannot broadcast
        dropout_p=0.25,
        is_causal=False,
        scale=None,
        key_padding_mask=torch.rand(B, S) < 0.8,
    )
    if average is not None:
        args["average_attn_weights"] = average
    return dict(**args, **_variant_args(H))


def _attention_with_weights_args() -> Dict[str, Any]:
    return _attention_args(average=True)


def _attention_forward_args() -> Dict[str, Any]:
    a = _attention_args()
    return dict(
        query=a["query"],
        key=a["key"],
        value=a["value"],
        attn_mask=a["attn_mask"],
        key_padding_mask=a["key_padding_mask"],
        dropout_p=0.25,
        is_causal=False,
        scale=0.5,
        need_weights=True,
        rng_state=torch.tensor([123, 4], dtype=torch.long),
        average_attn_weights=False,
        **_variant_args(3),
    )


def _attention_backward_args() -> Dict[str, Any]:
    a = _attention_forward_args()
    with torch.no_grad():
        output, logsumexp, weights = _ops()._attention_forward(*a.values())
    return dict(
        grad_output=torch.randn_like(output),
        grad_weights=torch.randn_like(weights),
        query=a["query"],
        key=a["key"],
        value=a["value"],
        output=output,
        logsumexp=logsumexp,
        attn_mask=a["attn_mask"],
        key_padding_mask=a["key_padding_mask"],
        dropout_p=a["dropout_p"],
        is_causal=False,
        scale=a["scale"],
        rng_state=a["rng_state"],
        attn_mask_requires_grad=True,
        key_padding_mask_requires_grad=False,
        **{name: a[name] for name in _VARIANT_NAMES},
    )


def _dropout_mask_args() -> Dict[str, Any]:
    return dict(
        rng_state=torch.tensor([123, 4], dtype=torch.long),
        batch=2,
        heads=3,
        q_len=4,
        kv_len=6,
        dropout_p=0.25,
    )


def _attention_varlen_args() -> Dict[str, Any]:
    # Sequences of 2 and 3 queries against 4 and 2 keys; H 4, Hkv 2, D 5, Dv 7.
    return dict(
        query=_randn(5, 4, 5),
        key=_randn(6, 2, 5),
        value=_randn(6, 2, 7),
        cu_seqlens_q=torch.tensor([0, 2, 5]),
        cu_seqlens_k=torch.tensor([0, 4, 6]),
        max_seqlen_q=3,
        max_seqlen_k=4,
        dropout_p=0.25,
        is_causal=False,
        scale=None,
        **_variant_args(4),
    )


def _attention_varlen_forward_args() -> Dict[str, Any]:
    a = _attention_varlen_args()
    variants = {name: a.pop(name) for name in _VARIANT_NAMES}
    a.update(scale=0.5, rng_state=torch.tensor([123, 4], dtype=torch.long))
    return dict(**a, **variants)


def _attention_varlen_backward_args() -> Dict[str, Any]:
    a = _attention_varlen_forward_args()
    with torch.no_grad():
        output, logsumexp = _ops()._attention_varlen_forward(*a.values())
    return dict(
        grad_output=torch.randn_like(output),
        query=a["query"],
        key=a["key"],
        value=a["value"],
        output=output,
        logsumexp=logsumexp,
        cu_seqlens_q=a["cu_seqlens_q"],
        cu_seqlens_k=a["cu_seqlens_k"],
        max_seqlen_q=3,
        max_seqlen_k=4,
        dropout_p=0.25,
        is_causal=True,
        scale=0.5,
        rng_state=a["rng_state"],
        **{name: a[name] for name in _VARIANT_NAMES},
    )


def _qkv_projection_args() -> Dict[str, Any]:
    B, L, S, Eq, Ek, Ev, E, H = 2, 3, 4, 5, 6, 7, 8, 2
    return dict(
        query=_randn(B, L, Eq),
        key=_randn(B, S, Ek),
        value=_randn(B, S, Ev),
        q_weight=_randn(E, Eq),
        k_weight=_randn(E, Ek),
        v_weight=_randn(E, Ev),
        q_bias=_randn(E),
        k_bias=_randn(E),
        v_bias=_randn(E),
        num_heads=H,
    )


def _qkv_projection_backward_args() -> Dict[str, Any]:
    p = _qkv_projection_args()
    B, L, S, E, H = 2, 3, 4, 8, 2
    return dict(
        grad_q=_randn(B, H, L, E // H),
        grad_k=_randn(B, H, S, E // H),
        grad_v=_randn(B, H, S, E // H),
        query=p["query"],
        key=p["key"],
        value=p["value"],
        q_weight=p["q_weight"],
        k_weight=p["k_weight"],
        v_weight=p["v_weight"],
        num_heads=H,
    )


def _merge_heads_args() -> Dict[str, Any]:
    B, H, L, D, Eout = 2, 3, 4, 5, 6
    return dict(x=_randn(B, H, L, D), out_weight=_randn(Eout, H * D), out_bias=_randn(Eout))


def _merge_heads_backward_args() -> Dict[str, Any]:
    m = _merge_heads_args()
    return dict(grad_output=_randn(2, 4, 6), x=m["x"], out_weight=m["out_weight"])


def _kv_cache_args() -> Dict[str, Any]:
    # Room in the caches: lengths 2 and 6 plus L_new = 5 fit S_max = 11.
    B, H, Hkv, L, L_new, S_max, D, Dv = 2, 6, 3, 4, 5, 11, 7, 8
    return dict(
        query=_randn(B, H, L, D),
        k_cache=torch.zeros(B, Hkv, S_max, D),
        v_cache=torch.zeros(B, Hkv, S_max, Dv),
        key=_randn(B, Hkv, L_new, D),
        value=_randn(B, Hkv, L_new, Dv),
        cache_seqlens=torch.tensor([2, 6]),
        attn_mask=_randn(B, H, L, S_max),  # full size, so size + 1 cannot broadcast
        is_causal=True,
        scale=None,
        **_variant_args(H),
    )


def _kv_cache_quantized_args() -> Dict[str, Any]:
    """The KV-cache call with int8 caches and their float32 scales (B, Hkv, S_max)."""
    args = _kv_cache_args()
    B, Hkv, S_max, _ = args["k_cache"].shape
    args["k_cache"] = torch.zeros(args["k_cache"].shape, dtype=torch.int8)
    args["v_cache"] = torch.zeros(args["v_cache"].shape, dtype=torch.int8)
    args["k_cache_scale"] = torch.zeros(B, Hkv, S_max)
    args["v_cache_scale"] = torch.zeros(B, Hkv, S_max)
    return args


def _sdpa_args() -> Dict[str, Any]:
    return dict(
        query=_randn(2, 3, 4, 5),
        key=_randn(2, 3, 6, 5),
        value=_randn(2, 3, 6, 7),
        attn_mask=_randn(2, 3, 4, 6),
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
    )


# What may be wrong with each argument.
#   dims: the dims whose size must agree with another argument (size + 1 and size 0 are wrong).
#   rank: which ranks are wrong (a lower-rank attn_mask broadcasts and is valid).
#   mask: bool is a valid dtype.
#   optional: None is valid.
@dataclass
class TensorArg:
    dims: Sequence[int]
    rank: str = (
        "exact"  # "exact"; "at_most_4" (a broadcast mask); "at_least_2" (sdpa's (..., N, F))
    )
    mask: bool = False
    optional: bool = False
    kind: str = "float"  # "float" or "int64" (rng_state, cache_seqlens)
    # The op's only tensor: then a meta tensor is a valid (shape-only) call, and None leaves the
    # dispatcher no key to dispatch on (it raises "There were no tensor arguments", naming no
    # argument, before any kernel of ours can run).
    only_tensor: bool = False
    # Arguments whose sizes must agree with this one's, and are checked first: a size
    # mismatch may be reported under their name.
    partners: Sequence[str] = ()
    # Other dtypes that are valid (the module promotes float masks as torch's does).
    valid_dtypes: Sequence[torch.dtype] = ()
    # False for a tensor that may not require grad (alibi_slopes): the "grad" mode leaves it be.
    differentiable: bool = True


@dataclass
class ScalarArg:
    bad: Sequence[Any]  # values that must be rejected


@dataclass
class OpSpec:
    name: str  # as in torch.ops.qkv_attention, or "functional.sdpa"
    make_args: Callable[[], Dict[str, Any]]
    args: Dict[str, Any]
    names_op: Sequence[str]  # the message names the op as one of these
    call: Optional[Callable[..., Any]] = None


NAN, INF = float("nan"), float("inf")
BAD_PROBABILITY = ScalarArg([-0.1, 1.5, NAN, INF, -INF, None, "0.1", 1j])
BAD_SCALE = ScalarArg([NAN, INF, -INF, "0.5", 1j])
# torch.ops converts any Python number (even 0.5 or 1j) and None to bool; a string or a list
# it rejects.
BAD_BOOL = ScalarArg(["yes", [True]])
BAD_HEADS = ScalarArg([0, -1, -2, 3, 5, 16, 2.5, None, "2"])  # E = 8 in the projection cases
BAD_SIZE = ScalarArg([-1, -(2**40), 2.5, None, "4"])
# A bound below -1 on either side; not a pair of ints.
BAD_WINDOW = ScalarArg([(-2, 0), (0, -2), (-5, -5), (1.5, 0), (1, 2, 3), None, "(1, 1)"])
BAD_SOFTCAP = ScalarArg([-1.0, NAN, INF, -INF, None, "0.5", 1j])
# (H,) slopes and sinks (the valid ones); (B, H) slopes are valid too (test_variants.py), so no
# rank mutation can name them wrong by accident: rank+1 gives (1, H) with B = 2.
_VARIANTS = dict(
    window_size=BAD_WINDOW,
    softcap=BAD_SOFTCAP,
    alibi_slopes=TensorArg(dims=(0,), optional=True, differentiable=False),
    sinks=TensorArg(dims=(0,), optional=True),
)
_VARIANT_NAMES = tuple(_VARIANTS)

_ATTENTION_TENSORS = dict(
    query=TensorArg(dims=(0, 1, 3)),
    key=TensorArg(dims=(0, 1, 2, 3)),
    value=TensorArg(dims=(0, 1, 2)),
    attn_mask=TensorArg(dims=(0, 1, 2, 3), rank="at_most_4", mask=True, optional=True),
    key_padding_mask=TensorArg(dims=(0, 1), mask=True, optional=True),
)
_ATTENTION_NAMES = ("attention", "qkv_attention::attention")
# The packed rows of query (key) must end where cu_seqlens_q (cu_seqlens_k) does: a changed row
# count may be reported under the offsets' name.
_VARLEN_TENSORS = dict(
    query=TensorArg(dims=(0, 1, 2), partners=("cu_seqlens_q",)),
    key=TensorArg(dims=(0, 1, 2), partners=("cu_seqlens_k",)),
    value=TensorArg(dims=(0, 1)),  # Dv is free
    cu_seqlens_q=TensorArg(
        dims=(0,), kind="int64", valid_dtypes=(torch.int32,), partners=("cu_seqlens_k",)
    ),
    cu_seqlens_k=TensorArg(
        dims=(0,), kind="int64", valid_dtypes=(torch.int32,), partners=("cu_seqlens_q",)
    ),
)
_VARLEN_NAMES = (
    "attention_varlen",
    "qkv_attention::attention_varlen",
    "qkv_attention::_attention_varlen_forward",
)

OPS: List[OpSpec] = [
    OpSpec(
        "attention",
        _attention_args,
        dict(
            **_ATTENTION_TENSORS,
            dropout_p=BAD_PROBABILITY,
            is_causal=BAD_BOOL,
            scale=BAD_SCALE,
            **_VARIANTS,
        ),
        _ATTENTION_NAMES,
    ),
    OpSpec(
        "attention_with_weights",
        _attention_with_weights_args,
        dict(
            **_ATTENTION_TENSORS,
            dropout_p=BAD_PROBABILITY,
            is_causal=BAD_BOOL,
            scale=BAD_SCALE,
            average_attn_weights=BAD_BOOL,
            **_VARIANTS,
        ),
        _ATTENTION_NAMES,
    ),
    OpSpec(
        "_attention_forward",
        _attention_forward_args,
        dict(
            **_ATTENTION_TENSORS,
            dropout_p=BAD_PROBABILITY,
            is_causal=BAD_BOOL,
            scale=BAD_SCALE,
            need_weights=BAD_BOOL,
            rng_state=TensorArg(dims=(0,), kind="int64"),
            average_attn_weights=BAD_BOOL,
            **_VARIANTS,
        ),
        _ATTENTION_NAMES,
    ),
    OpSpec(
        "_attention_backward",
        _attention_backward_args,
        dict(
            grad_output=TensorArg(dims=(0, 1, 2, 3)),
            grad_weights=TensorArg(dims=(0, 1, 2, 3), optional=True),
            **{k: v for k, v in _ATTENTION_TENSORS.items()},
            output=TensorArg(dims=(0, 1, 2, 3)),
            logsumexp=TensorArg(dims=(0, 1, 2)),
            dropout_p=BAD_PROBABILITY,
            is_causal=BAD_BOOL,
            scale=BAD_SCALE,
            rng_state=TensorArg(dims=(0,), kind="int64"),
            attn_mask_requires_grad=BAD_BOOL,
            key_padding_mask_requires_grad=BAD_BOOL,
            **_VARIANTS,
        ),
        ("attention backward", "qkv_attention::_attention_backward"),
    ),
    OpSpec(
        "_attention_dropout_mask",
        _dropout_mask_args,
        dict(
            rng_state=TensorArg(dims=(0,), kind="int64", only_tensor=True),
            batch=BAD_SIZE,
            heads=BAD_SIZE,
            q_len=BAD_SIZE,
            kv_len=BAD_SIZE,
            dropout_p=BAD_PROBABILITY,
        ),
        ("attention dropout mask", "qkv_attention::_attention_dropout_mask"),
    ),
    OpSpec(
        "attention_varlen",
        _attention_varlen_args,
        dict(
            **_VARLEN_TENSORS,
            max_seqlen_q=BAD_SIZE,
            max_seqlen_k=BAD_SIZE,
            dropout_p=BAD_PROBABILITY,
            is_causal=BAD_BOOL,
            scale=BAD_SCALE,
            **_VARIANTS,
        ),
        _VARLEN_NAMES,
    ),
    OpSpec(
        "_attention_varlen_forward",
        _attention_varlen_forward_args,
        dict(
            **_VARLEN_TENSORS,
            max_seqlen_q=BAD_SIZE,
            max_seqlen_k=BAD_SIZE,
            dropout_p=BAD_PROBABILITY,
            is_causal=BAD_BOOL,
            scale=BAD_SCALE,
            rng_state=TensorArg(dims=(0,), kind="int64"),
            **_VARIANTS,
        ),
        _VARLEN_NAMES,
    ),
    OpSpec(
        "_attention_varlen_backward",
        _attention_varlen_backward_args,
        dict(
            grad_output=TensorArg(dims=(0, 1, 2)),
            **_VARLEN_TENSORS,
            output=TensorArg(dims=(0, 1, 2)),
            logsumexp=TensorArg(dims=(0, 1)),
            max_seqlen_q=BAD_SIZE,
            max_seqlen_k=BAD_SIZE,
            dropout_p=BAD_PROBABILITY,
            is_causal=BAD_BOOL,
            scale=BAD_SCALE,
            rng_state=TensorArg(dims=(0,), kind="int64"),
            **_VARIANTS,
        ),
        ("attention_varlen backward", "qkv_attention::_attention_varlen_backward"),
    ),
    OpSpec(
        "qkv_projection",
        _qkv_projection_args,
        dict(
            query=TensorArg(dims=(0, 2)),
            key=TensorArg(dims=(0, 1, 2)),
            value=TensorArg(dims=(0, 1, 2)),
            q_weight=TensorArg(dims=(0, 1)),
            k_weight=TensorArg(dims=(0, 1)),
            v_weight=TensorArg(dims=(0, 1)),
            q_bias=TensorArg(dims=(0,), optional=True),
            k_bias=TensorArg(dims=(0,), optional=True),
            v_bias=TensorArg(dims=(0,), optional=True),
            num_heads=BAD_HEADS,
        ),
        ("qkv_projection",),
    ),
    OpSpec(
        "qkv_projection_backward",
        _qkv_projection_backward_args,
        dict(
            grad_q=TensorArg(dims=(0, 1, 2, 3), optional=True),
            grad_k=TensorArg(dims=(0, 1, 2, 3), optional=True),
            grad_v=TensorArg(dims=(0, 1, 2, 3), optional=True),
            query=TensorArg(dims=(0, 2)),
            key=TensorArg(dims=(0, 1, 2)),
            value=TensorArg(dims=(0, 1, 2)),
            q_weight=TensorArg(dims=(0, 1)),
            k_weight=TensorArg(dims=(0, 1)),
            v_weight=TensorArg(dims=(0, 1)),
            num_heads=BAD_HEADS,
        ),
        ("qkv_projection backward", "qkv_attention::qkv_projection_backward"),
    ),
    OpSpec(
        "merge_heads",
        _merge_heads_args,
        dict(
            x=TensorArg(dims=(1, 3)),
            out_weight=TensorArg(dims=(0, 1)),
            out_bias=TensorArg(dims=(0,), optional=True),
        ),
        ("merge_heads",),
    ),
    OpSpec(
        "merge_heads_backward",
        _merge_heads_backward_args,
        dict(
            grad_output=TensorArg(dims=(0, 1, 2)),
            x=TensorArg(dims=(0, 1, 2, 3)),
            out_weight=TensorArg(dims=(0, 1)),
        ),
        ("merge_heads backward", "qkv_attention::merge_heads_backward"),
    ),
    OpSpec(
        "attention_with_kv_cache",
        _kv_cache_args,
        dict(
            query=TensorArg(dims=(0, 1, 3)),
            k_cache=TensorArg(dims=(0, 1, 2, 3)),
            v_cache=TensorArg(dims=(0, 1, 2, 3)),
            key=TensorArg(dims=(0, 1, 2, 3), optional=True),
            value=TensorArg(dims=(0, 1, 2, 3), optional=True),
            cache_seqlens=TensorArg(
                dims=(0,), kind="int64", optional=True, valid_dtypes=(torch.int32,)
            ),
            attn_mask=TensorArg(dims=(0, 1, 2, 3), rank="at_most_4", mask=True, optional=True),
            is_causal=BAD_BOOL,
            scale=BAD_SCALE,
            **_VARIANTS,
        ),
        ("attention_with_kv_cache",),
    ),
    # The same op with int8 caches: their scales, float32 (B, Hkv, S_max). Optional in the
    # schema (float caches take none); None with quantized caches is an error of
    # ops/test_kv_cache_quantized.py's table. The other arguments are the float-cache spec's.
    OpSpec(
        "attention_with_kv_cache",
        _kv_cache_quantized_args,
        dict(
            k_cache_scale=TensorArg(dims=(0, 1, 2), optional=True, partners=("v_cache_scale",)),
            v_cache_scale=TensorArg(dims=(0, 1, 2), optional=True, partners=("k_cache_scale",)),
        ),
        ("attention_with_kv_cache",),
    ),
    OpSpec(
        "functional.sdpa",
        _sdpa_args,
        dict(
            query=TensorArg(dims=(0, 1, 3), rank="at_least_2"),
            # A different S no longer fits the (full-size) mask, checked first.
            key=TensorArg(dims=(0, 1, 2, 3), rank="at_least_2", partners=("attn_mask",)),
            value=TensorArg(dims=(0, 1, 2), rank="at_least_2"),
            attn_mask=TensorArg(dims=(0, 1, 2, 3), rank="at_most_4", mask=True, optional=True),
            dropout_p=BAD_PROBABILITY,
            is_causal=BAD_BOOL,
            scale=BAD_SCALE,
        ),
        ("scaled_dot_product_attention", "attention"),
        call=lambda *a: __import__("qkv_attention").functional.scaled_dot_product_attention(*a),
    ),
]


# ---------------------------------------------------------------------------------------------
# Mutations: (label, function of the valid argument -> the bad one).


def _resize(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size
    if t.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    return torch.randn(shape).to(t.dtype)


def _nested(t: torch.Tensor) -> torch.Tensor:
    return torch.nested.nested_tensor(list(t.unbind(0)))


def tensor_mutations(arg: TensorArg, valid: torch.Tensor):
    other_float = torch.float64 if valid.dtype != torch.float64 else torch.float32
    if not arg.optional and not arg.only_tensor:
        yield "None", lambda t: None
    yield "python_list", lambda t: [1.0, 2.0]
    yield "string", lambda t: "not a tensor"
    if arg.rank == "exact":
        yield "rank+1", lambda t: t.unsqueeze(0)
        yield "rank-1", lambda t: t[0]
    if arg.rank == "at_most_4":
        yield "rank5", lambda t: t.reshape(1, *t.shape).expand(2, *t.shape)
    if arg.rank != "at_most_4":  # a 0-d or 1-D mask broadcasts
        yield "0-d", lambda t: t.reshape(-1)[0].clone()
        yield "empty_1d", lambda t: t.new_empty(0)
    for d in arg.dims:
        yield f"dim{d}_size+1", lambda t, d=d: _resize(t, d, t.size(d) + 1)
        yield f"dim{d}_size0", lambda t, d=d: _resize(t, d, 0)
    if arg.kind == "int64":
        for dtype in (torch.int32, torch.float32, torch.float64):
            if dtype not in arg.valid_dtypes:
                yield f"dtype_{dtype}", lambda t, dtype=dtype: t.to(dtype)
    else:
        bad_dtypes = [
            torch.int64,
            torch.int32,
            torch.uint8,
            torch.int8,
            torch.complex64,
            other_float,
            torch.float16,
        ]
        if not arg.mask:
            bad_dtypes.append(torch.bool)
        for dtype in bad_dtypes:
            if dtype not in arg.valid_dtypes:
                yield f"dtype_{dtype}", lambda t, dtype=dtype: t.to(dtype)
    if not arg.only_tensor:
        yield "meta", lambda t: t.to("meta")
    yield "sparse_coo", lambda t: t.to_sparse()
    if valid.dim() >= 2:
        # Batched CSR needs the same number of nonzeros in every batch entry: no zeros.
        yield "sparse_csr", lambda t: torch.where(t == 0, torch.ones_like(t), t).to_sparse_csr()
        yield "nested", _nested
    if valid.dtype == torch.float32:
        yield "mkldnn", lambda t: t.to_mkldnn()
        yield "quantized", lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)


@dataclass
class Case:
    id: str
    op: str
    arg: str
    mutation: str
    mode: str
    must_name: Sequence[str]  # the message names the argument (one of these words)
    names_op: Sequence[str] = field(default_factory=tuple)


def _word(name: str) -> str:
    return rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])"


def build_op_cases() -> List[Case]:
    cases = []
    for spec in OPS:
        valid = spec.make_args()
        for arg_name, arg in spec.args.items():
            if isinstance(arg, TensorArg):
                labels = [label for label, _ in tensor_mutations(arg, valid[arg_name])]
            else:
                labels = [repr(value) for value in arg.bad]
            for label in labels:
                names = (arg_name,)
                if label.startswith("dim") and isinstance(arg, TensorArg):
                    names += tuple(arg.partners)
                for mode in MODES:
                    cases.append(
                        Case(
                            f"{spec.name}/{arg_name}/{label}/{mode}",
                            spec.name,
                            arg_name,
                            label,
                            mode,
                            names,
                            spec.names_op,
                        )
                    )
    return cases


# -- MultiheadAttention: constructor and forward arguments --------------------------------------

E_MODULE, H_MODULE = 8, 2


def _module(**overrides):
    import qkv_attention

    config = dict(embed_dim=E_MODULE, num_heads=H_MODULE)
    config.update(overrides)
    return qkv_attention.MultiheadAttention(**config)


def _module_forward_args() -> Dict[str, Any]:
    L, S, N = 3, 5, 2
    return dict(
        query=_randn(L, N, E_MODULE),
        key=_randn(S, N, E_MODULE),
        value=_randn(S, N, E_MODULE),
        key_padding_mask=torch.zeros(N, S, dtype=torch.bool),
        need_weights=True,
        attn_mask=torch.zeros(L, S, dtype=torch.bool),
        average_attn_weights=True,
        is_causal=False,
    )


MODULE_FORWARD_ARGS = dict(
    # (L, N, E): N and E must match key's and the module's; L must match attn_mask's (L, S),
    # which torch's module checks first.
    query=TensorArg(dims=(0, 1, 2), partners=("attn_mask",)),
    key=TensorArg(dims=(0, 1, 2)),
    value=TensorArg(dims=(0, 1, 2)),
    # A float16 mask with a float32 query is valid: torch's module promotes the masks' dtypes
    # (a bool mask counts as the query's dtype) and the sum must be the query's dtype.
    key_padding_mask=TensorArg(
        dims=(0, 1), mask=True, optional=True, valid_dtypes=(torch.float16,)
    ),
    attn_mask=TensorArg(dims=(0, 1), mask=True, optional=True, valid_dtypes=(torch.float16,)),
)

# Constructor arguments and the values each must reject. dropout is read by the forward in
# training mode (as in torch), so a bad dropout is checked by a forward in training mode.
MODULE_CONSTRUCTOR_BAD = dict(
    embed_dim=[0, -8, None, "8"],
    num_heads=[0, -2, 3, None, "2"],
    kdim=[-5, "5"],  # 0 is valid (as in torch): keys of no features
    vdim=[-5, "5"],
    dropout=[-0.1, 1.5, NAN, INF],
)


def build_module_cases() -> List[Case]:
    cases = []
    valid = _module_forward_args()
    for arg_name, arg in MODULE_FORWARD_ARGS.items():
        for label, _ in tensor_mutations(arg, valid[arg_name]):
            names = (arg_name,) + (tuple(arg.partners) if label.startswith("dim") else ())
            for mode in MODES:
                cases.append(
                    Case(
                        f"MultiheadAttention.forward/{arg_name}/{label}/{mode}",
                        "MultiheadAttention.forward",
                        arg_name,
                        label,
                        mode,
                        names,
                    )
                )
    for arg_name, values in MODULE_CONSTRUCTOR_BAD.items():
        for value in values:
            # A bad dropout reaches the operator, whose message calls it dropout_p.
            names = (arg_name, "dropout_p") if arg_name == "dropout" else (arg_name,)
            cases.append(
                Case(
                    f"MultiheadAttention/{arg_name}/{value!r}/grad",
                    "MultiheadAttention",
                    arg_name,
                    repr(value),
                    "grad",
                    names,
                )
            )
    # is_causal=True needs attn_mask (torch's rule): the message names attn_mask.
    for mode in MODES:
        cases.append(
            Case(
                f"MultiheadAttention.forward/is_causal/True-without-attn_mask/{mode}",
                "MultiheadAttention.forward",
                "is_causal",
                "True-without-attn_mask",
                mode,
                ("attn_mask",),
            )
        )
    return cases


# -- Sizes whose products overflow int64 or every allocator: any clean exception will do ---------

RESOURCE_CASES = {
    # Expanded (2^16, 2^16, 2^16, 1) inputs cost nothing; the (B, H, L, 1) output would need
    # 2^50 bytes, beyond any address space (so no allocation can succeed lazily and be touched).
    "attention/output_of_2^50_bytes": lambda ops: ops.attention(
        *(torch.zeros(1, 1, 1, 1).expand(2**16, 2**16, 2**16, 1),) * 3
    ),
    "attention_with_weights/output_of_2^50_bytes": lambda ops: ops.attention_with_weights(
        *(torch.zeros(1, 1, 1, 1).expand(2**16, 2**16, 2**16, 1),) * 3
    ),
    "qkv_projection/output_of_2^50_bytes": lambda ops: ops.qkv_projection(
        *(torch.zeros(1, 1, 1).expand(2**24, 2**24, 1),) * 3,
        *(torch.zeros(4, 1),) * 3,
        None,
        None,
        None,
        2,
    ),
    "attention_with_kv_cache/output_of_2^50_bytes": lambda ops: ops.attention_with_kv_cache(
        torch.zeros(1, 1, 1, 1).expand(2**16, 2**16, 2**16, 1),
        *(torch.zeros(1, 1, 1, 1).expand(2**16, 2**16, 1, 1),) * 2,
    ),
    "_attention_dropout_mask/2^62_bytes": lambda ops: ops._attention_dropout_mask(
        torch.zeros(2, dtype=torch.long), 2**31, 2**31, 1, 1, 0.5
    ),
    "_attention_dropout_mask/size_overflows_int64": lambda ops: ops._attention_dropout_mask(
        torch.zeros(2, dtype=torch.long), 2**40, 2**40, 1, 1, 0.5
    ),
}


# ---------------------------------------------------------------------------------------------
# Running one case (inside the worker subprocess).


def _mode_context(mode: str):
    if mode == "no_grad":
        return torch.no_grad()
    if mode == "inference_mode":
        return torch.inference_mode()
    return contextlib.nullcontext()


def _require_grad(value, mode: str):
    """In "grad" mode every floating-point tensor argument requires grad (when it can)."""
    if mode != "grad" or not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point() and not value.is_quantized:
        try:
            return value.detach().requires_grad_(True)
        except RuntimeError:
            return value
    return value


def _op_case_call(case: Case) -> Callable[[], Any]:
    spec = next(s for s in OPS if s.name == case.op and case.arg in s.args)
    args = spec.make_args()
    arg = spec.args[case.arg]
    if isinstance(arg, TensorArg):
        mutate = dict(tensor_mutations(arg, args[case.arg]))[case.mutation]
        args[case.arg] = mutate(args[case.arg])
    else:
        args[case.arg] = next(v for v in arg.bad if repr(v) == case.mutation)
    args = {
        k: _require_grad(v, case.mode)
        if not isinstance(spec.args.get(k), TensorArg) or spec.args[k].differentiable
        else v
        for k, v in args.items()
    }
    op = spec.call or getattr(_ops(), case.op)
    return lambda: op(*args.values())


def _module_case_call(case: Case) -> Callable[[], Any]:
    if case.op == "MultiheadAttention":
        value = next(v for v in MODULE_CONSTRUCTOR_BAD[case.arg] if repr(v) == case.mutation)
        if case.arg == "dropout":

            def call():
                module = _module(dropout=value).train()
                return module(*_module_forward_args().values())

            return call
        if case.arg in ("kdim", "vdim"):
            return lambda: _module(**{case.arg: value})
        return lambda: _module(**{case.arg: value})
    module = _module()
    if case.mode != "grad":
        module.requires_grad_(False)
    args = _module_forward_args()
    if case.arg == "is_causal":
        args.update(is_causal=True, attn_mask=None)
    else:
        mutate = dict(tensor_mutations(MODULE_FORWARD_ARGS[case.arg], args[case.arg]))
        args[case.arg] = mutate[case.mutation](args[case.arg])
    args = {k: _require_grad(v, case.mode) for k, v in args.items()}
    return lambda: module(**args)


def run_case(case: Case) -> Dict[str, Any]:
    torch.manual_seed(0)  # the same inputs (and dropout draws) in every run
    with warnings.catch_warnings(), _mode_context(case.mode):
        warnings.simplefilter("ignore")  # sparse CSR / nested "prototype" warnings
        try:  # building the bad input must not be what raises
            call = (
                _module_case_call(case)
                if case.op.startswith("MultiheadAttention")
                else _op_case_call(case)
            )
        except Exception as error:  # noqa: BLE001
            return dict(setup_error=f"{type(error).__name__}: {error}")
        try:
            call()
        except Exception as error:  # noqa: BLE001  (the point is to see what is raised)
            return dict(
                raised=type(error).__name__,
                bases=[c.__name__ for c in type(error).__mro__],
                message=str(error),
            )
    return dict(raised=None)


def run_resource_case(name: str) -> Dict[str, Any]:
    try:
        RESOURCE_CASES[name](_ops())
    except Exception as error:  # noqa: BLE001
        return dict(
            raised=type(error).__name__,
            bases=[c.__name__ for c in type(error).__mro__],
            message=str(error),
        )
    return dict(raised=None)


def all_cases() -> Dict[str, Case]:
    import qkv_attention

    cases = build_op_cases()
    if hasattr(qkv_attention, "MultiheadAttention"):
        cases += build_module_cases()
    return {case.id: case for case in cases}


def worker_main(ids: List[str]) -> None:
    """Runs the given case ids in order, printing a "start" line before each and its result
    after it, so that the parent can pin a crash or a hang on the case that was running."""
    cases = all_cases()
    for case_id in ids:
        print(json.dumps(dict(id=case_id, start=True)), flush=True)
        if case_id.startswith("resource:"):
            result = run_resource_case(case_id[len("resource:") :])
        else:
            result = run_case(cases[case_id])
        print(json.dumps(dict(id=case_id, **result)), flush=True)


# ---------------------------------------------------------------------------------------------
# The parent side: run every case in a few subprocesses, restarting after a crash or a hang.

BATCHES = 3
IMPORT_SECONDS = 120  # a cold start of torch on a busy machine
SECONDS_PER_CASE = 0.5  # cases take milliseconds; far slower means a hang


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def _run_batch(ids: List[str]) -> Dict[str, Dict[str, Any]]:
    """Runs `ids` in a worker subprocess; after a crash or a hang (killed at the time limit) the
    case that was running is recorded as such and a fresh worker takes the rest."""
    results: Dict[str, Dict[str, Any]] = {}
    remaining = list(ids)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    while remaining:
        timeout = IMPORT_SECONDS + SECONDS_PER_CASE * len(remaining)
        try:
            done = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--run-stdin"],
                input="\n".join(remaining),
                capture_output=True,
                text=True,
                env=env,
                timeout=timeout,
            )
            stdout, stderr, how = done.stdout, done.stderr, f"exit status {done.returncode}"
        except subprocess.TimeoutExpired as expired:
            stdout, stderr = _text(expired.stdout), _text(expired.stderr)
            how = f"hung: killed after {timeout:.0f} s"
        running = None
        for line in stdout.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("start"):
                    running = record["id"]
                else:
                    results[record["id"]] = record
                    running = None
        remaining = [i for i in remaining if i not in results]
        if remaining:
            # The worker stopped early: blame the case it was running (or the next one).
            culprit = running or remaining[0]
            results[culprit] = dict(
                id=culprit, crashed=f"the worker died ({how})", stderr=stderr[-3000:]
            )
            remaining.remove(culprit)
    return results


_RESULTS: Dict[str, Dict[str, Any]] = {}


def _results() -> Dict[str, Dict[str, Any]]:
    if not _RESULTS:
        ids = list(ALL_CASES) + [f"resource:{name}" for name in RESOURCE_CASES]
        batches = [ids[i::BATCHES] for i in range(BATCHES)]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=BATCHES) as pool:
            for batch_results in pool.map(_run_batch, batches):
                _RESULTS.update(batch_results)
    return _RESULTS


if __name__ != "__main__":
    ALL_CASES = all_cases()


def _check_raised_cleanly(result: Dict[str, Any]) -> None:
    assert "crashed" not in result, f"{result['crashed']}\n{result.get('stderr', '')}"
    assert "setup_error" not in result, f"the bad input could not be built: {result['setup_error']}"
    assert result["raised"] is not None, "no exception was raised"
    assert set(result["bases"]) & set(ALLOWED_EXCEPTIONS), (
        f"raised {result['raised']} (bases {result['bases']}), not one of {ALLOWED_EXCEPTIONS}: "
        f"{result['message']}"
    )


def _case_params():
    if __name__ == "__main__":
        return []
    return list(ALL_CASES)


@pytest.mark.parametrize("case_id", _case_params())
def test_bad_input_raises_an_exception_naming_the_argument(case_id):
    case = ALL_CASES[case_id]
    result = _results()[case_id]
    _check_raised_cleanly(result)
    message = result["message"]
    assert any(re.search(_word(name), message) for name in case.must_name), (
        f"the message does not name {case.must_name}: {result['raised']}: {message}"
    )
    if case.names_op:
        assert any(name in message for name in case.names_op), (
            f"the message does not name the op ({case.names_op}): {message}"
        )
    if (
        case.mutation.startswith("dtype_")
        and case.op != "functional.sdpa"
        and not case.op.startswith("MultiheadAttention")
    ):
        # docs/design.md section 2: a wrong dtype raises TypeError (torch's convention for
        # dtype errors).
        assert "TypeError" in result["bases"], f"{result['raised']} for a dtype error: {message}"
    if case.mutation.startswith("dtype_") and case.op == "functional.sdpa":
        # The drop-in raises what torch's function raises for a wrong dtype (RuntimeError),
        # as a class that is our ops' TypeError too.
        assert {"RuntimeError", "TypeError"} <= set(result["bases"]), (
            f"{result['raised']} (bases {result['bases']}) for a dtype error: {message}"
        )


# The ops.py wrapper of each op whose required tensors it checks for None.
_WRAPPED_OPS = (
    "attention",
    "attention_with_weights",
    "attention_varlen",
    "qkv_projection",
    "merge_heads",
    "attention_with_kv_cache",
)


def _none_cases():
    if __name__ == "__main__":
        return []
    cases = []
    for spec in OPS:
        if spec.name in _WRAPPED_OPS:
            for arg_name, arg in spec.args.items():
                if isinstance(arg, TensorArg) and not arg.optional:
                    cases.append(f"{spec.name}/{arg_name}")
    return cases


@pytest.mark.parametrize("case", _none_cases())
def test_python_wrapper_refuses_none_for_a_required_tensor_with_a_type_error(case):
    """``qkv_attention.ops.attention(q, None, v)``: a TypeError naming the argument, as for any
    other wrong type (the dispatcher itself would pass None on as an undefined tensor)."""
    import qkv_attention

    op_name, arg_name = case.split("/")
    spec = next(s for s in OPS if s.name == op_name and arg_name in s.args)
    args = spec.make_args()
    args[arg_name] = None
    with pytest.raises(TypeError, match=rf"{op_name}: {arg_name} must be a Tensor, but got None"):
        getattr(qkv_attention.ops, op_name)(**args)


def test_functional_names_enable_gqa_for_fewer_key_value_heads():
    from qkv_attention.functional import scaled_dot_product_attention

    args = _sdpa_args()
    args["query"] = _randn(2, 6, 4, 5)  # 6 query heads, 3 key/value heads, no enable_gqa
    with pytest.raises(RuntimeError, match=r"enable_gqa=True"):
        scaled_dot_product_attention(**args)


@pytest.mark.parametrize("op", ["attention", "attention_with_weights"])
def test_heads_third_layout_gets_a_hint_to_transpose(op):
    """(B, L, H, D) given where (B, H, L, D) is expected (a common layout mistake): the message
    says so and names the fix, instead of only reporting a grouped-query mismatch."""
    ops = torch.ops.qkv_attention
    q, k, v = _randn(2, 10, 4, 8), _randn(2, 7, 4, 8), _randn(2, 7, 4, 8)  # (B, L|S, H, D)
    with pytest.raises(RuntimeError, match=r"laid out \(B, L, H, D\).*transpose\(1, 2\)"):
        getattr(ops, op)(q, k, v)
    # The same heads counts in (B, H, L, D) order with a real grouped-query mismatch: no hint.
    with pytest.raises(RuntimeError, match=r"must be a multiple of key's \(grouped-query") as e:
        getattr(ops, op)(_randn(2, 3, 5, 8), _randn(2, 2, 7, 8), _randn(2, 2, 7, 8))
    assert "transpose" not in str(e.value)


def test_registered_op_refuses_an_undefined_required_tensor_with_a_type_error():
    """The dispatcher passes None for a required tensor on as an undefined tensor: the op's own
    check raises TypeError (what Python raises for a missing argument) naming it."""
    ops = torch.ops.qkv_attention
    q = _randn(2, 4, 5, 8)
    with pytest.raises(TypeError, match=r"attention: key is an undefined tensor \(None\)"):
        ops.attention(q, None, q)


@pytest.mark.parametrize("name", list(RESOURCE_CASES))
def test_impossible_sizes_raise_cleanly(name):
    """Sizes whose byte count overflows int64 or exceeds any allocator: an exception (any
    message; these are resource limits, not a wrong argument), never a crash."""
    _check_raised_cleanly(_results()[f"resource:{name}"])


def test_matrix_covers_every_argument_of_every_op():
    """Every argument in every registered schema of the library has cases (so a new argument
    cannot be added without joining the matrix)."""
    import qkv_attention  # noqa: F401

    covered = {(c.op, c.arg) for c in ALL_CASES.values()}
    for spec in OPS:
        if spec.name.startswith("functional"):
            continue
        schema = getattr(torch.ops.qkv_attention, spec.name).default._schema
        for argument in schema.arguments:
            assert (spec.name, argument.name) in covered, (spec.name, argument.name)
    registered = {
        name
        for name in dir(torch.ops.qkv_attention)
        if isinstance(getattr(torch.ops.qkv_attention, name), torch._ops.OpOverloadPacket)
    }
    assert registered <= {spec.name for spec in OPS}, registered - {s.name for s in OPS}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--list"]:
        for case_id in all_cases():
            print(case_id)
    elif sys.argv[1:2] == ["--run"]:
        worker_main(sys.argv[2:])
    elif sys.argv[1:2] == ["--run-stdin"]:
        worker_main([line for line in sys.stdin.read().split("\n") if line])
    else:
        sys.exit(__doc__)
