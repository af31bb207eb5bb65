"""The cases of ``python -m qkv_attention.check``, in one place for the tool and the tests.

``gradient_cases()``: every differentiable operator (and the options that change its math) as a
function and a maker of small float64 inputs, for gradcheck and gradgradcheck.
``parity_configs()``: ways to build and call ``MultiheadAttention``, each compared with
``torch.nn.MultiheadAttention`` from the same state_dict and inputs (``make_call``,
``forward_backward``, ``max_abs_difference``). ``tests/python`` runs these cases too
(``test_ops_gradcheck.py``, ``test_check_tool.py``) rather than writing them again.
This module depends on the installed package only.
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import functional, ops

F64 = torch.float64


@dataclass(frozen=True)
class GradientCase:
    """One operator call to differentiate: ``function(*make_inputs(generator))``."""

    name: str
    function: Callable[..., object]
    make_inputs: Callable[[torch.Generator], Tuple[Tensor, ...]]


def _randn(generator: torch.Generator, *shape: int, grad: bool = True) -> Tensor:
    return torch.randn(*shape, generator=generator, dtype=F64).requires_grad_(grad)


def _seeded(function: Callable[..., object], seed: int = 1234) -> Callable[..., object]:
    """Runs ``function`` with torch's generator seeded, without disturbing the caller's stream.

    gradcheck calls the function many times; dropout must draw the same mask every time for
    finite differences to make sense.
    """

    def wrapped(*args):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return function(*args)

    return wrapped


# Small shapes: finite differences cost one call per input element (two levels deep for
# gradgradcheck). B=2 and H=2 both > 1 so that batch and head strides are exercised; L != S and
# D != Dv so that transposed dimensions cannot hide.
_B, _H, _L, _S, _D, _DV = 2, 2, 2, 3, 2, 3


def _qkv(g: torch.Generator) -> Tuple[Tensor, Tensor, Tensor]:
    return _randn(g, _B, _H, _L, _D), _randn(g, _B, _H, _S, _D), _randn(g, _B, _H, _S, _DV)


def _bool_mask_with_empty_row(g: torch.Generator) -> Tensor:
    """(L, S) bool, True = may attend; query row 1 may attend to nothing (gives zeros)."""
    mask = torch.rand(_L, _S, generator=g) < 0.6
    mask[0, 0] = True
    mask[1, :] = False
    return mask


def _padding_bool(g: torch.Generator) -> Tensor:
    """(B, S) bool, True = may attend; batch 1 loses its last key."""
    mask = torch.ones(_B, _S, dtype=torch.bool)
    mask[1, -1] = False
    return mask


def _attention_forward_outputs(q, k, v, need_weights=True, **kw):
    """_attention_forward's differentiable outputs: the output and (if asked) the weights."""
    dropout_p = kw.get("dropout_p", 0.0)
    out, _lse, weights = torch.ops.qkv_attention._attention_forward(
        q,
        k,
        v,
        kw.get("attn_mask"),
        kw.get("key_padding_mask"),
        dropout_p,
        kw.get("is_causal", False),
        kw.get("scale"),
        need_weights,
        ops._draw_dropout_rng_state(dropout_p),
    )
    return (out, weights) if need_weights else out


def _attention_backward_of(q, k, v, grad_out, grad_weights, variants=None, **kw):
    """Runs the forward without autograd, then differentiates through _attention_backward.
    ``variants``: the four variant arguments (window_size, softcap, alibi_slopes, sinks) as
    keywords, given to both ops; with sinks, their gradient is returned too."""
    variants = variants or {}
    dropout_p = kw.get("dropout_p", 0.0)
    rng = ops._draw_dropout_rng_state(dropout_p)
    with torch.no_grad():
        out, lse, _w = torch.ops.qkv_attention._attention_forward(
            q,
            k,
            v,
            kw.get("attn_mask"),
            None,
            dropout_p,
            kw.get("is_causal", False),
            None,
            False,
            rng,
            **variants,
        )
    grads = torch.ops.qkv_attention._attention_backward(
        grad_out,
        grad_weights,
        q,
        k,
        v,
        out,
        lse,
        kw.get("attn_mask"),
        None,
        kw.get("dropout_p", 0.0),
        kw.get("is_causal", False),
        None,
        rng,
        False,
        False,
        **variants,
    )
    # (grad_query, grad_key, grad_value), and grad_sinks; no mask gradients asked for
    return grads[:3] + ((grads[5],) if variants.get("sinks") is not None else ())


