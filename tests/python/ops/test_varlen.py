"""attention_varlen (packed sequences with offsets) against per-sequence dense attention: our
dense op and torch's SDPA, in float64 with gradients to 1e-10; causal, GQA, L != S per
sequence, lengths 0, 1, odd and one long among short ones; dropout reproducible and equal to
the dense op's mask of the sequence's stream; gradcheck, gradgradcheck, opcheck,
torch.compile; float32 / bfloat16 loose cases; offset errors; empty work."""

import pytest
import torch
import torch.nn.functional as F

import qkv_attention  # noqa: F401
from qkv_attention import ops as qops

ops = torch.ops.qkv_attention

# Float64 against float64 references that sum in other orders: ~1e-15 relative per result,
# far below 1e-10, which any formula error (a wrong key, a wrong scale) exceeds by orders.
F64 = dict(atol=1e-10, rtol=1e-10)


def offsets(lengths):
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0)


def packed(lengths_q, lengths_k, H=4, Hkv=4, D=8, Dv=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), H, D, generator=g, dtype=dtype)
    k = torch.randn(sum(lengths_k), Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(sum(lengths_k), Hkv, Dv, generator=g, dtype=dtype)
    return q, k, v, offsets(lengths_q), offsets(lengths_k)


def per_sequence(fn, q, k, v, cu_q, cu_k):
    """fn(q_b (1, H, L, D), k_b, v_b, b) -> (1, H, L, Dv) for each sequence, packed again."""
    outs = []
    for b in range(cu_q.numel() - 1):
        qb = q[cu_q[b] : cu_q[b + 1]].transpose(0, 1).unsqueeze(0)
        kb = k[cu_k[b] : cu_k[b + 1]].transpose(0, 1).unsqueeze(0)
        vb = v[cu_k[b] : cu_k[b + 1]].transpose(0, 1).unsqueeze(0)
        outs.append(fn(qb, kb, vb, b)[0].transpose(0, 1))
    return torch.cat(outs)


def run_varlen(q, k, v, cu_q, cu_k, **kw):
    lq, lk = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
    return qops.attention_varlen(q, k, v, cu_q, cu_k, max(lq, default=0), max(lk, default=0), **kw)


CASES = {
    # lengths 0, 1, odd, one long among short ones; L == S
    "mixed": ([0, 1, 7, 3, 130, 5, 0, 2], None),
    # L != S per sequence, including queries without keys and keys without queries
    "cross": ([3, 1, 9, 0, 4], [5, 0, 2, 6, 70]),
    "single": ([33], [17]),
}


def lengths_of(name):
    lq, lk = CASES[name]
    return lq, lk if lk is not None else lq


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_matches_dense_op_and_torch_sdpa_per_sequence_values_and_gradients(
    case, is_causal, kv_heads
):
    lq, lk = lengths_of(case)
    q, k, v, cu_q, cu_k = packed(lq, lk, H=4, Hkv=kv_heads, D=8, Dv=6)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = run_varlen(q, k, v, cu_q, cu_k, is_causal=is_causal, scale=0.3)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad)

    def ours(qb, kb, vb, b):
        return qops.attention(qb, kb, vb, is_causal=is_causal, scale=0.3)

    def torch_sdpa(qb, kb, vb, b):
        L, S = qb.size(2), kb.size(2)
        if L == 0:
            return (
                qb.new_zeros(1, qb.size(1), 0, vb.size(-1))
                + 0 * qb.sum()
                + 0 * kb.sum()
                + 0 * vb.sum()
            )
        if S == 0:  # a query without keys gives zeros (the dense op's fully masked row)
            return qb.new_zeros(1, qb.size(1), L, vb.size(-1)) + 0 * qb.sum() + 0 * vb.sum()
        mask = torch.ones(L, S, dtype=torch.bool).tril() if is_causal else None
        # A causal row past the keys' end still sees keys; a row before none: zeros (ours).
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=0.3, enable_gqa=True)
        return torch.nan_to_num(out)

    for reference in (ours, torch_sdpa):
        ref_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        expected = per_sequence(reference, *ref_inputs, cu_q, cu_k)
        torch.testing.assert_close(out, expected, **F64)
        expected_grads = torch.autograd.grad(expected, ref_inputs, grad, allow_unused=True)
        for got, want in zip(grads, expected_grads):
            want = torch.zeros_like(got) if want is None else want
            torch.testing.assert_close(got, want, **F64)


