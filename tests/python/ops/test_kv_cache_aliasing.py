"""attention_with_kv_cache when its inputs share memory with the caches it writes.

The contract: the inputs mean what they held before the call (the functional meaning
torch.compile computes), so a query, key or value that is a view of cache rows gives the result
of the same call on copies of them; caches that would write one element twice, or write into
each other, are refused before anything is written, dense or not; a call that raises leaves the
caches bit for bit as they were. Also: attention_varlen's max_seqlen is only a bound.
"""

import pytest
import torch

from qkv_attention import ops

B, H, HKV, S_MAX, D = 2, 4, 2, 12, 8
LENGTHS = (5, 3)


def _caches(heads=HKV, generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    k = torch.randn(B, heads, S_MAX, D, generator=g)
    v = torch.randn(B, heads, S_MAX, D, generator=g)
    return k, v


def _functional(query, k_cache, v_cache, key, value, cache_seqlens, **kwargs):
    """The call on copies of everything: what the inputs held before the call."""
    k, v = k_cache.clone(), v_cache.clone()
    out = ops.attention_with_kv_cache(
        query.clone(), k, v, key.clone(), value.clone(), cache_seqlens.clone(), **kwargs
    )
    return out, k, v


def _aliased_inputs(case):
    """(query, key, value, k_cache, v_cache, lengths) where the named input views the caches."""
    k_cache, v_cache = _caches()
    lengths = torch.tensor(LENGTHS)
    L_new = 2
    g = torch.Generator().manual_seed(1)
    query = torch.randn(B, H, L_new, D, generator=g)
    key = torch.randn(B, HKV, L_new, D, generator=g)
    value = torch.randn(B, HKV, L_new, D, generator=g)
    # Rows 3 .. 5 of every sequence: sequence 1 (length 3) writes exactly there, sequence 0
    # (length 5) reads them as valid entries.
    written = slice(3, 3 + L_new)
    if case == "value_is_k_cache_rows_being_written":
        value = k_cache[:, :, written]
    elif case == "key_is_v_cache_rows_being_written":
        key = v_cache[:, :, written]
    elif case == "key_overlaps_its_own_destination":
        key = k_cache[:, :, 2 : 2 + L_new]  # shifted by one from sequence 1's destination
    elif case == "value_overlaps_its_own_destination":
        value = v_cache[:, :, 4 : 4 + L_new]
    elif case == "query_is_cache_rows_being_written":
        # The first B * H * L_new * D elements of k_cache: they include sequence 0's rows 5 and
        # 6 of head 0, which the call writes.
        query = k_cache.view(-1)[: query.numel()].view(query.shape)
    elif case == "key_and_value_are_the_same_cache_rows":
        key = value = k_cache[:, :, 0:L_new]
    elif case != "fresh":
        raise AssertionError(case)
    return query, key, value, k_cache, v_cache, lengths


ALIASING = [
    "value_is_k_cache_rows_being_written",
    "key_is_v_cache_rows_being_written",
    "key_overlaps_its_own_destination",
    "value_overlaps_its_own_destination",
    "query_is_cache_rows_being_written",
    "key_and_value_are_the_same_cache_rows",
]


@pytest.mark.parametrize("case", ALIASING)
@pytest.mark.parametrize("is_causal", [True, False])
def test_inputs_viewing_the_caches_mean_their_values_before_the_call(case, is_causal):
    query, key, value, k_cache, v_cache, lengths = _aliased_inputs(case)
    expected, expected_k, expected_v = _functional(
        query, k_cache, v_cache, key, value, lengths, is_causal=is_causal
    )
    with torch.no_grad():
        out = ops.attention_with_kv_cache(
            query, k_cache, v_cache, key, value, lengths, is_causal=is_causal
        )
    assert torch.equal(out, expected)
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("case", ALIASING[:3])
def test_aliased_inputs_under_compile_match_eager(case):
    query, key, value, k_cache, v_cache, lengths = _aliased_inputs(case)
    expected, expected_k, expected_v = _functional(query, k_cache, v_cache, key, value, lengths)
    # The fresh inputs, and the aliasing view taken inside the compiled function from the cache.
    fresh_query, fresh_key, fresh_value = (t.clone() for t in _aliased_inputs("fresh")[:3])

    def step(query, key, value, k_cache, v_cache, lengths):
        if case == "value_is_k_cache_rows_being_written":
            value = k_cache[:, :, 3:5]
        elif case == "key_is_v_cache_rows_being_written":
            key = v_cache[:, :, 3:5]
        else:
            key = k_cache[:, :, 2:4]
        return ops.attention_with_kv_cache(query, k_cache, v_cache, key, value, lengths)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(fresh_query, fresh_key, fresh_value, k_cache, v_cache, lengths)
    assert torch.equal(out, expected)
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)


