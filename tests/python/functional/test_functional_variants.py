"""functional.scaled_dot_product_attention's keyword-only variants (window_size, softcap,
alibi_slopes, sinks) on every path: 4-D inputs the operator takes as they are, other batch
shapes (3-D, 5-D, broadcast), grouped heads and jagged nested tensors.

Each variant is checked against torch's own SDPA where it can express it: a window is a band
given as a bool mask, ALiBi a float mask; sinks scale torch's output by
sigmoid(logsumexp(scores) - sink) (the sink's share of the softmax denominator is what the
keys lose); softcap is torch's SDPA of capped scores, written out as softmax(cap) @ V. Gradients
by gradcheck (finite differences), the sinks' included.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from helpers import random_tensor
from qkv_attention.functional import scaled_dot_product_attention as sdpa

pytestmark = pytest.mark.usefixtures("seed_torch")

FLOAT64 = dict(atol=1e-12, rtol=1e-10)


def band(L, S, left, right, is_causal=False):
    """(L, S) bool: query i sees key j when i - left <= j <= i + right (-1: open side)."""
    i = torch.arange(L)[:, None]
    j = torch.arange(S)[None, :]
    allowed = torch.ones(L, S, dtype=torch.bool)
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    if is_causal:
        allowed &= j <= i
    return allowed


def alibi_bias(slopes, L, S):
    """(..., H, L, S) float: -slope * |i - j| for slopes (..., H)."""
    distance = (torch.arange(L)[:, None] - torch.arange(S)[None, :]).abs().to(slopes.dtype)
    return -slopes[..., None, None] * distance


@pytest.mark.parametrize(
    "window, is_causal",
    [((2, 0), True), ((3, 1), False), ((-1, 2), False), ((1, -1), True)],
    ids=str,
)
@pytest.mark.parametrize("shape", [(2, 3), (3,), (2, 2, 3), ()], ids=str)
def test_window_equals_torchs_sdpa_with_the_band(shape, window, is_causal):
    L, S = 6, 7
    q = random_tensor(*shape, L, 8)
    k, v = random_tensor(*shape, S, 8), random_tensor(*shape, S, 5)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=band(L, S, *window, is_causal))
    actual = sdpa(q, k, v, is_causal=is_causal, window_size=window)
    torch.testing.assert_close(actual, expected, **FLOAT64)


def test_window_combines_with_a_mask_and_grouped_heads():
    q, k, v = random_tensor(2, 4, 5, 8), random_tensor(2, 2, 9, 8), random_tensor(2, 2, 9, 8)
    mask = torch.rand(2, 1, 5, 9) < 0.8
    expected = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask & band(5, 9, 2, 3), enable_gqa=True
    )
    actual = sdpa(q, k, v, attn_mask=mask, enable_gqa=True, window_size=[2, 3])
    torch.testing.assert_close(actual, expected, **FLOAT64)


@pytest.mark.parametrize("per_batch", [False, True], ids=["slopes_H", "slopes_batch_H"])
@pytest.mark.parametrize("shape", [(2, 3), (2, 2, 3)], ids=str)
def test_alibi_equals_torchs_sdpa_with_the_bias(shape, per_batch):
    L, S = 5, 6
    q, k, v = random_tensor(*shape, L, 8), random_tensor(*shape, S, 8), random_tensor(*shape, S, 8)
    slopes = torch.rand(*(shape if per_batch else shape[-1:]), dtype=torch.float64)
    expected = F.scaled_dot_product_attention(
        q, k, v, attn_mask=alibi_bias(slopes, L, S), is_causal=False
    )
    actual = sdpa(q, k, v, alibi_slopes=slopes)
    torch.testing.assert_close(actual, expected, **FLOAT64)


@pytest.mark.parametrize("shape", [(2, 3), (3,), (2, 2, 3)], ids=str)
def test_sinks_scale_torchs_output_by_the_keys_share(shape):
    L, S, H = 5, 6, shape[-1]
    q, k, v = random_tensor(*shape, L, 8), random_tensor(*shape, S, 8), random_tensor(*shape, S, 8)
    sinks = random_tensor(H)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)  # (..., H, L, S)
    scores = scores.masked_fill(~band(L, S, -1, -1, is_causal=True), -math.inf)
    keys_share = torch.sigmoid(scores.logsumexp(-1, keepdim=True) - sinks[:, None, None])
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True) * keys_share
    actual = sdpa(q, k, v, is_causal=True, sinks=sinks)
    torch.testing.assert_close(actual, expected, **FLOAT64)


def test_softcap_caps_the_scores_before_the_mask():
    q, k, v = (random_tensor(2, 3, 5, 8, scale=3.0) for _ in range(3))
    mask = torch.rand(2, 3, 5, 5) < 0.7
    mask[..., 0] = True
    scores = q @ k.transpose(-2, -1) * 0.5
    capped = (2.0 * torch.tanh(scores / 2.0)).masked_fill(~mask, -math.inf)
    expected = torch.softmax(capped, -1) @ v
    actual = sdpa(q, k, v, attn_mask=mask, scale=0.5, softcap=2.0)
    torch.testing.assert_close(actual, expected, **FLOAT64)


def test_general_path_equals_the_operators_4d_call():
    """5-D inputs broadcast over a batch dim: the same as the 4-D call with the batch dims
    flattened, every variant given, (*batch, H) slopes flattened alike."""
    q = random_tensor(2, 3, 4, 6, 8)
    k, v = random_tensor(1, 3, 2, 7, 8), random_tensor(1, 3, 2, 7, 8)
    slopes = torch.rand(2, 3, 4, dtype=torch.float64)
    variants = dict(window_size=(3, 1), softcap=1.5, sinks=random_tensor(4))
    actual = sdpa(q, k, v, is_causal=True, enable_gqa=True, alibi_slopes=slopes, **variants)
    k6, v6 = (t.expand(2, 3, 2, 7, 8).reshape(6, 2, 7, 8) for t in (k, v))
    expected = sdpa(
        q.reshape(6, 4, 6, 8),
        k6,
        v6,
        is_causal=True,
        enable_gqa=True,
        alibi_slopes=slopes.reshape(6, 4),
        **variants,
    )
    torch.testing.assert_close(actual, expected.reshape(2, 3, 4, 6, 8), atol=0, rtol=0)


def test_jagged_inputs_apply_the_variants_within_each_sequence():
    lengths = [5, 2, 7]
    H, D = 2, 8
    parts = [[random_tensor(n, H, D) for n in lengths] for _ in range(3)]
    q, k, v = (
        torch.nested.nested_tensor(p, layout=torch.jagged).transpose(1, 2) for p in parts
    )  # (B, H, j, D)
    sinks, slopes = random_tensor(H), torch.rand(H, dtype=torch.float64)
    variants = dict(window_size=(2, 0), softcap=3.0, alibi_slopes=slopes, sinks=sinks)
    actual = sdpa(q, k, v, is_causal=True, **variants).transpose(1, 2).unbind()  # (n, H, D)
    for b, n in enumerate(lengths):
        dense = [p[b].transpose(0, 1)[None] for p in parts]  # (1, H, n, D)
        expected = sdpa(*dense, is_causal=True, **variants)[0].transpose(0, 1)  # (n, H, D)
        torch.testing.assert_close(actual[b], expected, **FLOAT64)


def test_gradients_of_inputs_and_sinks_by_finite_differences():
    q = random_tensor(2, 4, 8, 4, requires_grad=True)
    k = random_tensor(2, 4, 8, 4, requires_grad=True)
    v = random_tensor(2, 4, 8, 4, requires_grad=True)
    sinks = random_tensor(4, requires_grad=True)
    slopes = torch.rand(4, dtype=torch.float64)

    def function(q, k, v, sinks):
        return sdpa(
            q[None],  # 5-D: the general path
            k[None],
            v[None],
            is_causal=True,
            window_size=(3, 0),
            softcap=2.0,
            alibi_slopes=slopes,
            sinks=sinks,
        )

    assert torch.autograd.gradcheck(function, (q, k, v, sinks))


def test_lower_right_causal_bias_with_a_window_or_slopes_raises():
    q, k, v = random_tensor(1, 2, 3, 8), random_tensor(1, 2, 5, 8), random_tensor(1, 2, 5, 8)
    with pytest.raises(ValueError, match="window_size and alibi_slopes .* causal_lower_right"):
        sdpa(q, k, v, attn_mask=causal_lower_right(3, 5), window_size=(2, 0))
    with pytest.raises(ValueError, match="causal_lower_right"):
        sdpa(q, k, v, attn_mask=causal_lower_right(3, 5), alibi_slopes=torch.ones(2))
    # softcap and sinks do not depend on the alignment: allowed.
    out = sdpa(q, k, v, attn_mask=causal_lower_right(3, 5), softcap=5.0, sinks=torch.zeros(2))
    assert out.shape == (1, 2, 3, 8)


def test_slopes_of_other_batch_dims_raise_naming_them():
    q = random_tensor(2, 3, 4, 6, 8)
    with pytest.raises(RuntimeError, match=r"alibi_slopes must be \(H,\) or the batch dims"):
        sdpa(q, q, q, alibi_slopes=torch.ones(3, 2, 4, dtype=torch.float64))


@pytest.mark.parametrize(
    "variants, name",
    [
        (dict(window_size=(-2, 0)), "window_size"),
        (dict(softcap=-1.0), "softcap"),
        (dict(sinks=torch.zeros(5, dtype=torch.float64)), "sinks"),
        (dict(alibi_slopes=torch.zeros(3, 5, dtype=torch.float64)), "alibi_slopes"),
    ],
    ids=["window", "softcap", "sinks", "slopes"],
)
def test_bad_variants_raise_the_operators_errors_naming_them(variants, name):
    q = random_tensor(2, 4, 5, 8)
    with pytest.raises((RuntimeError, ValueError), match=name):
        sdpa(q, q, q, **variants)
