"""Property-based tests (hypothesis) of the three operators and of MultiheadAttention against
float64 references written with plain torch ops.

Hypothesis draws the sizes (0, 1, small odd ones, and the SIMD/block boundaries 15-17, 31-33,
63-65), the dtype, the memory layout of every tensor (contiguous, transposed, sliced with a
storage offset and stride 2, stride-0 expanded, arbitrarily permuted), masks (bool or float,
with -inf, broadcast in any subset of dims, padding masks), causal with L != S, scale, dropout
and gradients. derandomize=True and no example database: every run draws the same examples, so
CI is reproducible; a failure prints the example to rerun. At least 500 examples per run:
``EXAMPLES`` below sums to 620.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qkv_attention
from helpers import (
    ALL_DTYPES,
    HALF_DTYPES,
    HALF_GRAD_TOLERANCE_OF_MAX,
    VS_FLOAT64_TOLERANCE,
    assert_close_to_max,
    reference_attention,
)

ops = torch.ops.qkv_attention

EXAMPLES = dict(attention=300, qkv_projection=100, merge_heads=100, module=120)


def hypothesis_settings(test_name):
    return settings(
        max_examples=EXAMPLES[test_name],
        derandomize=True,  # the same examples on every run and machine
        database=None,  # nothing remembered between runs
        deadline=None,  # timings on this shared machine are noisy
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


# Sizes: mostly tiny (0 and 1 included), sometimes just around the vector and block widths a
# kernel may tile by (16 float32 lanes of AVX-512, blocks of 32/64 keys).
BOUNDARY_SIZES = (15, 16, 17, 31, 32, 33, 63, 64, 65)


def sizes(low=0, high=6):
    small = st.integers(low, high)
    return st.one_of(small, small, small, st.sampled_from(BOUNDARY_SIZES))


def batch_sizes(high=3):
    return st.integers(0, high)


LAYOUTS = ("contiguous", "transposed", "strided", "expanded", "permuted")


def draw_layout(data, ndim, label):
    kind = data.draw(st.sampled_from(LAYOUTS), label=f"{label} layout")
    detail = None
    if ndim == 0:
        kind = "contiguous"
    elif kind == "expanded":
        detail = data.draw(st.integers(0, ndim - 1), label=f"{label} expanded dim")
    elif kind == "permuted":
        detail = data.draw(st.permutations(range(ndim)), label=f"{label} storage order")
    return kind, detail


def laid_out(shape, layout, values):
    """A tensor of `shape` whose values come from `values(storage_shape)`, stored as `layout`
    says: the view a user would pass (never a copy made contiguous)."""
    kind, detail = layout
    shape = list(shape)
    ndim = len(shape)
    if kind == "expanded":  # stride 0 in one dim
        base = list(shape)
        base[detail] = 1
        return values(base).expand(shape)
    if kind == "transposed" and ndim >= 2:
        stored = list(shape)
        stored[-1], stored[-2] = stored[-2], stored[-1]
        return values(stored).transpose(-1, -2)
    if kind == "strided":  # a storage offset and stride 2 in the last dim
        wide = values([n + 1 for n in shape[:-1]] + [2 * shape[-1] + 1])
        return wide[(slice(1, None),) * (ndim - 1) + (slice(1, None, 2),)]
    if kind == "permuted":
        perm = list(detail)
        inverse = sorted(range(ndim), key=lambda i: perm[i])
        return values([shape[p] for p in perm]).permute(inverse)
    return values(shape)


def backward_both(normal, output, ref_output, weights=None, ref_weights=None):
    """Backpropagates the same random cotangents of the output (and of the weights, when given)
    through ours and through the float64 reference; returns the cotangents."""
    grad_output = normal(list(output.shape))
    loss = (output * grad_output).sum()
    ref_loss = (ref_output * grad_output.double()).sum()
    grad_weights = None
    if weights is not None:
        grad_weights = normal(list(weights.shape))
        loss = loss + (weights * grad_weights).sum()
        ref_loss = ref_loss + (ref_weights * grad_weights.double()).sum()
    loss.backward()
    ref_loss.backward()
    return grad_output, grad_weights


def normal_values(generator, dtype, scale=1.0):
    def values(shape):
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    return values


def leaf(t, requires_grad):
    """The same view (strides, storage offset) as a leaf, so its .grad can be read."""
    return t.detach().requires_grad_(requires_grad)


def reference_leaf(t):
    return t.detach().to(torch.float64).requires_grad_(t.requires_grad)


def assert_matches(actual, expected, dtype, what, gradient=False):
    """Our result against the float64 reference, with the tolerances of helpers.
    Gradients are sums over L or S terms: their error scales with the largest gradient, so
    float64/float32 use the elementwise tolerance with atol relative to max|expected|, and half
    types HALF_GRAD_TOLERANCE_OF_MAX."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == dtype, (what, actual.dtype)
    if actual.numel() == 0:
        return
    if gradient and dtype in HALF_DTYPES:
        try:
            assert_close_to_max(actual, expected, HALF_GRAD_TOLERANCE_OF_MAX[dtype])
        except AssertionError as error:
            raise AssertionError(f"{what} ({dtype}): {error}") from None
        return
    tolerance = dict(VS_FLOAT64_TOLERANCE[dtype])
    if gradient:
        tolerance["atol"] *= max(1.0, expected.abs().max().item())
    torch.testing.assert_close(
        actual.double(), expected.double(), **tolerance, msg=lambda m: f"{what} ({dtype}): {m}"
    )


