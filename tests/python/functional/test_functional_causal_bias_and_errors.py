"""functional.scaled_dot_product_attention with torch's ``CausalBias`` masks
(``causal_upper_left`` / ``causal_lower_right``) against torch's function (forward and
gradients, L < S, L > S, L = S, half types, dropout, torch.compile), and the exceptions of the
drop-in: a wrong dtype raises what torch raises (RuntimeError; ours is also a TypeError), a
missing ``enable_gqa=True`` is named, a ``CausalBias`` with ``is_causal=True`` raises as torch's."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

from helpers import SAME_DTYPE_TOLERANCE, random_tensor
from qkv_attention._errors import InputDtypeError
from qkv_attention.functional import scaled_dot_product_attention as sdpa

pytestmark = [
    pytest.mark.usefixtures("seed_torch"),
    # torch warns that a lower-right bias with L > S gives NaN (it gives zeros on the CPU).
    pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs"),
]

BIASES = {"upper_left": causal_upper_left, "lower_right": causal_lower_right}
SIZES = [(3, 7), (7, 3), (5, 5), (1, 6)]


def qkv(L, S, dtype, heads=2, kv_heads=2):
    return (
        random_tensor(2, heads, L, 8, dtype=dtype),
        random_tensor(2, kv_heads, S, 8, dtype=dtype),
        random_tensor(2, kv_heads, S, 6, dtype=dtype),
    )


def run_with_grads(function, inputs, bias, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = function(*leaves, attn_mask=bias, **kwargs)
    grad_output = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad(out, leaves, grad_output)
    return out.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("variant", list(BIASES))
def test_causal_bias_matches_torch_with_gradients(variant, sizes, dtype):
    L, S = sizes
    inputs = qkv(L, S, dtype)
    ours, our_grads = run_with_grads(sdpa, inputs, BIASES[variant](L, S))
    theirs, their_grads = run_with_grads(
        F.scaled_dot_product_attention, inputs, BIASES[variant](L, S)
    )
    tolerance = SAME_DTYPE_TOLERANCE[dtype]
    torch.testing.assert_close(ours, theirs, **tolerance)
    for ours_grad, their_grad in zip(our_grads, their_grads):
        torch.testing.assert_close(ours_grad, their_grad, **tolerance)


@pytest.mark.parametrize("variant", list(BIASES))
def test_causal_bias_with_grouped_heads_matches_torch(variant):
    inputs = qkv(3, 7, torch.float64, heads=4, kv_heads=2)
    bias = BIASES[variant](3, 7)
    ours = sdpa(*inputs, attn_mask=bias, enable_gqa=True)
    theirs = F.scaled_dot_product_attention(*inputs, attn_mask=bias, enable_gqa=True)
    torch.testing.assert_close(ours, theirs, **SAME_DTYPE_TOLERANCE[torch.float64])


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("variant", list(BIASES))
def test_causal_bias_with_dropout_is_its_mask_with_the_same_draw(variant, sizes):
    """With dropout the masks are ours (not torch's): the bias gives exactly the call with its
    meaning spelled out (is_causal, or the bottom-right bool mask), after the same seed."""
    L, S = sizes
    inputs = qkv(L, S, torch.float32)
    torch.manual_seed(5)
    ours = sdpa(*inputs, attn_mask=BIASES[variant](L, S), dropout_p=0.5)
    torch.manual_seed(5)
    if variant == "upper_left" or L == S:
        expected = sdpa(*inputs, is_causal=True, dropout_p=0.5)
    else:
        bottom_right = torch.ones(L, S, dtype=torch.bool).tril(S - L)
        expected = sdpa(*inputs, attn_mask=bottom_right, dropout_p=0.5)
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, sdpa(*inputs, attn_mask=BIASES[variant](L, S)))  # dropped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", list(BIASES))
def test_causal_bias_under_torch_compile(variant, dtype):
    # The bias is an argument: torch's Dynamo cannot build a CausalBias inside the graph.
    compiled = torch.compile(lambda q, k, v, bias: sdpa(q, k, v, attn_mask=bias), fullgraph=True)
    inputs = qkv(3, 7, dtype)
    bias = BIASES[variant](3, 7)
    torch.testing.assert_close(
        compiled(*inputs, bias),
        F.scaled_dot_product_attention(*inputs, attn_mask=bias),
        **SAME_DTYPE_TOLERANCE[dtype],
    )


@pytest.mark.parametrize("variant", list(BIASES))
def test_causal_bias_with_is_causal_raises_as_torch(variant):
    inputs = qkv(3, 7, torch.float32)
    for function in (sdpa, F.scaled_dot_product_attention):
        with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
            function(*inputs, attn_mask=BIASES[variant](3, 7), is_causal=True)


def jagged(dtype):
    parts = [torch.randn(n, 2, 8, dtype=dtype) for n in (2, 3)]
    return torch.nested.as_nested_tensor(parts, layout=torch.jagged).transpose(1, 2)


WRONG_DTYPES = {
    "key": lambda q, k, v: (q, k.to(torch.float64), v, None),
    "value": lambda q, k, v: (q, k, v.to(torch.float16), None),
    "all_int": lambda q, k, v: (q.to(torch.int32), k.to(torch.int32), v.to(torch.int32), None),
    "mask_float64": lambda q, k, v: (q, k, v, torch.zeros(3, 7, dtype=torch.float64)),
    "mask_int": lambda q, k, v: (q, k, v, torch.zeros(3, 7, dtype=torch.int64)),
}


@pytest.mark.parametrize("case", list(WRONG_DTYPES))
def test_a_wrong_dtype_raises_what_torch_raises(case):
    """torch's function raises RuntimeError; ours raises InputDtypeError, which is both a
    RuntimeError (code written for torch catches it) and a TypeError (our ops' type)."""
    q, k, v, mask = WRONG_DTYPES[case](*qkv(3, 7, torch.float32))
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.raises(InputDtypeError) as raised:
        sdpa(q, k, v, attn_mask=mask)
    assert isinstance(raised.value, RuntimeError) and isinstance(raised.value, TypeError)
    name = "attn_mask" if case.startswith("mask") else ("query" if case == "all_int" else case)
    assert name in str(raised.value)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")
def test_a_wrong_dtype_of_jagged_inputs_raises_a_runtime_error_too():
    with pytest.raises(RuntimeError, match="value") as raised:
        sdpa(jagged(torch.float32), jagged(torch.float32), jagged(torch.float64))
    assert isinstance(raised.value, InputDtypeError)


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (6, 3), (8, 2)])
def test_fewer_key_value_heads_without_enable_gqa_names_the_flag(heads, kv_heads):
    # (One key/value head broadcasts: torch's and ours accept it without the flag.)
    inputs = qkv(3, 7, torch.float32, heads=heads, kv_heads=kv_heads)
    with pytest.raises(RuntimeError, match=r"pass enable_gqa=True"):
        sdpa(*inputs)
    torch.testing.assert_close(
        sdpa(*inputs, enable_gqa=True),
        F.scaled_dot_product_attention(*inputs, enable_gqa=True),
        **SAME_DTYPE_TOLERANCE[torch.float32],
    )