def gradient_cases() -> List[GradientCase]:
    """Every differentiable operator, with the options that change its math."""
    att = ops.attention
    attw = ops.attention_with_weights
    cases = [
        GradientCase("attention", lambda q, k, v: att(q, k, v), _qkv),
        GradientCase(
            "attention: bool mask, an empty row",
            lambda q, k, v, m: att(q, k, v, m),
            lambda g: (*_qkv(g), _bool_mask_with_empty_row(g)),
        ),
        GradientCase(
            "attention: float mask (B,1,L,S) with grad",
            lambda q, k, v, m: att(q, k, v, m),
            lambda g: (*_qkv(g), _randn(g, _B, 1, _L, _S)),
        ),
        GradientCase(
            "attention: bool key_padding_mask",
            lambda q, k, v, p: att(q, k, v, key_padding_mask=p),
            lambda g: (*_qkv(g), _padding_bool(g)),
        ),
        GradientCase(
            "attention: float key_padding_mask with grad + bool mask",
            lambda q, k, v, p, m: att(q, k, v, m, key_padding_mask=p),
            lambda g: (*_qkv(g), _randn(g, _B, _S), torch.rand(_L, _S, generator=g) < 0.7),
        ),
        GradientCase(
            "attention: is_causal, scale=0.7",
            lambda q, k, v: att(q, k, v, is_causal=True, scale=0.7),
            _qkv,
        ),
        GradientCase(
            "attention: dropout 0.4 (seeded)",
            _seeded(lambda q, k, v: att(q, k, v, dropout_p=0.4)),
            _qkv,
        ),
        GradientCase("attention_with_weights", lambda q, k, v: attw(q, k, v), _qkv),
        GradientCase(
            "attention_with_weights: float mask + padding + causal",
            lambda q, k, v, m, p: attw(q, k, v, m, is_causal=True, key_padding_mask=p),
            lambda g: (*_qkv(g), _randn(g, _H, _L, _S), _randn(g, _B, _S)),
        ),
        GradientCase(
            "attention_with_weights: dropout 0.3 (seeded)",
            _seeded(lambda q, k, v: attw(q, k, v, dropout_p=0.3)),
            _qkv,
        ),
        GradientCase(
            "attention: window (1, 0) causal, softcap, ALiBi, sinks",
            lambda q, k, v, sinks: att(
                q,
                k,
                v,
                is_causal=True,
                window_size=(1, 0),
                softcap=2.0,
                alibi_slopes=torch.tensor([0.25, 0.5], dtype=F64),
                sinks=sinks,
            ),
            lambda g: (*_qkv(g), _randn(g, _H)),
        ),
        GradientCase(
            "attention_with_weights: window (0, 1), sinks, float mask, averaged",
            lambda q, k, v, m, sinks: attw(
                q, k, v, m, window_size=(0, 1), sinks=sinks, average_attn_weights=True
            ),
            lambda g: (*_qkv(g), _randn(g, _B, 1, _L, _S), _randn(g, _H)),
        ),
        GradientCase(
            "_attention_forward: output and weights",
            lambda q, k, v: _attention_forward_outputs(q, k, v),
            _qkv,
        ),
        GradientCase(
            "_attention_backward",
            lambda q, k, v, go, gw: _attention_backward_of(q, k, v, go, gw),
            lambda g: (*_qkv(g), _randn(g, _B, _H, _L, _DV), _randn(g, _B, _H, _L, _S)),
        ),
        GradientCase(
            "_attention_backward: causal, dropout 0.3 (seeded)",
            _seeded(
                lambda q, k, v, go: _attention_backward_of(
                    q, k, v, go, None, is_causal=True, dropout_p=0.3
                )
            ),
            lambda g: (*_qkv(g), _randn(g, _B, _H, _L, _DV)),
        ),
        GradientCase(
            "_attention_backward: window, softcap, ALiBi, sinks",
            lambda q, k, v, go, sinks: _attention_backward_of(
                q,
                k,
                v,
                go,
                None,
                variants=dict(
                    window_size=(1, 1),
                    softcap=2.0,
                    alibi_slopes=torch.tensor([0.5, 0.25], dtype=F64),
                    sinks=sinks,
                ),
            ),
            lambda g: (*_qkv(g), _randn(g, _B, _H, _L, _DV), _randn(g, _H)),
        ),
    ]

    # qkv_projection: E = 4 features split into 2 heads; query, key and value of different
    # widths (kdim/vdim) and lengths (L=2, S=3).
    def projection_inputs(g, bias=True):
        tensors = [
            _randn(g, _B, _L, 3),
            _randn(g, _B, _S, 5),
            _randn(g, _B, _S, 2),
            _randn(g, 4, 3),
            _randn(g, 4, 5),
            _randn(g, 4, 2),
        ]
        if bias:
            tensors += [_randn(g, 4), _randn(g, 4), _randn(g, 4)]
        return tuple(tensors)

    cases += [
        GradientCase(
            "qkv_projection: biases, kdim/vdim",
            lambda *t: ops.qkv_projection(*t, 2),
            projection_inputs,
        ),
        GradientCase(
            "qkv_projection: no biases",
            lambda x, y, z, wq, wk, wv: ops.qkv_projection(
                x, y, z, wq, wk, wv, None, None, None, 2
            ),
            lambda g: projection_inputs(g, bias=False),
        ),
        GradientCase(
            "qkv_projection: self-attention (one input thrice)",
            lambda x, w, b: ops.qkv_projection(x, x, x, w[0], w[1], w[2], b[0], b[1], b[2], 2),
            lambda g: (_randn(g, _B, _L, 4), _randn(g, 3, 4, 4), _randn(g, 3, 4)),
        ),
        GradientCase(
            "qkv_projection_backward",
            lambda gq, gk, gv, x, y, z, wq, wk, wv: torch.ops.qkv_attention.qkv_projection_backward(
                gq, gk, gv, x, y, z, wq, wk, wv, 2
            ),
            lambda g: (
                _randn(g, _B, 2, _L, 2),
                _randn(g, _B, 2, _S, 2),
                _randn(g, _B, 2, _S, 2),
                *projection_inputs(g, bias=False),
            ),
        ),
        GradientCase(
            "merge_heads: bias",
            lambda x, w, b: ops.merge_heads(x, w, b),
            lambda g: (_randn(g, _B, _H, _L, _D), _randn(g, 5, _H * _D), _randn(g, 5)),
        ),
        GradientCase(
            "merge_heads: no bias",
            lambda x, w: ops.merge_heads(x, w, None),
            lambda g: (_randn(g, _B, _H, _L, _D), _randn(g, 5, _H * _D)),
        ),
        GradientCase(
            "merge_heads_backward",
            lambda go, x, w: torch.ops.qkv_attention.merge_heads_backward(go, x, w),
            lambda g: (_randn(g, _B, _L, 5), _randn(g, _B, _H, _L, _D), _randn(g, 5, _H * _D)),
        ),
        GradientCase(
            "functional.sdpa: 3-D inputs, broadcast float mask",
            lambda q, k, v, m: functional.scaled_dot_product_attention(q, k, v, m),
            lambda g: (
                _randn(g, 3, _L, _D),
                _randn(g, 3, _S, _D),
                _randn(g, 3, _S, _DV),
                _randn(g, _L, _S),
            ),
        ),
        GradientCase(
            "functional.sdpa: enable_gqa (4 query heads, 2 kv heads)",
            lambda q, k, v: functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            lambda g: (_randn(g, 1, 4, _L, _D), _randn(g, 1, 2, _S, _D), _randn(g, 1, 2, _S, _DV)),
        ),
    ]
    return cases