def masked_scores(q, k, attn_mask, key_padding_mask, is_causal, scale):
    """scale * q k^T + masks in float64, -inf where a key may not be seen: (B, H, L, S)."""
    q, k = q.double(), k.double()
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1)) if q.size(-1) > 0 else 1.0
    scores = (q @ k.transpose(-2, -1)) * scale
    for mask in (attn_mask, None if key_padding_mask is None else key_padding_mask[:, None, None]):
        if mask is None:
            continue
        scores = (
            scores.masked_fill(~mask, -math.inf)
            if mask.dtype == torch.bool
            else scores + mask.double()
        )
    if is_causal:
        L, S = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), -math.inf)
    return scores


# ---------------------------------------------------------------------------------------------
# attention, attention_with_weights and _attention_forward


def draw_mask(data, generator, target_shape, dtype, label):
    """None, or a bool / float mask broadcastable to `target_shape`, in a drawn layout."""
    kind = data.draw(st.sampled_from([None, "bool", "float"]), label=f"{label} kind")
    if kind is None:
        return None
    if label == "attn_mask":
        rank = data.draw(st.integers(0, 4), label="attn_mask rank")
        shape = [
            n if data.draw(st.booleans(), label=f"attn_mask dim {d} full") else 1
            for d, n in enumerate(target_shape[4 - rank :])
        ]
    else:
        shape = list(target_shape)
    layout = draw_layout(data, len(shape), label)
    if kind == "bool":
        keep = data.draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]), label=f"{label} keep fraction")

        def values(s):
            return torch.rand(s, generator=generator) < keep
    else:
        minus_inf = data.draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]), label=f"{label} -inf share")
        scale = data.draw(st.sampled_from([0.5, 3.0]), label=f"{label} scale")

        def values(s):
            v = torch.randn(s, generator=generator, dtype=torch.float64) * scale
            v = v.masked_fill(torch.rand(s, generator=generator) < minus_inf, -math.inf)
            return v.to(dtype)

    return laid_out(shape, layout, values)


