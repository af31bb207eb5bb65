"""Checks the operators and the drop-in module on this machine: ``python -m qkv_attention.check``.

Two parts, each printed as a table:

1. **Gradients of every operator** (float64, small shapes): ``torch.autograd.gradcheck`` compares
   the analytical gradients (our C++ backward operators) with finite differences, and
   ``gradgradcheck`` does the same for the second derivatives (the differentiable backward path).
   The backward operators are themselves differentiable and are checked too. The one operator
   left out is ``_attention_dropout_mask``: its output is a boolean mask, with no gradient.
2. **Parity with torch.nn.MultiheadAttention** over a set of configurations (batch_first, masks,
   kdim/vdim, bias_kv, zero_attn, need_weights, ...): both modules start from the same
   state_dict and see the same inputs; the table shows the largest difference in the outputs
   (and returned attention weights) and in the gradients of inputs and parameters. Also in that
   table: a torch.nn.TransformerEncoderLayer before and after ``replace_attention``, and
   ``qkv_attention.functional.scaled_dot_product_attention`` against torch's.

The exit code is 0 when every check passes and 1 otherwise, so the tool can gate a script.
This module depends on the installed package only (not on the repository's tests or examples).
"""
import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import functional, ops

__all__ = [
    "main", "gradient_cases", "parity_configs", "other_parity_checks", "run_gradient_checks",
    "run_parity_checks", "run_other_parity_checks", "GradientCase", "ParityConfig", "ParityCheck",
]

_F64 = torch.float64


# --------------------------------------------------------------------------------------------
# Part 1: gradcheck / gradgradcheck of every operator
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradientCase:
    """One operator call to differentiate: ``function(*make_inputs(generator))``."""

    name: str
    function: Callable[..., object]
    make_inputs: Callable[[torch.Generator], Tuple[Tensor, ...]]


@dataclass
class GradientResult:
    name: str
    gradcheck: str  # "ok", "FAIL" or "-" (not run)
    gradgradcheck: str
    seconds: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return "FAIL" not in (self.gradcheck, self.gradgradcheck)


def _randn(generator: torch.Generator, *shape: int, grad: bool = True) -> Tensor:
    return torch.randn(*shape, generator=generator, dtype=_F64).requires_grad_(grad)


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
        q, k, v, kw.get("attn_mask"), kw.get("key_padding_mask"), dropout_p,
        kw.get("is_causal", False), kw.get("scale"), need_weights,
        ops._draw_dropout_rng_state(dropout_p))
    return (out, weights) if need_weights else out


def _attention_backward_of(q, k, v, grad_out, grad_weights, **kw):
    """Runs the forward without autograd, then differentiates through _attention_backward."""
    dropout_p = kw.get("dropout_p", 0.0)
    rng = ops._draw_dropout_rng_state(dropout_p)
    with torch.no_grad():
        out, lse, _w = torch.ops.qkv_attention._attention_forward(
            q, k, v, kw.get("attn_mask"), None, dropout_p, kw.get("is_causal", False), None,
            False, rng)
    grads = torch.ops.qkv_attention._attention_backward(
        grad_out, grad_weights, q, k, v, out, lse, kw.get("attn_mask"), None,
        kw.get("dropout_p", 0.0), kw.get("is_causal", False), None, rng, False, False)
    return grads[:3]  # (grad_query, grad_key, grad_value); no mask gradients asked for


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
                    q, k, v, go, None, is_causal=True, dropout_p=0.3)
            ),
            lambda g: (*_qkv(g), _randn(g, _B, _H, _L, _DV)),
        ),
    ]

    # qkv_projection: E = 4 features split into 2 heads; query, key and value of different
    # widths (kdim/vdim) and lengths (L=2, S=3).
    def projection_inputs(g, bias=True):
        tensors = [_randn(g, _B, _L, 3), _randn(g, _B, _S, 5), _randn(g, _B, _S, 2),
                   _randn(g, 4, 3), _randn(g, 4, 5), _randn(g, 4, 2)]
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
                x, y, z, wq, wk, wv, None, None, None, 2),
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
                gq, gk, gv, x, y, z, wq, wk, wv, 2),
            lambda g: (_randn(g, _B, 2, _L, 2), _randn(g, _B, 2, _S, 2), _randn(g, _B, 2, _S, 2),
                       *projection_inputs(g, bias=False)),
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
            lambda g: (_randn(g, 3, _L, _D), _randn(g, 3, _S, _D), _randn(g, 3, _S, _DV),
                       _randn(g, _L, _S)),
        ),
        GradientCase(
            "functional.sdpa: enable_gqa (4 query heads, 2 kv heads)",
            lambda q, k, v: functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            lambda g: (_randn(g, 1, 4, _L, _D), _randn(g, 1, 2, _S, _D), _randn(g, 1, 2, _S, _DV)),
        ),
    ]
    return cases


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip()}"


