"""Scales near each dtype's range: torch's finite result, or an error naming `scale`, never a
silent NaN.

The kernels multiply the scores by the scale in the accumulation dtype (float32 for float32,
bfloat16 and float16; float64 for float64). A finite Python float above float32's range (1e39)
used to become inf there, and inf times a score of 0 is NaN; torch's SDPA gives NaN too, so such
a scale is refused, naming it. Any scale the accumulation dtype holds is accepted, and with
scores that stay finite the result is torch's: a softmax that is uniform (tiny scales) or a hard
maximum (huge ones).
"""

import pytest
import torch
import torch.nn.functional as F

import qkv_attention
from helpers import ALL_DTYPES, SAME_DTYPE_TOLERANCE

ops = torch.ops.qkv_attention
HALF_OR_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def inputs(dtype):
    # |q . k| <= 4 * 0.5 * 0.5 * ... small: the scores are at most ~|scale|, so a scale below
    # the accumulation dtype's max / 100 keeps every score finite.
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.rand(2, 2, n, 4, dtype=torch.float64, generator=generator) - 0.5 for n in (5, 7, 7)
    )
    return q.to(dtype), k.to(dtype), v.to(dtype)


def scales(dtype):
    finfo = torch.finfo(acc_dtype(dtype))
    return [finfo.tiny, 1e-20, 1e20, finfo.max / 100, -finfo.max / 100]


@pytest.mark.parametrize("dtype", HALF_OR_FLOAT, ids=str)
@pytest.mark.parametrize("scale", [1e39, -1e39, 1e300, 3.5e38])
def test_a_scale_the_accumulation_dtype_cannot_hold_is_refused_naming_it(dtype, scale):
    q, k, v = inputs(dtype)
    for call in (
        lambda: ops.attention(q, k, v, None, 0.0, False, scale),
        lambda: ops.attention_with_weights(q, k, v, None, 0.0, False, scale),
        lambda: ops._attention_forward(q, k, v, None, None, 0.0, False, scale, False),
        lambda: qkv_attention.functional.scaled_dot_product_attention(q, k, v, scale=scale),
    ):
        with pytest.raises(RuntimeError, match=r"scale = .* overflows Float, in which"):
            call()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_scales_near_the_range_give_torchs_finite_result(dtype):
    q, k, v = inputs(dtype)
    for scale in scales(dtype):
        ours = ops.attention(q, k, v, None, 0.0, False, scale)
        theirs = F.scaled_dot_product_attention(q, k, v, scale=scale)
        assert torch.isfinite(ours).all(), scale
        if not torch.isfinite(theirs).all():
            continue  # torch overflows where we do not: finite is all we promise there
        torch.testing.assert_close(
            ours, theirs, **SAME_DTYPE_TOLERANCE[dtype], msg=f"scale {scale}"
        )


def test_float64_accepts_scales_beyond_float32():
    q, k, v = inputs(torch.float64)
    for scale in (1e39, 1e300):
        ours = ops.attention(q, k, v, None, 0.0, False, scale)
        theirs = F.scaled_dot_product_attention(q, k, v, scale=scale)
        torch.testing.assert_close(ours, theirs, **SAME_DTYPE_TOLERANCE[torch.float64])


@pytest.mark.parametrize("dtype", HALF_OR_FLOAT, ids=str)
def test_the_largest_float32_scale_is_accepted(dtype):
    q, k, v = inputs(dtype)
    ours = ops.attention(q, k, v, None, 0.0, False, torch.finfo(torch.float32).max / 100)
    assert torch.isfinite(ours).all()
