"""Sliding window, softcap, ALiBi and attention sinks in every attention op, against the float64
reference of helpers (``reference_attention``, written from the definitions of docs/design.md,
not from our kernels).

- attention and attention_with_weights (per-head and averaged weights): every variant alone and
  all combined, with grouped-query heads, L != S, bool and float masks, padding masks, causal;
  values to 1e-10 and gradients (the sinks' included) to 1e-9 in float64; shapes that cross the
  kernels' query and key blocks, so that a window skips whole blocks; the split-KV decoding path
  (L <= 16 against more than 512 keys); float32 and bfloat16 within their tolerances.
- dropout with the variants: a seeded call reproduces itself bit for bit and equals the reference
  with the op's own keep-mask (the sink is never dropped).
- gradcheck and gradgradcheck with the sinks differentiated.
- attention_varlen against the reference run on each sequence alone (the alignment per sequence).
- attention_with_kv_cache, its general and its split-KV path, against the reference with the
  bottom-right alignment o = n_b - L of each sequence.
- bitwise the same results (grad of sinks included) with 1, 2 and 3 threads.
- torch.compile(fullgraph=True) with gradients of sinks; torch.func.vmap (every op, sinks
  per sample, dropout); CPU autocast (float32 slopes and sinks stay float32).
- strided and expanded slopes and sinks; sinks of -inf are no sinks; errors naming the
  argument.
The Makefile runs this file at every CPU level (LEVEL_TESTS).
"""

import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import qkv_attention
from helpers import (
    HALF_GRAD_TOLERANCE_OF_MAX,
    VS_FLOAT64_TOLERANCE,
    assert_close_to_max,
    reference_attention,
)
from qkv_attention import ops as qops

ops = torch.ops.qkv_attention
pytestmark = pytest.mark.usefixtures("seed_torch")

# float64 against the float64 reference: both round to ~1e-15 relative per result; a formula
# error (a key on the wrong side of the window, the cap after ALiBi) is orders larger.
VALUES_F64 = dict(atol=1e-10, rtol=1e-10)
GRADS_F64 = dict(atol=1e-9, rtol=1e-9)
# float32 gradients relative to the largest one: sums of at most a few hundred O(1) terms
# rounded at 6e-8 (measured ~1e-6 of the max); 2e-5 leaves a margin and still catches a wrong
# term (of order one).
F32_GRAD_OF_MAX = 2e-5


@dataclass(frozen=True)
class Variant:
    """The variant arguments of one call. ``alibi``: None, "heads" ((H,) slopes) or "batch"
    ((B, H)); ``sinks``: None or the mean of the sink logits (random around it)."""

    window_size: Tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: Optional[str] = None
    sinks: Optional[float] = None
    is_causal: bool = False
    scale: Optional[float] = None


@dataclass(frozen=True)
class Shape:
    """Sizes and masks. ``attn_mask``: None, "bool" ((B, H, L, S), one row of it all False) or
    "float" ((B, 1, L, S), differentiated); ``padding``: None, "bool" or "float" ((B, S))."""

    B: int = 2
    H: int = 4
    Hkv: int = 4
    L: int = 13
    S: int = 13
    D: int = 8
    Dv: int = 6
    attn_mask: Optional[str] = None
    padding: Optional[str] = None


VARIANTS = {
    "window": Variant(window_size=(5, 3)),
    "window_left_only": Variant(window_size=(4, -1)),
    "window_right_only": Variant(window_size=(-1, 2)),
    "window_diagonal_only": Variant(window_size=(0, 0)),
    "window_causal_mistral": Variant(window_size=(6, 0), is_causal=True),
    "window_wider_than_causal_allows": Variant(window_size=(3, 7), is_causal=True),
    "softcap": Variant(softcap=1.5, scale=0.9),
    "alibi_heads": Variant(alibi="heads"),
    "alibi_batch": Variant(alibi="batch"),
    "alibi_causal": Variant(alibi="heads", is_causal=True),
    "sinks": Variant(sinks=0.0),
    "sinks_dominant": Variant(sinks=4.0),
    "sinks_causal": Variant(sinks=1.0, is_causal=True),
    "softcap_alibi": Variant(softcap=2.0, alibi="heads", scale=1.1),
    "window_sinks": Variant(window_size=(4, 0), sinks=0.5, is_causal=True),
    "all": Variant(
        window_size=(5, 2), softcap=3.0, alibi="batch", sinks=0.5, is_causal=True, scale=0.8
    ),
    "all_noncausal": Variant(window_size=(3, 4), softcap=2.5, alibi="heads", sinks=-0.5),
}

SHAPES = {
    "square": Shape(),
    "gqa_L_lt_S_bool_mask": Shape(Hkv=2, L=9, S=21, attn_mask="bool"),
    "L_gt_S_float_masks": Shape(H=2, Hkv=1, L=21, S=9, attn_mask="float", padding="float"),
    "bool_padding": Shape(B=3, H=2, Hkv=2, L=11, S=15, padding="bool"),
}


