"""Few queries against many keys (decoding): the forward's split-KV path, which cuts the keys
into chunks processed in parallel and merges their partial outputs and logsumexps. Against
F.scaled_dot_product_attention across every split size, with masks, padding masks, causal
(L < S), grouped-query heads, in float64/float32/bfloat16; bitwise identical for any thread
count; and the gradients, which the backward computes from the merged logsumexp."""

import pytest
import torch
import torch.nn.functional as F

import qkv_attention  # noqa: F401

ops = torch.ops.qkv_attention

CHUNK = 256  # cpu/flash/decode.h: kDecodeChunk; the split path starts above 1 chunk
LENGTHS = [1, 7, 255, 256, 257, 511, 512, 513, 700, 1025, 3 * CHUNK + 17]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}


def make(B, H, Hkv, L, S, D, Dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, L, D, generator=g, dtype=dtype),
        torch.randn(B, Hkv, S, D, generator=g, dtype=dtype),
        torch.randn(B, Hkv, S, Dv, generator=g, dtype=dtype),
    )


def reference(q, k, v, mask=None, key_padding=None, causal_bottom=None):
    """float64 SDPA with key/value heads repeated and every mask as a bool/float (B, H, L, S)."""
    H, Hkv = q.size(1), k.size(1)
    k = k.double().repeat_interleave(H // Hkv, 1)
    v = v.double().repeat_interleave(H // Hkv, 1)
    L, S = q.size(2), k.size(2)
    full = torch.zeros(q.size(0), H, L, S, dtype=torch.float64)
    if mask is not None:
        full = full + (
            mask.double()
            if mask.dtype != torch.bool
            else torch.zeros_like(mask, dtype=torch.float64).masked_fill(~mask, float("-inf"))
        )
    if key_padding is not None:
        full = full.masked_fill(~key_padding[:, None, None, :], float("-inf"))
    if causal_bottom is not None:
        full = full.masked_fill(~causal_bottom, float("-inf"))
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=full)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S", LENGTHS)
@pytest.mark.parametrize("L", [1, 3, 16])
def test_decode_shapes_match_sdpa(dtype, S, L):
    q, k, v = make(2, 4, 2, L, S, 24, 20, dtype)
    out = ops.attention(q, k, v)
    torch.testing.assert_close(
        out.double(), reference(q, k, v), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype]
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["float", "bool", "padding", "causal"])
def test_decode_masks_match_sdpa(dtype, kind):
    B, H, Hkv, L, S = 2, 4, 1, 4, 1000
    q, k, v = make(B, H, Hkv, L, S, 16, 16, dtype)
    g = torch.Generator().manual_seed(5)
    mask = padding = None
    causal = False
    if kind == "float":
        mask = torch.randn(B, 1, L, S, generator=g, dtype=dtype)
    elif kind == "bool":
        mask = torch.rand(B, H, L, S, generator=g) > 0.5
        mask[..., 600] = True
    elif kind == "padding":
        padding = torch.rand(B, S, generator=g) > 0.3
        padding[:, 999] = True
    else:
        causal = True  # top-left: query i sees keys 0..i, all in the first chunk
    out = ops.attention(q, k, v, mask, 0.0, causal, None, padding)
    causal_mask = torch.ones(L, S, dtype=torch.bool).tril() if causal else None
    ref = reference(q, k, v, mask, padding, causal_mask)
    torch.testing.assert_close(out.double(), ref, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_decode_row_that_sees_no_key_gives_zeros_and_nan_gives_nan():
    q, k, v = make(1, 2, 2, 2, 900, 8, 8, torch.float32)
    padding = torch.zeros(1, 900, dtype=torch.bool)
    assert torch.equal(
        ops.attention(q, k, v, None, 0.0, False, None, padding), torch.zeros(1, 2, 2, 8)
    )
    k[0, 1, 700, 3] = float("nan")
    out = ops.attention(q, k, v)
    assert torch.isnan(out[0, 1]).all() and not torch.isnan(out[0, 0]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_split_path_is_bitwise_identical_for_one_and_two_threads(dtype, restore_threads):
    q, k, v = make(2, 8, 2, 2, 2000, 64, 64, dtype)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(ops.attention(q, k, v))
    assert torch.equal(*results)


def test_decode_gradients_match_sdpa_in_float64():
    q, k, v = make(1, 4, 2, 2, 600, 8, 8, torch.float64)
    for t in (q, k, v):
        t.requires_grad_(True)
    out = ops.attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    grad = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)
    ):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_decode_with_dropout_matches_its_returned_weights():
    q, k, v = make(1, 2, 2, 1, 700, 8, 8, torch.float64)
    torch.manual_seed(11)
    out = ops.attention(q, k, v, None, 0.3, False)
    torch.manual_seed(11)
    # The weights path computes whole rows (no split); both draw the same dropout stream.
    out_w, weights = ops.attention_with_weights(q, k, v, None, 0.3, False)
    torch.testing.assert_close(out, out_w, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, weights @ v, atol=1e-12, rtol=1e-12)
