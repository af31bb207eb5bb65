"""attention_with_kv_cache with the rest of PyTorch, and qkv_attention.KVCache:
opcheck, torch.compile(fullgraph=True) of a decode step that writes the caches, vmap, autocast,
the unsupported layouts, and a generation loop through the KVCache class.
"""

import pytest
import torch
import torch.nn.functional as F

import qkv_attention
from qkv_attention import KVCache

ops = torch.ops.qkv_attention
pytestmark = pytest.mark.usefixtures("seed_torch")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def decode_inputs(B=2, H=4, Hkv=2, L=1, S_max=40, D=8, dtype=torch.float32):
    k_cache = torch.zeros(B, Hkv, S_max, D, dtype=dtype)
    v_cache = torch.zeros(B, Hkv, S_max, D, dtype=dtype)
    lengths = torch.tensor([5, 17][:B] + [0] * max(0, B - 2), dtype=torch.int64)
    for b, n in enumerate(lengths.tolist()):
        k_cache[b, :, :n] = torch.randn(Hkv, n, D).to(dtype)
        v_cache[b, :, :n] = torch.randn(Hkv, n, D).to(dtype)
    query = torch.randn(B, H, L, D).to(dtype)
    key, value = torch.randn(B, Hkv, L, D).to(dtype), torch.randn(B, Hkv, L, D).to(dtype)
    return query, k_cache, v_cache, key, value, lengths


