"""qkv_projection's packed self-attention path, with every stride pattern of its weights.

When query, key and value are one tensor and the three weights (and biases) are consecutive
parts of one strided storage, the op runs one GEMM against the stacked (3E, Ein) matrix. It used
to decide that from is_contiguous(), which ignores the stride of a size-1 dimension: with E = 1
and (1, Ein) weights whose row stride was not their spacing in the storage, k and v were read
from the wrong rows, or a valid input was refused with an unclear storage error. Now the
decision is made on the real strides and offsets; every layout below must give F.linear's
result (and gradients), whichever path it takes.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

import qkv_attention  # noqa: F401

ops = torch.ops.qkv_attention
# float64, sums of Ein <= 7 products: 1e-12 is far above rounding, far below any wrong row.
TOL = dict(rtol=1e-12, atol=1e-12)
Ein = 5


def storage(n, seed):
    return torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def layouts(E):
    """(name, q_weight, k_weight, v_weight): (E, Ein) views, most of them of one storage."""
    base = storage(3 * E * Ein + 64, seed=E)
    yield "chunks of a contiguous (3E, Ein)", base[: 3 * E * Ein].view(3 * E, Ein).chunk(3)
    yield "chunks of a transposed (Ein, 3E)", base[: 3 * E * Ein].view(Ein, 3 * E).t().chunk(3)
    padded = base[: 3 * E * (Ein + 2)].view(3 * E, Ein + 2)[:, :Ein]
    yield "chunks of a row-padded (3E, Ein + 2)", padded.chunk(3)
    interleaved = base[: 3 * E * Ein].view(E, 3, Ein)
    yield "interleaved (E, 3, Ein)[:, i]", tuple(interleaved[:, i] for i in range(3))
    # consecutive blocks whose declared row stride differs from their spacing: the E = 1 bug
    for row_stride in (1, 3, Ein + 1, 40):
        if 2 * E * Ein + (E - 1) * row_stride + Ein <= base.numel():  # inside the storage
            yield (
                f"blocks E*Ein apart with row stride {row_stride}",
                tuple(base.as_strided((E, Ein), (row_stride, 1), i * E * Ein) for i in range(3)),
            )
    # row-stride-consistent blocks with a gap: not one stacked matrix
    yield (
        "blocks with a gap",
        tuple(base.as_strided((E, Ein), (Ein, 1), i * (E * Ein + 3)) for i in range(3)),
    )
    expanded = base[:Ein].view(1, Ein).expand(E, Ein)
    yield "one expanded row for all three", (expanded, expanded, expanded)
    yield (
        "expanded rows of three storages",
        tuple(storage(Ein, s).view(1, Ein).expand(E, Ein) for s in (1, 2, 3)),
    )
    column = base[: 3 * E * Ein].view(3 * E * Ein, 1)  # (Ein = 1 style) column stride games
    yield (
        "column-major blocks",
        tuple(column[i * E * Ein : (i + 1) * E * Ein].view(Ein, E).t() for i in range(3)),
    )
    yield "three separate tensors", tuple(storage(E * Ein, s).view(E, Ein) for s in (4, 5, 6))


def bias_layouts(E):
    base = storage(3 * E + 16, seed=100 + E)
    yield "none", (None, None, None)
    yield "chunks of one (3E,)", base[: 3 * E].chunk(3)
    yield (
        "strided blocks",
        tuple(base.as_strided((E,), (2,), i * E) for i in range(3))
        if 2 * E + 2 * (E - 1) < base.numel()
        else (None, None, None),
    )
    yield "three separate", tuple(storage(E, s) for s in (7, 8, 9))


CASES = [
    (E, name, weights, bias_name, biases)
    for E in (1, 2, 4)
    for (name, weights), (bias_name, biases) in itertools.product(layouts(E), bias_layouts(E))
]


@pytest.mark.parametrize(
    "E, name, weights, bias_name, biases", CASES, ids=[f"E{c[0]}-{c[1]}-bias {c[3]}" for c in CASES]
)
@pytest.mark.parametrize("self_attention", [True, False], ids=["one-input", "three-inputs"])
def test_projection_matches_linear_for_every_weight_layout(
    E, name, weights, bias_name, biases, self_attention
):
    num_heads = E if E <= 2 else 2
    x = storage(2 * 3 * Ein, seed=50).view(2, 3, Ein)
    inputs = (x, x, x) if self_attention else (x, x.clone(), x.clone())
    q, k, v = ops.qkv_projection(*inputs, *weights, *biases, num_heads)
    for out, inp, w, b in zip((q, k, v), inputs, weights, biases):
        expected = F.linear(inp, w, b).view(2, 3, num_heads, E // num_heads).transpose(1, 2)
        torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("E", [1, 4])
@pytest.mark.parametrize("layout", range(4))
def test_projection_gradients_for_strided_weight_views(E, layout):
    # The gradients reach the weights' views (and through them the storage) as F.linear's do.
    base_ours = storage(3 * E * Ein + 64, seed=E).requires_grad_()
    base_ref = base_ours.detach().clone().requires_grad_()

    def views(base):
        if layout == 0:
            return base[: 3 * E * Ein].view(3 * E, Ein).chunk(3)
        if layout == 1:
            return base[: 3 * E * Ein].view(Ein, 3 * E).t().chunk(3)
        if layout == 2:
            return tuple(base.as_strided((E, Ein), (Ein + 1, 1), i * E * Ein) for i in range(3))
        return tuple(base.as_strided((E, Ein), (1, E), i * E * Ein) for i in range(3))

    x = storage(2 * 3 * Ein, seed=51).view(2, 3, Ein)
    grads = [storage(2 * 3 * E, seed=60 + i).view(2, 1, 3, E) for i in range(3)]
    q, k, v = ops.qkv_projection(x, x, x, *views(base_ours), None, None, None, 1)
    torch.autograd.backward((q, k, v), grads)
    expected = [F.linear(x, w).view(2, 3, 1, E).transpose(1, 2) for w in views(base_ref)]
    torch.autograd.backward(expected, grads)
    for ours, ref in zip((q, k, v), expected):
        torch.testing.assert_close(ours, ref, **TOL)
    torch.testing.assert_close(base_ours.grad, base_ref.grad, **TOL)


def test_the_reported_case_e1_weights_of_one_storage():
    # The instance from the report: E = 1, weights strided views of one storage with a row
    # stride other than their spacing; k and v used to come from the wrong rows.
    base = storage(64, seed=9)
    weights = tuple(base.as_strided((1, 4), (7, 1), i * 4) for i in range(3))
    x = storage(2 * 3 * 4, seed=10).view(2, 3, 4)
    q, k, v = ops.qkv_projection(x, x, x, *weights, None, None, None, 1)
    for out, w in zip((q, k, v), weights):
        torch.testing.assert_close(out, F.linear(x, w).unsqueeze(1), **TOL)