def run_gradient_checks(
    cases: Sequence[GradientCase], second_order: bool = True, fast_mode: bool = False
) -> List[GradientResult]:
    results = []
    for index, case in enumerate(cases):
        generator = torch.Generator().manual_seed(1000 + index)
        inputs = case.make_inputs(generator)
        start = time.perf_counter()
        first, second, detail = "-", "-", ""
        try:
            torch.autograd.gradcheck(case.function, inputs, fast_mode=fast_mode)
            first = "ok"
        except Exception as error:  # gradcheck raises GradcheckError; the op may raise others
            first, detail = "FAIL", _describe(error)
        if second_order and first == "ok":
            try:
                torch.autograd.gradgradcheck(case.function, inputs, fast_mode=fast_mode)
                second = "ok"
            except Exception as error:
                second, detail = "FAIL", _describe(error)
        results.append(
            GradientResult(case.name, first, second, time.perf_counter() - start, detail)
        )
    return results


# --------------------------------------------------------------------------------------------
# Part 2: parity with torch.nn.MultiheadAttention
# --------------------------------------------------------------------------------------------


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
    dtype: torch.dtype = _F64


@dataclass
class ParityResult:
    name: str
    output_error: float
    gradient_error: float
    tolerance: Tuple[float, float]
    seconds: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return (
            not self.detail
            and self.output_error <= self.tolerance[0]
            and self.gradient_error <= self.tolerance[1]
        )


# Tolerances on max |ours - torch| for values of order 1 (inputs are N(0, 1), E = 8): the two
# implementations sum in different orders, so each result may differ by a few units in the last
# place times the number of terms summed (< 100 here). float64: eps 2.2e-16 -> 1e-12 leaves a
# margin of ~50x; float32: eps 1.2e-7 -> 2e-5 for outputs, 5e-5 for gradients (parameter
# gradients sum over batch and positions as well).
_TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-5, 5e-5),
}

_E, _HEADS, _BATCH, _QLEN, _KLEN = 8, 2, 2, 5, 6


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
            cross=True, add_bias_kv=True, add_zero_attn=True, key_padding_mask="bool",
            attn_mask="bool-2d",
        ),
        ParityConfig("key_padding_mask bool", cross=True, key_padding_mask="bool"),
        ParityConfig("key_padding_mask float", key_padding_mask="float"),
        ParityConfig("attn_mask 2-D bool", cross=True, attn_mask="bool-2d"),
        ParityConfig("attn_mask 2-D float", attn_mask="float-2d"),
        ParityConfig("attn_mask 3-D float (B*H, L, S)", cross=True, attn_mask="float-3d"),
        ParityConfig(
            "attn_mask 3-D + key_padding_mask", cross=True, attn_mask="float-3d",
            key_padding_mask="float",
        ),
        ParityConfig("causal mask + is_causal", attn_mask="causal", is_causal=True),
        ParityConfig("need_weights=False", need_weights=False),
        ParityConfig(
            "need_weights=False + padding + causal", attn_mask="causal", is_causal=True,
            key_padding_mask="bool", need_weights=False,
        ),
        ParityConfig("per-head weights (average=False)", cross=True, average_attn_weights=False),
        ParityConfig("unbatched input", unbatched=True, cross=True, key_padding_mask="bool"),
        ParityConfig(
            "unbatched, 3-D mask (H, L, S)", unbatched=True, attn_mask="float-3d",
            average_attn_weights=False,
        ),
        ParityConfig("dropout=0.5 in eval mode", dropout=0.5, eval_mode=True),
        ParityConfig("float32", dtype=torch.float32, cross=True),
        ParityConfig(
            "float32, kdim/vdim + masks", dtype=torch.float32, cross=True, kdim=5, vdim=3,
            key_padding_mask="bool", attn_mask="bool-2d",
        ),
    ]