def test_sequences_do_not_see_each_other():
    """Changing one sequence's keys changes only that sequence's output rows."""
    q, k, v, cu_q, cu_k = packed([3, 4, 5], [3, 4, 5])
    base = run_varlen(q, k, v, cu_q, cu_k)
    k2, v2 = k.clone(), v.clone()
    k2[3:7] += 1.0
    v2[3:7] -= 2.0
    changed = run_varlen(q, k2, v2, cu_q, cu_k)
    assert torch.equal(base[:3], changed[:3]) and torch.equal(base[7:], changed[7:])
    assert not torch.allclose(base[3:7], changed[3:7])


def test_query_without_keys_gives_zeros_and_zero_gradients():
    q, k, v, cu_q, cu_k = packed([2, 3], [0, 4])
    q.requires_grad_()
    out = run_varlen(q, k, v, cu_q, cu_k)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    out.sum().backward()
    assert torch.equal(q.grad[:2], torch.zeros_like(q.grad[:2]))
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("is_causal", [False, True])
def test_gradcheck_and_gradgradcheck(is_causal):
    q, k, v, cu_q, cu_k = packed([2, 0, 3, 1], [3, 2, 3, 0], H=2, Hkv=1, D=3, Dv=2)
    args = [t.requires_grad_() for t in (q, k, v)]

    def fn(q, k, v):
        return ops.attention_varlen(q, k, v, cu_q, cu_k, 3, 3, 0.0, is_causal, None)

    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_dropout_gradcheck_and_gradgradcheck_with_a_fixed_rng_state():
    q, k, v, cu_q, cu_k = packed([2, 3, 1], [3, 2, 2], H=2, Hkv=2, D=3, Dv=2)
    args = [t.requires_grad_() for t in (q, k, v)]
    rng_state = torch.tensor([1234, 5678])

    def fn(q, k, v):
        return ops._attention_varlen_forward(
            q, k, v, cu_q, cu_k, 3, 3, 0.4, False, None, rng_state
        )[0]

    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("is_causal", [False, True])
def test_dropout_equals_the_dense_op_on_each_sequence_stream(is_causal):
    """Sequence b's mask is the dense op's for the stream (seed, offset + b): outputs and
    gradients equal per-sequence dense _attention_forward calls with that state."""
    q, k, v, cu_q, cu_k = packed([5, 0, 9, 2], [7, 3, 9, 4], H=4, Hkv=2, D=8, Dv=8)
    rng_state = torch.tensor([987654321, 2**62 + 11])
    args = [t.requires_grad_() for t in (q, k, v)]
    out = ops._attention_varlen_forward(q, k, v, cu_q, cu_k, 9, 9, 0.3, is_causal, None, rng_state)[
        0
    ]
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, args, grad)

    def dense(qb, kb, vb, b):
        state = torch.tensor([rng_state[0].item(), rng_state[1].item() + b])
        return ops._attention_forward(qb, kb, vb, None, None, 0.3, is_causal, None, False, state)[0]

    ref_args = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    expected = per_sequence(dense, *ref_args, cu_q, cu_k)
    torch.testing.assert_close(out, expected, **F64)
    for got, want in zip(grads, torch.autograd.grad(expected, ref_args, grad)):
        torch.testing.assert_close(got, want, **F64)


