"""Torch's dtype tolerance: nn.MultiheadAttention accepts an in_proj_bias (and a bias_k/bias_v
of lower precision) whose dtype differs from the input's and returns the input's dtype (its
own test_multihead_attn_fast_path_query_and_bias_have_different_dtypes); ours accepts the
same, with torch's result, and in every layout (torch's only where its linear happens to take
the matmul path: batch_first, batched)."""

import pytest
import torch
from torch import nn

import qkv_attention

E, HEADS, N, L, S = 8, 2, 3, 4, 5
# float64 results against torch's: the bias values convert exactly to float64 on both sides;
# the same math in another summation order (as test_module_parity): 1e-10.
# float32: torch adds a float64 bias in float64 and rounds once, we round the bias first and
# add in float32: at most one more rounding, a few ulps of O(1) values: 1e-5.
# bfloat16 query: three bf16 roundings on either side in different orders: 2 ulps at 1.0.
TOLERANCE = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    # Gradients rounded to a float16 bias: the same float64 value rounded on both sides, or
    # values a rounding apart landing on neighbours: 1 ulp relative, 2^-10.
    torch.float16: dict(atol=1e-3, rtol=1e-3),
}


def pair(dtype, bias_dtype, field="in_proj_bias", training=False):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(
        E, HEADS, batch_first=True, dtype=dtype, add_bias_kv=field != "in_proj_bias"
    ).train(training)
    with torch.no_grad():
        theirs.in_proj_bias.normal_()  # nonzero, so a wrong cast shows
    setattr(theirs, field, nn.Parameter(getattr(theirs, field).detach().to(bias_dtype)))
    ours = qkv_attention.MultiheadAttention(
        E, HEADS, batch_first=True, dtype=dtype, add_bias_kv=field != "in_proj_bias"
    ).train(training)
    setattr(ours, field, nn.Parameter(getattr(theirs, field).detach().clone()))
    for name, param in theirs.named_parameters():
        if name != field:
            ours.get_parameter(name).data.copy_(param)
    return ours, theirs


def test_torch_test_case_float16_bias_with_float64_module_in_eval():
    """torch's own test: float16 in_proj_bias, float64 weights and input, eval mode."""
    ours, theirs = pair(torch.float64, torch.float16)
    query = torch.randn(3, 3, E, dtype=torch.float64)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            output, weights = ours(query, query, query)
            expected, expected_weights = theirs(query, query, query)
        assert output.dtype == weights.dtype == expected.dtype == torch.float64
        torch.testing.assert_close(output, expected, **TOLERANCE[torch.float64])
        torch.testing.assert_close(weights, expected_weights, **TOLERANCE[torch.float64])


CASES = [
    (torch.float64, torch.float16),
    (torch.float64, torch.bfloat16),
    (torch.float64, torch.float32),
    (torch.float32, torch.float64),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]


@pytest.mark.parametrize("dtype, bias_dtype", CASES)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("cross", [False, True])
def test_in_proj_bias_of_another_dtype_gives_torch_result_and_gradients(
    dtype, bias_dtype, training, need_weights, cross
):
    ours, theirs = pair(dtype, bias_dtype, training=training)
    torch.manual_seed(1)
    query = torch.randn(N, L, E, dtype=dtype)
    memory = torch.randn(N, S, E, dtype=dtype) if cross else query
    results = []
    for module in (ours, theirs):
        torch.manual_seed(2)
        output, weights = module(query, memory, memory, need_weights=need_weights)
        (bias_grad,) = torch.autograd.grad(output.float().square().sum(), module.in_proj_bias)
        results.append((output, weights, bias_grad))
    (output, weights, bias_grad), (expected, expected_weights, expected_grad) = results
    assert output.dtype == expected.dtype == dtype
    torch.testing.assert_close(output, expected, **TOLERANCE[dtype])
    if need_weights:
        assert weights.dtype == dtype
        torch.testing.assert_close(weights, expected_weights, **TOLERANCE[dtype])
    # The bias's gradient comes back in the bias's own dtype, as torch's.
    assert bias_grad.dtype == expected_grad.dtype == bias_dtype
    # Computed in the module's dtype, then rounded to the bias's: the coarser of the two.
    coarser = min(
        (dtype, bias_dtype), key=lambda d: torch.finfo(d).bits + (0 if d != torch.bfloat16 else -8)
    )
    tolerance = dict(TOLERANCE[coarser])
    if dtype == torch.bfloat16:
        # A bf16 module's bias gradient sums N * L = 12 bf16 terms per entry, rounded in
        # different orders on each side, with cancellation: the error scales with the largest
        # entry, not with each (small) entry; 4 ulps of the largest (measured <= 1.7).
        tolerance["atol"] = 4 * 2**-8 * expected_grad.abs().max().item()
    torch.testing.assert_close(bias_grad, expected_grad, **tolerance)


@pytest.mark.parametrize("layout", ["sequence_first", "unbatched"])
def test_in_proj_bias_of_another_dtype_works_where_torch_linear_refuses(layout):
    """torch's module raises here (its linear takes addmm, which wants one dtype); ours gives
    what torch gives with the bias converted first."""
    ours, theirs = pair(torch.float64, torch.float16)
    ours.batch_first = theirs.batch_first = False
    query = (
        torch.randn(L, E, dtype=torch.float64)
        if layout == "unbatched"
        else torch.randn(L, N, E, dtype=torch.float64)
    )
    with pytest.raises(RuntimeError, match="same dtype"):
        theirs(query, query, query)
    theirs.in_proj_bias = nn.Parameter(theirs.in_proj_bias.detach().double())
    output, weights = ours(query, query, query)
    expected, expected_weights = theirs(query, query, query)
    assert output.dtype == torch.float64
    torch.testing.assert_close(output, expected, **TOLERANCE[torch.float64])
    torch.testing.assert_close(weights, expected_weights, **TOLERANCE[torch.float64])


@pytest.mark.parametrize(
    "dtype, bias_dtype", [(torch.float64, torch.float16), (torch.float32, torch.bfloat16)]
)
def test_bias_kv_of_lower_precision_gives_torch_result(dtype, bias_dtype):
    ours, theirs = pair(dtype, bias_dtype, field="bias_k")
    ours.bias_v = nn.Parameter(ours.bias_v.detach().to(bias_dtype))
    theirs.bias_v = nn.Parameter(theirs.bias_v.detach().to(bias_dtype))
    query = torch.randn(N, L, E, dtype=dtype)
    output, weights = ours(query, query, query)
    expected, expected_weights = theirs(query, query, query)
    assert output.dtype == expected.dtype == dtype
    torch.testing.assert_close(output, expected, **TOLERANCE[dtype])
    torch.testing.assert_close(weights, expected_weights, **TOLERANCE[dtype])


def test_out_proj_bias_of_another_dtype_raises_as_in_torch():
    ours, theirs = pair(torch.float64, torch.float64)
    for module in (ours, theirs):
        module.out_proj.bias = nn.Parameter(module.out_proj.bias.detach().half())
    query = torch.randn(N, L, E, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        theirs(query, query, query)
    with pytest.raises((RuntimeError, TypeError), match="out_bias"):
        ours(query, query, query)