def _make_call(config: ParityConfig, generator: torch.Generator):
    """The inputs and forward keyword arguments for one config (identical for both modules)."""
    dtype = config.dtype
    batch = () if config.unbatched else (_BATCH,)
    q_len, k_len = _QLEN, (_KLEN if config.cross else _QLEN)

    def sequence(length, width):
        shape = (length, *batch, width) if not config.batch_first else (*batch, length, width)
        if config.unbatched:
            shape = (length, width)
        return torch.randn(*shape, generator=generator, dtype=dtype)

    query = sequence(q_len, _E)
    if config.cross:
        key = sequence(k_len, config.kdim or _E)
        value = sequence(k_len, config.vdim or _E)
    else:
        key = value = query  # self-attention: one tensor (the module's fast path checks this)

    kwargs = {"need_weights": config.need_weights,
              "average_attn_weights": config.average_attn_weights}
    # Key 0 is never masked, so no query row is left with nothing to attend to (torch gives
    # NaN for such rows and we give zeros: a deliberate difference, not tested here).
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
            n = _HEADS * (1 if config.unbatched else _BATCH)
            mask = torch.randn(n, q_len, k_len, generator=generator, dtype=dtype)
        kwargs["attn_mask"] = mask
    if config.is_causal:
        kwargs["is_causal"] = True
    return query, key, value, kwargs


def _max_abs_difference(ours: Optional[Tensor], theirs: Optional[Tensor]) -> float:
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


def _forward_backward(module: nn.Module, query, key, value, kwargs, generator_seed: int):
    """Output, weights and gradients (inputs, then parameters by name) of one module."""
    inputs = [query.clone().requires_grad_(), None, None]
    same = key is query
    inputs[1] = inputs[0] if same else key.clone().requires_grad_()
    inputs[2] = inputs[0] if same else value.clone().requires_grad_()
    output, weights = module(*inputs, **kwargs)
    generator = torch.Generator().manual_seed(generator_seed)
    loss = (output * torch.randn(output.shape, generator=generator, dtype=output.dtype)).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, generator=generator,
                                             dtype=weights.dtype)).sum()
    gradient_targets = list(dict.fromkeys(inputs))  # the one tensor once for self-attention
    names, parameters = zip(*module.named_parameters())
    grads = torch.autograd.grad(loss, gradient_targets + list(parameters), allow_unused=True)
    input_grads = grads[: len(gradient_targets)]
    parameter_grads = dict(zip(names, grads[len(gradient_targets):]))
    return output, weights, input_grads, parameter_grads


def _module_kwargs(config: ParityConfig) -> Dict[str, object]:
    return dict(
        embed_dim=_E, num_heads=_HEADS, dropout=config.dropout, bias=config.bias,
        add_bias_kv=config.add_bias_kv, add_zero_attn=config.add_zero_attn, kdim=config.kdim,
        vdim=config.vdim, batch_first=config.batch_first, dtype=config.dtype,
    )


def _initialisation_difference(ours: nn.Module, theirs: nn.Module) -> Tuple[float, str]:
    """Same state_dict keys in the same order, and the largest difference between values."""
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    if list(ours_state) != list(theirs_state):
        return math.inf, f"state_dict keys differ: {list(ours_state)} vs {list(theirs_state)}"
    return max(_max_abs_difference(ours_state[k], theirs_state[k]) for k in ours_state), ""


def run_parity_checks(configs: Sequence[ParityConfig]) -> List[ParityResult]:
    from . import MultiheadAttention as OurMultiheadAttention  # written after ops; see __init__

    results = []
    for index, config in enumerate(configs):
        start = time.perf_counter()
        tolerance = _TOLERANCES[config.dtype]
        try:
            torch.manual_seed(index)
            theirs = nn.MultiheadAttention(**_module_kwargs(config))
            torch.manual_seed(index)
            ours = OurMultiheadAttention(**_module_kwargs(config))
            init_error, detail = _initialisation_difference(ours, theirs)
            if init_error > 0 and not detail:
                detail = f"different initial weights from the same seed (max diff {init_error:.2e})"
            ours.load_state_dict(theirs.state_dict())  # compare the math from equal weights
            if config.eval_mode:
                ours.eval()
                theirs.eval()
            query, key, value, kwargs = _make_call(config, torch.Generator().manual_seed(index))
            ours_out = _forward_backward(ours, query, key, value, kwargs, 7 + index)
            theirs_out = _forward_backward(theirs, query, key, value, kwargs, 7 + index)
            output_error = max(_max_abs_difference(ours_out[0], theirs_out[0]),
                               _max_abs_difference(ours_out[1], theirs_out[1]))
            gradient_errors = [_max_abs_difference(a, b)
                               for a, b in zip(ours_out[2], theirs_out[2])]
            if set(ours_out[3]) != set(theirs_out[3]):
                detail = detail or "parameter names differ"
            gradient_errors += [_max_abs_difference(ours_out[3][name], theirs_out[3].get(name))
                                for name in ours_out[3]]
            gradient_error = max(gradient_errors)
        except Exception as error:  # report and go on: one broken config must not hide the rest
            output_error = gradient_error = math.inf
            detail = _describe(error)
        results.append(ParityResult(config.name, output_error, gradient_error, tolerance,
                                    time.perf_counter() - start, detail))
    return results