def test_dropout_is_reproducible_and_keeps_about_1_minus_p():
    q, k, v, cu_q, cu_k = packed([40, 60, 30], [50, 60, 20], H=4, D=8, Dv=8)
    v = torch.ones_like(v)  # each output element = sum of the row's kept weights
    torch.manual_seed(3)
    a = run_varlen(q, k, v, cu_q, cu_k, dropout_p=0.25)
    torch.manual_seed(3)
    b = run_varlen(q, k, v, cu_q, cu_k, dropout_p=0.25)
    assert torch.equal(a, b)
    c = run_varlen(q, k, v, cu_q, cu_k, dropout_p=0.25)
    assert not torch.equal(a, c)
    # E[sum of kept weights / (1 - p)] = 1 per row.
    assert abs(a[..., 0].mean().item() - 1.0) < 0.05
    ones = run_varlen(q, k, v, cu_q, cu_k, dropout_p=1.0)
    assert torch.equal(ones, torch.zeros_like(ones))


def test_opcheck():
    q, k, v, cu_q, cu_k = packed([2, 0, 5, 1], [3, 4, 2, 0], H=4, Hkv=2, D=8, Dv=4)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(ops.attention_varlen.default, (q, k, v, cu_q, cu_k, 5, 4))
    torch.library.opcheck(
        ops.attention_varlen.default, (q, k, v, cu_q.int(), cu_k.int(), 5, 4, 0.0, True, 0.5)
    )
    rng_state = torch.tensor([1, 2])
    torch.library.opcheck(
        ops._attention_varlen_forward.default,
        (q, k, v, cu_q, cu_k, 5, 4, 0.2, True, None, rng_state),
    )
    out, lse = ops._attention_varlen_forward(
        q.detach(), k.detach(), v.detach(), cu_q, cu_k, 5, 4, 0.2, True, None, rng_state
    )
    torch.library.opcheck(
        ops._attention_varlen_backward.default,
        (
            torch.randn_like(out),
            q.detach(),
            k.detach(),
            v.detach(),
            out,
            lse,
            cu_q,
            cu_k,
            5,
            4,
            0.2,
            True,
            None,
            rng_state,
        ),
    )
    plain = [t.detach() for t in (q, k, v)]
    torch.library.opcheck(ops.attention_varlen.default, (*plain, cu_q, cu_k, 5, 4))


def test_compile_fullgraph_with_backward():
    q, k, v, cu_q, cu_k = packed([3, 5, 2], [4, 5, 1], H=4, Hkv=2, D=8, Dv=8)

    def fn(q, k, v, cu_q, cu_k):
        return ops.attention_varlen(q, k, v, cu_q, cu_k, 5, 5, 0.0, True, None).sum(-1)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_args = [t.clone().requires_grad_() for t in (q, k, v)]
    out = compiled(*args, cu_q, cu_k)
    expected = fn(*ref_args, cu_q, cu_k)
    torch.testing.assert_close(out, expected, **F64)
    out.sum().backward()
    expected.sum().backward()
    for a, b in zip(args, ref_args):
        torch.testing.assert_close(a.grad, b.grad, **F64)


# bfloat16 against float64: 8-bit mantissa, the output (a weighted mean of O(1) values) rounded
# once plus the rounded P before P V: a few 2^-8 at most. float32: sums of <= 130 terms, 1e-5.
LOOSE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.mark.parametrize("dtype", list(LOOSE))
def test_lower_precision_against_float64(dtype):
    lq = [0, 1, 7, 3, 130, 5]
    q, k, v, cu_q, cu_k = packed(lq, lq, H=4, Hkv=2, D=16, Dv=16)
    expected = run_varlen(q, k, v, cu_q, cu_k, is_causal=True)
    args = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = run_varlen(*args, cu_q, cu_k, is_causal=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, **LOOSE[dtype])
    out.float().sum().backward()
    assert all(torch.isfinite(a.grad).all() for a in args)


