"""Numerics at the edges: logits of +-1e4, float16 inputs near its range and subnormals,
sequences of 65536 positions with small D, and 64-bit index arithmetic (sizes whose product
passes 2^31 built from stride-0 expanded tensors, and element offsets past 2^31 from views of a
sparse memory-mapped file: both cost no memory).
"""

import math
import os

import pytest
import torch

import qkv_attention  # noqa: F401
from helpers import (
    ALL_DTYPES,
    HALF_GRAD_TOLERANCE_OF_MAX,
    VS_FLOAT64_TOLERANCE,
    assert_close_to_max,
    reference_attention,
)

ops = torch.ops.qkv_attention


def leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors]


def check_output(actual, expected, dtype, what="output", tolerance=None):
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    tolerance = tolerance or VS_FLOAT64_TOLERANCE[dtype]
    torch.testing.assert_close(
        actual.double(), expected, **tolerance, msg=lambda m: f"{what} ({dtype}): {m}"
    )


def check_gradient(actual, expected, dtype, what, tolerance=None):
    """Gradients sum over L or S terms: error relative to the largest gradient (helpers)."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if tolerance is None and dtype in HALF_GRAD_TOLERANCE_OF_MAX:
        assert_close_to_max(actual, expected, HALF_GRAD_TOLERANCE_OF_MAX[dtype])
    else:
        tolerance = dict(tolerance or VS_FLOAT64_TOLERANCE[dtype])
        tolerance["atol"] *= max(1.0, expected.abs().max().item())
        torch.testing.assert_close(
            actual.double(), expected, **tolerance, msg=lambda m: f"{what} ({dtype}): {m}"
        )


def forward_backward_against_reference(
    q,
    k,
    v,
    dtype,
    attn_mask=None,
    is_causal=False,
    scale=None,
    grad_scale=1.0,
    seed=0,
    tolerance=None,
    grad_tolerance=None,
):
    """Runs attention_with_weights forward and backward and compares output, weights and the
    gradients of q, k, v with the float64 reference on the same inputs."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = leaves(q, k, v)
    out, weights = ops.attention_with_weights(q, k, v, attn_mask, 0.0, is_causal, scale)
    q64, k64, v64 = leaves(q.double(), k.double(), v.double())
    ref_out, ref_weights = reference_attention(q64, k64, v64, attn_mask, is_causal, scale)
    check_output(out, ref_out, dtype, tolerance=tolerance)
    check_output(weights, ref_weights, dtype, "weights", tolerance=tolerance)
    grad = (torch.randn(out.shape, generator=g, dtype=torch.float64) * grad_scale).to(dtype)
    (out * grad).sum().backward()
    (ref_out * grad.double()).sum().backward()
    for name, ours, theirs in (("query", q, q64), ("key", k, k64), ("value", v, v64)):
        check_gradient(
            ours.grad, theirs.grad, dtype, f"grad of {name}", grad_tolerance or tolerance
        )


# -- logits of +-1e4 ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_logits_of_plus_minus_1e4_give_the_exact_saturated_softmax(dtype):
    """Integer q and k in [-100, 100] (exact in every dtype) with D = 4 and scale 1: the logits
    are exact integers up to +-4e4, so the reference is exact too; the softmax saturates onto
    the largest logit (or splits evenly between ties), and the gradients vanish. No inf or NaN
    from exp overflow; the max-subtraction must be done right."""
    g = torch.Generator().manual_seed(0)
    B, H, L, S, D = 2, 2, 9, 13, 4
    q = torch.randint(-100, 101, (B, H, L, D), generator=g).to(dtype)
    k = torch.randint(-100, 101, (B, H, S, D), generator=g).to(dtype)
    v = torch.randn(B, H, S, D, generator=g, dtype=torch.float64).to(dtype)
    logits = q.double() @ k.double().transpose(-1, -2)
    assert logits.abs().max() > 1e4  # the case is what its name says
    # The gradients vanish only up to rounding: a fused backward takes delta = dO . O, and dS =
    # P (dP - delta) with P one-hot leaves dP - delta ~ 1 float32 ulp of dO . v, times q or k
    # (up to 100). torch's own fused SDPA gives the same 2.3e-5 here. So float32 gradients get
    # 1e-5 per unit of |q|, |k|.
    grad_tolerance = None
    if dtype == torch.float32:
        grad_tolerance = dict(atol=1e-5 * 100, rtol=1e-5)
    forward_backward_against_reference(q, k, v, dtype, scale=1.0, grad_tolerance=grad_tolerance)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_float_masks_of_plus_minus_1e4_dominate_the_scores(dtype):
    """An additive mask of -1e4 (the usual "padding" value) and +1e4 on ordinary scores: the
    result is the attention restricted to the +1e4 keys, exactly as the reference computes it."""
    g = torch.Generator().manual_seed(1)
    B, H, L, S, D = 2, 3, 7, 11, 8
    q, k, v = (
        torch.randn(B, H, n, D, generator=g, dtype=torch.float64).to(dtype) for n in (L, S, S)
    )
    choice = torch.randint(0, 3, (B, 1, L, S), generator=g)
    mask = torch.tensor([-1e4, 0.0, 1e4], dtype=torch.float64)[choice].to(dtype)
    forward_backward_against_reference(
        q, k, v, dtype, attn_mask=mask, tolerance=LARGE_MASK_TOLERANCE.get(dtype)
    )