def make_inputs(shape: Shape, variant: Variant, dtype=torch.float64, seed=0, sinks_dtype=None):
    """The op's tensors as a dict (every floating one but the slopes requires grad)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*sizes, scale=1.0):
        return (torch.randn(*sizes, generator=g, dtype=torch.float64) * scale).to(dtype)

    B, H, Hkv, L, S = shape.B, shape.H, shape.Hkv, shape.L, shape.S
    t = dict(
        query=randn(B, H, L, shape.D),
        key=randn(B, Hkv, S, shape.D),
        value=randn(B, Hkv, S, shape.Dv),
        attn_mask=None,
        key_padding_mask=None,
        alibi_slopes=None,
        sinks=None,
    )
    if shape.attn_mask == "bool":
        mask = torch.rand(B, H, L, S, generator=g) < 0.7
        mask[0, 1, 2] = False  # a row that sees nothing: zeros, with or without sinks
        t["attn_mask"] = mask
    elif shape.attn_mask == "float":
        t["attn_mask"] = randn(B, 1, L, S)
    if shape.padding == "bool":
        padding = torch.ones(B, S, dtype=torch.bool)
        padding[-1, -4:] = False
        padding[0, :2] = False
        t["key_padding_mask"] = padding
    elif shape.padding == "float":
        t["key_padding_mask"] = randn(B, S, scale=0.5)
    if variant.alibi is not None:
        # ALiBi's slopes are positive, 2^-8 .. 1/2 for 8 heads; random in that range.
        sizes = (H,) if variant.alibi == "heads" else (B, H)
        t["alibi_slopes"] = (torch.rand(*sizes, generator=g, dtype=torch.float64) * 0.5 + 0.01).to(
            dtype
        )
    if variant.sinks is not None:
        sinks = torch.randn(H, generator=g, dtype=torch.float64) + variant.sinks
        t["sinks"] = sinks.to(sinks_dtype or dtype)
    for name in ("query", "key", "value", "attn_mask", "key_padding_mask", "sinks"):
        if t[name] is not None and t[name].is_floating_point():
            t[name] = t[name].detach().requires_grad_()
    return t


def variant_kwargs(variant: Variant, t):
    return dict(
        window_size=variant.window_size,
        softcap=variant.softcap,
        alibi_slopes=t["alibi_slopes"],
        sinks=t["sinks"],
    )


def run_ours(t, variant, with_weights=False, average=False, dropout_p=0.0):
    args = (t["query"], t["key"], t["value"], t["attn_mask"])
    kwargs = dict(
        dropout_p=dropout_p,
        is_causal=variant.is_causal,
        scale=variant.scale,
        key_padding_mask=t["key_padding_mask"],
        **variant_kwargs(variant, t),
    )
    if with_weights:
        return qops.attention_with_weights(*args, average_attn_weights=average, **kwargs)
    return (qops.attention(*args, **kwargs),)


def run_reference(t, variant, average=False, dropout_keep=None, dropout_p=0.0):
    out, weights = reference_attention(
        t["query"],
        t["key"],
        t["value"],
        t["attn_mask"],
        variant.is_causal,
        variant.scale,
        t["key_padding_mask"],
        dropout_keep=dropout_keep,
        dropout_p=dropout_p,
        **variant_kwargs(variant, t),
    )
    return out, (weights.mean(1) if average else weights)


def differentiable(t):
    return [
        t[n]
        for n in ("query", "key", "value", "attn_mask", "key_padding_mask", "sinks")
        if t[n] is not None and t[n].requires_grad
    ]


def values_and_grads(results, leaves, seed=1):
    """The results and the gradients of a fixed random projection of them."""
    g = torch.Generator().manual_seed(seed)
    loss = sum(
        (r.double() * torch.randn(r.shape, generator=g, dtype=torch.float64)).sum() for r in results
    )
    return list(results), list(torch.autograd.grad(loss, leaves))


def check_float64(t, variant, with_weights=False, average=False, dropout=None):
    """Ours against the reference on the same leaves: values to 1e-10, gradients to 1e-9."""
    keep, dropout_p = dropout if dropout is not None else (None, 0.0)
    leaves = differentiable(t)
    ours = run_ours(t, variant, with_weights, average, dropout_p)
    reference = run_reference(t, variant, average, keep, dropout_p)[: len(ours)]
    ours_values, ours_grads = values_and_grads(ours, leaves)
    ref_values, ref_grads = values_and_grads(reference, leaves)
    for mine, theirs in zip(ours_values, ref_values):
        assert mine.dtype == torch.float64 and mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, **VALUES_F64)
    for leaf, mine, theirs in zip(leaves, ours_grads, ref_grads):
        assert mine.dtype == leaf.dtype and mine.shape == leaf.shape
        torch.testing.assert_close(mine, theirs, **GRADS_F64)


# ---- the reference itself -------------------------------------------------------------------


def test_reference_agrees_with_sdpa_given_the_variants_as_a_mask_and_a_key():
    """Window, causality with an offset and ALiBi written as one float mask, the sink as one
    more key with a zero value whose score is the sink (through the mask): torch's SDPA in
    float64 gives what the reference gives. Checks the reference against an independent
    formulation before the ops are checked against it (softcap is a plain tanh of the scores)."""
    B, H, L, S, D, o = 2, 3, 6, 10, 4, 3
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64) for n in (L, S, S))
    slopes = torch.rand(B, H, dtype=torch.float64)
    sinks = torch.randn(H, dtype=torch.float64)
    left, right = 2, 1
    bias = torch.zeros(B, H, L, S + 1, dtype=torch.float64)
    for i in range(L):
        for j in range(S):
            distance = i + o - j
            if distance < 0 or distance > left or -distance > right:
                bias[:, :, i, j] = -math.inf
            else:
                bias[:, :, i, j] = -slopes * abs(distance)
    bias[..., S] = sinks.view(1, H, 1)
    k_sink = torch.cat([k, torch.zeros(B, H, 1, D, dtype=torch.float64)], dim=2)
    v_sink = torch.cat([v, torch.zeros(B, H, 1, D, dtype=torch.float64)], dim=2)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k_sink, v_sink, attn_mask=bias)
    out, weights = reference_attention(
        q,
        k,
        v,
        is_causal=True,
        window_size=(left, right),
        alibi_slopes=slopes,
        sinks=sinks,
        causal_offset=o,
    )
    torch.testing.assert_close(out, expected, **VALUES_F64)
    assert weights.shape == (B, H, L, S)


# ---- attention and attention_with_weights in float64 ------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attention_values_and_gradients_match_the_reference(variant, shape):
    check_float64(make_inputs(SHAPES[shape], VARIANTS[variant]), VARIANTS[variant])


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("shape", ["gqa_L_lt_S_bool_mask", "L_gt_S_float_masks"])
@pytest.mark.parametrize("variant", ["window_causal_mistral", "softcap_alibi", "sinks", "all"])
def test_attention_with_weights_values_and_gradients_match_the_reference(variant, shape, average):
    check_float64(
        make_inputs(SHAPES[shape], VARIANTS[variant]),
        VARIANTS[variant],
        with_weights=True,
        average=average,
    )


# Shapes past the kernels' blocks (forward 48 x 256 at most, backward 48 x 128): with a window
# most key blocks lie outside the band and are skipped, a few are cut by it.
BLOCK_SHAPES = {
    "long_square": Shape(B=1, H=2, Hkv=1, L=600, S=600, D=16, Dv=16),
    "long_L_lt_S": Shape(B=1, H=2, Hkv=2, L=100, S=700, D=8, Dv=8, padding="bool"),
    "long_L_gt_S": Shape(B=1, H=2, Hkv=1, L=530, S=300, D=8, Dv=8),
}
BLOCK_VARIANTS = {
    "window_causal": Variant(window_size=(40, 0), is_causal=True),
    "window_both_sides": Variant(window_size=(100, 30)),
    "all": Variant(window_size=(70, 5), softcap=2.0, alibi="heads", sinks=1.0, is_causal=True),
    "sinks_alibi_no_window": Variant(alibi="batch", sinks=2.0),
}


@pytest.mark.parametrize("shape", list(BLOCK_SHAPES))
@pytest.mark.parametrize("variant", list(BLOCK_VARIANTS))
def test_windows_across_many_key_blocks_match_the_reference(variant, shape):
    check_float64(
        make_inputs(BLOCK_SHAPES[shape], BLOCK_VARIANTS[variant]), BLOCK_VARIANTS[variant]
    )


# The split-KV decoding path: L <= 16 queries against more than 2 chunks of 256 keys; the sink
# enters once, in the merge of the chunks. attention aligns top-left (o = 0), so the windows
# reach far keys through their right side here (the KV cache tests below align bottom-right).
DECODE_VARIANTS = {
    "sinks": Variant(sinks=1.0),
    "window_reaching_three_chunks": Variant(window_size=(-1, 600), sinks=0.0),
    "window_inside_one_chunk": Variant(window_size=(2, 100)),
    "window_causal": Variant(window_size=(3, 0), is_causal=True, sinks=0.5),
    "softcap_alibi_sinks": Variant(softcap=2.0, alibi="batch", sinks=-1.0),
    "all": Variant(window_size=(3, 700), softcap=3.0, alibi="heads", sinks=2.0),
}


@pytest.mark.parametrize("L", [1, 16])
@pytest.mark.parametrize("variant", list(DECODE_VARIANTS))
def test_decoding_path_matches_the_reference(variant, L):
    shape = Shape(B=2, H=4, Hkv=2, L=L, S=1100, D=16, Dv=8, padding="bool")
    check_float64(make_inputs(shape, DECODE_VARIANTS[variant]), DECODE_VARIANTS[variant])


# ---- half types and float32 against the float64 reference -------------------------------------


@pytest.mark.parametrize(
    "dtype, sinks_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
    ids=str,
)
@pytest.mark.parametrize("shape", ["gqa_L_lt_S_bool_mask", "long_square", "decode"])
def test_lower_precision_within_tolerance_of_the_reference(dtype, sinks_dtype, shape):
    shapes = {**SHAPES, **BLOCK_SHAPES, "decode": Shape(B=2, H=4, Hkv=2, L=3, S=900, D=16, Dv=8)}
    variant = Variant(window_size=(300, 1), softcap=3.0, alibi="heads", sinks=1.0, is_causal=True)
    if shape == "decode":  # a band of 700 keys (top-left alignment: through its right side)
        variant = replace(variant, window_size=(1, 700), is_causal=False)
    t = make_inputs(shapes[shape], variant, dtype=dtype, sinks_dtype=sinks_dtype)
    leaves = differentiable(t)
    ours = run_ours(t, variant)
    assert ours[0].dtype == dtype
    reference = run_reference(t, variant)[:1]
    ours_values, ours_grads = values_and_grads(ours, leaves)
    ref_values, ref_grads = values_and_grads(reference, leaves)
    torch.testing.assert_close(
        ours_values[0].double(), ref_values[0], **VS_FLOAT64_TOLERANCE[dtype]
    )
    of_max = F32_GRAD_OF_MAX if dtype == torch.float32 else HALF_GRAD_TOLERANCE_OF_MAX[dtype]
    for leaf, mine, theirs in zip(leaves, ours_grads, ref_grads):
        assert mine.dtype == leaf.dtype
        assert_close_to_max(mine, theirs, of_max)


# ---- what the weights are ---------------------------------------------------------------------


def test_weights_exclude_the_sink_and_rows_sum_to_one_minus_its_probability():
    """p_sink = exp(sink) / (exp(sink) + sum_j exp(s_j)), computed here directly."""
    B, H, L, S, D = 2, 3, 5, 7, 4
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64) for n in (L, S, S))
    sinks = torch.tensor([-1.0, 0.5, 3.0], dtype=torch.float64)
    out, weights = qops.attention_with_weights(q, k, v, sinks=sinks)
    assert weights.shape == (B, H, L, S)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    p_sink = sinks.exp().view(1, H, 1) / (
        sinks.exp().view(1, H, 1) + scores.exp().sum(-1)
    )  # (B, H, L)
    torch.testing.assert_close(weights.sum(-1), 1 - p_sink, **VALUES_F64)
    assert (weights.sum(-1) < 1).all()
    torch.testing.assert_close(out, weights @ v, **VALUES_F64)
    _, averaged = qops.attention_with_weights(q, k, v, sinks=sinks, average_attn_weights=True)
    torch.testing.assert_close(averaged, weights.mean(1), **VALUES_F64)


@pytest.mark.parametrize("sinks", [None, 2.0])
def test_rows_that_see_no_key_give_zeros_and_zero_gradients(sinks):
    """A window that leaves a row no key (query i of L > S past the last key with window
    (0, 0)), a padding mask that hides every key of a sequence: zeros, never NaN; the sinks'
    gradient gets nothing from such rows."""
    variant = Variant(window_size=(0, 0), sinks=sinks)
    t = make_inputs(Shape(B=2, H=2, Hkv=2, L=9, S=4, padding="bool"), variant)
    with torch.no_grad():
        t["key_padding_mask"][1] = False
    out, weights = run_ours(t, variant, with_weights=True)
    assert torch.equal(out[:, :, 4:], torch.zeros_like(out[:, :, 4:]))  # rows 4.. see no key
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(weights[1], 0 * weights[1])
    assert not out.isnan().any()
    check_float64(t, variant, with_weights=True)


@pytest.mark.parametrize("S", [7, 600])
def test_strided_slopes_and_sinks_read_by_their_strides(S):
    """Slopes (B, H) transposed from (H, B) and expanded from (1, H), sinks every other
    element of a longer tensor: the results of their contiguous copies (forward, decoding)."""
    B, H, L, D = 2, 4, 5, 8
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64) for n in (L, S, S))
    sinks = torch.randn(2 * H, dtype=torch.float64)[::2]
    for slopes in (
        torch.rand(H, B, dtype=torch.float64).t(),
        torch.rand(1, H, dtype=torch.float64).expand(B, H),
    ):
        assert not slopes.is_contiguous()
        strided = qops.attention(q, k, v, window_size=(3, 400), alibi_slopes=slopes, sinks=sinks)
        contiguous = qops.attention(
            q,
            k,
            v,
            window_size=(3, 400),
            alibi_slopes=slopes.contiguous(),
            sinks=sinks.contiguous(),
        )
        assert torch.equal(strided, contiguous)


def test_sinks_of_minus_infinity_are_no_sinks():
    """exp(-inf) = 0 adds nothing to the denominator: the output of no sinks, and a zero
    gradient for them (not NaN)."""
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64) for n in (5, 9, 9))
    sinks = torch.full((3,), -math.inf, dtype=torch.float64, requires_grad=True)
    out = qops.attention(q, k, v, sinks=sinks)
    torch.testing.assert_close(out, qops.attention(q, k, v), **VALUES_F64)
    (grad,) = torch.autograd.grad(out.sum(), sinks)
    assert torch.equal(grad, torch.zeros_like(grad))


# ---- dropout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("variant", ["all", "sinks_dominant", "window_causal_mistral"])
def test_dropout_is_reproducible_and_matches_the_reference_with_the_ops_mask(variant, with_weights):
    """The stream is unchanged by the variants: after torch.manual_seed, the op draws the state
    ``_draw_dropout_rng_state`` draws, and _attention_dropout_mask regenerates its mask."""
    shape, p = SHAPES["gqa_L_lt_S_bool_mask"], 0.3
    v = VARIANTS[variant]
    t = make_inputs(shape, v)
    torch.manual_seed(7)
    rng_state = qkv_attention.ops._draw_dropout_rng_state(p)
    keep = ops._attention_dropout_mask(rng_state, shape.B, shape.H, shape.L, shape.S, p)
    torch.manual_seed(7)
    first = run_ours(t, v, with_weights, dropout_p=p)
    torch.manual_seed(7)
    second = run_ours(t, v, with_weights, dropout_p=p)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    torch.manual_seed(7)
    check_float64(t, v, with_weights=with_weights, dropout=(keep, p))


def test_dropout_acts_on_the_key_weights_only():
    """With a dominant sink every kept key weight is p_j / (1 - p) of the reference's p_j:
    the sink's share of the denominator is the same with and without dropout."""
    B, H, L, S, D, p = 1, 2, 4, 64, 8, 0.5
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64) for n in (L, S, S))
    sinks = torch.tensor([3.0, 5.0], dtype=torch.float64)
    _, plain = qops.attention_with_weights(q, k, v, sinks=sinks)
    torch.manual_seed(3)
    _, dropped = qops.attention_with_weights(q, k, v, dropout_p=p, sinks=sinks)
    kept = dropped != 0
    assert 0 < kept.sum() < kept.numel()
    torch.testing.assert_close(dropped[kept], plain[kept] / (1 - p), **VALUES_F64)


