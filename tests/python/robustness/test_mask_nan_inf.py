"""NaN and infinities placed in each mask, alone and together at the same key, in every dtype:
the result is torch's (NaN where torch gives NaN, the same values elsewhere).

torch adds the masks (attn_mask + key_padding_mask) and takes the softmax, so NaN in either
mask, or +inf, or -inf in one and +inf in the other, makes the score NaN, and the row NaN; -inf
alone removes the key. We keep the two masks apart (no (B, H, L, S) sum is built), so each
combination at one key is a case of its own. The one reported divergence: in float64 a -inf in
attn_mask hid a NaN in key_padding_mask at the same key (float32 and torch give NaN).

No row is fully masked here: there our op gives zeros and torch's SDPA does not (a documented
difference, tested elsewhere).
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import ALL_DTYPES, SAME_DTYPE_TOLERANCE

ops = torch.ops.qkv_attention
B, H, L, S, D = 2, 2, 3, 5, 4
VALUES = {"0": 0.0, "nan": math.nan, "inf": math.inf, "-inf": -math.inf}
ROW, KEY = 1, 2  # where the attn_mask entry goes; the padding entry is (batch 0, KEY)


def inputs(dtype):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(B, H, n, D, dtype=torch.float64, generator=generator).to(dtype)
        for n in (L, S, S)
    )
    attn_mask = (torch.randn(L, S, dtype=torch.float64, generator=generator) * 0.5).to(dtype)
    padding = (torch.randn(B, S, dtype=torch.float64, generator=generator) * 0.5).to(dtype)
    return q, k, v, attn_mask, padding


def torch_reference(q, k, v, attn_mask, padding):
    merged = attn_mask + padding[:, None, None, :]  # (B, 1, L, S)
    return F.scaled_dot_product_attention(q, k, v, merged)


CASES = [(a, p) for a, p in itertools.product(VALUES, repeat=2) if (a, p) != ("0", "0")]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize(
    "in_attn_mask, in_padding", CASES, ids=[f"attn={a},pad={p}" for a, p in CASES]
)
def test_nan_and_inf_in_the_masks_give_torchs_result(dtype, in_attn_mask, in_padding):
    q, k, v, attn_mask, padding = inputs(dtype)
    attn_mask[ROW, KEY] = VALUES[in_attn_mask]
    padding[0, KEY] = VALUES[in_padding]
    ours = ops.attention(q, k, v, attn_mask, 0.0, False, None, padding)
    theirs = torch_reference(q, k, v, attn_mask, padding)
    assert torch.equal(ours.isnan(), theirs.isnan()), (
        f"NaN rows differ: ours {ours.isnan().any(-1).tolist()}, "
        f"torch {theirs.isnan().any(-1).tolist()}"
    )
    torch.testing.assert_close(ours, theirs, equal_nan=True, **SAME_DTYPE_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("mask", ["attn_mask", "key_padding_mask"])
def test_the_weights_and_the_module_agree_with_the_output(dtype, value, mask):
    # attention_with_weights gives the plain op's output (to rounding: it multiplies from the
    # normalised weights in one pass), with NaN in the same places, and its weights are NaN
    # exactly in the output's NaN rows.
    q, k, v, attn_mask, padding = inputs(dtype)
    (attn_mask if mask == "attn_mask" else padding)[
        (ROW, KEY) if mask == "attn_mask" else (0, KEY)
    ] = VALUES[value]
    out = ops.attention(q, k, v, attn_mask, 0.0, False, None, padding)
    out_w, weights = ops.attention_with_weights(q, k, v, attn_mask, 0.0, False, None, padding)
    assert torch.equal(out.isnan(), out_w.isnan())
    torch.testing.assert_close(out, out_w, equal_nan=True, **SAME_DTYPE_TOLERANCE[dtype])
    assert torch.equal(weights.isnan().any(-1), out.isnan().any(-1))