def _check_refused(k_cache, v_cache, message, buffers):
    before = [b.clone() for b in buffers]
    query = torch.randn(B, H, 1, D)
    key = torch.randn(B, HKV, 1, D)
    value = torch.randn(B, HKV, 1, v_cache.size(-1))
    with torch.no_grad(), pytest.raises(RuntimeError, match="attention_with_kv_cache: " + message):
        ops.attention_with_kv_cache(query, k_cache, v_cache, key, value, torch.tensor(LENGTHS))
    for b, saved in zip(buffers, before):
        assert torch.equal(b, saved), "a refused call wrote into a cache"


def test_overlapping_slices_of_one_buffer_are_refused():
    # A packed (..., 2D) K|V buffer sliced so that the halves overlap by one feature: neither
    # view is dense, ATen's own check cannot decide, and the value write would land on keys.
    buffer = torch.randn(B, HKV, S_MAX, 2 * D)
    _check_refused(
        buffer[..., :D], buffer[..., D - 1 : 2 * D - 1], "k_cache and v_cache share", [buffer]
    )


def test_the_same_non_dense_slice_as_both_caches_is_refused():
    buffer = torch.randn(B, HKV, S_MAX, 2 * D)
    half = buffer[..., :D]
    _check_refused(half, half, "k_cache and v_cache share", [buffer])


def test_a_cache_whose_rows_overlap_is_refused():
    # Rows D/2 elements apart: every element but the first half-row is shared by two rows.
    storage = torch.randn(B * HKV * S_MAX * D)
    k_cache = storage.as_strided((B, HKV, S_MAX, D), (HKV * S_MAX * D, S_MAX * D, D // 2, 1))
    v_cache = torch.randn(B, HKV, S_MAX, D)
    _check_refused(k_cache, v_cache, "k_cache is written in place, but several", [storage, v_cache])


def test_interleaved_halves_of_one_buffer_are_written_and_read_exactly():
    buffer = torch.randn(B, HKV, S_MAX, 2 * D)
    k_cache, v_cache = buffer[..., :D], buffer[..., D:]
    separate_k, separate_v = k_cache.clone(), v_cache.clone()
    query = torch.randn(B, H, 1, D)
    key, value = torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D)
    lengths = torch.tensor(LENGTHS)
    with torch.no_grad():
        out = ops.attention_with_kv_cache(query, k_cache, v_cache, key, value, lengths)
        expected = ops.attention_with_kv_cache(query, separate_k, separate_v, key, value, lengths)
    assert torch.equal(out, expected)
    assert torch.equal(k_cache, separate_k) and torch.equal(v_cache, separate_v)


def test_varlen_max_seqlen_is_only_a_bound():
    # Tiny sequences with a bound whose product with H overflows nothing that is computed.
    q = torch.randn(5, 2, 4, dtype=torch.float64)
    k = torch.randn(7, 2, 4, dtype=torch.float64)
    v = torch.randn(7, 2, 4, dtype=torch.float64)
    cu_q, cu_k = torch.tensor([0, 2, 5]), torch.tensor([0, 3, 7])
    exact = ops.attention_varlen(q, k, v, cu_q, cu_k, 3, 4)
    bounded = ops.attention_varlen(q, k, v, cu_q, cu_k, 2**31, 2**31)
    assert torch.equal(exact, bounded)