# ---- gradcheck and gradgradcheck --------------------------------------------------------------


def _small(variant, shape=Shape(B=2, H=2, Hkv=1, L=3, S=4, D=2, Dv=3), attn_mask=None):
    t = make_inputs(replace(shape, attn_mask=attn_mask), variant)
    names = [n for n in ("query", "key", "value", "attn_mask", "sinks") if t[n] is not None]
    return t, names


GRADCHECK_VARIANTS = {
    "window": Variant(window_size=(1, 0), is_causal=True),
    "softcap": Variant(softcap=1.0, scale=1.3),
    "alibi": Variant(alibi="batch"),
    "sinks": Variant(sinks=0.5),
    "all": Variant(window_size=(1, 1), softcap=2.0, alibi="heads", sinks=0.0, is_causal=True),
}


@pytest.mark.parametrize("op", ["attention", "attention_with_weights", "averaged_weights"])
@pytest.mark.parametrize("attn_mask", [None, "float"])
@pytest.mark.parametrize("variant", list(GRADCHECK_VARIANTS))
def test_gradcheck_and_gradgradcheck(variant, attn_mask, op):
    v = GRADCHECK_VARIANTS[variant]
    t, names = _small(v, attn_mask=attn_mask)

    def fn(*tensors):
        given = dict(t, **dict(zip(names, tensors)))
        return run_ours(given, v, with_weights=op != "attention", average=op == "averaged_weights")

    inputs = tuple(t[n] for n in names)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs, fast_mode=True)