@hypothesis_settings("attention")
@given(data=st.data())
def test_attention_matches_float64_reference(data):
    dtype = data.draw(st.sampled_from(ALL_DTYPES), label="dtype")
    B, H = data.draw(batch_sizes(), label="B"), data.draw(batch_sizes(), label="H")
    L, S = data.draw(sizes(), label="L"), data.draw(sizes(), label="S")
    D, Dv = data.draw(sizes(), label="D"), data.draw(sizes(), label="Dv")
    if B * H * L * S * (D + Dv + 1) > 100_000:  # keep each example in the milliseconds
        B = H = 1
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    normal = normal_values(generator, dtype)

    route = data.draw(
        st.sampled_from(["attention", "attention_with_weights", "_attention_forward"]),
        label="route",
    )
    dropout_p = 0.0
    need_weights = route == "attention_with_weights"
    if route == "_attention_forward":
        dropout_p = data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="dropout_p")
        need_weights = data.draw(st.booleans(), label="need_weights")
    is_causal = data.draw(st.booleans(), label="is_causal")
    scale = data.draw(
        st.one_of(st.none(), st.sampled_from([0.0, -0.7]), st.floats(0.05, 2.0)), label="scale"
    )
    with_grad = data.draw(st.booleans(), label="gradients")

    query = leaf(laid_out((B, H, L, D), draw_layout(data, 4, "query"), normal), with_grad)
    key = leaf(laid_out((B, H, S, D), draw_layout(data, 4, "key"), normal), with_grad)
    value = leaf(laid_out((B, H, S, Dv), draw_layout(data, 4, "value"), normal), with_grad)
    attn_mask = draw_mask(data, generator, (B, H, L, S), dtype, "attn_mask")
    key_padding_mask = draw_mask(data, generator, (B, S), dtype, "key_padding_mask")
    mask_grad = with_grad and data.draw(st.booleans(), label="mask gradients")
    if attn_mask is not None:
        attn_mask = leaf(attn_mask, mask_grad and attn_mask.is_floating_point())
    if key_padding_mask is not None:
        key_padding_mask = leaf(
            key_padding_mask, mask_grad and key_padding_mask.is_floating_point()
        )

    weights = logsumexp = keep = None
    if route == "attention":
        output = ops.attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, key_padding_mask
        )
    elif route == "attention_with_weights":
        output, weights = ops.attention_with_weights(
            query, key, value, attn_mask, dropout_p, is_causal, scale, key_padding_mask
        )
    else:
        rng_state = qkv_attention.ops._draw_dropout_rng_state(dropout_p)
        output, logsumexp, weights = ops._attention_forward(
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
        )
        if dropout_p > 0:
            keep = ops._attention_dropout_mask(rng_state, B, H, L, S, dropout_p)
        if not need_weights:
            weights = None

    ref = {
        name: reference_leaf(t) if t is not None and t.is_floating_point() else t
        for name, t in dict(
            query=query,
            key=key,
            value=value,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
        ).items()
    }
    ref_output, ref_weights = reference_attention(
        ref["query"],
        ref["key"],
        ref["value"],
        ref["attn_mask"],
        is_causal,
        scale,
        ref["key_padding_mask"],
        keep,
        dropout_p,
    )

    assert output.is_contiguous()
    assert_matches(output, ref_output, dtype, "output")
    if weights is not None:
        assert_matches(weights, ref_weights, dtype, "weights")
    if logsumexp is not None and value.size(-1) == 0 and weights is None:
        # Nothing to compute (an empty output, no weights): the forward returns at once and its
        # logsumexp, which only the backward of that empty output would read, is -inf.
        assert bool((logsumexp == -math.inf).all())
    elif logsumexp is not None:
        expected = torch.logsumexp(
            masked_scores(query, key, attn_mask, key_padding_mask, is_causal, scale), dim=-1
        )
        # float32 (the accumulation dtype of every type but float64): 1e-5, as for outputs.
        tolerance = VS_FLOAT64_TOLERANCE[logsumexp.dtype]
        torch.testing.assert_close(logsumexp.double(), expected, **tolerance)

    if not with_grad:
        return
    grad_output, grad_weights = backward_both(normal, output, ref_output, weights, ref_weights)
    ours = dict(
        query=query, key=key, value=value, attn_mask=attn_mask, key_padding_mask=key_padding_mask
    )
    products = None
    for name, t in ours.items():
        if t is None or not t.requires_grad:
            continue
        expected = ref[name].grad
        if expected is None:  # the reference did not use it (e.g. S = 0)
            expected = torch.zeros_like(ref[name])
        actual = t.grad if t.grad is not None else torch.zeros_like(t)
        if name in ("query", "key") and dtype in HALF_DTYPES and expected.numel():
            # dQ = scale dS K and dK = scale dS^T Q, where dS = P dP - P delta cancels: delta is
            # dO . O with O rounded to the half type (as in torch's kernels), so its rounding
            # reaches dQ and dK through those products, which may be far larger than the
            # result. Compare against the larger of max|expected| and scale * |products| |K|.
            if products is None:
                products = reference_score_gradient(
                    ref, is_causal, scale, keep, dropout_p, grad_output, grad_weights
                )[1]
            scale_value = scale if scale is not None else 1 / math.sqrt(max(query.size(-1), 1))
            other = (ref["key"] if name == "query" else ref["query"]).detach().double().abs()
            spread = products if name == "query" else products.transpose(-2, -1)
            through = abs(scale_value) * (spread @ other).max().item() if other.numel() else 0.0
            bound = HALF_GRAD_TOLERANCE_OF_MAX[dtype] * max(
                expected.abs().max().item(), through, 1e-3
            )
            error = (actual.double() - expected).abs().max().item()
            assert error <= bound, (
                f"grad of {name} ({dtype}): max error {error:.3e} exceeds {bound:.3e}"
            )
            continue
        if name in ("query", "key", "value"):
            assert_matches(actual, expected, dtype, f"grad of {name}", gradient=True)
            continue
        # A mask's gradient sums d loss / d score over the dims it is broadcast in, and rows of
        # d loss / d score sum to about zero (softmax), so the result may be far smaller than
        # its terms. The error of a sum is bounded by eps * sum |terms|: compare against that.
        # Each d loss / d score is itself a difference of products, P dP - P delta, that cancel
        # (exactly, for a row with one key): a backward that recomputes P carries their rounding
        # too, so their magnitudes count as terms.
        score_grad, products = reference_score_gradient(
            ref, is_causal, scale, keep, dropout_p, grad_output, grad_weights
        )
        terms = score_grad.abs() + products
        if name == "attn_mask":
            term_sum = terms.sum_to_size(t.shape)
        else:
            term_sum = terms.sum((1, 2))  # (B, H, L, S) -> (B, S)
        assert actual.shape == expected.shape and actual.dtype == dtype
        tolerance = VS_FLOAT64_TOLERANCE[dtype]["rtol"]
        error = (actual.double() - expected).abs()
        bound = tolerance * (expected.abs() + term_sum) + 1e-300
        assert bool((error <= bound).all()), (
            f"grad of {name} ({dtype}): max error {error.max().item():.3e}, "
            f"worst error / bound {(error / bound).max().item():.2f}"
        )


