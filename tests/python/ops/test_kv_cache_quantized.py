"""attention_with_kv_cache over quantized caches (int8, float8_e4m3fn, float8_e5m2).

- The write: the new rows' codes and scales are those of the definition (s = max|x| / top in
  float32, codes round(x / s) to nearest even, saturated), at the new positions only.
- The attention: equal to float64 attention over the dequantized cache (stored.float() * scale)
  to the query dtype's rounding, through prefill-then-decode sequences of different lengths,
  grouped-query heads, both kernel paths (the general forward and split-KV decoding, L <= 16
  against more than 512 keys), a window with sinks and a mask; and within a documented bound
  of float64 attention over the unquantized rows (docs/kv-cache.md).
- Every error leaves the caches and the scales unchanged; KVCache owns the scales; a decode
  step compiles with fullgraph=True; opcheck passes.
"""

import math
import re

import pytest
import torch

import qkv_attention
from qkv_attention import KVCache

ops = torch.ops.qkv_attention
pytestmark = pytest.mark.usefixtures("seed_torch")

CACHE_DTYPES = (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)
TOP = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
# Against float64 attention over the dequantized cache: the op's own rounding in the query
# dtype (its operands are the dequantized values exactly).
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=2.0**-6, rtol=2.0**-6),
    torch.float16: dict(atol=2.0**-8, rtol=2.0**-8),
}
# Against float64 attention over the unquantized rows, unit-normal data, D = 64, float32 query,
# every row of prefill and decode (the first prefill rows see one key: their output is one
# quantized value row): the largest |error| over 8 runs of run_sequence was 0.025 (int8),
# 0.11 (e4m3fn) and 0.32 (e5m2); docs/kv-cache.md states these bounds.
QUANTIZATION_BOUND = {torch.int8: 0.05, torch.float8_e4m3fn: 0.2, torch.float8_e5m2: 0.5}


def quantize_reference(rows, cache_dtype):
    """rows (..., D) of a float dtype -> codes (..., D) of cache_dtype and float32 scales (...),
    from the definition (torch.round rounds half to even; the float8 casts round to nearest
    even)."""
    x = rows.float()
    top = TOP[cache_dtype]
    scale = x.abs().amax(-1) / top
    q = torch.where(scale.unsqueeze(-1) > 0, x / scale.unsqueeze(-1), torch.zeros_like(x))
    q = q.clamp(-top, top)
    codes = q.round().to(torch.int8) if cache_dtype == torch.int8 else q.to(cache_dtype)
    return codes, scale


def empty_quantized(B, Hkv, S_max, D, cache_dtype):
    """Caches and scales as torch.empty might leave them: NaN codes (int8: 127), NaN scales."""
    k = torch.full((B, Hkv, S_max, D), 0x7F, dtype=torch.uint8).view(cache_dtype)
    v = torch.full((B, Hkv, S_max, D), 0x7F, dtype=torch.uint8).view(cache_dtype)
    k_scale = torch.full((B, Hkv, S_max), float("nan"))
    v_scale = torch.full((B, Hkv, S_max), float("nan"))
    return k, v, k_scale, v_scale


