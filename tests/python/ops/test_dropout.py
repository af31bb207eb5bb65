"""Dropout on the attention weights: reproducible under torch.manual_seed, the right keep rate
and scale, and a backward that uses the forward's mask without storing it."""

import math

import pytest
import torch

import qkv_attention

from helpers import random_bool_mask, random_qkv, random_tensor, reference_attention

ops = torch.ops.qkv_attention
pytestmark = pytest.mark.usefixtures("seed_torch")

FLOAT64_EPS = torch.finfo(torch.float64).eps


def run_with_seed(
    seed, query, key, value, dropout_p, attn_mask=None, is_causal=False, grad_output=None
):
    """Output, weights and the gradients of (query, key, value) of one seeded call."""
    leaves = [t.detach().clone().requires_grad_() for t in (query, key, value)]
    torch.manual_seed(seed)
    out, weights = ops.attention_with_weights(*leaves, attn_mask, dropout_p, is_causal)
    if grad_output is None:
        grad_output = torch.ones_like(out)
    out.backward(grad_output)
    return out.detach(), weights.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_same_seed_gives_bitwise_identical_results(dtype):
    query, key, value = random_qkv(2, 3, 9, 11, 4, 5, dtype=dtype)
    mask = random_bool_mask(9, 11)
    first = run_with_seed(5, query, key, value, 0.3, mask, True)
    torch.rand(100)  # whatever happened to the generator in between
    second = run_with_seed(5, query, key, value, 0.3, mask, True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)
    # and the plain attention op draws the same mask as attention_with_weights. Not bitwise: with
    # weights requested the output is multiplied from the normalised weights (one pass), without
    # them from the online softmax; a different mask would differ by O(1), not by rounding.
    torch.manual_seed(5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        ops.attention(query, key, value, mask, 0.3, True), first[0], atol=tolerance, rtol=tolerance
    )


def test_different_seeds_give_different_masks():
    query, key, value = random_qkv(2, 2, 8, 16, 4)
    _, weights_a, _ = run_with_seed(1, query, key, value, 0.5)
    _, weights_b, _ = run_with_seed(2, query, key, value, 0.5)
    dropped_a, dropped_b = weights_a == 0, weights_b == 0
    # 512 independent draws at p = 0.5: the two patterns agree on about half of them.
    agreement = (dropped_a == dropped_b).double().mean().item()
    assert 0.35 < agreement < 0.65


def test_consecutive_calls_draw_fresh_masks():
    query, key, value = random_qkv(1, 2, 8, 16, 4)
    torch.manual_seed(3)
    _, first = ops.attention_with_weights(query, key, value, None, 0.5)
    _, second = ops.attention_with_weights(query, key, value, None, 0.5)
    assert not torch.equal(first == 0, second == 0)


def test_mask_does_not_depend_on_dtype():
    # The stream is a function of (seed, offset, position) only.
    query, key, value = random_qkv(2, 2, 6, 10, 4)
    _, weights64, _ = run_with_seed(9, query, key, value, 0.4)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        _, weights, _ = run_with_seed(9, *(t.to(dtype) for t in (query, key, value)), 0.4)
        assert torch.equal(weights == 0, weights64 == 0), dtype


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.8])
def test_keep_rate_is_one_minus_p(dropout_p):
    # Softmax weights are strictly positive here (no mask, moderate scores), so a zero weight
    # is exactly a dropped one.
    B, H, L, S = 2, 4, 64, 128
    query, key, value = random_qkv(B, H, L, S, 4)
    torch.manual_seed(11)
    _, weights = ops.attention_with_weights(query, key, value, None, dropout_p)
    kept = weights != 0
    # Each of the N = 65536 weights is kept independently with probability q = 1 - p: the
    # kept fraction has standard deviation sqrt(q (1 - q) / N) <= 0.002. Six of them bound a
    # false failure at 2e-9 (and the seed is fixed, so the test is deterministic anyway).
    n = kept.numel()
    keep_probability = 1 - dropout_p
    sigma = math.sqrt(keep_probability * dropout_p / n)
    assert abs(kept.double().mean().item() - keep_probability) < 6 * sigma
    # The same rate holds in every (batch, head) block (n = 8192 each), and no two blocks share
    # a pattern (an offset that did not advance would repeat it).
    block_rates = kept.double().mean(dim=(2, 3)).flatten()
    block_sigma = math.sqrt(keep_probability * dropout_p / (L * S))
    assert ((block_rates - keep_probability).abs() < 6 * block_sigma).all()
    blocks = kept.reshape(B * H, L * S)
    for i in range(B * H):
        for j in range(i + 1, B * H):
            assert not torch.equal(blocks[i], blocks[j])


