"""The blocked attention kernels at their seams.

The CPU kernels (csrc/cpu/flash/forward.h, backward.h) work on blocks of 48 (avx512, avx2) or
128 (default level) queries against 256 or 512 keys (backward: 48 x 128), take a split-KV path
for at most 16 queries (decode.h), skip causal blocks and columns past the diagonal, split the keys
of a head into groups with partial dQ sums when B * H is small, and regenerate dropout bits
per block. Each test here aims at one of those seams, against the float64 reference of
helpers (plain torch ops, never torch's SDPA):
  - L and S on both sides of every block size, L = 1, S = 1, long rows;
  - causal with L != S (both ways), where whole blocks and partial columns are skipped;
  - masks read in place through stride-0 (broadcast) dimensions, and strided ones;
  - dropout bits across block edges equal _attention_dropout_mask's;
  - the weights (computed once per row block, the output multiplied from them) against the
    output;
  - bitwise identical results for 1 and 2 threads where the key groups split a head;
  - rows that see no key: zeros and zero gradients, also in blocks skipped by causality.
"""

import pytest
import torch

import qkv_attention
from helpers import (
    HALF_GRAD_TOLERANCE_OF_MAX,
    VS_FLOAT64_TOLERANCE,
    assert_close_to_max,
    random_qkv,
    reference_attention,
)

ops = torch.ops.qkv_attention
FAST_DTYPES = (torch.float32, torch.bfloat16)  # the AVX-512 float and bfloat16 paths
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def check_against_reference(
    dtype,
    B,
    H,
    L,
    S,
    D,
    Dv=None,
    attn_mask=None,
    is_causal=False,
    key_padding_mask=None,
    dropout_p=0.0,
    seed=0,
):
    """Forward (output, weights, logsumexp) and backward (q, k, v and float-mask gradients) of
    attention_with_weights against the float64 reference with the same dropout mask."""
    torch.manual_seed(seed)
    q, k, v = random_qkv(B, H, L, S, D, Dv, dtype=dtype, requires_grad=True)
    mask_needs_grad = attn_mask is not None and attn_mask.is_floating_point()
    if mask_needs_grad:
        attn_mask = attn_mask.detach().to(dtype).requires_grad_()
    torch.manual_seed(seed + 1)
    out, weights = ops.attention_with_weights(
        q, k, v, attn_mask, dropout_p, is_causal, None, key_padding_mask
    )
    keep = None
    if dropout_p > 0:
        torch.manual_seed(seed + 1)  # the state attention_with_weights drew
        rng_state = qkv_attention.ops._draw_dropout_rng_state(dropout_p)
        keep = ops._attention_dropout_mask(rng_state, B, H, L, S, dropout_p)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask64 = attn_mask.detach().double().requires_grad_() if mask_needs_grad else attn_mask
    ref_out, ref_weights = reference_attention(
        *leaves, mask64, is_causal, None, key_padding_mask, keep, dropout_p
    )
    tolerance = VS_FLOAT64_TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref_out, **tolerance)
    torch.testing.assert_close(weights.double(), ref_weights, **tolerance)

    # The logsumexp saved for the backward, in float32 (float64 for float64).
    lse = ops._attention_forward(
        q.detach(),
        k.detach(),
        v.detach(),
        attn_mask.detach() if mask_needs_grad else attn_mask,
        key_padding_mask,
        0.0,
        is_causal,
        None,
        False,
    )[1]
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    grad = torch.randn(out.shape, dtype=torch.float64)
    inputs = [q, k, v] + ([attn_mask] if mask_needs_grad else [])
    ref_inputs = leaves + ([mask64] if mask_needs_grad else [])
    ours = torch.autograd.grad(out, inputs, grad.to(dtype))
    theirs = torch.autograd.grad(ref_out, ref_inputs, grad)
    for name, a, e in zip(("query", "key", "value", "attn_mask"), ours, theirs):
        assert torch.isfinite(a).all(), name
        if dtype in HALF_GRAD_TOLERANCE_OF_MAX:
            assert_close_to_max(a, e, HALF_GRAD_TOLERANCE_OF_MAX[dtype])
        else:
            # Gradients sum over L or S terms: the error is relative to the largest gradient.
            scaled = dict(tolerance)
            scaled["atol"] = tolerance["atol"] * max(1.0, e.abs().max().item())
            torch.testing.assert_close(a.double(), e, **scaled, msg=lambda m: f"{name}: {m}")


# Around 48 (query block), 128/256/512 (key blocks), and single positions.
BOUNDARY_SHAPES = [
    (1, 1),
    (1, 300),
    (300, 1),
    (47, 47),
    (48, 48),
    (49, 49),
    (97, 127),
    (96, 129),
    (50, 255),
    (49, 257),
    (130, 511),
    (17, 513),
    (145, 200),
]