def reference_score_gradient(ref, is_causal, scale, keep, dropout_p, grad_output, grad_weights):
    """d loss / d score (B, H, L, S) in float64: the gradient of an additive all-zero mask
    applied on top of the given masks."""
    q, k, v = (ref[name].detach() for name in ("query", "key", "value"))
    B, H, L, S = q.size(0), q.size(1), q.size(2), k.size(2)
    probe = torch.zeros(B, H, L, S, dtype=torch.float64, requires_grad=True)
    mask = ref["attn_mask"]
    if mask is None:
        combined = probe
    elif mask.dtype == torch.bool:
        combined = probe.masked_fill(~mask, -math.inf)
    else:
        combined = probe + mask.detach()
    padding = ref["key_padding_mask"]
    out, weights = reference_attention(
        q,
        k,
        v,
        combined,
        is_causal,
        scale,
        None if padding is None else padding.detach(),
        keep,
        dropout_p,
    )
    weights.retain_grad()
    loss = (out * grad_output.double()).sum()
    if grad_weights is not None:
        loss = loss + (weights * grad_weights.double()).sum()
    loss.backward()
    # d loss / d score = P (dP - delta) with delta = sum_j P dP: the magnitude of the products
    # that cancel in it, |W * d loss / d W| per score and their row sum (delta's scale).
    if weights.grad is None:
        return probe.grad, torch.zeros_like(probe.grad)
    products = (weights.detach() * weights.grad).abs()
    return probe.grad, products + products.sum(-1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# qkv_projection


@hypothesis_settings("qkv_projection")
@given(data=st.data())
def test_qkv_projection_matches_float64_reference(data):
    dtype = data.draw(st.sampled_from(ALL_DTYPES), label="dtype")
    B = data.draw(batch_sizes(), label="B")
    L, S = data.draw(sizes(), label="L"), data.draw(sizes(), label="S")
    in_features = {name: data.draw(sizes(), label=f"E{name}") for name in "qkv"}
    H = data.draw(st.integers(1, 4), label="num_heads")
    head_dim = data.draw(st.integers(0, 9), label="E / H")
    E = H * head_dim
    if B * (L + 2 * S) * max(in_features.values()) * E > 100_000:  # milliseconds per example
        B = 1
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    normal = normal_values(generator, dtype)
    with_grad = data.draw(st.booleans(), label="gradients")

    inputs = {}
    for name, rows in (("query", L), ("key", S), ("value", S)):
        shape = (B, rows, in_features[name[0]])
        inputs[name] = leaf(laid_out(shape, draw_layout(data, 3, name), normal), with_grad)
    weights, biases = {}, {}
    for p in "qkv":
        shape = (E, in_features[p])
        # 1/sqrt(fan_in) keeps the outputs O(1), as nn.Linear's initialisation does.
        scaled = normal_values(generator, dtype, 1.0 / math.sqrt(max(1, in_features[p])))
        weights[p] = leaf(laid_out(shape, draw_layout(data, 2, f"{p}_weight"), scaled), with_grad)
        biases[p] = (
            leaf(laid_out((E,), draw_layout(data, 1, f"{p}_bias"), normal), with_grad)
            if data.draw(st.booleans(), label=f"{p}_bias given")
            else None
        )

    outputs = ops.qkv_projection(
        inputs["query"],
        inputs["key"],
        inputs["value"],
        weights["q"],
        weights["k"],
        weights["v"],
        biases["q"],
        biases["k"],
        biases["v"],
        H,
    )
    leaves = [*inputs.values(), *weights.values(), *[b for b in biases.values() if b is not None]]
    ref_leaves = {id(t): reference_leaf(t) for t in leaves}
    ref_outputs = []
    for x, p in zip(inputs.values(), "qkv"):
        x64, w64 = ref_leaves[id(x)], ref_leaves[id(weights[p])]
        projected = x64 @ w64.T  # (B, N, E)
        if biases[p] is not None:
            projected = projected + ref_leaves[id(biases[p])]
        N = x.size(1)
        ref_outputs.append(projected.reshape(B, N, H, head_dim).transpose(1, 2))  # (B, H, N, E/H)

    for name, out, ref_out in zip("qkv", outputs, ref_outputs):
        assert out.is_contiguous()
        assert_matches(out, ref_out, dtype, f"projected {name}")
    if not with_grad:
        return
    grads = [normal(list(out.shape)) for out in outputs]
    sum((out * g).sum() for out, g in zip(outputs, grads)).backward()
    sum((out * g.double()).sum() for out, g in zip(ref_outputs, grads)).backward()
    for t in leaves:
        expected = ref_leaves[id(t)].grad
        if expected is None:
            expected = torch.zeros_like(ref_leaves[id(t)])
        actual = t.grad if t.grad is not None else torch.zeros_like(t)
        assert_matches(
            actual, expected, dtype, f"gradient of a {tuple(t.shape)} input", gradient=True
        )


# ---------------------------------------------------------------------------------------------
# merge_heads


@hypothesis_settings("merge_heads")
@given(data=st.data())
def test_merge_heads_matches_float64_reference(data):
    dtype = data.draw(st.sampled_from(ALL_DTYPES), label="dtype")
    B, H = data.draw(batch_sizes(), label="B"), data.draw(batch_sizes(4), label="H")
    L, D = data.draw(sizes(), label="L"), data.draw(sizes(), label="D")
    Eout = data.draw(sizes(), label="Eout")
    if B * L * H * D * Eout > 100_000:  # milliseconds per example
        B = 1
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    normal = normal_values(generator, dtype)
    with_grad = data.draw(st.booleans(), label="gradients")

    x = leaf(laid_out((B, H, L, D), draw_layout(data, 4, "x"), normal), with_grad)
    scaled = normal_values(generator, dtype, 1.0 / math.sqrt(max(1, H * D)))
    weight = leaf(laid_out((Eout, H * D), draw_layout(data, 2, "out_weight"), scaled), with_grad)
    bias = (
        leaf(laid_out((Eout,), draw_layout(data, 1, "out_bias"), normal), with_grad)
        if data.draw(st.booleans(), label="bias given")
        else None
    )

    output = ops.merge_heads(x, weight, bias)
    x64, w64 = reference_leaf(x), reference_leaf(weight)
    b64 = reference_leaf(bias) if bias is not None else None
    ref = x64.transpose(1, 2).reshape(B, L, H * D) @ w64.T  # (B, L, Eout)
    if b64 is not None:
        ref = ref + b64
    assert_matches(output, ref, dtype, "merge_heads output")
    if not with_grad:
        return
    grad = normal([B, L, Eout])
    (output * grad).sum().backward()
    (ref * grad.double()).sum().backward()
    for ours, theirs, name in ((x, x64, "x"), (weight, w64, "out_weight"), (bias, b64, "out_bias")):
        if ours is None:
            continue
        expected = theirs.grad if theirs.grad is not None else torch.zeros_like(theirs)
        actual = ours.grad if ours.grad is not None else torch.zeros_like(ours)
        assert_matches(actual, expected, dtype, f"grad of {name}", gradient=True)


# ---------------------------------------------------------------------------------------------
# MultiheadAttention against torch.nn.MultiheadAttention run in float64 on the same parameters

# Module output and gradients against torch's module in float64, relative to the largest
# expected value. The module chains three ops, each rounding its result to the dtype (q, k, v;
# the heads' outputs; the output projection), and an error in q or k moves each logit by up to
# |logit| times that error, so this is one bound for the whole chain per dtype:
#   float64: 1e-12 (measured <= 4.4e-16 over these examples),
#   float32: 1e-5, helpers' float32 tolerance (measured <= 1.4e-7),
#   bfloat16 / float16: 4 ulps at 1.0, 2^-6 / 2^-8 (measured <= 1.8 / 0.7 ulps).
MODULE_TOLERANCE_OF_MAX = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 2.0**-6,
    torch.float16: 2.0**-8,
}