def reference(query, keys, values, lengths, is_causal=True, window=(-1, -1), sinks=None):
    """float64 attention of query (B, H, L, D) over each sequence's first lengths[b] rows of
    keys/values (B, Hkv, S_max, D), bottom-right aligned; the window and sinks as the op's."""
    B, H, L, D = query.shape
    group = H // keys.shape[1]
    out = torch.zeros(B, H, L, values.shape[3], dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        k = keys[b, :, :n].double().repeat_interleave(group, 0)
        v = values[b, :, :n].double().repeat_interleave(group, 0)
        scores = query[b].double() @ k.transpose(-1, -2) / math.sqrt(D)  # (H, L, n)
        distance = torch.arange(L).view(L, 1) + (n - L) - torch.arange(n).view(1, n)
        allowed = torch.ones(L, n, dtype=torch.bool)
        if is_causal:
            allowed &= distance >= 0
        if window[0] >= 0:
            allowed &= distance <= window[0]
        if window[1] >= 0:
            allowed &= distance >= -window[1]
        scores = scores.masked_fill(~allowed, float("-inf"))
        if sinks is not None:
            column = sinks.double().view(H, 1, 1).expand(H, L, 1)
            probs = torch.softmax(torch.cat([scores, column], -1), -1)[..., :n]
        else:
            probs = torch.softmax(scores, -1).nan_to_num(0.0)
        out[b] = probs @ v
    return out


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_write_stores_the_codes_and_scales_of_the_definition(cache_dtype, dtype):
    B, H, Hkv, S_max, D = 2, 4, 2, 40, 24
    k, v, k_scale, v_scale = empty_quantized(B, Hkv, S_max, D, cache_dtype)
    lengths = torch.tensor([3, 11])
    key = (torch.randn(B, Hkv, 5, D) * torch.logspace(-2, 2, 5).view(1, 1, 5, 1)).to(dtype)
    value = torch.randn(B, Hkv, 5, D).to(dtype)
    value[0, 1, 2] = 0  # a zero row: zeros and scale 0
    before = [t.clone() for t in (k, v, k_scale, v_scale)]
    with torch.no_grad():
        ops.attention_with_kv_cache(
            torch.randn(B, H, 1, D).to(dtype),
            k,
            v,
            key,
            value,
            lengths,
            k_cache_scale=k_scale,
            v_cache_scale=v_scale,
        )
    for cache, scales, rows, old_cache, old_scales in (
        (k, k_scale, key, before[0], before[2]),
        (v, v_scale, value, before[1], before[3]),
    ):
        codes, expected_scales = quantize_reference(rows, cache_dtype)
        for b, n in enumerate(lengths.tolist()):
            written = slice(n, n + 5)
            assert torch.equal(cache[b, :, written].view(torch.uint8), codes[b].view(torch.uint8))
            assert torch.equal(scales[b, :, written], expected_scales[b])
            # Nothing else changed (NaN codes and scales compared bit for bit).
            untouched = torch.ones(S_max, dtype=torch.bool)
            untouched[written] = False
            assert torch.equal(
                cache[b][:, untouched].view(torch.uint8),
                old_cache[b][:, untouched].view(torch.uint8),
            )
            assert torch.equal(
                scales[b][:, untouched].view(torch.int32),
                old_scales[b][:, untouched].view(torch.int32),
            )
    assert v_scale[0, 1, 5] == 0 and (v[0, 1, 5].view(torch.uint8) == 0).all()


def run_sequence(
    cache_dtype, dtype, B, H, Hkv, D, prompts, steps, S_max, window=(-1, -1), sinks=None
):
    """Prefill prompts of different lengths (padding: each sequence advances by its own length),
    then decode `steps` tokens; checks every call against float64 attention over the
    dequantized cache, and returns the largest error against the unquantized rows."""
    cache = KVCache(B, Hkv, S_max, D, dtype=cache_dtype)
    keys = torch.randn(B, Hkv, S_max, D)  # the unquantized rows each position receives
    values = torch.randn(B, Hkv, S_max, D)
    worst = 0.0
    L0 = max(prompts)
    calls = [(0, L0)] + [(None, 1)] * steps
    for start, L in calls:
        n = cache.lengths.clone()
        q = torch.randn(B, H, L, D).to(dtype)
        k_new = torch.stack([keys[b, :, int(n[b]) : int(n[b]) + L] for b in range(B)]).to(dtype)
        v_new = torch.stack([values[b, :, int(n[b]) : int(n[b]) + L] for b in range(B)]).to(dtype)
        with torch.no_grad():
            out = ops.attention_with_kv_cache(
                q,
                cache.k,
                cache.v,
                k_new,
                v_new,
                cache.lengths,
                None,
                True,
                None,
                list(window),
                0.0,
                None,
                sinks,
                cache.k_scale,
                cache.v_scale,
            )
        assert out.dtype == dtype
        advance = torch.tensor(prompts) if start == 0 else torch.full((B,), L)
        after = n + L  # what the op attended over
        k_deq, v_deq = cache.dequantized()
        expected = reference(q, k_deq, v_deq, after, window=window, sinks=sinks)
        torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype])
        if dtype == torch.float32:
            unquantized = reference(q, keys, values, after, window=window, sinks=sinks)
            worst = max(worst, (out.double() - unquantized).abs().max().item())
        cache.lengths += advance
    return worst


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_then_decode_equals_attention_over_the_dequantized_cache(cache_dtype, dtype):
    # Prompts of 40 rows written, 530 and 700 kept: the prefill takes the general path (L = 40),
    # the decode steps split-KV decoding (L = 1 against > 512 keys); grouped heads.
    worst = run_sequence(
        cache_dtype, dtype, B=2, H=4, Hkv=2, D=64, prompts=[40, 23], steps=3, S_max=96
    )
    worst2 = run_sequence(
        cache_dtype, dtype, B=2, H=6, Hkv=2, D=64, prompts=[600, 520], steps=2, S_max=640
    )
    if dtype == torch.float32:
        assert max(worst, worst2) < QUANTIZATION_BOUND[cache_dtype]


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_window_and_sinks_over_a_quantized_cache(cache_dtype):
    sinks = torch.randn(4) + 2
    run_sequence(
        cache_dtype,
        torch.float32,
        B=2,
        H=4,
        Hkv=1,
        D=32,
        prompts=[560, 530],
        steps=2,
        S_max=600,
        window=(100, 0),
        sinks=sinks,
    )