@pytest.mark.parametrize("dropout_p", [0.25, 0.7])
def test_dropout_mask_op_keeps_independent_elements(dropout_p):
    # The mask op directly, on 2^20 elements: keep rate within 6 sigma (sigma <= 5e-4), and
    # neighbours (j, j + 1) both kept at rate q^2, as for independent draws.
    rng_state = torch.tensor([0x1234_5678_9ABC, 77], dtype=torch.int64)
    keep = ops._attention_dropout_mask(rng_state, 2, 4, 256, 512, dropout_p)
    assert keep.dtype == torch.bool and keep.shape == (2, 4, 256, 512)
    q = 1 - dropout_p
    n = keep.numel()
    assert abs(keep.double().mean().item() - q) < 6 * math.sqrt(q * (1 - q) / n)
    pairs = (keep[..., :-1] & keep[..., 1:]).double()
    assert abs(pairs.mean().item() - q * q) < 6 * math.sqrt(q * q * (1 - q * q) / pairs.numel())
    # the same state gives the same mask
    assert torch.equal(keep, ops._attention_dropout_mask(rng_state, 2, 4, 256, 512, dropout_p))


def test_dropout_mask_op_extremes():
    rng_state = torch.tensor([5, 6], dtype=torch.int64)
    assert ops._attention_dropout_mask(rng_state, 2, 3, 4, 5, 0.0).all()
    assert not ops._attention_dropout_mask(rng_state, 2, 3, 4, 5, 1.0).any()


@pytest.mark.parametrize("dropout_p", [0.2, 0.5])
def test_kept_weights_are_scaled_by_exactly_one_over_keep_probability(dropout_p):
    query, key, value = random_qkv(2, 3, 7, 9, 4, 5)
    mask = random_tensor(7, 9, scale=0.5)
    plain_out, plain_weights = ops.attention_with_weights(query, key, value, mask)
    torch.manual_seed(21)
    out, weights = ops.attention_with_weights(query, key, value, mask, dropout_p)
    kept = weights != 0
    assert 0 < kept.double().mean().item() < 1
    # Kept weights: the undropped weight times 1/(1-p), up to the rounding of that product
    # (a few ulps: the factors may be multiplied in another order).
    torch.testing.assert_close(
        weights[kept], plain_weights[kept] / (1 - dropout_p), rtol=4 * FLOAT64_EPS, atol=0
    )
    assert (weights[~kept] == 0).all()
    # and the output is made of exactly these weights
    torch.testing.assert_close(out, weights @ value, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, plain_out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_dropout_p_one_gives_zeros_and_zero_gradients(dtype):
    query, key, value = random_qkv(2, 2, 5, 6, 3, 4, dtype=dtype, requires_grad=True)
    mask = random_tensor(5, 6, dtype=dtype, requires_grad=True)
    out, weights = ops.attention_with_weights(query, key, value, mask, 1.0, True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(weights, torch.zeros_like(weights))
    (out.sum() + weights.sum()).backward()
    for t in (query, key, value, mask):
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_backward_uses_the_forward_mask(dtype, is_causal):
    B, H, L, S, D, Dv, p = 2, 3, 6, 7, 4, 3, 0.4
    query, key, value = random_qkv(B, H, L, S, D, Dv, dtype=dtype)
    attn_mask = random_tensor(H, L, S, dtype=dtype, scale=0.5)
    grad_output = random_tensor(B, H, L, Dv, dtype=dtype)
    grad_weights = random_tensor(B, H, L, S, dtype=dtype)

    # The mask this seed draws: the state the composite ops draw, passed to the pure forward.
    torch.manual_seed(33)
    rng_state = qkv_attention.ops._draw_dropout_rng_state(p)
    _, _, weights = ops._attention_forward(
        query, key, value, attn_mask, None, p, is_causal, None, True, rng_state
    )
    keep = ops._attention_dropout_mask(rng_state, B, H, L, S, p)
    visible = torch.ones(L, S, dtype=torch.bool)
    if is_causal:
        visible = visible.tril()
    # the weights are zero exactly where the mask drops a visible key
    assert torch.equal(weights != 0, keep & visible)

    leaves = [t.clone().requires_grad_() for t in (query, key, value, attn_mask)]
    torch.manual_seed(33)
    out, weights = ops.attention_with_weights(*leaves[:3], leaves[3], p, is_causal)
    torch.rand(1000)  # the backward must not depend on the generator's state
    torch.autograd.backward((out, weights), (grad_output, grad_weights))

    leaves64 = [t.detach().double().requires_grad_() for t in (query, key, value, attn_mask)]
    expected, expected_weights = reference_attention(
        *leaves64[:3], leaves64[3], is_causal, dropout_keep=keep, dropout_p=p
    )
    torch.autograd.backward(
        (expected, expected_weights), (grad_output.double(), grad_weights.double())
    )
    tolerance = (
        dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    )
    torch.testing.assert_close(out.detach().double(), expected.detach(), **tolerance)
    torch.testing.assert_close(weights.detach().double(), expected_weights.detach(), **tolerance)
    for name, ours, theirs in zip(("query", "key", "value", "attn_mask"), leaves, leaves64):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, **tolerance, msg=name)


def test_zero_dropout_does_not_consume_the_generator():
    query, key, value = random_qkv(2, 2, 4, 5, 3, requires_grad=True)
    state = torch.get_rng_state()
    out = ops.attention(query, key, value, None, 0.0, True)
    out_w, weights = ops.attention_with_weights(query, key, value, None, 0.0)
    (out.sum() + out_w.sum() + weights.sum()).backward()
    assert torch.equal(torch.get_rng_state(), state)
    # while a positive dropout_p draws from it (so the check above can fail)
    ops.attention(query, key, value, None, 0.1)
    assert not torch.equal(torch.get_rng_state(), state)