@dataclass(frozen=True)
class ParityCheck:
    """A comparison with torch that is not a MultiheadAttention configuration.

    ``compare()`` returns (max output error, max gradient error); float64 tolerances apply.
    """

    name: str
    compare: Callable[[], Tuple[float, float]]


def _replace_attention_in_encoder_layer() -> Tuple[float, float]:
    """A torch.nn.TransformerEncoderLayer before and after ``replace_attention``."""
    from . import MultiheadAttention as OurMultiheadAttention
    from . import replace_attention

    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(
        _E, _HEADS, dim_feedforward=16, dropout=0.0, batch_first=True, dtype=_F64)
    ours = replace_attention(copy.deepcopy(theirs))
    if not isinstance(ours.self_attn, OurMultiheadAttention):
        raise AssertionError("replace_attention left torch's MultiheadAttention in place")
    x = torch.randn(_BATCH, _QLEN, _E, generator=torch.Generator().manual_seed(3), dtype=_F64)
    padding = torch.zeros(_BATCH, _QLEN, dtype=torch.bool)
    padding[1, -2:] = True
    outputs, grads = [], []
    for layer in (ours, theirs):
        inp = x.clone().requires_grad_()
        out = layer(inp, src_key_padding_mask=padding)
        names, params = zip(*layer.named_parameters())
        g = torch.autograd.grad(out.square().sum(), [inp, *params])
        outputs.append(out)
        grads.append(dict(zip(("input", *names), g)))
    gradient_error = max(_max_abs_difference(grads[0][n], grads[1].get(n)) for n in grads[0])
    return _max_abs_difference(outputs[0], outputs[1]), gradient_error


def _sdpa_against_torch(q_shape, k_shape, v_shape, mask: Optional[str] = None, **kwargs):
    """functional.scaled_dot_product_attention against torch's, float64, output and gradients
    of query, key, value (and of a float mask)."""

    def compare() -> Tuple[float, float]:
        g = torch.Generator().manual_seed(11)
        inputs = [torch.randn(*shape, generator=g, dtype=_F64)
                  for shape in (q_shape, k_shape, v_shape)]
        L, S = q_shape[-2], k_shape[-2]
        if mask == "bool":  # True = may attend; key 0 always, so no row is empty
            attn_mask = torch.rand(L, S, generator=g) < 0.6
            attn_mask[:, 0] = True
            inputs.append(attn_mask)
        elif mask == "float":
            inputs.append(torch.randn(q_shape[0], 1, L, S, generator=g, dtype=_F64))
        results = []
        for function in (functional.scaled_dot_product_attention,
                         nn.functional.scaled_dot_product_attention):
            leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
            out = function(*leaves[:3], attn_mask=leaves[3] if mask else None, **kwargs)
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5),
                                   dtype=_F64)
            differentiable = [t for t in leaves if t.requires_grad]
            results.append((out, torch.autograd.grad(out, differentiable, grad_out)))
        (ours_out, ours_grads), (theirs_out, theirs_grads) = results
        return (_max_abs_difference(ours_out, theirs_out),
                max(_max_abs_difference(a, b) for a, b in zip(ours_grads, theirs_grads)))

    return compare


def other_parity_checks() -> List[ParityCheck]:
    return [
        ParityCheck("replace_attention(TransformerEncoderLayer)",
                    _replace_attention_in_encoder_layer),
        ParityCheck("functional.sdpa vs F.sdpa: no mask",
                    _sdpa_against_torch((2, 2, 5, 4), (2, 2, 6, 4), (2, 2, 6, 3))),
        ParityCheck("functional.sdpa vs F.sdpa: bool mask (L, S)",
                    _sdpa_against_torch((2, 2, 5, 4), (2, 2, 6, 4), (2, 2, 6, 3), mask="bool")),
        ParityCheck("functional.sdpa vs F.sdpa: float mask with grad, scale=0.3",
                    _sdpa_against_torch((2, 2, 5, 4), (2, 2, 6, 4), (2, 2, 6, 3), mask="float",
                                        scale=0.3)),
        ParityCheck("functional.sdpa vs F.sdpa: is_causal, L=5 < S=6",
                    _sdpa_against_torch((2, 2, 5, 4), (2, 2, 6, 4), (2, 2, 6, 3),
                                        is_causal=True)),
        ParityCheck("functional.sdpa vs F.sdpa: 3-D inputs",
                    _sdpa_against_torch((3, 5, 4), (3, 6, 4), (3, 6, 3))),
        ParityCheck("functional.sdpa vs F.sdpa: enable_gqa",
                    _sdpa_against_torch((1, 4, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3),
                                        enable_gqa=True)),
    ]