def quantized_call_args(cache_dtype=torch.int8, B=2, H=4, Hkv=2, S_max=16, D=8, L=1):
    k, v, k_scale, v_scale = empty_quantized(B, Hkv, S_max, D, cache_dtype)
    k.view(torch.uint8).zero_()
    v.view(torch.uint8).zero_()
    k_scale.zero_()
    v_scale.zero_()
    return dict(
        query=torch.randn(B, H, L, D),
        k_cache=k,
        v_cache=v,
        key=torch.randn(B, Hkv, L, D),
        value=torch.randn(B, Hkv, L, D),
        cache_seqlens=torch.tensor([2, 5]),
        k_cache_scale=k_scale,
        v_cache_scale=v_scale,
    )


BAD_CALLS = [
    ("k_cache_scale", None, "k_cache_scale (float32 (B, Hkv, S_max)"),
    ("v_cache_scale", None, "v_cache_scale (float32 (B, Hkv, S_max)"),
    ("k_cache_scale", lambda a: a["k_cache_scale"].double(), "k_cache_scale must be float32"),
    ("v_cache_scale", lambda a: a["v_cache_scale"][:, :, :-1], "v_cache_scale must have shape"),
    (
        "k_cache",
        lambda a: a["k_cache"][..., :1].view(torch.uint8).expand(-1, -1, -1, 8),
        "share one dtype",
    ),
    (
        "v_cache",
        lambda a: a["v_cache"].view(torch.uint8).view(torch.float8_e4m3fn),
        "share one dtype",
    ),
    ("key", lambda a: a["key"].double(), "key has dtype"),
    ("cache_seqlens", lambda a: torch.tensor([2, 16]), "would overflow"),
    ("k_cache", lambda a: a["k_cache"].view(torch.uint8), "share one dtype"),
]


@pytest.mark.parametrize("name, change, message", BAD_CALLS, ids=[c[2] for c in BAD_CALLS])
def test_errors_leave_the_caches_and_scales_unchanged(name, change, message):
    args = quantized_call_args()
    args[name] = None if change is None else change(args)
    watched = [
        args[n]
        for n in ("k_cache", "v_cache", "k_cache_scale", "v_cache_scale")
        if args[n] is not None
    ]
    before = [t.clone() for t in watched]
    with torch.no_grad(), pytest.raises((RuntimeError, TypeError), match=re.escape(message)):
        ops.attention_with_kv_cache(**args)
    for t, old in zip(watched, before):
        assert torch.equal(t.view(torch.uint8), old.view(torch.uint8))


