"""CPU autocast: the ops, functional.scaled_dot_product_attention and MultiheadAttention
compute in the lower precision inside torch.autocast("cpu", dtype=bfloat16/float16), as torch's
SDPA and nn.MultiheadAttention do: the same output and weights dtypes, values within the
dtype's tolerance of torch's under the same autocast, gradients in the leaves' own dtype."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qkv_attention
from helpers import HALF_DTYPES, SAME_DTYPE_TOLERANCE
from qkv_attention import functional, ops

E, HEADS, N, L, S = 16, 4, 2, 5, 7

# Module against torch's module, both under autocast: the same casts, then three roundings
# to the half type (projection, attention, output projection) in different orders on each
# side, each up to the tolerance of helpers' SAME_DTYPE_TOLERANCE; twice that covers the
# chain (measured: <= 3.9e-3 in bf16, <= 4.9e-4 in fp16 at these sizes).
MODULE_TOLERANCE = {
    dtype: dict(atol=2 * tol["atol"], rtol=2 * tol["rtol"])
    for dtype, tol in SAME_DTYPE_TOLERANCE.items()
}
# Gradients of float32 leaves through half-precision computation: each backward GEMM rounds
# to the half type too; sums over E = 16 features of O(1) terms. 4x the value tolerance
# (measured <= 2.0e-2 in bf16, <= 3.9e-3 in fp16).
GRAD_TOLERANCE = {
    dtype: dict(atol=4 * tol["atol"], rtol=4 * tol["rtol"])
    for dtype, tol in SAME_DTYPE_TOLERANCE.items()
}


def heads(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)


@pytest.mark.parametrize("low", HALF_DTYPES)
def test_attention_op_under_autocast_computes_in_the_autocast_dtype(low):
    torch.manual_seed(0)
    q, k, v = (heads(N, HEADS, n, E // HEADS, requires_grad=True) for n in (L, S, S))
    mask = torch.randn(L, S)  # float32: autocast casts it too, as for SDPA
    with torch.autocast("cpu", dtype=low):
        out = ops.attention(q, k, v, mask)
        both = ops.attention_with_weights(q, k, v, mask)
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.dtype == low and both[0].dtype == low and both[1].dtype == low
    assert theirs.dtype == low
    # The same as calling the op on the inputs cast by hand: bit for bit.
    cast = [t.detach().to(low) for t in (q, k, v, mask)]
    assert torch.equal(out, ops.attention(*cast))
    assert torch.equal(both[1], ops.attention_with_weights(*cast)[1])
    torch.testing.assert_close(out, theirs, **SAME_DTYPE_TOLERANCE[low])
    # Gradients reach the float32 leaves in float32, as torch's.
    grad = torch.randn_like(out)
    ours_grads = torch.autograd.grad(out, (q, k, v), grad)
    theirs_grads = torch.autograd.grad(theirs, (q, k, v), grad)
    for mine, reference in zip(ours_grads, theirs_grads):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, reference, **GRAD_TOLERANCE[low])


@pytest.mark.parametrize("low", HALF_DTYPES)
def test_autocast_leaves_float64_and_bool_masks_alone(low):
    torch.manual_seed(0)
    q, k, v = (heads(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(4, 4) > 0.3
    with torch.autocast("cpu", dtype=low):
        out = ops.attention(q, k, v, mask)
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.dtype == theirs.dtype == torch.float64
    assert torch.equal(out, ops.attention(q, k, v, mask))


@pytest.mark.parametrize("low", HALF_DTYPES)
def test_projection_and_merge_ops_under_autocast_match_torch_linear(low):
    torch.manual_seed(0)
    x = heads(N, L, E)
    weight, bias = torch.randn(E, E), torch.randn(E)
    with torch.autocast("cpu", dtype=low):
        q, k, v = ops.qkv_projection(x, x, x, weight, weight, weight, bias, bias, bias, HEADS)
        merged = ops.merge_heads(q, weight, bias)
        linear = F.linear(x, weight, bias)
    assert q.dtype == k.dtype == v.dtype == merged.dtype == linear.dtype == low
    torch.testing.assert_close(  # (B, L, E) -> (B, H, L, D)
        q, linear.view(N, L, HEADS, E // HEADS).transpose(1, 2), **SAME_DTYPE_TOLERANCE[low]
    )
    cast = [t.to(low) for t in (q, weight, bias)]
    assert torch.equal(merged, ops.merge_heads(*cast))


@pytest.mark.parametrize("low", HALF_DTYPES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_functional_under_autocast_matches_torch_sdpa(low, is_causal):
    torch.manual_seed(0)
    q, k, v = (heads(3, 2, L, 8, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=low):
        ours = functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    assert ours.dtype == theirs.dtype == low
    torch.testing.assert_close(ours, theirs, **SAME_DTYPE_TOLERANCE[low])
    ours.float().sum().backward()
    ours_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    theirs.float().sum().backward()
    for t, mine in zip((q, k, v), ours_grads):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, t.grad, **GRAD_TOLERANCE[low])


def module_pair(**config):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, HEADS, **config)
    ours = qkv_attention.MultiheadAttention(E, HEADS, **config)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


MASKS = {
    "none": {},
    "bool_padding": dict(key_padding_mask=torch.tensor([[False] * 6 + [True], [False] * 7])),
    "float32_attn_mask": dict(
        attn_mask=torch.randn(L, S, generator=torch.Generator().manual_seed(1))
    ),
    "bool_attn_mask_and_padding": dict(
        attn_mask=torch.triu(torch.ones(L, S, dtype=torch.bool), diagonal=1),
        key_padding_mask=torch.tensor([[False] * 5 + [True] * 2, [False] * 7]),
    ),
    "float32_attn_mask_and_padding": dict(
        attn_mask=torch.randn(L, S, generator=torch.Generator().manual_seed(2)),
        key_padding_mask=torch.zeros(N, S),
    ),
}


@pytest.mark.parametrize("low", HALF_DTYPES)
@pytest.mark.parametrize("masks", list(MASKS))
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_module_under_autocast_matches_torch_module(low, masks, need_weights, training):
    ours, theirs = module_pair(batch_first=True, add_bias_kv=masks == "none")
    ours.train(training)
    theirs.train(training)
    torch.manual_seed(1)
    query = torch.randn(N, L, E, requires_grad=True)
    memory = torch.randn(N, S, E, requires_grad=True)
    results = []
    for module in (ours, theirs):
        with torch.autocast("cpu", dtype=low):
            output, weights = module(
                query, memory, memory, need_weights=need_weights, **MASKS[masks]
            )
        grads = torch.autograd.grad(
            output.float().square().sum(), (query, memory, *module.parameters())
        )
        results.append((output, weights, grads))
    (output, weights, grads), (expected, expected_weights, expected_grads) = results
    assert output.dtype == expected.dtype == low
    torch.testing.assert_close(output, expected, **MODULE_TOLERANCE[low])
    if need_weights:
        assert weights.dtype == expected_weights.dtype == low
        torch.testing.assert_close(weights, expected_weights, **MODULE_TOLERANCE[low])
    else:
        assert weights is None and expected_weights is None
    for mine, reference in zip(grads, expected_grads):
        assert mine.dtype == reference.dtype == torch.float32
        torch.testing.assert_close(mine, reference, **GRAD_TOLERANCE[low])


@pytest.mark.parametrize("low", HALF_DTYPES)
def test_half_activation_into_float32_module_runs_under_autocast(low):
    """A Linear before attention hands a bf16/fp16 activation to the float32 module, as in
    any model trained under autocast; torch's module runs, so does ours."""
    ours, theirs = module_pair()
    torch.manual_seed(2)
    embed = nn.Linear(E, E)
    x = torch.randn(L, N, E)
    with torch.autocast("cpu", dtype=low):
        hidden = embed(x)
        assert hidden.dtype == low
        output, weights = ours(hidden, hidden, hidden)
        expected, expected_weights = theirs(hidden, hidden, hidden)
    assert output.dtype == weights.dtype == low
    torch.testing.assert_close(output, expected, **MODULE_TOLERANCE[low])
    torch.testing.assert_close(weights, expected_weights, **MODULE_TOLERANCE[low])
    # Outside autocast the same mix is an error, as for torch's module.
    with pytest.raises(
        RuntimeError,
        match=r"query has dtype torch\.(bfloat16|float16) but the "
        r"module's parameters have dtype torch\.float32",
    ):
        ours(hidden, hidden, hidden)