@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=str)
@pytest.mark.parametrize("L,S", BOUNDARY_SHAPES, ids=lambda x: str(x))
def test_lengths_around_every_block_size_match_the_reference(dtype, L, S):
    check_against_reference(dtype, 1, 2, L, S, 16)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("L,S", [(1, 1), (49, 257), (130, 129)], ids=lambda x: str(x))
def test_every_dtype_at_block_edges_with_odd_head_sizes(dtype, L, S):
    """D = 17 (odd: the bfloat16 GEMMs pair elements along D) and Dv = 5 (a partial vector)."""
    check_against_reference(dtype, 2, 1, L, S, 17, 5)


@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=str)
@pytest.mark.parametrize(
    "L,S", [(1, 300), (60, 300), (300, 60), (257, 49), (49, 600), (600, 49)], ids=lambda x: str(x)
)
def test_causal_with_different_query_and_key_lengths(dtype, L, S):
    """Top-left causal: query i sees keys 0..i, so rows past S see every key and keys past L are
    seen by no row (their gradients are zero)."""
    check_against_reference(dtype, 1, 2, L, S, 16, is_causal=True)


@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=str)
def test_long_rows_and_many_key_blocks(dtype):
    check_against_reference(dtype, 1, 1, 3, 3000, 32)
    check_against_reference(dtype, 1, 1, 700, 700, 32, is_causal=True)


@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=str)
@pytest.mark.parametrize(
    "mask_shape",
    [
        (1, 1, 1, 1),
        (1, 1, 1, 200),
        (1, 1, 70, 1),
        (2, 1, 1, 200),
        (1, 3, 70, 200),
        (70, 200),
        (200,),
    ],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks_broadcast_through_stride_zero_dimensions(dtype, mask_shape, kind):
    """Masks of every broadcastable shape are read in place (stride 0 where broadcast): along
    the keys, a broadcast mask is one value per row; float masks also get their gradient."""
    B, H, L, S = 2, 3, 70, 200
    g = torch.Generator().manual_seed(3)
    if kind == "bool":
        mask = torch.rand(mask_shape, generator=g) < 0.8
    else:
        mask = torch.randn(mask_shape, generator=g, dtype=torch.float64)
    check_against_reference(dtype, B, H, L, S, 16, attn_mask=mask)


@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=str)
def test_strided_and_expanded_masks_with_a_key_padding_mask(dtype):
    """An attn_mask whose keys are not contiguous (a transposed view) and an expanded float
    mask, together with key_padding_mask and causality."""
    B, H, L, S = 2, 2, 60, 150
    g = torch.Generator().manual_seed(4)
    transposed = (torch.rand(B, 1, S, L, generator=g) < 0.85).transpose(-1, -2)
    assert transposed.stride(-1) != 1
    padding = torch.ones(B, S, dtype=torch.bool)
    padding[1, 140:] = False
    check_against_reference(
        dtype, B, H, L, S, 16, attn_mask=transposed, is_causal=True, key_padding_mask=padding
    )
    expanded = torch.randn(1, 1, L, 1, generator=g, dtype=torch.float64).expand(B, H, L, S)
    check_against_reference(dtype, B, H, L, S, 16, attn_mask=expanded, key_padding_mask=padding)


@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=str)
@pytest.mark.parametrize("L,S,causal", [(50, 261, False), (130, 130, True), (7, 517, False)])
def test_dropout_across_block_edges_matches_the_dropout_mask_op(dtype, L, S, causal):
    """Rows whose elements n = ((b H + h) L + i) S + j start anywhere inside a Philox block of
    4: the kernels' vectorised keep bits and _attention_dropout_mask agree, and gradients use
    the same mask as the forward."""
    check_against_reference(dtype, 2, 2, L, S, 16, is_causal=causal, dropout_p=0.3, seed=5)


@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=str)
def test_logits_of_plus_minus_1e4_through_masks_stay_finite(dtype):
    """Large logits and a mask of -1e4 / +1e4 values, across two key blocks: the running max
    must rescale correctly between blocks (no overflow of exp, no NaN)."""
    B, H, L, S, D = 1, 1, 50, 300, 8
    q, k, v = random_qkv(B, H, L, S, D, dtype=dtype)
    q = (q * 40).to(dtype)
    k = (k * 40).to(dtype)
    mask = torch.zeros(L, S, dtype=torch.float64)
    mask[:, 280:] = 1e4  # the last key block dominates: the max jumps after 256 keys
    mask[:, :10] = -1e4
    out = ops.attention(q, k, v, mask.to(dtype))
    ref, _ = reference_attention(q, k, v, mask.to(dtype))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, **VS_FLOAT64_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=str)