def test_float_caches_take_no_scales():
    cache_k, cache_v = torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4)
    with (
        torch.no_grad(),
        pytest.raises(RuntimeError, match="k_cache_scale is given but the caches"),
    ):
        ops.attention_with_kv_cache(
            torch.randn(1, 1, 1, 4), cache_k, cache_v, k_cache_scale=torch.zeros(1, 1, 8)
        )


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_kv_cache_owns_the_scales(cache_dtype):
    cache = KVCache(2, 2, 32, 16, dtype=cache_dtype)
    assert (
        cache.quantized
        and cache.k_scale.shape == (2, 2, 32)
        and cache.k_scale.dtype == torch.float32
    )
    with torch.no_grad():
        out = cache.attend(
            torch.randn(2, 4, 3, 16).half(),
            torch.randn(2, 2, 3, 16).half(),
            torch.randn(2, 2, 3, 16).half(),
        )
    assert out.dtype == torch.float16 and out.shape == (2, 4, 3, 16)
    assert cache.lengths.tolist() == [3, 3]
    k, v = cache.dequantized()
    assert k.dtype == torch.float32 and torch.isfinite(k[:, :, :3]).all()
    assert not KVCache(1, 1, 4, 4).quantized


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_a_decode_step_compiles_with_fullgraph(cache_dtype):
    B, H, Hkv, S_max, D = 2, 4, 2, 64, 16
    eager = KVCache(B, Hkv, S_max, D, dtype=cache_dtype)
    compiled_cache = KVCache(B, Hkv, S_max, D, dtype=cache_dtype)
    for c in (eager, compiled_cache):
        c.k.view(torch.uint8).zero_()
        c.v.view(torch.uint8).zero_()
        c.k_scale.zero_()
        c.v_scale.zero_()

    def step(q, k, v, k_cache, v_cache, lengths, k_scale, v_scale):
        return qkv_attention.ops.attention_with_kv_cache(
            q, k_cache, v_cache, k, v, lengths, k_cache_scale=k_scale, v_cache_scale=v_scale
        )

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    with torch.no_grad():
        for n in range(3):
            q, k, v = torch.randn(B, H, 1, D), torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D)
            lengths = torch.full((B,), n)
            want = step(q, k, v, eager.k, eager.v, lengths, eager.k_scale, eager.v_scale)
            got = compiled(
                q,
                k,
                v,
                compiled_cache.k,
                compiled_cache.v,
                lengths,
                compiled_cache.k_scale,
                compiled_cache.v_scale,
            )
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert torch.equal(eager.k.view(torch.uint8), compiled_cache.k.view(torch.uint8))
    assert torch.equal(eager.v_scale, compiled_cache.v_scale)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_opcheck(cache_dtype):
    args = quantized_call_args(cache_dtype)
    # opcheck's schema test perturbs the inputs with torch.mul, which has no float8 kernel: the
    # schema (one for every cache dtype) is checked with int8, the rest with every dtype.
    utils = ("test_schema",) if cache_dtype == torch.int8 else ()
    utils += ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    with torch.no_grad():
        torch.library.opcheck(ops.attention_with_kv_cache.default, (), args, test_utils=utils)


def test_autocast_casts_the_inputs_and_leaves_quantized_caches_alone():
    args = quantized_call_args(torch.int8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.attention_with_kv_cache(**args)
    assert out.dtype == torch.bfloat16
    assert args["k_cache"].dtype == torch.int8 and args["k_cache_scale"].dtype == torch.float32
    # The rows written are the bfloat16-cast key's.
    codes, scales = quantize_reference(args["key"].to(torch.bfloat16), torch.int8)
    assert torch.equal(args["k_cache"][0, :, 2], codes[0, :, 0])
    assert torch.equal(args["k_cache_scale"][1, :, 5], scales[1, :, 0])


def test_vmap_over_per_sample_quantized_caches():
    samples = [quantized_call_args(torch.int8) for _ in range(3)]
    stacked = {
        name: torch.stack([s[name] for s in samples]) if name != "cache_seqlens" else None
        for name in samples[0]
    }
    lengths = samples[0]["cache_seqlens"]
    expected = []
    with torch.no_grad():
        for s in samples:
            expected.append(ops.attention_with_kv_cache(**{**s, "cache_seqlens": lengths.clone()}))

        def call(q, kc, vc, k, v, ks, vs):
            return qkv_attention.ops.attention_with_kv_cache(
                q, kc, vc, k, v, lengths, k_cache_scale=ks, v_cache_scale=vs
            )

        names = ("query", "k_cache", "v_cache", "key", "value", "k_cache_scale", "v_cache_scale")
        # Fresh caches of zeros, the same new rows: each sample's call writes its own cache.
        inputs = [stacked[n].clone() for n in names]
        for i in (1, 2):
            inputs[i].view(torch.uint8).zero_()
        for i in (5, 6):
            inputs[i].zero_()
        got = torch.vmap(call)(*inputs)
        torch.testing.assert_close(got, torch.stack(expected), atol=0, rtol=0)
        assert torch.equal(inputs[1], torch.stack([s["k_cache"] for s in samples]))
        assert torch.equal(inputs[6], torch.stack([s["v_cache_scale"] for s in samples]))
        with pytest.raises(RuntimeError, match="k_cache_scale must be vmapped exactly"):
            torch.vmap(call, in_dims=(0, 0, 0, 0, 0, None, 0))(*inputs[:5], inputs[5][0], inputs[6])