def test_autocast_computes_in_bfloat16():
    q, k, v, cu_q, cu_k = packed([3, 4], [3, 4], dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_varlen(q, k, v, cu_q, cu_k)
    assert out.dtype == torch.bfloat16


def test_vmap_over_samples_equals_per_sample_calls():
    q, k, v, cu_q, cu_k = packed([2, 3], [4, 1])
    qs, ks, vs = (torch.stack([t, t * 0.5]) for t in (q, k, v))
    out = torch.func.vmap(lambda a, b, c: qops.attention_varlen(a, b, c, cu_q, cu_k, 3, 4))(
        qs, ks, vs
    )
    for n in range(2):
        torch.testing.assert_close(out[n], run_varlen(qs[n], ks[n], vs[n], cu_q, cu_k), **F64)


# ---- errors and empty work ----


def bad_call(**changes):
    q, k, v, cu_q, cu_k = packed([2, 3], [4, 1])
    args = dict(
        query=q,
        key=k,
        value=v,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=3,
        max_seqlen_k=4,
    )
    args.update(changes)
    return lambda: qops.attention_varlen(**args)


BAD = [
    (
        "start",
        dict(cu_seqlens_q=torch.tensor([1, 2, 5])),
        RuntimeError,
        r"cu_seqlens_q must start at 0, but cu_seqlens_q\[0\] = 1",
    ),
    (
        "decreasing",
        dict(cu_seqlens_k=torch.tensor([0, 4, 3, 5]), cu_seqlens_q=torch.tensor([0, 2, 5, 5])),
        RuntimeError,
        r"cu_seqlens_k must be non-decreasing, but cu_seqlens_k\[2\] = 3 < cu_seqlens_k\[1\] = 4",
    ),
    (
        "end",
        dict(cu_seqlens_q=torch.tensor([0, 2, 4])),
        RuntimeError,
        r"cu_seqlens_q must end at the number of packed query rows \(5\), but "
        r"cu_seqlens_q\[2\] = 4",
    ),
    (
        "batch",
        dict(cu_seqlens_k=torch.tensor([0, 5])),
        RuntimeError,
        r"cu_seqlens_k has 2 entries \(1 sequences\) but cu_seqlens_q has 3 \(2 sequences\)",
    ),
    (
        "dtype",
        dict(cu_seqlens_q=torch.tensor([0.0, 2.0, 5.0])),
        TypeError,
        r"cu_seqlens_q must be int32 or int64, but has dtype Float",
    ),
    (
        "rank",
        dict(cu_seqlens_k=torch.tensor([[0, 4, 5]])),
        RuntimeError,
        r"cu_seqlens_k must have shape \(B \+ 1,\)",
    ),
    (
        "max",
        dict(max_seqlen_q=2),
        RuntimeError,
        r"sequence 1 has 3 query rows .*more than max_seqlen_q = 2",
    ),
    (
        "heads",
        dict(
            key=torch.randn(5, 3, 8, dtype=torch.float64),
            value=torch.randn(5, 3, 8, dtype=torch.float64),
        ),
        RuntimeError,
        r"key has 3 heads and query has 4",
    ),
    (
        "features",
        dict(key=torch.randn(5, 4, 7, dtype=torch.float64)),
        RuntimeError,
        r"key has 7 features per head but query has 8",
    ),
    (
        "value_rows",
        dict(value=torch.randn(6, 4, 8, dtype=torch.float64)),
        RuntimeError,
        r"value has 6 rows \(total_k\) but key has 5",
    ),
    (
        "query_rank",
        dict(query=torch.randn(1, 5, 4, 8, dtype=torch.float64)),
        RuntimeError,
        r"query must be 3-D \(total_q, H, D\), but has shape \[1, 5, 4, 8\]",
    ),
    ("value_dtype", dict(value=torch.randn(5, 4, 8)), TypeError, r"value"),
    (
        "nested_offsets",
        dict(cu_seqlens_q=torch.nested.nested_tensor([torch.tensor([0, 2, 5])])),
        NotImplementedError,
        r"cu_seqlens_q",
    ),
]


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")
@pytest.mark.parametrize("name, changes, error, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_naming_the_argument(name, changes, error, message):
    with pytest.raises(error, match=r"attention_varlen: " + message):
        bad_call(**changes)()


def test_size_overflow_is_refused_before_allocation():
    # max_seqlen is only a bound: nothing is computed from it, so a huge one is no overflow
    # (tests/python/ops/test_kv_cache_aliasing.py has sequences with keys too).
    q = torch.empty(0, 4, 8).expand(0, 4, 8)
    huge = 2**40
    cu = torch.tensor([0, 0])
    assert ops.attention_varlen(q, q, q, cu, cu, huge, huge).shape == (0, 4, 8)
    big = torch.empty(1, 1, 1).expand(2**40, 2**10, 2**10)
    with pytest.raises(RuntimeError, match="attention_varlen: query has size 1099511627776"):
        ops.attention_varlen(big, big, big, cu, cu, 1, 1)


@pytest.mark.parametrize("shape", ["no_sequences", "all_empty", "no_heads", "Dv0"])
def test_empty_work_returns_at_once_with_zero_gradients(shape):
    if shape == "no_sequences":
        q, k, v, cu_q, cu_k = packed([], [])
    elif shape == "all_empty":
        q, k, v, cu_q, cu_k = packed([0, 0], [0, 3])
    elif shape == "no_heads":
        q, k, v, cu_q, cu_k = packed([2, 3], [1, 2], H=0, Hkv=0)
    else:
        q, k, v, cu_q, cu_k = packed([2, 3], [1, 2], Dv=0)
    args = [t.requires_grad_() for t in (q, k, v)]
    out = run_varlen(*args, cu_q, cu_k)
    assert out.shape == (q.size(0), q.size(1), v.size(2))
    out.sum().backward()
    for a in args:
        assert torch.equal(a.grad, torch.zeros_like(a))


def test_unsupported_layout_names_the_argument():
    q, k, v, cu_q, cu_k = packed([2, 3], [4, 1])
    with pytest.raises(NotImplementedError, match=r"attention_varlen: key must be a dense"):
        ops._attention_varlen_forward(q, k.to_sparse(), v, cu_q, cu_k, 3, 4, 0.0, False, None)


@pytest.mark.parametrize("threads", [1, 2])
def test_many_short_sequences_match_whatever_the_thread_count(threads):
    lengths = [
        int(x) for x in torch.randint(0, 20, (50,), generator=torch.Generator().manual_seed(1))
    ] + [300]
    q, k, v, cu_q, cu_k = packed(lengths, lengths, H=2, Hkv=2, D=8, Dv=8, dtype=torch.float32)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = run_varlen(q, k, v, cu_q, cu_k, is_causal=True)
    finally:
        torch.set_num_threads(previous)
    torch.set_num_threads(1)
    try:
        reference = per_sequence(
            lambda a, b, c, _: qops.attention(a, b, c, is_causal=True), q, k, v, cu_q, cu_k
        )
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(out, reference, atol=0, rtol=0)


def test_differentiating_the_backward_of_traced_offsets_raises_clearly():
    """The double backward loops over the sequences: with FakeTensors (torch.compile's
    tracing) there are no offset values to loop over, and it says so."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, cu_q, cu_k = packed([2, 3], [4, 1])
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t).requires_grad_() for t in (q, k, v))
        fcu_q, fcu_k = mode.from_tensor(cu_q), mode.from_tensor(cu_k)
        out, lse = ops._attention_varlen_forward(fq, fk, fv, fcu_q, fcu_k, 3, 4, 0.0, False, None)
        with pytest.raises(NotImplementedError, match="reads the offsets' values"):
            ops._attention_varlen_backward(
                torch.ones_like(out),
                fq,
                fk,
                fv,
                out.detach(),
                lse,
                fcu_q,
                fcu_k,
                3,
                4,
                0.0,
                False,
                None,
                None,
            )


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_with_dropout_gives_the_plain_gradients(use_reentrant):
    """Checkpointing replays the dropout draw (torch restores the RNG state), so the
    recomputed forward uses the same masks and the gradients equal the plain run's."""
    q, k, v, cu_q, cu_k = packed([5, 0, 9, 2], [7, 3, 9, 4], H=4, Hkv=2, D=8, Dv=8)

    def fn(q, k, v):
        return ops.attention_varlen(q, k, v, cu_q, cu_k, 9, 9, 0.3, True)

    def run(checkpointed):
        args = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(5)
        if checkpointed:
            out = torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=use_reentrant)
        else:
            out = fn(*args)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return [out.detach()] + [t.grad for t in args]

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, **F64)
