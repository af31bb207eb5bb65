"""Jagged tensors with holes (``torch.nested.narrow``: ``lengths()`` is not None) and nested
inputs whose sequences do not match, through functional.scaled_dot_product_attention and
MultiheadAttention: each sequence is attended over its own ``lengths[b]`` rows (not the
padding between them), against each sequence computed densely on its own, with gradients; and
key/value split into other sequences than each other are refused on every module path."""

import pytest
import torch
import torch.nn.functional as F

import qkv_attention
from qkv_attention.functional import scaled_dot_product_attention as sdpa

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")

F64 = dict(atol=1e-10, rtol=1e-10)

# A padded (B=3, T=7) buffer and the rows each sequence keeps: holes at the start of sequence
# 0 and 2, at the end of every sequence, and between sequences.
STARTS = {"start": [1, 0, 2], "end": [0, 0, 0], "middle": [2, 1, 3]}
LENGTHS = [3, 5, 4]
T = 7


def narrowed(buffer, where):
    """(B, j, ...) jagged with holes: sequence b is buffer[b, start_b : start_b + length_b]."""
    starts, lengths = torch.tensor(STARTS[where]), torch.tensor(LENGTHS)
    nt = torch.nested.narrow(buffer, 1, starts, lengths, layout=torch.jagged)
    assert nt.lengths() is not None  # the layout this file is about
    return nt


def sequence(buffer, where, b):
    start = STARTS[where][b]
    return buffer[b, start : start + LENGTHS[b]]


@pytest.mark.parametrize("where", list(STARTS))
@pytest.mark.parametrize("is_causal", [False, True])
def test_functional_honours_the_lengths_of_a_jagged_tensor_with_holes(where, is_causal):
    H, D = 2, 8
    g = torch.Generator().manual_seed(0)
    buffer = torch.randn(3, T, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    x = narrowed(buffer, where).transpose(1, 2)  # (B, H, j, D)
    out = sdpa(x, x, x, is_causal=is_causal)
    assert out.transpose(1, 2).lengths() is None
    assert torch.diff(out.transpose(1, 2).offsets()).tolist() == LENGTHS
    grad_out = torch.randn(out.transpose(1, 2).values().shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out.transpose(1, 2).values(), buffer, grad_out)

    reference = buffer.detach().clone().requires_grad_()
    expected = []
    for b in range(3):
        xb = sequence(reference, where, b).transpose(0, 1)  # (H, L_b, D)
        expected.append(F.scaled_dot_product_attention(xb, xb, xb, is_causal=is_causal))
    expected_rows = torch.cat([e.transpose(0, 1) for e in expected])  # (total, H, D)
    torch.testing.assert_close(out.transpose(1, 2).values(), expected_rows, **F64)
    (expected_grad,) = torch.autograd.grad(expected_rows, reference, grad_out)
    torch.testing.assert_close(grad, expected_grad, **F64)
    # The holes get no gradient: nothing read them.
    for b, start in enumerate(STARTS[where]):
        assert not grad[b, :start].any() and not grad[b, start + LENGTHS[b] :].any()


def test_functional_with_holes_in_key_value_only():
    """Queries without holes against keys/values with holes: key b's rows are its own."""
    H, D = 2, 8
    g = torch.Generator().manual_seed(1)
    buffer = torch.randn(3, T, H, D, generator=g, dtype=torch.float64)
    kv = narrowed(buffer, "middle").transpose(1, 2)
    parts = [torch.randn(n, H, D, generator=g, dtype=torch.float64) for n in (2, 1, 4)]
    q = torch.nested.as_nested_tensor(parts, layout=torch.jagged).transpose(1, 2)
    out = sdpa(q, kv, kv)
    for b, part in enumerate(parts):
        kb = sequence(buffer, "middle", b).transpose(0, 1)
        expected = F.scaled_dot_product_attention(part.transpose(0, 1), kb, kb)
        torch.testing.assert_close(out[b], expected, **F64)


@pytest.mark.parametrize("where", list(STARTS))
@pytest.mark.parametrize("need_weights", [False, True])
def test_module_honours_the_lengths_of_a_jagged_tensor_with_holes(where, need_weights):
    torch.manual_seed(0)
    module = qkv_attention.MultiheadAttention(16, 4, batch_first=True, dtype=torch.float64)
    buffer = torch.randn(3, T, 16, dtype=torch.float64)
    x = narrowed(buffer, where)
    out, weights = module(x, x, x, need_weights=need_weights)
    assert out.is_nested and [o.size(0) for o in out.unbind()] == LENGTHS
    for b, got in enumerate(out.unbind()):
        xb = sequence(buffer, where, b)
        expected, expected_weights = module(xb, xb, xb)
        torch.testing.assert_close(got, expected, **F64)
        if need_weights:
            n = LENGTHS[b]
            torch.testing.assert_close(weights[b, :n, :n], expected_weights, **F64)


def jagged_rows(lengths, features, seed):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, features, generator=g, dtype=torch.float64) for n in lengths]
    return torch.nested.as_nested_tensor(parts, layout=torch.jagged)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("kdim", [None, 12], ids=["packed", "separate-projections"])
def test_module_refuses_value_split_unlike_key_on_every_path(need_weights, kdim):
    """Same total rows, another split: key sequence b and value sequence b differ in length."""
    module = qkv_attention.MultiheadAttention(
        16, 4, batch_first=True, kdim=kdim, vdim=kdim, dtype=torch.float64
    )
    features = kdim or 16
    query = jagged_rows([2, 3], 16, 0)
    key, value = jagged_rows([4, 2], features, 1), jagged_rows([3, 3], features, 2)
    with pytest.raises(AssertionError, match=r"key's sequence lengths are \[4, 2\] and value's"):
        module(query, key, value, need_weights=need_weights)


@pytest.mark.parametrize("need_weights", [False, True])
def test_module_refuses_a_value_with_another_number_of_sequences(need_weights):
    module = qkv_attention.MultiheadAttention(16, 4, batch_first=True, dtype=torch.float64)
    query, key = jagged_rows([2, 3], 16, 0), jagged_rows([4, 2], 16, 1)
    value = jagged_rows([4, 1, 1], 16, 2)
    with pytest.raises(AssertionError, match="key has 2 sequences and value has 3"):
        module(query, key, value, need_weights=need_weights)


@pytest.mark.parametrize("need_weights", [False, True])
def test_module_refuses_nested_inputs_of_another_dtype_than_its_parameters(need_weights):
    module = qkv_attention.MultiheadAttention(16, 4, batch_first=True, dtype=torch.float64)
    x = jagged_rows([2, 3], 16, 0).to(torch.float32)
    with pytest.raises(RuntimeError, match="module's parameters have dtype torch.float64"):
        module(x, x, x, need_weights=need_weights)


def test_functional_refuses_value_split_unlike_key():
    g = torch.Generator().manual_seed(3)

    def bhjd(lengths):
        parts = [torch.randn(n, 2, 8, generator=g) for n in lengths]
        return torch.nested.as_nested_tensor(parts, layout=torch.jagged).transpose(1, 2)

    with pytest.raises(RuntimeError, match=r"key's sequence lengths are \[4, 2\] and value's"):
        sdpa(bhjd([2, 3]), bhjd([4, 2]), bhjd([3, 3]))