@dataclass(frozen=True)
class ParityConfig:
    """One way to build and call the module. Masks use the module's convention (True = masked)."""

    name: str
    batch_first: bool = True
    cross: bool = False  # key/value of another length than the query
    kdim: Optional[int] = None
    vdim: Optional[int] = None
    bias: bool = True
    add_bias_kv: bool = False
    add_zero_attn: bool = False
    key_padding_mask: Optional[str] = None  # None, "bool" or "float"
    attn_mask: Optional[str] = None  # None, "bool-2d", "float-2d", "float-3d", "causal"
    is_causal: bool = False
    need_weights: bool = True
    average_attn_weights: bool = True
    unbatched: bool = False
    dropout: float = 0.0
    eval_mode: bool = False
    dtype: torch.dtype = F64


# Tolerances on max |ours - torch| for values of order 1 (inputs are N(0, 1), E = 8): the two
# implementations sum in different orders, so each result may differ by a few units in the last
# place times the number of terms summed (< 100 here). float64: eps 2.2e-16 -> 1e-12 leaves a
# margin of ~50x; float32: eps 1.2e-7 -> 2e-5 for outputs, 5e-5 for gradients (parameter
# gradients sum over batch and positions as well).
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-5, 5e-5),
}

E, HEADS, BATCH, QLEN, KLEN = 8, 2, 2, 5, 6