def test_gradgradcheck_full_jacobian_with_sinks():
    v = GRADCHECK_VARIANTS["all"]
    t, names = _small(v, Shape(B=1, H=2, Hkv=2, L=2, S=3, D=2, Dv=2))

    def fn(*tensors):
        return run_ours(dict(t, **dict(zip(names, tensors))), v)

    assert gradgradcheck(fn, tuple(t[n] for n in names))


def test_gradcheck_with_dropout_and_sinks():
    v = GRADCHECK_VARIANTS["all"]
    t, names = _small(v)

    def fn(*tensors):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(11)  # the same mask at every evaluation
            return run_ours(dict(t, **dict(zip(names, tensors))), v, True, dropout_p=0.4)

    inputs = tuple(t[n] for n in names)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs, fast_mode=True)


# ---- attention_varlen -------------------------------------------------------------------------


def _offsets(lengths):
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0)


def run_varlen_and_reference(
    lq, lk, variant, H=4, Hkv=2, D=8, Dv=6, dtype=torch.float64, dropout_p=0.0
):
    """Ours on the packed sequences and the reference on each sequence alone, packed again.
    With dropout, sequence b's mask is the one of the stream (seed, offset + b) of the state
    the op draws."""
    g = torch.Generator().manual_seed(3)
    B = len(lq)
    q = torch.randn(sum(lq), H, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(sum(lk), Hkv, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(sum(lk), Hkv, Dv, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    slopes = None
    if variant.alibi is not None:
        sizes = (H,) if variant.alibi == "heads" else (B, H)
        slopes = (torch.rand(*sizes, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    sinks = None
    if variant.sinks is not None:
        sinks = (torch.randn(H, generator=g, dtype=torch.float64) + variant.sinks).to(dtype)
        sinks.requires_grad_()
    cu_q, cu_k = _offsets(lq), _offsets(lk)
    torch.manual_seed(13)
    rng_state = qkv_attention.ops._draw_dropout_rng_state(dropout_p)
    torch.manual_seed(13)
    out = qops.attention_varlen(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max(lq),
        max(lk),
        dropout_p=dropout_p,
        is_causal=variant.is_causal,
        scale=variant.scale,
        window_size=variant.window_size,
        softcap=variant.softcap,
        alibi_slopes=slopes,
        sinks=sinks,
    )
    pieces = []
    for b in range(B):
        # (L_b, H, D) -> (1, H, L_b, D)
        qb, kb, vb = (
            x[c[b] : c[b + 1]].transpose(0, 1).unsqueeze(0)
            for x, c in ((q, cu_q), (k, cu_k), (v, cu_k))
        )
        keep = None
        if dropout_p > 0:
            state = torch.tensor([rng_state[0].item(), rng_state[1].item() + b])
            L_b, S_b = qb.size(2), kb.size(2)
            keep = ops._attention_dropout_mask(state, 1, H, L_b, S_b, dropout_p)
        ref, _ = reference_attention(
            qb,
            kb,
            vb,
            dropout_keep=keep,
            dropout_p=dropout_p,
            is_causal=variant.is_causal,
            scale=variant.scale,
            window_size=variant.window_size,
            softcap=variant.softcap,
            alibi_slopes=None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b]),
            sinks=sinks,
        )
        pieces.append(ref[0].transpose(0, 1))  # (1, H, L_b, Dv) -> (L_b, H, Dv)
    reference = torch.cat(pieces)
    leaves = [q, k, v] + ([sinks] if sinks is not None else [])
    return out, reference, leaves


VARLEN_LENGTHS = {
    "mixed": ([0, 1, 7, 3, 300, 5, 0, 2], [0, 1, 7, 3, 300, 5, 0, 2]),
    "cross": ([3, 1, 9, 0, 40], [5, 0, 2, 6, 70]),
}


@pytest.mark.parametrize("lengths", list(VARLEN_LENGTHS))
@pytest.mark.parametrize(
    "variant", ["window_causal_mistral", "window", "alibi_batch", "sinks", "all", "all_noncausal"]
)
def test_varlen_matches_the_reference_per_sequence(variant, lengths):
    out, reference, leaves = run_varlen_and_reference(*VARLEN_LENGTHS[lengths], VARIANTS[variant])
    torch.testing.assert_close(out, reference, **VALUES_F64)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves, grad)
    theirs = torch.autograd.grad(reference, leaves, grad)
    for mine, expected in zip(ours, theirs):
        torch.testing.assert_close(mine, expected, **GRADS_F64)


def test_varlen_dropout_matches_the_reference_with_each_sequences_mask():
    out, reference, leaves = run_varlen_and_reference(
        [4, 0, 9, 30], [7, 3, 9, 25], VARIANTS["all"], dropout_p=0.3
    )
    torch.testing.assert_close(out, reference, **VALUES_F64)
    grad = torch.randn_like(out)
    for mine, expected in zip(
        torch.autograd.grad(out, leaves, grad), torch.autograd.grad(reference, leaves, grad)
    ):
        torch.testing.assert_close(mine, expected, **GRADS_F64)


def test_varlen_gradcheck_with_sinks():
    lq, lk = [2, 0, 3], [3, 2, 1]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 1, 2, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(3, 2, generator=g, dtype=torch.float64)

    def fn(q, k, v, sinks):
        return qops.attention_varlen(
            q,
            k,
            v,
            _offsets(lq),
            _offsets(lk),
            3,
            3,
            is_causal=True,
            window_size=(1, 0),
            softcap=2.0,
            alibi_slopes=slopes,
            sinks=sinks,
        )

    assert gradcheck(fn, (q, k, v, sinks))
    assert gradgradcheck(fn, (q, k, v, sinks), fast_mode=True)


# ---- attention_with_kv_cache ------------------------------------------------------------------


def kv_cache_case(
    lengths, L, L_new, S_max, variant, H=4, Hkv=2, D=16, Dv=8, dtype=torch.float64, mask=False
):
    """Ours on NaN-filled caches against the reference on each sequence's n_b = lengths[b] +
    L_new valid entries, aligned bottom-right (o = n_b - L). ``mask``: a random bool attn_mask
    (B, 1, L, S_max) too, cut to each sequence's valid columns for the reference."""
    g = torch.Generator().manual_seed(5)
    B = len(lengths)

    def randn(*sizes):
        return torch.randn(*sizes, generator=g, dtype=torch.float64).to(dtype)

    k_cache = torch.full((B, Hkv, S_max, D), float("nan"), dtype=dtype)
    v_cache = torch.full((B, Hkv, S_max, Dv), float("nan"), dtype=dtype)
    for b, n in enumerate(lengths):
        k_cache[b, :, :n], v_cache[b, :, :n] = randn(Hkv, n, D), randn(Hkv, n, Dv)
    query, key, value = randn(B, H, L, D), randn(B, Hkv, L_new, D), randn(B, Hkv, L_new, Dv)
    slopes = None
    if variant.alibi is not None:
        sizes = (H,) if variant.alibi == "heads" else (B, H)
        slopes = (torch.rand(*sizes, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    sinks = None
    if variant.sinks is not None:
        sinks = (torch.randn(H, generator=g, dtype=torch.float64) + variant.sinks).to(dtype)
    attn_mask = torch.rand(B, 1, L, S_max, generator=g) < 0.8 if mask else None
    with torch.no_grad():
        out = qops.attention_with_kv_cache(
            query,
            k_cache,
            v_cache,
            key,
            value,
            torch.tensor(lengths),
            attn_mask,
            is_causal=variant.is_causal,
            scale=variant.scale,
            window_size=variant.window_size,
            softcap=variant.softcap,
            alibi_slopes=slopes,
            sinks=sinks,
        )
    pieces = []
    for b, n in enumerate(lengths):
        n_b = n + L_new
        ref, _ = reference_attention(
            query[b : b + 1],
            k_cache[b : b + 1, :, :n_b],
            v_cache[b : b + 1, :, :n_b],
            None if attn_mask is None else attn_mask[b : b + 1, :, :, :n_b],
            is_causal=variant.is_causal,
            scale=variant.scale,
            window_size=variant.window_size,
            softcap=variant.softcap,
            alibi_slopes=None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b]),
            sinks=sinks,
            causal_offset=n_b - L,
        )
        pieces.append(ref)
    return out, torch.cat(pieces)


KV_VARIANTS = {
    "window_causal": Variant(window_size=(7, 0), is_causal=True),
    "window_not_causal": Variant(window_size=(4, 2)),
    "sinks": Variant(sinks=1.0, is_causal=True),
    "alibi_batch_softcap": Variant(alibi="batch", softcap=2.0, is_causal=True),
    "all": Variant(window_size=(9, 0), softcap=3.0, alibi="heads", sinks=0.5, is_causal=True),
}


@pytest.mark.parametrize("step", ["prefill", "chunk", "decode_one"])
@pytest.mark.parametrize("variant", list(KV_VARIANTS))
def test_kv_cache_general_path_matches_the_reference_bottom_right(variant, step):
    lengths, L, L_new = {
        "prefill": ([0, 0], 20, 20),
        "chunk": ([5, 23], 6, 6),
        "decode_one": ([3, 40], 1, 1),
    }[step]
    out, reference = kv_cache_case(lengths, L, L_new, 64, KV_VARIANTS[variant])
    assert not out.isnan().any()
    torch.testing.assert_close(out, reference, **VALUES_F64)


KV_DECODE_VARIANTS = {
    **KV_VARIANTS,
    "window_of_600": Variant(window_size=(599, 0), is_causal=True, sinks=0.0),
    "window_of_1024": Variant(window_size=(1023, 0), is_causal=True, alibi="heads"),
}


@pytest.mark.parametrize("L", [1, 4, 16])
@pytest.mark.parametrize("variant", list(KV_DECODE_VARIANTS))
def test_kv_cache_split_path_matches_the_reference_bottom_right(variant, L):
    """n_b > 512 valid keys and L <= 16 queries: the split-KV decoding path."""
    out, reference = kv_cache_case([700, 1500], L, L, 1600, KV_DECODE_VARIANTS[variant])
    assert not out.isnan().any()
    torch.testing.assert_close(out, reference, **VALUES_F64)


@pytest.mark.parametrize("path", ["general", "split"])
@pytest.mark.parametrize("variant", ["window_causal", "all"])
def test_kv_cache_with_a_mask_and_the_variants(variant, path):
    lengths, S_max = ([5, 23], 64) if path == "general" else ([700, 1500], 1600)
    out, reference = kv_cache_case(lengths, 3, 3, S_max, KV_VARIANTS[variant], mask=True)
    torch.testing.assert_close(out, reference, **VALUES_F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kv_cache_lower_precision(dtype):
    out, reference = kv_cache_case([700, 30], 2, 2, 800, KV_VARIANTS["all"], dtype=dtype)
    tolerance = (
        VS_FLOAT64_TOLERANCE[dtype] if dtype == torch.float32 else dict(atol=2.0**-6, rtol=2.0**-6)
    )
    torch.testing.assert_close(out.double(), reference, **tolerance)


# ---- bitwise across thread counts -------------------------------------------------------------


def _bits(t):
    return t.detach().contiguous().view(torch.uint8)


def _run_all_outputs_and_grads(t, variant, dropout_p):
    """attention_with_weights, attention with dropout and without (the decoding path takes no
    weights and no dropout), and the gradients of all three."""
    leaves = differentiable(t)
    results = run_ours(t, variant, with_weights=True)
    torch.manual_seed(99)
    results += run_ours(t, variant, dropout_p=dropout_p)
    results += run_ours(t, variant)
    values, grads = values_and_grads(results, leaves)
    return values + grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "case",
    ["blocks", "decode"],
)
def test_thread_count_does_not_change_any_bit(case, dtype, restore_threads):
    variant = Variant(window_size=(150, 20), softcap=3.0, alibi="heads", sinks=1.0, is_causal=True)
    shape = (
        Shape(B=1, H=4, Hkv=2, L=301, S=333, D=16, Dv=8, padding="bool")
        if case == "blocks"
        else Shape(B=2, H=4, Hkv=2, L=5, S=1300, D=16, Dv=8)
    )
    if case == "decode":  # a band of 900 keys (top-left alignment: through its right side)
        variant = replace(variant, window_size=(2, 900), is_causal=False)
    t = make_inputs(shape, variant, dtype=dtype)
    torch.set_num_threads(1)
    expected = _run_all_outputs_and_grads(t, variant, 0.2)
    for threads in (2, 3):
        torch.set_num_threads(threads)
        results = _run_all_outputs_and_grads(t, variant, 0.2)
        for i, (a, b) in enumerate(zip(results, expected)):
            assert torch.equal(_bits(a), _bits(b)), f"result {i} differs with {threads} threads"


def test_varlen_and_kv_cache_thread_count_does_not_change_any_bit(restore_threads):
    variant = VARIANTS["all"]
    results = {}
    for threads in (1, 3):
        torch.set_num_threads(threads)
        out, _, leaves = run_varlen_and_reference(
            [5, 300, 17], [9, 280, 40], variant, dtype=torch.float32
        )
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        cache_out, _ = kv_cache_case([700, 1500], 3, 3, 1600, variant, dtype=torch.float32)
        results[threads] = [out, *grads, cache_out]
    for a, b in zip(results[3], results[1]):
        assert torch.equal(_bits(a), _bits(b))


# ---- torch.compile, vmap, autocast ------------------------------------------------------------


def test_compile_fullgraph_with_gradients_of_sinks():
    torch._dynamo.reset()
    variant = VARIANTS["all"]
    t = make_inputs(SHAPES["gqa_L_lt_S_bool_mask"], variant, dtype=torch.float32)

    def fn(q, k, v, mask, slopes, sinks):
        out = qops.attention(
            q,
            k,
            v,
            mask,
            is_causal=True,
            window_size=(5, 2),
            softcap=3.0,
            alibi_slopes=slopes,
            sinks=sinks,
        )
        _, weights = qops.attention_with_weights(
            q, k, v, window_size=(5, 2), softcap=3.0, alibi_slopes=slopes, sinks=sinks
        )
        return out.sum() + (weights * weights).sum()

    args = [t[n] for n in ("query", "key", "value", "attn_mask", "alibi_slopes", "sinks")]
    leaves = [t[n] for n in ("query", "key", "value", "sinks")]
    eager = torch.autograd.grad(fn(*args), leaves)
    # aot_eager: the graph is traced whole (Meta kernels, the autograd of the ops, fullgraph)
    # with no C++ of inductor's, whose cache is not keyed by ATEN_CPU_CAPABILITY (this file runs
    # at every CPU level); integrations/test_compile.py covers inductor.
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(*args), leaves)
    for mine, expected in zip(grads, eager):
        torch.testing.assert_close(mine, expected, rtol=1e-6, atol=1e-6)
    assert grads[-1].abs().sum() > 0


@pytest.mark.parametrize("sinks_dim", [None, 0])
@pytest.mark.parametrize("slopes_dim", [None, 0])
def test_vmap_matches_per_sample_calls(sinks_dim, slopes_dim):
    N, B, H, L, S, D = 3, 2, 4, 6, 9, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(N, B, H, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(N, B, 2, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(N, B, 2, S, D, generator=g, dtype=torch.float64)
    sinks = torch.randn(*((N,) if sinks_dim == 0 else ()), H, generator=g, dtype=torch.float64)
    slopes = torch.rand(*((N,) if slopes_dim == 0 else ()), H, generator=g, dtype=torch.float64)

    def fn(q, k, v, slopes, sinks):
        out, weights = qops.attention_with_weights(
            q,
            k,
            v,
            is_causal=True,
            window_size=(3, 0),
            softcap=2.0,
            alibi_slopes=slopes,
            sinks=sinks,
        )
        return out, weights

    batched = torch.func.vmap(fn, in_dims=(0, 0, 0, slopes_dim, sinks_dim))(q, k, v, slopes, sinks)
    for n in range(N):
        expected = fn(
            q[n],
            k[n],
            v[n],
            slopes if slopes_dim is None else slopes[n],
            sinks if sinks_dim is None else sinks[n],
        )
        for a, b in zip(batched, expected):
            torch.testing.assert_close(a[n], b, rtol=1e-12, atol=1e-12)


def test_vmap_with_dropout_matches_per_sample_calls_with_their_states():
    """randomness="different": each sample draws its own state, as a call of its own would
    (the vmap rule calls the op per sample); a window and sinks ride along."""
    N, B, H, L, S, D, p = 3, 2, 2, 5, 7, 4, 0.4
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(N, B, H, n, D, generator=g, dtype=torch.float64) for n in (L, S, S))
    sinks = torch.randn(H, generator=g, dtype=torch.float64)

    def fn(q, k, v):
        return qops.attention(q, k, v, None, p, window_size=(2, 1), sinks=sinks)

    torch.manual_seed(5)
    batched = torch.func.vmap(fn, randomness="different")(q, k, v)
    torch.manual_seed(5)
    states = qkv_attention.ops._draw_dropout_rng_state(p, samples=N)
    for n in range(N):
        keep = ops._attention_dropout_mask(states[n], B, H, L, S, p)
        expected, _ = reference_attention(
            q[n], k[n], v[n], dropout_keep=keep, dropout_p=p, window_size=(2, 1), sinks=sinks
        )
        torch.testing.assert_close(batched[n], expected, **VALUES_F64)


def test_vmap_of_varlen_and_kv_cache_with_the_variants_matches_per_sample_calls():
    N, H, D = 2, 2, 8
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(N, 5, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    cu = _offsets([2, 3])
    sinks = torch.randn(N, H, generator=g, dtype=torch.float64)
    slopes = torch.rand(2, H, generator=g, dtype=torch.float64)

    def varlen(q, k, v, sinks):
        return qops.attention_varlen(
            q,
            k,
            v,
            cu,
            cu,
            3,
            3,
            is_causal=True,
            window_size=(1, 0),
            softcap=2.0,
            alibi_slopes=slopes,
            sinks=sinks,
        )

    batched = torch.func.vmap(varlen)(q, k, v, sinks)
    for n in range(N):
        torch.testing.assert_close(batched[n], varlen(q[n], k[n], v[n], sinks[n]), **VALUES_F64)

    caches = [torch.randn(N, 2, 1, 16, D, generator=g, dtype=torch.float64) for _ in range(2)]
    query = torch.randn(N, 2, H, 1, D, generator=g, dtype=torch.float64)
    lengths = torch.tensor([9, 16])

    def step(query, k_cache, v_cache, sinks):
        return qops.attention_with_kv_cache(
            query, k_cache, v_cache, None, None, lengths, window_size=(3, 0), sinks=sinks
        )

    batched = torch.func.vmap(step)(query, *caches, sinks)
    for n in range(N):
        expected = step(query[n], caches[0][n], caches[1][n], sinks[n])
        torch.testing.assert_close(batched[n], expected, **VALUES_F64)


def test_autocast_bfloat16_with_float32_sinks_and_slopes():
    variant = VARIANTS["all"]
    t = make_inputs(SHAPES["gqa_L_lt_S_bool_mask"], variant, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out,) = run_ours(t, variant)
    assert out.dtype == torch.bfloat16
    # Autocast casts query, key, value and the float masks; float32 slopes and sinks stay
    # float32 (half ones become float32): the same call by hand gives the same bits.
    rounded = {
        n: x.detach().to(torch.bfloat16)
        if n in ("query", "key", "value")
        or (n == "attn_mask" and x is not None and x.is_floating_point())
        else x
        for n, x in t.items()
    }
    assert torch.equal(out, run_ours(rounded, variant)[0])
    reference, _ = run_reference(rounded, variant)
    torch.testing.assert_close(out.double(), reference, atol=2.0**-6, rtol=2.0**-6)
    grads = torch.autograd.grad(out, differentiable(t), torch.ones_like(out))
    sinks_grad = grads[-1]
    assert sinks_grad.dtype == torch.float32 and sinks_grad.abs().sum() > 0


def test_autocast_bfloat16_varlen_with_float32_sinks():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(7, 4, 8, generator=g, requires_grad=True) for _ in range(3))
    sinks = torch.randn(4, generator=g, requires_grad=True)
    cu = _offsets([3, 4])
    kwargs = dict(window_size=(1, 0), is_causal=True, softcap=3.0, sinks=sinks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = qops.attention_varlen(q, k, v, cu, cu, 4, 4, **kwargs)
    assert out.dtype == torch.bfloat16
    by_hand = [t.detach().to(torch.bfloat16) for t in (q, k, v)]
    assert torch.equal(out, qops.attention_varlen(*by_hand, cu, cu, 4, 4, **kwargs))
    grads = torch.autograd.grad(out, (q, sinks), torch.ones_like(out))
    assert grads[0].dtype == torch.float32 and grads[1].dtype == torch.float32


# ---- errors -----------------------------------------------------------------------------------


def _error_call(op, **kwargs):
    """One call of ``op`` on small valid float32 inputs, with ``kwargs`` changed."""
    B, H, L, S, D = 2, 4, 3, 5, 8
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, 2, S, D), torch.randn(B, 2, S, D)
    if op == "attention":
        return lambda: qops.attention(q, k, v, **kwargs)
    if op == "attention_with_weights":
        return lambda: qops.attention_with_weights(q, k, v, **kwargs)
    if op == "attention_varlen":
        packed = [x.transpose(1, 2).reshape(-1, x.size(1), D) for x in (q, k, v)]
        cu_q, cu_k = _offsets([L] * B), _offsets([S] * B)
        return lambda: qops.attention_varlen(*packed, cu_q, cu_k, L, S, **kwargs)
    caches = torch.zeros(B, 2, 16, D), torch.zeros(B, 2, 16, D)
    return lambda: qops.attention_with_kv_cache(q, *caches, k, v, torch.tensor([1, 4]), **kwargs)


ERRORS = {
    "window left below -1": (dict(window_size=(-2, 0)), "window_size"),
    "window right below -1": (dict(window_size=(3, -5)), "window_size"),
    "negative softcap": (dict(softcap=-1.0), "softcap"),
    "NaN softcap": (dict(softcap=float("nan")), "softcap"),
    "infinite softcap": (dict(softcap=float("inf")), "softcap"),
    "slopes of L entries": (dict(alibi_slopes=torch.rand(3)), "alibi_slopes"),
    "slopes (B, H, 1)": (dict(alibi_slopes=torch.rand(2, 4, 1)), "alibi_slopes"),
    "slopes (H, B)": (dict(alibi_slopes=torch.rand(4, 2)), "alibi_slopes"),
    "slopes float64 with float32 inputs": (
        dict(alibi_slopes=torch.rand(4, dtype=torch.float64)),
        "alibi_slopes",
    ),
    "slopes float16": (dict(alibi_slopes=torch.rand(4).half()), "alibi_slopes"),
    "slopes int64": (dict(alibi_slopes=torch.ones(4, dtype=torch.int64)), "alibi_slopes"),
    "slopes on the meta device": (dict(alibi_slopes=torch.rand(4, device="meta")), "alibi_slopes"),
    "slopes that require grad": (dict(alibi_slopes=torch.rand(4).requires_grad_()), "alibi_slopes"),
    "sinks of the key heads": (dict(sinks=torch.randn(2)), "sinks"),
    "sinks (B, H)": (dict(sinks=torch.randn(2, 4)), "sinks"),
    "sinks 0-d": (dict(sinks=torch.tensor(1.0)), "sinks"),
    "sinks float64 with float32 inputs": (dict(sinks=torch.randn(4, dtype=torch.float64)), "sinks"),
    "sinks bool": (dict(sinks=torch.ones(4, dtype=torch.bool)), "sinks"),
    "sinks on the meta device": (dict(sinks=torch.randn(4, device="meta")), "sinks"),
}


@pytest.mark.parametrize(
    "op", ["attention", "attention_with_weights", "attention_varlen", "attention_with_kv_cache"]
)
@pytest.mark.parametrize("error", list(ERRORS))
def test_bad_variant_arguments_raise_naming_the_argument(error, op):
    kwargs, name = ERRORS[error]
    with pytest.raises((RuntimeError, TypeError, ValueError), match=rf"\b{name}\b"):
        with torch.no_grad() if "require grad" not in error else torch.enable_grad():
            _error_call(op, **kwargs)()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(alibi_slopes=torch.rand(4, dtype=torch.float32), sinks=torch.randn(4)),
        dict(alibi_slopes=torch.rand(2, 4), sinks=torch.randn(4)),
    ],
    ids=["float32 (H,) slopes", "(B, H) slopes"],
)
def test_float32_slopes_and_sinks_are_accepted_with_half_inputs(kwargs):
    B, H, L, S, D = 2, 4, 3, 5, 8
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.bfloat16) for n in (L, S, S))
    out = qops.attention(q, k, v, **kwargs)
    t = dict(query=q, key=k, value=v, attn_mask=None, key_padding_mask=None, **kwargs)
    reference, _ = run_reference(t, Variant())
    torch.testing.assert_close(out.double(), reference, **VS_FLOAT64_TOLERANCE[torch.bfloat16])
