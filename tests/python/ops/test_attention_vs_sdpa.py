"""Our operators against torch's: attention against F.scaled_dot_product_attention (forward and
every gradient) in float32 and float64, the half types against a float64 reference, and
qkv_projection / merge_heads against F.linear in every dtype."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import (
    ALL_DTYPES,
    HALF_DTYPES,
    HALF_GRAD_TOLERANCE_OF_MAX,
    SAME_DTYPE_TOLERANCE,
    VS_FLOAT64_TOLERANCE,
    assert_close_to_max,
    random_bool_mask,
    random_qkv,
    random_tensor,
    reference_attention,
)

ops = torch.ops.qkv_attention
pytestmark = pytest.mark.usefixtures("seed_torch")

FULL_DTYPES = (torch.float32, torch.float64)


def combine_for_sdpa(attn_mask, key_padding_mask, is_causal, L, S):
    """One SDPA attn_mask equal to our (attn_mask, key_padding_mask, is_causal): SDPA has no
    key_padding_mask and refuses is_causal together with a mask. Returns (mask, is_causal)."""
    masks = []
    if attn_mask is not None:
        masks.append(attn_mask)
    if key_padding_mask is not None:
        masks.append(key_padding_mask[:, None, None, :])  # (B, S) -> (B, 1, 1, S)
    if not masks:
        return None, is_causal  # SDPA's own is_causal (top-left)
    if is_causal:
        masks.append(torch.ones(L, S, dtype=torch.bool).tril())
    combined = masks[0]
    for mask in masks[1:]:
        if combined.dtype == torch.bool and mask.dtype == torch.bool:
            combined = combined & mask
        elif combined.dtype == torch.bool:
            combined = mask.masked_fill(~combined, -math.inf)
        elif mask.dtype == torch.bool:
            combined = combined.masked_fill(~mask, -math.inf)
        else:
            combined = combined + mask
    return combined, False


def make_mask(kind, spec, dims, dtype, requires_grad):
    shape = tuple(1 if letter == "1" else dims[letter] for letter in spec)
    if kind == "bool":
        return random_bool_mask(*shape)
    return random_tensor(*shape, dtype=dtype, scale=0.7).requires_grad_(requires_grad)


def ours_and_sdpa(dtype, dims, attn_mask=None, key_padding_mask=None, is_causal=False, scale=None):
    """Runs both on the same inputs and one random output gradient; returns the two outputs and
    the two dicts of gradients (query, key, value and the float masks that require grad)."""
    B, H, L, S, D, Dv = dims
    leaves = dict(
        zip(
            ("query", "key", "value"),
            random_qkv(B, H, L, S, D, Dv, dtype=dtype, requires_grad=True),
        )
    )
    for name, mask in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
        if mask is not None and mask.requires_grad:
            leaves[name] = mask
    grad_output = random_tensor(B, H, L, Dv, dtype=dtype)

    def run(use_sdpa):
        inputs = {name: t.detach().clone().requires_grad_() for name, t in leaves.items()}
        q, k, v = inputs["query"], inputs["key"], inputs["value"]
        mask = inputs.get("attn_mask", attn_mask)
        padding = inputs.get("key_padding_mask", key_padding_mask)
        if use_sdpa:
            sdpa_mask, sdpa_causal = combine_for_sdpa(mask, padding, is_causal, L, S)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=sdpa_mask, is_causal=sdpa_causal, scale=scale
            )
        else:
            out = ops.attention(q, k, v, mask, 0.0, is_causal, scale, padding)
        out.backward(grad_output)
        return out.detach(), {name: t.grad for name, t in inputs.items()}

    ours, our_grads = run(use_sdpa=False)
    theirs, their_grads = run(use_sdpa=True)
    return ours, theirs, our_grads, their_grads


# (B, H, L, S, D, Dv), attn_mask (kind, shape spec, requires_grad) or None,
# key_padding_mask (kind, requires_grad) or None, is_causal, scale
SDPA_CASES = {
    "plain": ((2, 3, 5, 7, 4, 4), None, None, False, None),
    "D_ne_Dv": ((2, 2, 5, 6, 8, 3), None, None, False, None),
    "custom_scale": ((1, 2, 4, 5, 6, 6), None, None, False, 0.3),
    "size_1_dims": ((1, 1, 1, 1, 1, 1), None, None, False, None),
    "bool_mask_LS": ((2, 2, 5, 6, 4, 3), ("bool", "LS", False), None, False, None),
    "bool_mask_B11S": ((3, 2, 4, 6, 4, 4), ("bool", "B11S", False), None, False, None),
    "bool_mask_H1S": ((2, 3, 4, 5, 4, 4), ("bool", "H1S", False), None, False, None),
    "float_mask_BHLS_grad": ((2, 2, 4, 5, 4, 3), ("float", "BHLS", True), None, False, None),
    "float_mask_1H1S_grad": ((2, 3, 4, 6, 4, 4), ("float", "1H1S", True), None, False, None),
    "float_mask_LS_grad_scale": ((2, 2, 5, 4, 3, 5), ("float", "LS", True), None, False, 1.3),
    "causal_square": ((2, 2, 6, 6, 4, 4), None, None, True, None),
    "causal_L_gt_S": ((2, 2, 7, 4, 4, 3), None, None, True, None),
    "causal_L_lt_S": ((2, 2, 4, 7, 4, 5), None, None, True, None),
    "causal_and_bool_mask": ((2, 2, 6, 5, 4, 4), ("bool", "B1LS", False), None, True, None),
    "causal_and_float_mask_grad": ((2, 2, 5, 6, 4, 4), ("float", "HLS", True), None, True, None),
    "padding_bool": ((3, 2, 4, 6, 4, 4), None, ("bool", False), False, None),
    "padding_float_grad": ((2, 2, 4, 6, 4, 4), None, ("float", True), False, None),
    "padding_and_mask_float_grad_causal": (
        (2, 2, 5, 5, 4, 3),
        ("float", "1LS", True),
        ("float", True),
        True,
        None,
    ),
    "padding_bool_and_bool_mask": (
        (2, 3, 4, 6, 4, 4),
        ("bool", "LS", False),
        ("bool", False),
        False,
        None,
    ),
}


@pytest.mark.parametrize("dtype", FULL_DTYPES, ids=str)
@pytest.mark.parametrize(
    "dims, mask_spec, padding_spec, is_causal, scale", SDPA_CASES.values(), ids=SDPA_CASES.keys()
)
def test_attention_matches_sdpa(dtype, dims, mask_spec, padding_spec, is_causal, scale):
    B, H, L, S, D, Dv = dims
    letters = dict(B=B, H=H, L=L, S=S)
    attn_mask = (
        None if mask_spec is None else make_mask(*mask_spec[:2], letters, dtype, mask_spec[2])
    )
    padding = None
    if padding_spec is not None:
        padding = make_mask(padding_spec[0], "BS", letters, dtype, padding_spec[1])
    ours, theirs, our_grads, their_grads = ours_and_sdpa(
        dtype, dims, attn_mask, padding, is_causal, scale
    )
    tolerance = SAME_DTYPE_TOLERANCE[dtype]
    # Random bool masks may leave a row with no key: SDPA gives zeros there too (torch >= 2.5),
    # and in any case ours must be finite everywhere.
    assert torch.isfinite(ours).all()
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite], **tolerance)
    assert set(our_grads) == set(their_grads)
    for name in our_grads:
        assert our_grads[name].shape == their_grads[name].shape, name
        torch.testing.assert_close(our_grads[name], their_grads[name], **tolerance, msg=name)


@pytest.mark.parametrize("dtype", FULL_DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_rows_without_keys_give_exact_zeros_and_zero_gradients(dtype, mask_kind):
    B, H, L, S, D, Dv = 2, 2, 4, 5, 3, 3
    allowed = random_bool_mask(B, H, L, S)
    allowed[0, 1, 2, :] = False  # query row (0, 1, 2) may attend to nothing
    allowed[1, 0, :, 3] = False  # key 3 of (1, 0) is seen by no query
    allowed[1, 0, 0, :] = False
    if mask_kind == "bool":
        attn_mask = allowed
    else:
        attn_mask = random_tensor(B, H, L, S, dtype=dtype).masked_fill(~allowed, -math.inf)
        attn_mask.requires_grad_()
    ours, theirs, our_grads, their_grads = ours_and_sdpa(dtype, (B, H, L, S, D, Dv), attn_mask)
    for row in ((0, 1, 2), (1, 0, 0)):
        assert torch.equal(ours[row], torch.zeros(Dv, dtype=dtype))
        assert torch.equal(our_grads["query"][row], torch.zeros(D, dtype=dtype))
        if mask_kind == "float":
            assert torch.equal(our_grads["attn_mask"][row], torch.zeros(S, dtype=dtype))
    assert torch.equal(our_grads["key"][1, 0, 3], torch.zeros(D, dtype=dtype))
    assert torch.equal(our_grads["value"][1, 0, 3], torch.zeros(Dv, dtype=dtype))
    for tensor in (ours, *our_grads.values()):
        assert torch.isfinite(tensor).all()
    # Everywhere SDPA is finite, the two agree.
    tolerance = SAME_DTYPE_TOLERANCE[dtype]
    finite = torch.isfinite(theirs)
    assert finite.any()
    torch.testing.assert_close(ours[finite], theirs[finite], **tolerance)
    for name in our_grads:
        finite = torch.isfinite(their_grads[name])
        torch.testing.assert_close(
            our_grads[name][finite], their_grads[name][finite], **tolerance, msg=name
        )


@pytest.mark.parametrize("dtype", FULL_DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_no_keys_gives_zeros(dtype, is_causal):
    B, H, L, D, Dv = 2, 3, 4, 5, 6
    query, key, value = random_qkv(B, H, L, 0, D, Dv, dtype=dtype, requires_grad=True)
    mask = torch.zeros(L, 0, dtype=dtype, requires_grad=True)
    out = ops.attention(query, key, value, mask, 0.0, is_causal)
    assert torch.equal(out, torch.zeros(B, H, L, Dv, dtype=dtype))
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(query, key, value, attn_mask=mask), rtol=0, atol=0
    )
    out.backward(random_tensor(B, H, L, Dv, dtype=dtype))
    assert torch.equal(query.grad, torch.zeros_like(query))
    assert key.grad.shape == key.shape and value.grad.shape == value.shape
    assert mask.grad.shape == mask.shape


@pytest.mark.parametrize("dtype", FULL_DTYPES, ids=str)
@pytest.mark.parametrize("empty", ["B", "L", "H"])
def test_empty_batch_or_queries_give_empty_outputs(dtype, empty):
    dims = dict(B=2, H=3, L=4, S=5)
    dims[empty] = 0
    B, H, L, S = dims["B"], dims["H"], dims["L"], dims["S"]
    query, key, value = random_qkv(B, H, L, S, 3, 2, dtype=dtype, requires_grad=True)
    out, weights = ops.attention_with_weights(query, key, value, None, 0.0, True)
    assert out.shape == (B, H, L, 2) and weights.shape == (B, H, L, S)
    assert out.shape == F.scaled_dot_product_attention(query, key, value).shape
    (out.sum() + weights.sum()).backward()
    for t in (query, key, value):
        assert t.grad.shape == t.shape and torch.equal(t.grad, torch.zeros_like(t))


# ---------------------------------------------------------------------------------------------
# Half types against the float64 reference

HALF_CASES = {
    "plain": ((2, 2, 16, 24, 16, 8), None, None, False, None),
    "causal_L_gt_S_scale": ((2, 2, 24, 16, 8, 16), None, None, True, 0.2),
    "float_mask_broadcast": ((2, 3, 12, 20, 16, 16), ("float", "1H1S"), None, False, None),
    "bool_mask_with_empty_rows_causal": ((2, 2, 16, 16, 8, 8), ("bool", "B1LS"), None, True, None),
    "padding_float_and_bool_mask": ((2, 2, 12, 18, 8, 8), ("bool", "LS"), "float", False, None),
}


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize(
    "dims, mask_spec, padding_kind, is_causal, scale", HALF_CASES.values(), ids=HALF_CASES.keys()
)
def test_half_types_match_float64_reference(dtype, dims, mask_spec, padding_kind, is_causal, scale):
    B, H, L, S, D, Dv = dims
    letters = dict(B=B, H=H, L=L, S=S)
    query, key, value = random_qkv(B, H, L, S, D, Dv, dtype=dtype, requires_grad=True)
    attn_mask = None if mask_spec is None else make_mask(*mask_spec, letters, dtype, False)
    if mask_spec is not None and mask_spec[0] == "bool":
        attn_mask[..., 3, :] = False  # query 3 has no key
    padding = None if padding_kind is None else make_mask(padding_kind, "BS", letters, dtype, False)
    out = ops.attention(query, key, value, attn_mask, 0.0, is_causal, scale, padding)
    assert out.dtype == dtype
    grad_output = random_tensor(B, H, L, Dv, dtype=dtype)
    out.backward(grad_output)

    leaves64 = [t.detach().double().requires_grad_() for t in (query, key, value)]
    expected, _ = reference_attention(*leaves64, attn_mask, is_causal, scale, padding)
    expected.backward(grad_output.double())
    # The reference sees the same rounded inputs: the difference is our rounding alone.
    torch.testing.assert_close(out.double(), expected, **VS_FLOAT64_TOLERANCE[dtype])
    for name, ours, theirs in zip(("query", "key", "value"), (query, key, value), leaves64):
        assert ours.grad.dtype == dtype, name
        assert_close_to_max(ours.grad, theirs.grad, HALF_GRAD_TOLERANCE_OF_MAX[dtype])


# ---------------------------------------------------------------------------------------------
# qkv_projection and merge_heads against F.linear


def close_in_dtype(actual, expected, dtype, name):
    """Our result in ``dtype`` against a float64 reference computed from the same inputs."""
    assert actual.dtype == dtype, name
    if dtype in HALF_DTYPES:
        assert_close_to_max(actual, expected, HALF_GRAD_TOLERANCE_OF_MAX[dtype])
    else:
        torch.testing.assert_close(
            actual.double(), expected, **VS_FLOAT64_TOLERANCE[dtype], msg=name
        )


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_qkv_projection_matches_linear(dtype, bias):
    B, L, S, Eq, Ek, Ev, E, H = 2, 5, 7, 12, 6, 10, 16, 4
    inputs = [
        random_tensor(B, L, Eq, dtype=dtype),
        random_tensor(B, S, Ek, dtype=dtype),
        random_tensor(B, S, Ev, dtype=dtype),
    ]
    weights = [random_tensor(E, n, dtype=dtype, scale=n**-0.5) for n in (Eq, Ek, Ev)]
    biases = [random_tensor(E, dtype=dtype) if bias else None for _ in range(3)]
    leaves = [t for t in inputs + weights + biases if t is not None]
    for t in leaves:
        t.requires_grad_()
    outputs = ops.qkv_projection(*inputs, *weights, *biases, H)
    grads_out = [random_tensor(*o.shape, dtype=dtype) for o in outputs]
    torch.autograd.backward(outputs, grads_out)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    by_id = dict(zip(map(id, leaves), leaves64))
    expected = []
    for x, w, b in zip(inputs, weights, biases):
        projected = F.linear(by_id[id(x)], by_id[id(w)], None if b is None else by_id[id(b)])
        n = x.shape[1]
        expected.append(projected.view(B, n, H, E // H).transpose(1, 2))  # (B, H, n, E/H)
    torch.autograd.backward(expected, [g.double() for g in grads_out])
    for name, ours, theirs in zip("qkv", outputs, expected):
        assert ours.shape == theirs.shape and ours.is_contiguous()
        close_in_dtype(ours, theirs.detach(), dtype, name)
    for index, (ours, theirs) in enumerate(zip(leaves, leaves64)):
        close_in_dtype(ours.grad, theirs.grad, dtype, f"grad of input {index}")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_merge_heads_matches_linear(dtype, bias):
    B, H, L, D, Eout = 2, 4, 5, 3, 7
    x = random_tensor(B, H, L, D, dtype=dtype, requires_grad=True)
    weight = random_tensor(Eout, H * D, dtype=dtype, scale=(H * D) ** -0.5, requires_grad=True)
    out_bias = random_tensor(Eout, dtype=dtype, requires_grad=True) if bias else None
    out = ops.merge_heads(x, weight, out_bias)
    grad_output = random_tensor(B, L, Eout, dtype=dtype)
    out.backward(grad_output)

    leaves = [t for t in (x, weight, out_bias) if t is not None]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    concat = leaves64[0].transpose(1, 2).reshape(B, L, H * D)  # (B, H, L, D) -> (B, L, H*D)
    expected = F.linear(concat, leaves64[1], leaves64[2] if bias else None)
    expected.backward(grad_output.double())
    assert out.shape == (B, L, Eout) and out.is_contiguous()
    close_in_dtype(out, expected.detach(), dtype, "output")
    for name, ours, theirs in zip(("x", "out_weight", "out_bias"), leaves, leaves64):
        close_in_dtype(ours.grad, theirs.grad, dtype, name)