def run_other_parity_checks(checks: Sequence[ParityCheck]) -> List[ParityResult]:
    results = []
    for check in checks:
        start = time.perf_counter()
        detail = ""
        try:
            output_error, gradient_error = check.compare()
        except Exception as error:
            output_error = gradient_error = math.inf
            detail = _describe(error)
        results.append(ParityResult(check.name, output_error, gradient_error, _TOLERANCES[_F64],
                                    time.perf_counter() - start, detail))
    return results


# --------------------------------------------------------------------------------------------
# Output and command line
# --------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_gradient_table(results: Sequence[GradientResult]) -> str:
    rows = [[r.name, r.gradcheck, r.gradgradcheck, f"{r.seconds:.2f}",
             "pass" if r.passed else "FAIL"] for r in results]
    return _table(["operator case (float64)", "gradcheck", "gradgradcheck", "s", "result"], rows)


def format_parity_table(results: Sequence[ParityResult]) -> str:
    def number(x: float) -> str:
        return "inf" if math.isinf(x) else f"{x:.1e}"

    rows = [[r.name, number(r.output_error), number(r.gradient_error),
             f"{r.tolerance[0]:.0e}/{r.tolerance[1]:.0e}", "pass" if r.passed else "FAIL"]
            for r in results]
    return _table(["configuration (ours vs torch, same inputs)", "max output err",
                   "max grad err", "tolerance", "result"], rows)


def _select(items, patterns: Optional[Sequence[str]]):
    if not patterns:
        return list(items)
    return [item for item in items if any(p.lower() in item.name.lower() for p in patterns)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qkv_attention.check",
        description="gradcheck/gradgradcheck of every qkv_attention operator and parity of "
        "qkv_attention.MultiheadAttention with torch.nn.MultiheadAttention. "
        "Exit code 0 when everything passes, 1 otherwise.")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="run only the checks whose name contains TEXT (repeatable)")
    parser.add_argument("--skip-gradcheck", action="store_true", help="skip part 1")
    parser.add_argument("--skip-parity", action="store_true", help="skip part 2")
    parser.add_argument("--no-gradgradcheck", action="store_true",
                        help="first derivatives only (faster)")
    parser.add_argument("--fast", action="store_true",
                        help="gradcheck's fast_mode (random projections instead of full Jacobians)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads while checking (default 1: the tensors are tiny, and "
                        "waking a second thread costs more than the work, very much more on a "
                        "busy machine)")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print the full error of every failure")
    args = parser.parse_args(argv)

    cases = [] if args.skip_gradcheck else _select(gradient_cases(), args.only)
    configs = [] if args.skip_parity else _select(parity_configs(), args.only)
    others = [] if args.skip_parity else _select(other_parity_checks(), args.only)
    if args.list:
        for item in [*cases, *configs, *others]:
            print(item.name)
        return 0

    if not (cases or configs or others):
        print("no check matches the selection", file=sys.stderr)
        return 1
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(args.threads, 1))
    try:
        return _run_and_report(args, cases, configs, others)
    finally:
        torch.set_num_threads(threads_before)


def _run_and_report(args, cases, configs, others) -> int:
    from . import build_info

    print(f"qkv_attention.check: torch {torch.__version__}, threads: {torch.get_num_threads()}")
    print(f"build: {build_info()}")
    start = time.perf_counter()
    failures: List[Tuple[str, str]] = []
    if cases:
        gradient_results = run_gradient_checks(
            cases, second_order=not args.no_gradgradcheck, fast_mode=args.fast)
        print("\n" + format_gradient_table(gradient_results))
        failures += [(r.name, r.detail) for r in gradient_results if not r.passed]
    if configs or others:
        parity_results = run_parity_checks(configs) + run_other_parity_checks(others)
        print("\n" + format_parity_table(parity_results))
        failures += [(r.name, r.detail or "error above tolerance")
                     for r in parity_results if not r.passed]
    total = len(cases) + len(configs) + len(others)
    elapsed = time.perf_counter() - start
    if failures:
        print(f"\n{len(failures)} of {total} checks FAILED ({elapsed:.1f} s):")
        for name, detail in failures:
            print(f"  {name}: {detail if args.verbose else detail.splitlines()[0][:300]}")
        return 1
    print(f"\nall {total} checks passed ({elapsed:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