@pytest.mark.parametrize("low", HALF_DTYPES)
def test_module_under_autocast_rejects_what_torch_rejects(low):
    ours, theirs = module_pair()
    x = torch.randn(L, N, E)
    with torch.autocast("cpu", dtype=low):
        # float64 input is not cast by autocast, the float32 parameters are: torch's linear
        # raises on the mix, so do we.
        with pytest.raises(RuntimeError):
            theirs(x.double(), x.double(), x.double())
        with pytest.raises(RuntimeError, match="query has dtype torch.float64"):
            ours(x.double(), x.double(), x.double())
        # A float64 mask is not cast either: torch raises, so do we, naming the masks.
        mask = torch.zeros(L, L, dtype=torch.float64)
        with pytest.raises(RuntimeError):
            theirs(x, x, x, attn_mask=mask)
        with pytest.raises(
            RuntimeError,
            match=r"float masks must have any floating dtype but "
            r"float64 .*attn_mask: torch.float64",
        ):
            ours(x, x, x, attn_mask=mask)


@pytest.mark.parametrize("low", HALF_DTYPES)
def test_float64_module_ignores_autocast_as_torch_does(low):
    ours, theirs = module_pair(dtype=torch.float64)
    x = torch.randn(L, N, E, dtype=torch.float64)
    with torch.autocast("cpu", dtype=low):
        output, weights = ours(x, x, x)
        expected, expected_weights = theirs(x, x, x)
    assert output.dtype == weights.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(output, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(weights, expected_weights, atol=1e-10, rtol=1e-10)


def test_autocast_kernels_are_registered_for_the_public_ops():
    for name in (
        "qkv_projection",
        "attention",
        "attention_with_weights",
        "merge_heads",
        "_attention_forward",
        "attention_varlen",
        "_attention_varlen_forward",
    ):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            f"qkv_attention::{name}", "AutocastCPU"
        ), name


def test_compiled_functional_under_autocast_equals_eager():
    torch.manual_seed(0)
    q, k, v = (heads(2, 2, L, 8) for _ in range(3))
    compiled = torch.compile(
        functional.scaled_dot_product_attention, fullgraph=True, backend="aot_eager"
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = functional.scaled_dot_product_attention(q, k, v)
        result = compiled(q, k, v)
    assert result.dtype == torch.bfloat16
    assert torch.equal(result, expected)