def test_rows_without_keys_give_zeros_and_zero_gradients(dtype):
    """A fully masked row in a block that is otherwise visible, and (causal, L > S) rows whose
    only keys are masked by key_padding_mask."""
    B, H, L, S = 1, 2, 100, 300
    mask = torch.ones(L, S, dtype=torch.bool)
    mask[3] = False
    mask[60, :] = False
    q, k, v = random_qkv(B, H, L, S, 16, dtype=dtype, requires_grad=True)
    out = ops.attention(q, k, v, mask)
    assert (out[:, :, 3] == 0).all() and (out[:, :, 60] == 0).all()
    (gq,) = torch.autograd.grad(out.float().sum(), (q,))
    assert (gq[:, :, 3] == 0).all() and (gq[:, :, 60] == 0).all()
    assert torch.isfinite(gq).all()
    check_against_reference(dtype, B, H, L, S, 16, attn_mask=mask)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize(
    "B,H,L,S,causal,dropout",
    [
        (1, 1, 200, 1100, False, 0.0),  # B*H = 1: the keys of the head split into 8 groups
        (1, 3, 150, 700, True, 0.2),  # B*H = 3: 3 groups each, causal
        (2, 8, 100, 300, False, 0.1),
    ],  # B*H = 16: one group per head
    ids=["one-head", "three-heads-causal", "sixteen-heads"],
)
def test_key_groups_give_bitwise_identical_results_for_any_thread_count(
    dtype, B, H, L, S, causal, dropout, restore_threads
):
    """The partial dQ sums of the key groups are added in group order, whatever thread ran
    which group: every output bit is the same with 1 and 2 threads, and from call to call."""
    q, k, v = random_qkv(B, H, L, S, 16, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, H, L, 16, dtype=torch.float64).to(dtype)

    def run():
        torch.manual_seed(11)
        out, weights = ops.attention_with_weights(q, k, v, None, dropout, causal)
        grads = torch.autograd.grad((out * grad).sum() + weights.float().sum(), (q, k, v))
        return [out, weights, *grads]

    torch.set_num_threads(1)
    expected = run()
    for threads in (2, 1, 2):
        torch.set_num_threads(threads)
        for a, b in zip(run(), expected):
            assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=str)
def test_weights_gradient_and_dropout_together(dtype):
    """need_weights with the weights in the loss: grad_weights feeds delta through a second
    pass over P; with dropout the weights are the dropped ones."""
    B, H, L, S = 1, 2, 60, 270
    q, k, v = random_qkv(B, H, L, S, 16, dtype=dtype, requires_grad=True)
    torch.manual_seed(21)
    out, weights = ops.attention_with_weights(q, k, v, None, 0.25, False)
    torch.manual_seed(21)  # the state attention_with_weights drew
    rng_state = qkv_attention.ops._draw_dropout_rng_state(0.25)
    keep = ops._attention_dropout_mask(rng_state, B, H, L, S, 0.25)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_weights = reference_attention(*leaves, dropout_keep=keep, dropout_p=0.25)
    g_out = torch.randn(out.shape, dtype=torch.float64)
    g_w = torch.randn(weights.shape, dtype=torch.float64)
    ours = torch.autograd.grad(
        (out * g_out.to(dtype)).sum() + (weights * g_w.to(dtype)).sum(), (q, k, v)
    )
    theirs = torch.autograd.grad((ref_out * g_out).sum() + (ref_weights * g_w).sum(), leaves)
    assert torch.equal(weights == 0, (keep == 0) | (ref_weights == 0))
    for a, e in zip(ours, theirs):
        assert_close_to_max(a, e, 2.0**-6 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_packed_self_attention_projection_equals_the_separate_one(dtype, bias):
    """qkv_projection on one input with the weights as chunks of one (3E, Ein) matrix (the
    module's self-attention) takes the one-GEMM path; it must give what three separate
    projections of copies give, forward and backward (up to GEMM rounding: the K dimension is
    the same, but MKL may block a 3E-wide GEMM differently)."""
    B, L, E, H = 2, 37, 48, 4
    g = torch.Generator().manual_seed(8)
    x = torch.randn(B, L, E, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(3 * E, E, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(3 * E, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    biases = b.chunk(3) if bias else (None, None, None)
    packed = ops.qkv_projection(x, x, x, *w.chunk(3), *biases, H)
    x2 = [x.detach().clone().requires_grad_() for _ in range(3)]
    w2 = [c.detach().clone().requires_grad_() for c in w.chunk(3)]
    b2 = [c.detach().clone().requires_grad_() for c in b.chunk(3)] if bias else [None] * 3
    separate = ops.qkv_projection(*x2, *w2, *b2, H)
    tolerance = VS_FLOAT64_TOLERANCE[dtype]
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype) for t in packed]
    for a, e in zip(packed, separate):
        assert a.is_contiguous()
        torch.testing.assert_close(a, e, **tolerance)
    ours = torch.autograd.grad(packed, [x, w] + ([b] if bias else []), grads)
    theirs = torch.autograd.grad(separate, x2 + w2 + (b2 if bias else []), grads)
    expected = [theirs[0] + theirs[1] + theirs[2], torch.cat(theirs[3:6])]
    if bias:
        expected.append(torch.cat(theirs[6:9]))
    for a, e in zip(ours, expected):
        scaled = dict(tolerance, atol=tolerance["atol"] * max(1.0, e.abs().max().item()) * 4)
        torch.testing.assert_close(a, e, **scaled)