def parity_configs() -> List[ParityConfig]:
    return [
        ParityConfig("self-attention, seq-first", batch_first=False),
        ParityConfig("self-attention, batch_first"),
        ParityConfig("cross-attention L=5, S=6", cross=True),
        ParityConfig("kdim=5, vdim=3 (separate projections)", cross=True, kdim=5, vdim=3),
        ParityConfig("bias=False", bias=False),
        ParityConfig("add_bias_kv", cross=True, add_bias_kv=True),
        ParityConfig("add_zero_attn", add_zero_attn=True),
        ParityConfig(
            "bias_kv + zero_attn + bool padding + bool mask",
            cross=True,
            add_bias_kv=True,
            add_zero_attn=True,
            key_padding_mask="bool",
            attn_mask="bool-2d",
        ),
        ParityConfig("key_padding_mask bool", cross=True, key_padding_mask="bool"),
        ParityConfig("key_padding_mask float", key_padding_mask="float"),
        ParityConfig("attn_mask 2-D bool", cross=True, attn_mask="bool-2d"),
        ParityConfig("attn_mask 2-D float", attn_mask="float-2d"),
        ParityConfig("attn_mask 3-D float (B*H, L, S)", cross=True, attn_mask="float-3d"),
        ParityConfig(
            "attn_mask 3-D + key_padding_mask",
            cross=True,
            attn_mask="float-3d",
            key_padding_mask="float",
        ),
        ParityConfig("causal mask + is_causal", attn_mask="causal", is_causal=True),
        ParityConfig("need_weights=False", need_weights=False),
        ParityConfig(
            "need_weights=False + padding + causal",
            attn_mask="causal",
            is_causal=True,
            key_padding_mask="bool",
            need_weights=False,
        ),
        ParityConfig("per-head weights (average=False)", cross=True, average_attn_weights=False),
        ParityConfig("unbatched input", unbatched=True, cross=True, key_padding_mask="bool"),
        ParityConfig(
            "unbatched, 3-D mask (H, L, S)",
            unbatched=True,
            attn_mask="float-3d",
            average_attn_weights=False,
        ),
        ParityConfig("dropout=0.5 in eval mode", dropout=0.5, eval_mode=True),
        ParityConfig("float32", dtype=torch.float32, cross=True),
        ParityConfig(
            "float32, kdim/vdim + masks",
            dtype=torch.float32,
            cross=True,
            kdim=5,
            vdim=3,
            key_padding_mask="bool",
            attn_mask="bool-2d",
        ),
    ]


