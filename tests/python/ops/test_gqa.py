"""Grouped-query attention in the attention op: key/value with Hkv heads serve H = G * Hkv query
heads (query head h reads key/value head h // G), against F.scaled_dot_product_attention(
enable_gqa=True) in float64, with gradients, double backward, opcheck, thread-count determinism
and the error for a head count that does not divide."""

import pytest
import torch
import torch.nn.functional as F

import qkv_attention  # noqa: F401
from qkv_attention.functional import scaled_dot_product_attention as our_sdpa

ops = torch.ops.qkv_attention

# (B, H, Hkv, L, S, D, Dv): MQA (Hkv = 1), Hkv = H, L != S, Dv != D, lengths across key blocks.
SHAPES = [
    (2, 8, 2, 33, 70, 16, 24),
    (1, 4, 1, 5, 300, 8, 8),
    (2, 4, 4, 17, 17, 8, 8),
    (1, 6, 3, 130, 530, 32, 16),
    (2, 2, 1, 1, 9, 4, 4),
]


def inputs(B, H, Hkv, L, S, D, Dv, dtype=torch.float64, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(
        requires_grad
    )  # noqa: E731
    return make(B, H, L, D), make(B, Hkv, S, D), make(B, Hkv, S, Dv)


def mask_for(kind, B, H, L, S):
    g = torch.Generator().manual_seed(1)
    if kind == "float":
        return torch.randn(B, 1, L, S, generator=g, dtype=torch.float64)
    if kind == "bool":
        mask = torch.rand(B, H, L, S, generator=g) > 0.3
        mask[..., 0] = True  # every row sees a key (SDPA gives NaN for empty rows)
        return mask
    return None


# SDPA takes no mask together with is_causal. Every shape has L <= S, so no causal row is empty.
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "mask_kind,causal", [(None, False), ("float", False), ("bool", False), (None, True)]
)
def test_gqa_matches_sdpa_enable_gqa_values_and_all_gradients(shape, mask_kind, causal):
    B, H, Hkv, L, S, D, Dv = shape
    assert L <= S
    q, k, v = inputs(*shape)
    mask = mask_for(mask_kind, B, H, L, S)
    ours = ops.attention(q, k, v, mask, 0.0, causal)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    grad = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
    for name, a, b in zip(("query", "key", "value"), ours_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=f"grad of {name}")


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_functional_enable_gqa_passes_unrepeated_key_value_and_matches_torch(shape):
    q, k, v = inputs(*shape)
    ours = our_sdpa(q, k, v, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)


def test_functional_without_enable_gqa_keeps_torchs_error_for_different_head_counts():
    q, k, v = inputs(1, 4, 2, 3, 5, 4, 4, requires_grad=False)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError, match="do not broadcast"):
        our_sdpa(q, k, v)


def test_gqa_gradcheck_and_gradgradcheck_with_mask_and_causal():
    q, k, v = inputs(1, 4, 2, 3, 5, 4, 3)
    mask = torch.randn(1, 1, 3, 5, dtype=torch.float64)
    fn = lambda q, k, v: ops.attention(q, k, v, mask, 0.0, True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_gqa_with_dropout_is_reproducible_and_matches_its_mask():
    q, k, v = inputs(1, 4, 2, 6, 9, 4, 4, requires_grad=False)
    torch.manual_seed(3)
    out, weights = ops.attention_with_weights(q, k, v, None, 0.5, False)
    torch.manual_seed(3)
    again = ops.attention(q, k, v, None, 0.5, False)
    # The same mask; not bitwise, as the weights path multiplies from the normalised weights.
    torch.testing.assert_close(out, again, atol=1e-12, rtol=1e-12)
    # The returned post-dropout weights times the repeated values give the output.
    v_rep = v.repeat_interleave(2, dim=1)
    torch.testing.assert_close(out, weights @ v_rep, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_forward_and_backward_are_bitwise_identical_for_one_and_two_threads(
    dtype, restore_threads
):
    q, k, v = inputs(1, 8, 2, 70, 300, 32, 32, dtype=dtype)
    grad = torch.randn(1, 8, 70, 32, dtype=dtype)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = ops.attention(q, k, v, None, 0.0, True)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_gqa_opcheck():
    q, k, v = inputs(2, 4, 2, 5, 7, 8, 6)
    torch.library.opcheck(
        ops._attention_forward.default, (q, k, v, None, None, 0.0, True, None, False)
    )
    torch.library.opcheck(ops.attention.default, (q, k, v))


@pytest.mark.parametrize("kv_heads", [3, 0])
def test_key_heads_that_do_not_divide_query_heads_raise_naming_both(kv_heads):
    q = torch.randn(1, 4, 3, 8)
    k = torch.randn(1, kv_heads, 5, 8)
    with pytest.raises(RuntimeError, match=f"key has {kv_heads} heads and query has 4"):
        ops.attention(q, k, k)


def test_value_heads_must_equal_key_heads():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="value"):
        ops.attention(q, k, torch.randn(1, 4, 5, 8))
