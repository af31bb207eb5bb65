"""attention_with_kv_cache against a plain reference: the in-place writes, the attention over
each sequence's valid prefix, the bottom-right causal alignment, and every error.

The reference concatenates nothing and shifts nothing: for each sequence b it takes the cache
as it must be after the call (the old valid prefix, then the new keys/values), cut to its
n_b = cache_seqlens[b] + L_new valid entries, and runs torch's scaled_dot_product_attention in
float64 with the bottom-right causal mask (query i sees keys j <= n_b - L + i) and the user's
mask cut to n_b columns. Caches start filled with NaN, so any read past a valid prefix shows.

These tests run at every CPU level (Makefile LEVEL_TESTS): the op reaches the level's blocked
forward and its split-KV decoding (L <= 16 against more than 512 keys).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import VS_FLOAT64_TOLERANCE

ops = torch.ops.qkv_attention
pytestmark = pytest.mark.usefixtures("seed_torch")

# float64: the kernels accumulate in float64 (VS_FLOAT64_TOLERANCE). float32: sums over up to
# ~1500 keys, each weight rounded once: 2e-5 (~170 eps) against the measured ~3e-6. bfloat16:
# the output is rounded once to bf16 after float32 accumulation (2^-9), and the probabilities
# are rounded to bf16 before P @ V on AVX-512 BF16 machines: 2^-6 (loose, as the task allows).
TOLERANCE = {
    torch.float64: VS_FLOAT64_TOLERANCE[torch.float64],
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=2.0**-6, rtol=2.0**-6),
}


def nan_caches(B, Hkv, S_max, D, Dv, dtype, fill=float("nan")):
    """Caches as torch.empty might leave them: every entry `fill` (NaN by default)."""
    return (
        torch.full((B, Hkv, S_max, D), fill, dtype=dtype),
        torch.full((B, Hkv, S_max, Dv), fill, dtype=dtype),
    )


def fill_history(k_cache, v_cache, lengths):
    """Random valid prefixes of the given lengths (the rest stays as it was)."""
    for b, n in enumerate(lengths.tolist()):
        k_cache[b, :, :n] = torch.randn(k_cache[b, :, :n].shape).to(k_cache.dtype)
        v_cache[b, :, :n] = torch.randn(v_cache[b, :, :n].shape).to(v_cache.dtype)


def reference(query, k_cache, v_cache, lengths, attn_mask=None, is_causal=True, scale=None):
    """(B, H, L, Dv) in float64 from caches already holding the new entries; lengths are the
    valid entries per sequence after the write."""
    B, H, L, D = query.shape
    Hkv, S_max, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    if B == 0 or H == 0:
        return torch.zeros(B, H, L, Dv, dtype=torch.float64)
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    outputs = []
    for b in range(B):
        n = int(lengths[b])
        q = query[b : b + 1].double()
        k = k_cache[b : b + 1, :, :n].double().repeat_interleave(H // Hkv, dim=1)
        v = v_cache[b : b + 1, :, :n].double().repeat_interleave(H // Hkv, dim=1)
        i = torch.arange(L).unsqueeze(1)
        j = torch.arange(n).unsqueeze(0)
        visible = (j <= n - L + i) if is_causal else torch.ones(L, n, dtype=torch.bool)
        visible = visible.expand(1, H, L, n)
        bias = torch.zeros(1, H, L, n, dtype=torch.float64)
        if attn_mask is not None:
            mask = attn_mask.expand(B, H, L, S_max)[b : b + 1, :, :, :n]
            if mask.dtype == torch.bool:
                visible = visible & mask
            else:
                bias = mask.double().expand(1, H, L, n)
        sdpa_mask = bias.masked_fill(~visible, float("-inf"))
        if n == 0:
            out = torch.zeros(1, H, L, Dv, dtype=torch.float64)
        elif D == 0:  # every score is 0 (+ the mask): torch's SDPA takes no empty head dim
            out = torch.softmax(sdpa_mask, dim=-1).nan_to_num(0.0) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, scale=scale)
        # A row that sees no key gives zeros (the ops' contract).
        empty_rows = ~visible.any(-1, keepdim=True)
        outputs.append(out.masked_fill(empty_rows, 0.0))
    return torch.cat(outputs)


def assert_cache_after_write(before, after, new, lengths):
    """`after` equals `before` everywhere except rows lengths[b] .. lengths[b] + L_new of each
    sequence, which hold `new`; NaN compares equal to NaN (bitwise)."""
    expected = before.clone()
    L_new = new.shape[2]
    for b, n in enumerate(lengths.tolist()):
        expected[b, :, n : n + L_new] = new[b]
    assert torch.equal(after.contiguous().view(torch.int8), expected.contiguous().view(torch.int8))


def step_and_check(
    query, k_cache, v_cache, key, value, lengths, attn_mask=None, is_causal=True, scale=None
):
    """Runs the op, checks the caches and the output, and returns the new lengths."""
    k_before, v_before = k_cache.clone(), v_cache.clone()
    lengths_before = lengths.clone()
    with torch.no_grad():
        out = ops.attention_with_kv_cache(
            query, k_cache, v_cache, key, value, lengths, attn_mask, is_causal, scale
        )
    assert torch.equal(lengths, lengths_before), "cache_seqlens must not be modified"
    if key is not None:
        assert_cache_after_write(k_before, k_cache, key, lengths)
        assert_cache_after_write(v_before, v_cache, value, lengths)
    else:
        assert torch.equal(k_cache.view(torch.int8), k_before.view(torch.int8))
    L_new = 0 if key is None else key.shape[2]
    after = lengths.long() + L_new
    expected = reference(query, k_cache, v_cache, after, attn_mask, is_causal, scale)
    assert out.dtype == query.dtype and out.shape == expected.shape and out.is_contiguous()
    assert not out.isnan().any(), "NaN beyond a valid prefix reached the output"
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[query.dtype])
    return after.to(lengths.dtype)


def make_mask(kind, B, H, L, S_max):
    if kind is None:
        return None
    if kind == "bool":
        mask = torch.rand(B, 1, L, S_max) < 0.8
        mask[..., 0] = True  # every row keeps a key: not all rows empty
        return mask
    if kind == "float":
        return torch.randn(1, H, L, S_max) * 0.5
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("S_max", [24, 300, 1400])
def test_prefill_then_decode_with_different_lengths_per_sequence(dtype, heads, S_max):
    H, Hkv = heads
    B, D, Dv = 3, 16, 8
    k_cache, v_cache = nan_caches(B, Hkv, S_max, D, Dv, dtype)
    # Different histories per sequence (sequence 0 empty), then a prompt of P tokens, then
    # single-token steps; the longest reaches S_max exactly.
    P, steps = 5, 3
    lengths = torch.tensor([0, S_max // 3, S_max - P - steps], dtype=torch.int64)
    fill_history(k_cache, v_cache, lengths)
    query = torch.randn(B, H, P, D).to(dtype)
    key, value = torch.randn(B, Hkv, P, D).to(dtype), torch.randn(B, Hkv, P, Dv).to(dtype)
    lengths = step_and_check(query, k_cache, v_cache, key, value, lengths)
    for _ in range(steps):
        query = torch.randn(B, H, 1, D).to(dtype)
        key, value = torch.randn(B, Hkv, 1, D).to(dtype), torch.randn(B, Hkv, 1, Dv).to(dtype)
        lengths = step_and_check(query, k_cache, v_cache, key, value, lengths)
    assert lengths.tolist() == [P + steps, S_max // 3 + P + steps, S_max]


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("L", [1, 4, 16, 17, 40])
@pytest.mark.parametrize("S_max", [48, 700])
def test_queries_masks_and_causality(mask_kind, is_causal, L, S_max):
    # L <= 16 against S > 512 takes the split-KV path, the rest the blocked forward.
    B, H, Hkv, D = 2, 4, 2, 8
    dtype = torch.float64
    k_cache, v_cache = nan_caches(B, Hkv, S_max, D, D, dtype)
    L_new = min(L, 3)  # queries need not equal new keys (e.g. a verify step)
    lengths = torch.tensor([S_max - L_new - 7, 10], dtype=torch.int32)
    fill_history(k_cache, v_cache, lengths)
    query = torch.randn(B, H, L, D, dtype=dtype)
    key, value = (
        torch.randn(B, Hkv, L_new, D, dtype=dtype),
        torch.randn(B, Hkv, L_new, D, dtype=dtype),
    )
    mask = make_mask(mask_kind, B, H, L, S_max)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    step_and_check(query, k_cache, v_cache, key, value, lengths, mask, is_causal, scale=0.3)


def test_more_queries_than_visible_keys_gives_zero_rows():
    # Bottom-right: with n = 3 keys and L = 5 queries, rows 0 and 1 see no key.
    k_cache, v_cache = nan_caches(1, 1, 8, 4, 4, torch.float64)
    lengths = torch.tensor([1])
    fill_history(k_cache, v_cache, lengths)
    query = torch.randn(1, 1, 5, 4, dtype=torch.float64)
    key, value = (
        torch.randn(1, 1, 2, 4, dtype=torch.float64),
        torch.randn(1, 1, 2, 4, dtype=torch.float64),
    )
    with torch.no_grad():
        out = ops.attention_with_kv_cache(query, k_cache, v_cache, key, value, lengths)
    assert torch.equal(out[0, 0, :2], torch.zeros(2, 4, dtype=torch.float64))
    assert out[0, 0, 2:].abs().sum() > 0
    k_cache2, v_cache2 = nan_caches(1, 1, 8, 4, 4, torch.float64)
    k_cache2[:, :, :1], v_cache2[:, :, :1] = k_cache[:, :, :1], v_cache[:, :, :1]
    step_and_check(query, k_cache2, v_cache2, key, value, lengths)


def test_causal_prefill_of_an_empty_cache_equals_top_left_causal_attention():
    # With nothing cached and L = L_new, bottom-right and top-left alignment coincide.
    B, H, L, D = 2, 3, 20, 8
    k_cache, v_cache = nan_caches(B, H, 32, D, D, torch.float64)
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        out = ops.attention_with_kv_cache(
            q, k_cache, v_cache, k, v, torch.zeros(B, dtype=torch.int64)
        )
        expected = ops.attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected, **VS_FLOAT64_TOLERANCE[torch.float64])


@pytest.mark.parametrize("S_max", [40, 900])
def test_without_new_entries_reads_the_first_lengths_and_writes_nothing(S_max):
    B, H, D = 2, 2, 8
    k_cache, v_cache = nan_caches(B, H, S_max, D, D, torch.float32)
    lengths = torch.tensor([S_max - 1, 5])
    fill_history(k_cache, v_cache, lengths)
    query = torch.randn(B, H, 2, D)
    step_and_check(query, k_cache, v_cache, None, None, lengths)


@pytest.mark.parametrize("S_max", [40, 900])
def test_without_cache_seqlens_every_entry_is_valid(S_max):
    B, H, Hkv, L, D = 2, 4, 2, 3, 8
    k_cache = torch.randn(B, Hkv, S_max, D, dtype=torch.float64)
    v_cache = torch.randn(B, Hkv, S_max, D, dtype=torch.float64)
    query = torch.randn(B, H, L, D, dtype=torch.float64)
    for is_causal in (True, False):
        with torch.no_grad():
            out = ops.attention_with_kv_cache(query, k_cache, v_cache, is_causal=is_causal)
        full = torch.full((B,), S_max)
        expected = reference(query, k_cache, v_cache, full, is_causal=is_causal)
        torch.testing.assert_close(out.double(), expected, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), float("-inf"), 3e38, 0.0])
@pytest.mark.parametrize("L, S_max", [(1, 1200), (3, 64), (30, 100)])
def test_garbage_beyond_the_valid_length_never_reaches_the_output(fill, L, S_max):
    B, H, D = 3, 2, 16
    lengths = torch.tensor([S_max - L - 50, 7, 0])
    history = nan_caches(B, H, S_max, D, D, torch.float32, fill=0.0)
    fill_history(*history, lengths)
    query = torch.randn(B, H, L, D)
    key, value = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    outputs = []
    for garbage in (fill, 0.0):
        k_cache, v_cache = nan_caches(B, H, S_max, D, D, torch.float32, fill=garbage)
        for b, n in enumerate(lengths.tolist()):
            k_cache[b, :, :n], v_cache[b, :, :n] = history[0][b, :, :n], history[1][b, :, :n]
        with torch.no_grad():
            outputs.append(
                ops.attention_with_kv_cache(
                    query, k_cache, v_cache, key, value, lengths, torch.ones(L, S_max) * 0.1
                )
            )
    assert outputs[0].isfinite().all()
    # Bitwise the same: the garbage is never read, not even multiplied by zero.
    assert torch.equal(outputs[0], outputs[1])


def test_strided_caches_and_inputs():
    # A cache that is a slice of a larger buffer (e.g. one layer of a stacked cache), with
    # query and key transposed views.
    B, H, S_max, D = 2, 4, 600, 8
    buffer = torch.full((3, B, H, S_max, 2 * D), float("nan"), dtype=torch.float64)
    k_cache, v_cache = buffer[1, ..., :D], buffer[1, ..., D:]
    lengths = torch.tensor([550, 20])
    fill_history(k_cache, v_cache, lengths)
    query = torch.randn(B, 1, H, D, dtype=torch.float64).transpose(1, 2)
    key = torch.randn(B, 1, H, D, dtype=torch.float64).transpose(1, 2)
    value = torch.randn(B, H, 1, D, dtype=torch.float64)
    others = buffer[[0, 2]].clone()
    step_and_check(query, k_cache, v_cache, key, value, lengths)
    assert torch.equal(buffer[[0, 2]].view(torch.int64), others.view(torch.int64))


# ---- empty work ---------------------------------------------------------------------------


def test_no_queries_still_writes_the_new_entries():
    k_cache, v_cache = nan_caches(2, 2, 10, 4, 3, torch.float32)
    lengths = torch.tensor([0, 4])
    query = torch.empty(2, 2, 0, 4)
    key, value = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 3)
    k_before = k_cache.clone()
    with torch.no_grad():
        out = ops.attention_with_kv_cache(query, k_cache, v_cache, key, value, lengths)
    assert out.shape == (2, 2, 0, 3)
    assert_cache_after_write(k_before, k_cache, key, lengths)


@pytest.mark.parametrize(
    "shape",
    [
        dict(B=0, H=2, Hkv=1, L=1, L_new=1, S_max=8, D=4, Dv=4),
        dict(B=2, H=2, Hkv=1, L=2, L_new=0, S_max=8, D=4, Dv=4),
        dict(B=2, H=0, Hkv=0, L=2, L_new=1, S_max=8, D=4, Dv=4),
        dict(B=2, H=2, Hkv=2, L=2, L_new=1, S_max=8, D=4, Dv=0),
        dict(B=2, H=2, Hkv=2, L=2, L_new=0, S_max=0, D=4, Dv=4),
        dict(B=2, H=2, Hkv=2, L=2, L_new=1, S_max=8, D=0, Dv=4),
    ],
    ids=["B0", "L_new0", "H0", "Dv0", "S_max0", "D0"],
)
def test_empty_work(shape):
    B, H, Hkv, L, L_new = shape["B"], shape["H"], shape["Hkv"], shape["L"], shape["L_new"]
    S_max, D, Dv = shape["S_max"], shape["D"], shape["Dv"]
    k_cache, v_cache = nan_caches(B, Hkv, S_max, D, Dv, torch.float64)
    lengths = torch.zeros(B, dtype=torch.int64)
    query = torch.randn(B, H, L, D, dtype=torch.float64)
    key = torch.randn(B, Hkv, L_new, D, dtype=torch.float64)
    value = torch.randn(B, Hkv, L_new, Dv, dtype=torch.float64)
    after = step_and_check(query, k_cache, v_cache, key, value, lengths)
    assert after.tolist() == [L_new] * B


# ---- errors: each names the argument and the numbers, and leaves the caches unchanged -------


def _valid(B=3, H=4, Hkv=2, L=1, S_max=16, D=8, Dv=6, dtype=torch.float32):
    k_cache, v_cache = nan_caches(B, Hkv, S_max, D, Dv, dtype)
    lengths = torch.tensor([3, S_max - 2, 0])[:B]
    fill_history(k_cache, v_cache, lengths)
    return dict(
        query=torch.randn(B, H, L, D).to(dtype),
        k_cache=k_cache,
        v_cache=v_cache,
        key=torch.randn(B, Hkv, 2, D).to(dtype),
        value=torch.randn(B, Hkv, 2, Dv).to(dtype),
        cache_seqlens=lengths,
        attn_mask=None,
        is_causal=True,
        scale=None,
    )


def _change(**changes):
    def apply(args):
        for name, value in changes.items():
            args[name] = value(args) if callable(value) else value
        return args

    return apply


ERRORS = {
    "overflow_of_the_last_sequence": (
        _change(cache_seqlens=lambda a: torch.tensor([3, 15, 0])),
        r"sequence 1 would overflow its cache: cache_seqlens\[1\] = 15 valid entries plus the 2 "
        r"new positions of key exceed the caches' S_max = 16",
    ),
    "overflow_int32": (
        _change(cache_seqlens=lambda a: torch.tensor([3, 2, 2**31 - 1], dtype=torch.int32)),
        r"cache_seqlens\[2\] = 2147483647 .* S_max = 16",
    ),
    "overflow_int64_max": (
        _change(cache_seqlens=lambda a: torch.tensor([3, 2, 2**63 - 1])),
        r"cache_seqlens\[2\] = 9223372036854775807 .* S_max = 16",
    ),
    "negative_length": (
        _change(cache_seqlens=lambda a: torch.tensor([3, -1, 0])),
        r"cache_seqlens\[1\] = -1 is negative",
    ),
    "more_new_keys_than_S_max": (
        _change(key=lambda a: torch.randn(3, 2, 17, 8), value=lambda a: torch.randn(3, 2, 17, 6)),
        r"key has 17 new positions but the caches hold at most S_max = 16",
    ),
    "key_without_value": (_change(value=None), r"key is given and value is None"),
    "value_without_key": (_change(key=None), r"value is given and key is None"),
    "key_without_cache_seqlens": (_change(cache_seqlens=None), r"cache_seqlens is None"),
    "cache_seqlens_float": (
        _change(cache_seqlens=lambda a: a["cache_seqlens"].float()),
        r"cache_seqlens must be int32 or int64, but has dtype Float",
    ),
    "cache_seqlens_wrong_length": (
        _change(cache_seqlens=lambda a: torch.tensor([1, 2, 3, 4])),
        r"cache_seqlens must have shape \(B,\) = \(3\).*\[4\]",
    ),
    "cache_seqlens_2d": (
        _change(cache_seqlens=lambda a: a["cache_seqlens"].unsqueeze(0)),
        r"cache_seqlens must have shape \(B,\) = \(3\)",
    ),
    "key_dtype": (
        _change(key=lambda a: a["key"].double()),
        r"key has dtype Double but k_cache has dtype Float",
    ),
    "query_dtype": (
        _change(query=lambda a: a["query"].double()),
        r"k_cache has dtype Float but query has dtype Double",
    ),
    "int_cache": (
        _change(k_cache=lambda a: torch.zeros(3, 2, 16, 8, dtype=torch.int64)),
        r"k_cache must be float64, float32, bfloat16 or float16, but has dtype Long",
    ),
    "key_features": (
        _change(key=lambda a: torch.randn(3, 2, 2, 7)),
        r"key has 7 features per head but k_cache has 8",
    ),
    "value_positions": (
        _change(value=lambda a: torch.randn(3, 2, 3, 6)),
        r"value has 3 positions but key has 2",
    ),
    "key_heads": (
        _change(key=lambda a: torch.randn(3, 4, 2, 8)),
        r"key has 4 heads but k_cache has 2",
    ),
    "v_cache_length": (
        _change(v_cache=lambda a: torch.zeros(3, 2, 17, 6)),
        r"v_cache has 17 positions but k_cache has 16",
    ),
    "gqa_heads": (
        _change(query=lambda a: torch.randn(3, 3, 1, 8)),
        r"k_cache has 2 heads and query has 3",
    ),
    "mask_shape": (
        _change(attn_mask=lambda a: torch.ones(1, 1, 1, 15, dtype=torch.bool)),
        r"attn_mask of shape \[1, 1, 1, 15\] cannot be broadcast to the attention scores' "
        r"shape \(B, H, L, S_max\) = "
        r"\(3, 4, 1, 16\)",
    ),
    "mask_dtype": (
        _change(attn_mask=lambda a: torch.zeros(1, 16, dtype=torch.float64)),
        r"attn_mask must be bool or have the query's dtype",
    ),
    "scale_nan": (_change(scale=float("nan")), r"scale must be a finite number"),
    "query_rank": (_change(query=lambda a: a["query"][0]), r"query must be 4-D"),
    "expanded_cache": (
        _change(k_cache=lambda a: torch.zeros(1, 1, 1, 8).expand(3, 2, 16, 8)),
        r"k_cache is written in place, but several of its elements share memory",
    ),
    "caches_share_memory": (
        # Dense views of one buffer, overlapping (interleaved views that never share an
        # element, as in test_strided_caches_and_inputs, are fine).
        _change(v_cache=lambda a: a["k_cache"].view(-1)[: 3 * 2 * 16 * 6].view(3, 2, 16, 6)),
        r"k_cache and v_cache share memory",
    ),
    "sparse_query": (
        _change(query=lambda a: a["query"].to_sparse()),
        r"query must be a dense tensor",
    ),
    "sparse_cache": (
        _change(k_cache=lambda a: a["k_cache"].nan_to_num().to_sparse()),
        r"k_cache must be a dense tensor",
    ),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_name_the_argument_and_leave_the_caches_unchanged(name):
    change, message = ERRORS[name]
    args = change(_valid())
    caches = [args["k_cache"], args["v_cache"]]
    before = [c.clone() if c.layout == torch.strided else None for c in caches]
    with (
        torch.no_grad(),
        pytest.raises(
            (RuntimeError, TypeError, ValueError), match="attention_with_kv_cache: (.*)" + message
        ),
    ):
        ops.attention_with_kv_cache(**args)
    for cache, old in zip(caches, before):
        if old is not None:
            assert torch.equal(
                cache.view(torch.int8) if cache.dtype != torch.int64 else cache,
                old.view(torch.int8) if old.dtype != torch.int64 else old,
            )


def test_size_overflow_is_refused_before_anything_is_allocated():
    big = torch.zeros(1, 1, 1, 1).expand(2**16, 2**16, 2**16, 1)  # 2^48 elements
    cache = torch.zeros(1, 1, 1, 1).expand(2**16, 2**16, 1, 1)
    with torch.no_grad(), pytest.raises(RuntimeError, match="attention_with_kv_cache: query"):
        ops.attention_with_kv_cache(big, cache, cache)
    with torch.no_grad(), pytest.raises(RuntimeError, match="the output|the attention scores"):
        ops.attention_with_kv_cache(
            torch.zeros(1, 1, 1, 1).expand(2**20, 2**8, 2**12, 1),
            torch.zeros(1, 1, 1, 1).expand(2**20, 1, 2**12, 1),
            torch.zeros(1, 1, 1, 1).expand(2**20, 1, 2**12, 1),
        )


# ---- no autograd ------------------------------------------------------------------------------


@pytest.mark.parametrize("argument", ["query", "key", "value", "k_cache", "attn_mask"])
def test_inputs_requiring_grad_raise_with_grad_mode_on(argument):
    args = _valid()
    args["attn_mask"] = torch.zeros(1, 16)
    args[argument] = args[argument].detach().requires_grad_()
    before = args["k_cache"].clone()
    with pytest.raises(
        RuntimeError,
        match=rf"attention_with_kv_cache: {argument} requires grad, "
        r"but this op is for inference",
    ):
        ops.attention_with_kv_cache(**args)
    assert torch.equal(args["k_cache"].view(torch.int8), before.view(torch.int8))
    # Under no_grad or inference_mode the same call runs.
    with torch.no_grad():
        ops.attention_with_kv_cache(**args)


def test_grad_mode_without_inputs_requiring_grad_runs_and_bumps_the_cache_versions():
    args = _valid()
    k_version, v_version = args["k_cache"]._version, args["v_cache"]._version
    out = ops.attention_with_kv_cache(**args)
    assert not out.requires_grad
    assert args["k_cache"]._version > k_version and args["v_cache"]._version > v_version


def test_inference_mode_runs():
    with torch.inference_mode():
        args = _valid()
        out = ops.attention_with_kv_cache(**args)
    assert out.shape == (3, 4, 1, 6)


@pytest.mark.parametrize("L, S_max", [(1, 1500), (20, 300)], ids=["split_kv", "blocked"])
def test_bitwise_the_same_for_any_thread_count(L, S_max):
    B, H, Hkv, D = 3, 4, 2, 16
    k_cache, v_cache = nan_caches(B, Hkv, S_max, D, D, torch.float32)
    lengths = torch.tensor([S_max - L - 3, 100, 0])
    fill_history(k_cache, v_cache, lengths)
    query = torch.randn(B, H, L, D)
    key, value = torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            with torch.no_grad():
                outputs.append(
                    ops.attention_with_kv_cache(
                        query, k_cache, v_cache, key, value, lengths, None, True, None
                    )
                )
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[0], outputs[1])