def make_call(config: ParityConfig, generator: torch.Generator):
    """The inputs and forward keyword arguments for one config (identical for both modules)."""
    dtype = config.dtype
    batch = () if config.unbatched else (BATCH,)
    q_len, k_len = QLEN, (KLEN if config.cross else QLEN)

    def sequence(length, width):
        shape = (length, *batch, width) if not config.batch_first else (*batch, length, width)
        if config.unbatched:
            shape = (length, width)
        return torch.randn(*shape, generator=generator, dtype=dtype)

    query = sequence(q_len, E)
    if config.cross:
        key = sequence(k_len, config.kdim or E)
        value = sequence(k_len, config.vdim or E)
    else:
        key = value = query  # self-attention: one tensor (the module's fast path checks this)

    kwargs = {
        "need_weights": config.need_weights,
        "average_attn_weights": config.average_attn_weights,
    }
    # Key 0 is never masked, so no query row is left with nothing to attend to (torch's module
    # gives NaN for such rows, ours zeros: docs/differences.md; not compared here).
    if config.key_padding_mask is not None:
        padded = torch.zeros(*batch, k_len, dtype=torch.bool)
        padded[..., -1] = True
        if not config.unbatched:
            padded[-1, -3:] = True
        if config.key_padding_mask == "float":
            padded = torch.zeros(padded.shape, dtype=dtype).masked_fill(padded, -math.inf)
            padded[..., 1] = 0.5  # a finite bias too
        kwargs["key_padding_mask"] = padded
    if config.attn_mask is not None:
        kind = config.attn_mask
        if kind == "causal":
            mask = torch.ones(q_len, k_len, dtype=torch.bool).triu(1)
        elif kind == "bool-2d":
            mask = torch.rand(q_len, k_len, generator=generator) < 0.4
            mask[:, 0] = False
        elif kind == "float-2d":
            mask = torch.randn(q_len, k_len, generator=generator, dtype=dtype)
        else:  # float-3d: (B*H, L, S), or (H, L, S) for unbatched input
            n = HEADS * (1 if config.unbatched else BATCH)
            mask = torch.randn(n, q_len, k_len, generator=generator, dtype=dtype)
        kwargs["attn_mask"] = mask
    if config.is_causal:
        kwargs["is_causal"] = True
    return query, key, value, kwargs


def max_abs_difference(ours: Optional[Tensor], theirs: Optional[Tensor]) -> float:
    """max |ours - theirs|; NaN in the same places counts as equal, anywhere else as inf."""
    if ours is None and theirs is None:
        return 0.0
    if ours is None or theirs is None or ours.shape != theirs.shape:
        return math.inf
    ours, theirs = ours.detach().double(), theirs.detach().double()
    both_nan = ours.isnan() & theirs.isnan()
    difference = (ours - theirs).abs().masked_fill(both_nan, 0)
    if difference.isnan().any():
        return math.inf
    return difference.max().item() if difference.numel() else 0.0


def forward_backward(module: nn.Module, query, key, value, kwargs, generator_seed: int):
    """Output, weights and gradients (inputs, then parameters by name) of one module."""
    inputs = [query.clone().requires_grad_(), None, None]
    same = key is query
    inputs[1] = inputs[0] if same else key.clone().requires_grad_()
    inputs[2] = inputs[0] if same else value.clone().requires_grad_()
    output, weights = module(*inputs, **kwargs)
    generator = torch.Generator().manual_seed(generator_seed)
    loss = (output * torch.randn(output.shape, generator=generator, dtype=output.dtype)).sum()
    if weights is not None:
        loss = (
            loss
            + (weights * torch.randn(weights.shape, generator=generator, dtype=weights.dtype)).sum()
        )
    gradient_targets = list(dict.fromkeys(inputs))  # the one tensor once for self-attention
    names, parameters = zip(*module.named_parameters())
    grads = torch.autograd.grad(loss, gradient_targets + list(parameters), allow_unused=True)
    input_grads = grads[: len(gradient_targets)]
    parameter_grads = dict(zip(names, grads[len(gradient_targets) :]))
    return output, weights, input_grads, parameter_grads


def module_kwargs(config: ParityConfig) -> Dict[str, object]:
    return dict(
        embed_dim=E,
        num_heads=HEADS,
        dropout=config.dropout,
        bias=config.bias,
        add_bias_kv=config.add_bias_kv,
        add_zero_attn=config.add_zero_attn,
        kdim=config.kdim,
        vdim=config.vdim,
        batch_first=config.batch_first,
        dtype=config.dtype,
    )


def initialisation_difference(ours: nn.Module, theirs: nn.Module) -> Tuple[float, str]:
    """Same state_dict keys in the same order, and the largest difference between values."""
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    if list(ours_state) != list(theirs_state):
        return math.inf, f"state_dict keys differ: {list(ours_state)} vs {list(theirs_state)}"
    return max(max_abs_difference(ours_state[k], theirs_state[k]) for k in ours_state), ""