# score + 1e4 in the float32 accumulator keeps the score only to float32's ulp at 1e4, 2^-10;
# that sum and the max-subtraction each round (half an ulp each), so the weights are off by up
# to ~2^-10 relative: an exact reference cannot be matched closer by any float32 computation
# (torch's float32 SDPA too). Twice that, 2^-9, for float32 and float16; bfloat16's own
# tolerance (2^-7) already covers it; float64's (1e-12 relative to scores of 1e4: 2e-12 ulps).
LARGE_MASK_TOLERANCE = {
    torch.float32: dict(atol=2.0**-9, rtol=2.0**-9),
    torch.float16: dict(atol=2.0**-9, rtol=2.0**-9),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
}


# -- float16 near its range -------------------------------------------------------------------


def test_float16_values_near_65504_do_not_overflow():
    """q and k of magnitude up to 6e4 (q.k up to ~1e10, far past float16's 65504) with a scale
    of 1e-9 that brings the logits back to O(10), and values near +-6e4: every intermediate
    must be held in float32 (the accumulation dtype); the outputs, weighted averages of the
    values, stay within float16's range and match the reference."""
    g = torch.Generator().manual_seed(2)
    B, H, L, S, D = 1, 2, 16, 24, 8
    q, k = (
        torch.empty(B, H, n, D, dtype=torch.float64).uniform_(-6e4, 6e4, generator=g).half()
        for n in (L, S)
    )
    v = torch.empty(B, H, S, D, dtype=torch.float64).uniform_(-6e4, 6e4, generator=g).half()
    assert (q.double() @ k.double().transpose(-1, -2)).abs().max() > 1e9
    forward_backward_against_reference(q, k, v, torch.float16, scale=1e-9)


def test_float16_subnormal_values_are_not_flushed_to_zero():
    """Values of 1e-7 to 6e-5 (float16 subnormals): the output, a weighted average of them, is
    computed in float32 and rounded once, so it keeps its subnormal value (no flush to zero);
    compared with an absolute tolerance of 2 subnormal ulps (2 * 2^-24)."""
    g = torch.Generator().manual_seed(3)
    B, H, L, S, D = 1, 2, 8, 12, 8
    q, k = (torch.randn(B, H, n, D, generator=g).half() for n in (L, S))
    v = (torch.rand(B, H, S, D, generator=g, dtype=torch.float64) * 6e-5 + 1e-7).half()
    assert (v.abs() < 6.1e-5).all() and (v != 0).all()  # all subnormal, none zero
    out = ops.attention(q, k, v)
    ref, _ = reference_attention(q, k, v)
    assert (out != 0).all()
    torch.testing.assert_close(out.double(), ref, atol=2 * 2.0**-24, rtol=0)


# -- long sequences -----------------------------------------------------------------------------

# Sums of up to 65536 float32 terms: a sequential sum errs by up to n * eps * sum|terms| in the
# worst case (4e-3 for n = 65536) and by about sqrt(n) * eps (3e-5) in practice; we measured at
# most 2.4e-6 relative to the largest value. 1e-4 relative to the largest value catches any
# accumulation in a half type (bfloat16 would be off by ~1e-1) while leaving room for a kernel
# that sums in a different order.
LONG_TOLERANCE_OF_MAX = {torch.float32: 1e-4, torch.bfloat16: 2.0**-6}