def _naive(query, k_cache, v_cache, key, value, lengths):
    """Attention over each sequence's prefix after writing, in float64 (torch SDPA)."""
    outputs = []
    H, Hkv = query.shape[1], k_cache.shape[1]
    for b in range(query.shape[0]):
        n = int(lengths[b])
        k = torch.cat([k_cache[b, :, :n], key[b]], dim=1).double()
        v = torch.cat([v_cache[b, :, :n], value[b]], dim=1).double()
        k, v = (t.repeat_interleave(H // Hkv, dim=0) for t in (k, v))
        L, total = query.shape[2], k.shape[1]
        visible = torch.arange(total)[None, :] <= total - L + torch.arange(L)[:, None]
        outputs.append(F.scaled_dot_product_attention(query[b].double(), k, v, attn_mask=visible))
    return torch.stack(outputs)


@pytest.mark.parametrize("case", ["decode", "prefill_mask_int32", "read_only", "no_seqlens"])
def test_opcheck(case):
    query, k_cache, v_cache, key, value, lengths = decode_inputs()
    kwargs = {}
    if case == "prefill_mask_int32":
        query, key, value = (
            torch.randn(2, 4, 3, 8),
            torch.randn(2, 2, 3, 8),
            torch.randn(2, 2, 3, 8),
        )
        lengths = lengths.int()
        kwargs = dict(attn_mask=torch.randn(1, 4, 3, 40), scale=0.5)
    if case == "read_only":
        key = value = None
        kwargs = dict(is_causal=False)
    if case == "no_seqlens":
        key = value = lengths = None
    torch.library.opcheck(
        ops.attention_with_kv_cache.default, (query, k_cache, v_cache, key, value, lengths), kwargs
    )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_decode_step_writes_the_caches_and_matches_eager(backend):
    def step(query, key, value, k_cache, v_cache, lengths):
        out = ops.attention_with_kv_cache(query, k_cache, v_cache, key, value, lengths)
        lengths += key.shape[2]
        return out

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    inputs = decode_inputs()
    eager_state = [t.clone() for t in inputs[1:3]] + [inputs[5].clone()]
    compiled_state = [t.clone() for t in inputs[1:3]] + [inputs[5].clone()]
    with torch.no_grad():
        for _ in range(3):  # the lengths advance: the same graph serves every step
            query, key, value = (torch.randn_like(t) for t in (inputs[0], inputs[3], inputs[4]))
            expected = _naive(query, eager_state[0], eager_state[1], key, value, eager_state[2])
            eager = step(query, key, value, *eager_state)
            out = compiled(query, key, value, *compiled_state)
            torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
            for a, b in zip(compiled_state, eager_state):
                assert torch.equal(a, b)  # the compiled step wrote the same cache entries
    assert compiled_state[2].tolist() == [8, 20]


def test_compiled_kv_cache_class_attend():
    cache = KVCache(2, 2, 32, 8)
    cache.k.zero_()
    cache.v.zero_()
    reference = KVCache(2, 2, 32, 8)
    reference.k.zero_()
    reference.v.zero_()

    def attend(cache, q, k, v):
        return cache.attend(q, k, v)

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for L in (4, 1, 1):
            q, k, v = torch.randn(2, 4, L, 8), torch.randn(2, 2, L, 8), torch.randn(2, 2, L, 8)
            torch.testing.assert_close(compiled(cache, q, k, v), reference.attend(q, k, v))
    assert torch.equal(cache.k, reference.k) and cache.lengths.tolist() == [6, 6]


def test_vmap_over_per_sample_caches_writes_each_sample_in_place():
    N = 3
    samples = [decode_inputs() for _ in range(N)]
    stacked = [torch.stack([s[i] for s in samples]) for i in range(6)]
    query, k_cache, v_cache, key, value, lengths = stacked
    expected = [
        ops.attention_with_kv_cache(s[0], s[1].clone(), s[2].clone(), s[3], s[4], s[5])
        for s in samples
    ]
    with torch.no_grad():
        out = torch.func.vmap(ops.attention_with_kv_cache)(
            query, k_cache, v_cache, key, value, lengths
        )
    torch.testing.assert_close(out, torch.stack(expected))
    for n, s in enumerate(samples):
        ops.attention_with_kv_cache(s[0], s[1], s[2], s[3], s[4], s[5])
        assert torch.equal(k_cache[n], s[1]) and torch.equal(v_cache[n], s[2])


def test_vmap_with_shared_caches_that_would_be_written_raises():
    query, k_cache, v_cache, key, value, lengths = decode_inputs()
    batched_query = torch.stack([query, query])
    batched_key = torch.stack([key, key])
    before = k_cache.clone()
    with (
        torch.no_grad(),
        pytest.raises(RuntimeError, match="k_cache and v_cache must both be vmapped"),
    ):
        torch.func.vmap(ops.attention_with_kv_cache, in_dims=(0, None, None, 0, 0, None))(
            batched_query, k_cache, v_cache, batched_key, batched_key, lengths
        )
    assert torch.equal(k_cache, before)
    # Reading shared caches is fine.
    with torch.no_grad():
        out = torch.func.vmap(
            ops.attention_with_kv_cache, in_dims=(0, None, None, None, None, None)
        )(batched_query, k_cache, v_cache, None, None, lengths)
    torch.testing.assert_close(
        out[1], ops.attention_with_kv_cache(query, k_cache, v_cache, None, None, lengths)
    )


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
def test_autocast_computes_in_the_cache_dtype_and_keeps_the_write(cache_dtype):
    query, k_cache, v_cache, key, value, lengths = decode_inputs(dtype=cache_dtype)
    query32, key32, value32 = query.float(), key.float(), value.float()
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    with torch.no_grad():
        expected = ops.attention_with_kv_cache(
            query32.to(cache_dtype),
            expected_k,
            expected_v,
            key32.to(cache_dtype),
            value32.to(cache_dtype),
            lengths,
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ops.attention_with_kv_cache(
                query32, k_cache, v_cache, key32, value32, lengths, torch.zeros(1, 40)
            )
    assert out.dtype == cache_dtype
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("layout", ["sparse", "nested", "mkldnn"])
@pytest.mark.parametrize("argument", ["query", "k_cache", "key"])
def test_unsupported_layouts_raise_naming_the_argument(layout, argument):
    args = list(decode_inputs())
    index = {"query": 0, "k_cache": 1, "key": 3}[argument]
    t = args[index]
    args[index] = {
        "sparse": lambda: t.to_sparse(),
        "nested": lambda: torch.nested.nested_tensor(list(t.unbind(0))),
        "mkldnn": lambda: t.to_mkldnn(),
    }[layout]()
    with (
        torch.no_grad(),
        pytest.raises(
            RuntimeError,
            match=rf"attention_with_kv_cache: "
            rf"{argument} must be a dense",
        ),
    ):
        ops.attention_with_kv_cache(*args)


# ---- the KVCache class ----------------------------------------------------------------------


def test_kv_cache_docstring_example_runs_as_written():
    batch, heads, kv_heads, head_dim = 2, 8, 2, 64
    cache = KVCache(batch, kv_heads, max_len=128, head_dim=head_dim)
    with torch.no_grad():
        q = torch.randn(batch, heads, 5, head_dim)
        k = torch.randn(batch, kv_heads, 5, head_dim)
        v = torch.randn(batch, kv_heads, 5, head_dim)
        out = cache.attend(q, k, v)
        assert out.shape == (2, 8, 5, 64)
        for step in range(3):
            q = torch.randn(batch, heads, 1, head_dim)
            k = torch.randn(batch, kv_heads, 1, head_dim)
            v = torch.randn(batch, kv_heads, 1, head_dim)
            out = cache.attend(q, k, v)
            assert out.shape == (2, 8, 1, 64)
    assert cache.lengths.tolist() == [8, 8]
    cache.reset(1)
    assert cache.lengths.tolist() == [8, 0]
    cache.reset()
    assert cache.lengths.tolist() == [0, 0]
    assert "lengths=[0, 0]" in repr(cache)


def test_kv_cache_generation_matches_attention_over_the_whole_history():
    # A two-sequence generation loop with different prompt lengths (sequence 1 starts later),
    # against attention over the keys seen so far.
    torch.manual_seed(1)
    B, H, Hkv, D, max_len = 2, 4, 2, 16, 24
    cache = KVCache(B, Hkv, max_len, D, dtype=torch.float64)
    keys = torch.randn(B, Hkv, max_len, D, dtype=torch.float64)
    values = torch.randn(B, Hkv, max_len, D, dtype=torch.float64)
    queries = torch.randn(B, H, max_len, D, dtype=torch.float64)
    with torch.no_grad():
        cache.attend(queries[:, :, :6], keys[:, :, :6], values[:, :, :6])
        cache.reset(1)
        cache.lengths[1] = 2  # sequence 1 kept only 2 tokens of its prompt
        for t in range(6, 10):
            q, k, v = (x[:, :, t : t + 1] for x in (queries, keys, values))
            # Sequence 1's entries land at 2, 3, ...: give it the keys that belong there.
            k = torch.stack([k[0], keys[1, :, t - 4 : t - 3]])
            v = torch.stack([v[0], values[1, :, t - 4 : t - 3]])
            out = cache.attend(q, k, v)
            n = cache.lengths.tolist()
            for b, k_hist, v_hist in (
                (0, keys[0, :, : n[0]], values[0, :, : n[0]]),
                (1, keys[1, :, : n[1]], values[1, :, : n[1]]),
            ):
                expected = ops.attention(
                    q[b : b + 1],
                    k_hist.unsqueeze(0).repeat_interleave(2, 1),
                    v_hist.unsqueeze(0).repeat_interleave(2, 1),
                )
                torch.testing.assert_close(out[b : b + 1], expected)
    assert cache.lengths.tolist() == [10, 6]


def test_kv_cache_advance_mask_and_overflow_leave_lengths_consistent():
    cache = KVCache(2, 1, 4, 2)
    with torch.no_grad():
        q, k = torch.randn(2, 1, 3, 2), torch.randn(2, 1, 3, 2)
        cache.attend(q, k, k, advance=torch.tensor([True, False]))
        assert cache.lengths.tolist() == [3, 0]
        with pytest.raises(RuntimeError, match=r"sequence 0 would overflow its cache"):
            cache.attend(q, k, k)
        assert cache.lengths.tolist() == [3, 0]


def test_kv_cache_rejects_bad_sizes():
    with pytest.raises(ValueError, match="max_len must be a non-negative int"):
        KVCache(1, 1, -1, 4)
    assert qkv_attention.KVCache is KVCache


def test_compiled_decode_step_with_grad_mode_on_and_no_input_requiring_grad():
    # A user who forgets no_grad: nothing requires grad, so the op runs (and compiles).
    compiled = torch.compile(
        lambda q, kc, vc, k, v, n: ops.attention_with_kv_cache(q, kc, vc, k, v, n),
        fullgraph=True,
        backend="aot_eager",
    )
    inputs = decode_inputs()
    eager_caches = [inputs[1].clone(), inputs[2].clone()]
    eager = ops.attention_with_kv_cache(inputs[0], *eager_caches, *inputs[3:])
    out = compiled(*inputs)
    assert not out.requires_grad
    torch.testing.assert_close(out, eager)
    assert torch.equal(inputs[1], eager_caches[0]) and torch.equal(inputs[2], eager_caches[1])