def test_heads_that_cannot_be_grouped_get_no_gqa_hint():
    inputs = qkv(3, 7, torch.float32, heads=3, kv_heads=2)
    with pytest.raises(RuntimeError, match="do not broadcast") as raised:
        sdpa(*inputs)
    assert "enable_gqa" not in str(raised.value)


BAD_SCALARS = [
    dict(dropout_p="0.1"),
    dict(dropout_p=None),
    dict(dropout_p=1j),
    dict(scale="0.5"),
    dict(scale=1j),
    dict(is_causal="yes"),
    dict(is_causal=[True]),
]


@pytest.mark.parametrize("kwargs", BAD_SCALARS, ids=str)
@pytest.mark.parametrize("layout", ["dense", "grouped", "reshaped"])
def test_a_scalar_argument_of_the_wrong_type_raises_a_type_error_as_torch(kwargs, layout):
    """torch's function raises TypeError (its argument parser); the dispatcher would raise
    RuntimeError for ours. On each path: the operator directly, grouped heads, 3-D inputs."""
    heads, kv_heads = (4, 2) if layout == "grouped" else (2, 2)
    q, k, v = qkv(3, 7, torch.float32, heads=heads, kv_heads=kv_heads)
    if layout == "reshaped":
        q, k, v = q[0], k[0], v[0]
    gqa = layout == "grouped"
    with pytest.raises(TypeError):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **kwargs)
    (name,) = kwargs
    with pytest.raises(TypeError, match=rf"scaled_dot_product_attention: {name} must be"):
        sdpa(q, k, v, enable_gqa=gqa, **kwargs)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")
def test_a_scalar_argument_of_the_wrong_type_with_jagged_inputs_raises_a_type_error():
    q = jagged(torch.float32)
    with pytest.raises(TypeError, match="scaled_dot_product_attention: dropout_p must be"):
        sdpa(q, q, q, dropout_p="0.1")
