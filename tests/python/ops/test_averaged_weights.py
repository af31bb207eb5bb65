"""attention_with_weights(..., average_attn_weights=True): the weights' mean over the heads,
(B, L, S), computed by the kernel without a per-head (B, H, L, S) tensor.

Checked against the per-head weights averaged with torch's mean (values, and the gradients
that flow back through the averaged weights), with masks, causal, dropout, GQA and a decode
shape; gradcheck and gradgradcheck; bitwise identical across thread counts; and the memory the
op allocates.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from helpers import random_bool_mask, random_tensor
from qkv_attention import ops

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}

# (B, H, Hkv, L, S, D, Dv, is_causal)
SHAPES = [
    (2, 3, 3, 5, 7, 4, 4, False),
    (2, 4, 4, 130, 300, 16, 8, True),  # several query and key blocks, causal
    (1, 12, 12, 65, 1000, 8, 8, False),  # H not a power of two: the mean's division
    (3, 8, 2, 17, 40, 8, 8, True),  # GQA
    (2, 4, 1, 1, 1500, 16, 16, False),  # one query against many keys (MQA)
]


def _inputs(B, H, Hkv, L, S, D, Dv, dtype):
    return (
        random_tensor(B, H, L, D, dtype=dtype),
        random_tensor(B, Hkv, S, D, dtype=dtype),
        random_tensor(B, Hkv, S, Dv, dtype=dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Hkv{}L{}S{}D{}Dv{}c{}".format(*s))
@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_averaged_weights_equal_the_mean_of_the_per_head_weights(dtype, shape, masks, dropout_p):
    B, H, Hkv, L, S, D, Dv, is_causal = shape
    q, k, v = _inputs(B, H, Hkv, L, S, D, Dv, dtype)
    attn_mask = random_tensor(L, S, dtype=dtype) if masks else None
    padding = random_bool_mask(B, S) if masks else None
    torch.manual_seed(7)  # the same dropout draw for both calls
    out, per_head = ops.attention_with_weights(
        q, k, v, attn_mask, dropout_p, is_causal, None, padding
    )
    torch.manual_seed(7)
    out_avg, averaged = ops.attention_with_weights(
        q, k, v, attn_mask, dropout_p, is_causal, None, padding, average_attn_weights=True
    )
    assert averaged.shape == (B, L, S) and averaged.dtype == dtype
    assert averaged.is_contiguous()
    expected = per_head.double().mean(dim=1) if dtype == torch.bfloat16 else per_head.mean(dim=1)
    torch.testing.assert_close(
        averaged.to(expected.dtype),
        expected,
        rtol=TOLERANCE[dtype],
        atol=TOLERANCE[dtype],
        equal_nan=True,
    )
    torch.testing.assert_close(
        out_avg, out, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype], equal_nan=True
    )


@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "B{}H{}Hkv{}L{}S{}".format(*s[:5]))
def test_gradients_through_averaged_weights_equal_those_through_the_mean(shape):
    B, H, Hkv, L, S, D, Dv, is_causal = shape
    q, k, v = (t.requires_grad_() for t in _inputs(B, H, Hkv, L, S, D, Dv, torch.float64))
    mask = random_tensor(1, H, L, S, dtype=torch.float64).requires_grad_()
    grad_out = random_tensor(B, H, L, Dv, dtype=torch.float64)
    grad_w = random_tensor(B, L, S, dtype=torch.float64)

    def gradients(average):
        out, weights = ops.attention_with_weights(
            q, k, v, mask, 0.0, is_causal, None, None, average_attn_weights=average
        )
        if not average:
            weights = weights.mean(dim=1)
        loss = (out * grad_out).sum() + (weights * grad_w).sum()
        return torch.autograd.grad(loss, (q, k, v, mask))

    for ours, reference in zip(gradients(True), gradients(False)):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gqa", [False, True])
def test_gradcheck_and_gradgradcheck_with_averaged_weights(gqa):
    Hkv = 1 if gqa else 2
    q = random_tensor(2, 2, 3, 4, dtype=torch.float64).requires_grad_()
    k = random_tensor(2, Hkv, 5, 4, dtype=torch.float64).requires_grad_()
    v = random_tensor(2, Hkv, 5, 3, dtype=torch.float64).requires_grad_()
    mask = random_tensor(3, 5, dtype=torch.float64).requires_grad_()

    def fn(q, k, v, mask):
        return ops.attention_with_weights(
            q, k, v, mask, 0.0, True, None, None, average_attn_weights=True
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, mask))
    assert torch.autograd.gradgradcheck(fn, (q, k, v, mask))


def test_averaged_weights_are_bitwise_identical_across_thread_counts():
    q, k, v = _inputs(2, 6, 3, 200, 333, 16, 16, torch.float32)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            torch.manual_seed(3)
            results.append(
                ops.attention_with_weights(
                    q, k, v, None, 0.2, True, None, None, average_attn_weights=True
                )
            )
    finally:
        torch.set_num_threads(threads)
    for out, weights in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(weights, results[0][1])


def test_averaged_weights_allocate_no_per_head_scores():
    B, H, L, S, D = 2, 16, 64, 512, 8
    q, k, v = _inputs(B, H, H, L, S, D, D, torch.float32)
    per_head_bytes = B * H * L * S * 4

    def largest_allocation(average):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            ops.attention_with_weights(q, k, v, average_attn_weights=average)
        return max(
            event.cpu_memory_usage
            for event in prof.events()
            if event.name == "qkv_attention::_attention_forward"
        )

    assert largest_allocation(False) >= per_head_bytes  # the measurement sees the weights
    # Output (B, H, L, D), logsumexp (B, H, L) and the averaged weights (B, L, S) only.
    assert largest_allocation(True) < B * H * L * D * 4 + B * H * L * 4 + B * L * S * 4 + 4096


def test_the_module_asks_the_kernel_for_averaged_weights():
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    ours = __import__("qkv_attention").MultiheadAttention(32, 4, batch_first=True).eval()
    ours.load_state_dict(mha.state_dict())
    x = random_tensor(2, 9, 32, dtype=torch.float32)
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        out, weights = ours(x, x, x)
    names = {event.name for event in prof.events()}
    assert "aten::mean" not in names  # no per-head weights averaged afterwards
    expected_out, expected_weights = mha(x, x, x)
    assert weights.shape == (2, 9, 9)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)


def test_averaged_weights_under_vmap_equal_a_loop():
    q, k, v = (torch.stack([t, t.flip(0)]) for t in _inputs(2, 4, 2, 6, 9, 8, 8, torch.float64))
    batched = torch.vmap(
        lambda q, k, v: ops.attention_with_weights(q, k, v, average_attn_weights=True)
    )(q, k, v)
    for i in range(2):
        out, weights = ops.attention_with_weights(q[i], k[i], v[i], average_attn_weights=True)
        torch.testing.assert_close(batched[0][i], out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batched[1][i], weights, rtol=1e-12, atol=1e-12)


def test_averaged_weights_compile_fullgraph_with_gradients():
    q, k, v = (t.requires_grad_() for t in _inputs(2, 4, 2, 6, 9, 8, 8, torch.float64))

    def fn(q, k, v):
        out, weights = ops.attention_with_weights(q, k, v, None, 0.0, True, None, None, True)
        return out.sum() + (weights * torch.arange(9.0, dtype=torch.float64)).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    expected = torch.autograd.grad(fn(q, k, v), (q, k, v))
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