def assert_close_relative_to_max(actual, expected, tolerance, what):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    if expected.numel() == 0:
        return
    scale = max(1.0, expected.abs().max().item())
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= tolerance * scale, (
        f"{what}: max error {error:.3e} exceeds {tolerance:.1e} x {scale:.3g}"
    )


def draw_module_mask(data, generator, shape, dtype, label):
    """None, a bool mask (True = masked out, as torch's module reads it) or a float mask, that
    never masks key 0, so that no row is fully masked (torch's module gives NaN there; ours
    zeros, tested elsewhere)."""
    kind = data.draw(st.sampled_from([None, "bool", "float"]), label=f"{label} kind")
    if kind is None:
        return None, None
    layout = draw_layout(data, len(shape), label)
    if kind == "bool":

        def values(s):
            return torch.rand(s, generator=generator) < 0.4
    else:

        def values(s):
            return torch.randn(s, generator=generator, dtype=torch.float64).to(dtype)

    mask = laid_out(shape, layout, values)
    # Key 0 is always visible: column 0 is False (bool) or left as it is (finite float).
    if kind == "bool":
        mask = mask.clone()
        mask[..., 0] = False
    reference = mask if kind == "bool" else mask.double()
    return mask, reference


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask")
@hypothesis_settings("module")
@given(data=st.data())
def test_multihead_attention_matches_torch_module_in_float64(data):
    dtype = data.draw(st.sampled_from(ALL_DTYPES), label="dtype")
    H = data.draw(st.integers(1, 3), label="num_heads")
    E = H * data.draw(st.integers(1, 4), label="head_dim")
    separate = data.draw(st.booleans(), label="kdim/vdim")
    kdim = data.draw(st.integers(1, 6), label="kdim") if separate else None
    vdim = data.draw(st.integers(1, 6), label="vdim") if separate else None
    config = dict(
        embed_dim=E,
        num_heads=H,
        dropout=0.0,
        bias=data.draw(st.booleans(), label="bias"),
        add_bias_kv=data.draw(st.booleans(), label="add_bias_kv"),
        add_zero_attn=data.draw(st.booleans(), label="add_zero_attn"),
        kdim=kdim,
        vdim=vdim,
        batch_first=data.draw(st.booleans(), label="batch_first"),
    )
    batched = data.draw(st.booleans(), label="batched")
    N, L, S = (
        data.draw(st.integers(1, 3), label="N"),
        data.draw(st.integers(1, 6), label="L"),
        data.draw(st.integers(1, 6), label="S"),
    )
    need_weights = data.draw(st.booleans(), label="need_weights")
    average = data.draw(st.booleans(), label="average_attn_weights")
    with_grad = data.draw(st.booleans(), label="gradients")
    seed = data.draw(st.integers(0, 2**31), label="seed")
    generator = torch.Generator().manual_seed(seed)
    normal = normal_values(generator, dtype)

    torch.manual_seed(seed)
    ours = qkv_attention.MultiheadAttention(**config, dtype=dtype)
    theirs = torch.nn.MultiheadAttention(**config, dtype=torch.float64)
    theirs.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})

    def sequence_shape(length, features):
        if not batched:
            return (length, features)
        return (N, length, features) if config["batch_first"] else (length, N, features)

    inputs, ref_inputs = {}, {}
    for name, length, features in (("query", L, E), ("key", S, kdim or E), ("value", S, vdim or E)):
        shape = sequence_shape(length, features)
        inputs[name] = leaf(laid_out(shape, draw_layout(data, len(shape), name), normal), with_grad)
        ref_inputs[name] = reference_leaf(inputs[name])
    padding_shape = (N, S) if batched else (S,)
    key_padding_mask, ref_padding = draw_module_mask(
        data, generator, padding_shape, dtype, "key_padding_mask"
    )
    mask_3d = data.draw(st.booleans(), label="attn_mask 3-D")
    attn_shape = ((N * H if batched else H), L, S) if mask_3d else (L, S)
    attn_mask, ref_attn = draw_module_mask(data, generator, attn_shape, dtype, "attn_mask")
    if not with_grad:
        ours.requires_grad_(False)

    out, weights = ours(
        *inputs.values(),
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        average_attn_weights=average,
    )
    ref_out, ref_weights = theirs(
        *ref_inputs.values(),
        key_padding_mask=ref_padding,
        need_weights=need_weights,
        attn_mask=ref_attn,
        average_attn_weights=average,
    )
    tolerance = MODULE_TOLERANCE_OF_MAX[dtype]
    assert out.dtype == dtype
    assert_close_relative_to_max(out, ref_out, tolerance, "output")
    assert (weights is None) == (ref_weights is None)
    if weights is not None:
        assert_close_relative_to_max(weights, ref_weights, tolerance, "weights")
    if not with_grad:
        return
    backward_both(normal, out, ref_out, weights, ref_weights)
    grad_tolerance = tolerance
    pairs = [(inputs[n], ref_inputs[n], n) for n in inputs]
    ref_parameters = dict(theirs.named_parameters())
    pairs += [(p, ref_parameters[n], n) for n, p in ours.named_parameters()]
    for t, ref_t, name in pairs:
        expected = ref_t.grad if ref_t.grad is not None else torch.zeros_like(ref_t)
        actual = t.grad if t.grad is not None else torch.zeros_like(t)
        assert_close_relative_to_max(actual, expected, grad_tolerance, f"grad of {name}")