def assert_long_close(actual, expected, dtype, what):
    assert torch.isfinite(actual).all(), what
    scale = max(1e-3, expected.abs().max().item())
    error = (actual.double() - expected).abs().max().item()
    assert error <= LONG_TOLERANCE_OF_MAX[dtype] * scale, (
        f"{what} ({dtype}): max error {error:.3e} vs max |expected| {scale:.3e}"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("L,S", [(65536, 33), (33, 65536)], ids=["L65536", "S65536"])
def test_65536_positions_with_small_head_dim_forward_and_backward(L, S, dtype):
    """L = 65536 (dK and dV sum over 65536 queries) or S = 65536 (the softmax and dQ sum over
    65536 keys), D = 4, causal when L > S is not needed: all of it against the float64
    reference, forward and backward."""
    g = torch.Generator().manual_seed(4)
    D = 4
    q, k, v = (
        torch.randn(1, 1, n, D, generator=g, dtype=torch.float64).to(dtype) for n in (L, S, S)
    )
    q, k, v = leaves(q, k, v)
    out = ops.attention(q, k, v)
    q64, k64, v64 = leaves(q.double(), k.double(), v.double())
    ref, _ = reference_attention(q64, k64, v64)
    assert_long_close(out, ref, dtype, "output")
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    (out * grad).sum().backward()
    (ref * grad.double()).sum().backward()
    for name, ours, theirs in (("query", q, q64), ("key", k, k64), ("value", v, v64)):
        assert_long_close(ours.grad, theirs.grad, dtype, f"grad of {name}")


def test_causal_65536_by_65536_with_a_broadcast_mask_passes_2_to_31_scores():
    """L = S = 65536, causal, D = 2, with an attn_mask broadcast from (1, 1, 1, S) to
    (1, 1, L, S) by stride 0: the scores' shape (1, 1, 65536, 65536) has 2^32 elements and the
    causal triangle 2^31 + 2^15 visible pairs, none of them materialised. Sampled query rows
    (first, last, and around 2^15 where row * S passes 2^31) against the float64 reference."""
    L = S = 65536
    D = 2
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, n, D, generator=g) for n in (L, S, S))
    key_allowed = torch.rand(1, 1, 1, S, generator=g) < 0.9
    key_allowed[..., 0] = True  # every causal row keeps a key
    mask = key_allowed.expand(1, 1, L, S)
    assert mask.stride() == (S, S, 0, 1) and mask.numel() == 2**32
    out = ops.attention(q, k, v, mask, 0.0, True)
    rows = torch.tensor([0, 1, 2, 1000, 32767, 32768, 32769, 50000, 65534, 65535])
    for i in rows.tolist():
        scores = (q[0, 0, i].double() @ k[0, 0, : i + 1].double().T) / math.sqrt(D)
        scores = scores.masked_fill(~key_allowed[0, 0, 0, : i + 1], -math.inf)
        expected = torch.softmax(scores, -1) @ v[0, 0, : i + 1].double()
        torch.testing.assert_close(
            out[0, 0, i].double(), expected, atol=1e-5, rtol=1e-4, msg=lambda m: f"row {i}: {m}"
        )


# -- element offsets past 2^31 --------------------------------------------------------------------


def far_view(directory, name, size, stride, storage_offset, values):
    """A float32 view of `size`/`stride` whose elements lie past element 2^31 of a sparse,
    privately mapped file: the untouched pages cost neither memory nor disk."""
    numel = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    path = os.path.join(directory, f"{name}.bin")
    with open(path, "wb") as f:
        f.truncate(numel * 4)
    storage = torch.from_file(path, shared=False, size=numel, dtype=torch.float32)
    os.remove(path)  # the mapping stays valid; nothing is left behind
    view = storage.as_strided(size, stride, storage_offset)
    view.copy_(values)  # copy-on-write: only the touched pages become memory
    return view


def test_views_with_element_offsets_past_2_to_31_are_read_and_differentiated_correctly(tmp_path):
    """query, key, value and a float attn_mask whose batch/head strides put their elements
    past element 2^31 (byte offsets past 8 GiB): a kernel that computed an offset in 32 bits
    would read the wrong place (or crash). Forward and backward against the float64 reference
    on contiguous copies. Runs in this process: a crash is the test's failure."""
    g = torch.Generator().manual_seed(6)
    B, H, L, S, D, Dv = 2, 2, 5, 7, 4, 3
    big = 2**31
    q0, k0, v0 = (torch.randn(B, H, n, d, generator=g) for n, d in ((L, D), (S, D), (S, Dv)))
    m0 = torch.randn(B, 1, L, S, generator=g)
    q = far_view(tmp_path, "q", (B, H, L, D), (big - 2**20, 2**20 + 8, 64, 1), 12, q0)
    k = far_view(tmp_path, "k", (B, H, S, D), (2**30 + 2**17, 2**30 + 7, 4096, 1), 3, k0)
    v = far_view(tmp_path, "v", (B, H, S, Dv), (2**20, 2**10, 8, 1), big + 100000, v0)
    mask = far_view(tmp_path, "m", (B, 1, L, S), (big + 2**16, 1, S + 1, 1), 5, m0)
    for t in (q, k, v, mask):
        last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        assert last > big
    q, k, v, mask = leaves(q, k, v, mask)
    out, weights = ops.attention_with_weights(q, k, v, mask)
    q64, k64, v64, m64 = leaves(q0.double(), k0.double(), v0.double(), m0.double())
    ref_out, ref_weights = reference_attention(q64, k64, v64, m64)
    check_output(out, ref_out, torch.float32)
    check_output(weights, ref_weights, torch.float32, "weights")
    grad = torch.randn(out.shape, generator=g)
    (out * grad).sum().backward()
    (ref_out * grad.double()).sum().backward()
    for name, ours, theirs in (
        ("query", q, q64),
        ("key", k, k64),
        ("value", v, v64),
        ("attn_mask", mask, m64),
    ):
        check_gradient(ours.grad, theirs.grad, torch.float32, f"grad of {name}")
