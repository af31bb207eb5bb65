"""Determinism and thread safety of every op, forward and backward.

- Repeated calls give bitwise-identical results (dropout too, after the same torch.manual_seed).
- attention / attention_with_weights (forward, backward, dropout; with a window, softcap, ALiBi
  and sinks too, grad of sinks included) give bitwise-identical results with
  torch.set_num_threads(1), (2) and (3): the kernels never split a sum across threads.
- qkv_projection and merge_heads (forward and backward) give bitwise-identical results with 1, 2
  and 3 threads too: their GEMMs are cut into tiles fixed by the shape, each tile one BLAS call
  that sums its whole reduction on one thread (a plain threaded MKL GEMM with few rows splits the
  reduction and differed by up to 4.3e-7 of the largest value in float32). The cases cover few
  rows, tall and skinny products, the packed self-attention path, (N, B, E) inputs, and a module-
  sized product cut into many tiles.
- Calls from many Python threads at once (the ops release the GIL) agree bitwise with the same
  calls made serially; with dropout, every call draws its own seed and offset from the default
  generator under its lock, and its output is the attention with the keep-mask of that draw.

Shapes are odd and large enough that at::parallel_for splits the work into many chunks.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import qkv_attention
from helpers import ALL_DTYPES, VS_FLOAT64_TOLERANCE, reference_attention

ops = torch.ops.qkv_attention
THREAD_COUNTS = (1, 2, 3)


def _randn(generator, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


# Each case: a function of (dtype, seed) returning the inputs, and a function of the inputs
# returning every output and gradient (forward, then backward of a fixed random projection).


def attention_inputs(
    dtype, seed, B=2, H=3, L=67, S=131, D=24, Dv=40, causal=True, dropout_p=0.0, variants=False
):
    g = torch.Generator().manual_seed(seed)
    extra = {}
    if variants:
        # A window, a softcap, (B, H) ALiBi slopes and sinks (differentiated).
        extra = dict(
            window_size=(20, 3),
            softcap=4.0,
            alibi_slopes=torch.rand(B, H, generator=g).to(dtype),
            sinks=_randn(g, H, dtype=dtype),
        )
    return dict(
        variants=extra,
        query=_randn(g, B, H, L, D, dtype=dtype),
        # A transposed key: the strided path.
        key=_randn(g, B, H, D, S, dtype=dtype).transpose(-1, -2),
        value=_randn(g, B, H, S, Dv, dtype=dtype),
        attn_mask=_randn(g, 1, H, L, S, dtype=dtype),  # broadcast over B, with gradient
        key_padding_mask=torch.rand(B, S, generator=g) < 0.9,
        is_causal=causal,
        dropout_p=dropout_p,
        grad_output=_randn(g, B, H, L, Dv, dtype=dtype),
        grad_weights=_randn(g, B, H, L, S, dtype=dtype),
    )


def run_attention(inputs, seed=1234):
    q, k, v, mask = (
        inputs[n].detach().requires_grad_() for n in ("query", "key", "value", "attn_mask")
    )
    variants = dict(inputs["variants"])
    sinks = variants.get("sinks")
    if sinks is not None:
        sinks = variants["sinks"] = sinks.detach().requires_grad_()
    torch.manual_seed(seed)  # the dropout draw
    out, weights = ops.attention_with_weights(
        q,
        k,
        v,
        mask,
        inputs["dropout_p"],
        inputs["is_causal"],
        None,
        inputs["key_padding_mask"],
        **variants,
    )
    ((out * inputs["grad_output"]).sum() + (weights * inputs["grad_weights"]).sum()).backward()
    return [out, weights, q.grad, k.grad, v.grad, mask.grad] + (
        [sinks.grad] if sinks is not None else []
    )


def projection_inputs(dtype, seed, B=3, L=67, S=129, Eq=80, Ek=72, Ev=56, E=96, H=4):
    g = torch.Generator().manual_seed(seed)
    return dict(
        query=_randn(g, B, L, Eq, dtype=dtype),
        key=_randn(g, B, S, Ek, dtype=dtype),
        value=_randn(g, B, S, Ev, dtype=dtype),
        weights=[_randn(g, E, n, dtype=dtype, scale=n**-0.5) for n in (Eq, Ek, Ev)],
        biases=[_randn(g, E, dtype=dtype) for _ in range(3)],
        num_heads=H,
        grads=[_randn(g, B, H, n, E // H, dtype=dtype) for n in (L, S, S)],
    )


def run_projection(inputs):
    leaves = [inputs[n].detach().requires_grad_() for n in ("query", "key", "value")]
    leaves += [w.detach().requires_grad_() for w in inputs["weights"] + inputs["biases"]]
    outs = ops.qkv_projection(*leaves, inputs["num_heads"])
    sum((o * g).sum() for o, g in zip(outs, inputs["grads"])).backward()
    return [*outs, *(t.grad for t in leaves)]


def merge_inputs(dtype, seed, B=3, H=4, L=67, D=24, Eout=72):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=_randn(g, B, H, L, D, dtype=dtype),
        weight=_randn(g, Eout, H * D, dtype=dtype, scale=(H * D) ** -0.5),
        bias=_randn(g, Eout, dtype=dtype),
        grad=_randn(g, B, L, Eout, dtype=dtype),
    )


def run_merge(inputs):
    x, w, b = (inputs[n].detach().requires_grad_() for n in ("x", "weight", "bias"))
    out = ops.merge_heads(x, w, b)
    (out * inputs["grad"]).sum().backward()
    return [out, x.grad, w.grad, b.grad]


def packed_projection_inputs(dtype, seed, B=3, L=67, E=96, H=4, position_major=False):
    """Self-attention as nn.MultiheadAttention calls it: one input, in_proj_weight.chunk(3)."""
    g = torch.Generator().manual_seed(seed)
    x = (
        _randn(g, L, B, E, dtype=dtype).transpose(0, 1)
        if position_major
        else _randn(g, B, L, E, dtype=dtype)
    )
    return dict(
        x=x,
        weight=_randn(g, 3 * E, E, dtype=dtype, scale=E**-0.5),
        bias=_randn(g, 3 * E, dtype=dtype),
        num_heads=H,
        grads=[_randn(g, B, H, L, E // H, dtype=dtype) for _ in range(3)],
    )


def run_packed_projection(inputs):
    x, w, b = (inputs[n].detach().requires_grad_() for n in ("x", "weight", "bias"))
    outs = ops.qkv_projection(x, x, x, *w.chunk(3), *b.chunk(3), inputs["num_heads"])
    sum((o * g).sum() for o, g in zip(outs, inputs["grads"])).backward()
    return [*outs, x.grad, w.grad, b.grad]


CASES = {
    "attention": (attention_inputs, run_attention),
    "attention_dropout": (
        lambda dtype, seed: attention_inputs(dtype, seed, dropout_p=0.3),
        run_attention,
    ),
    "attention_variants_dropout": (
        lambda dtype, seed: attention_inputs(dtype, seed, dropout_p=0.3, variants=True),
        run_attention,
    ),
    "attention_noncausal_long_rows": (
        lambda dtype, seed: attention_inputs(
            dtype, seed, B=1, H=1, L=9, S=1031, D=8, Dv=8, causal=False
        ),
        run_attention,
    ),
}
GEMM_CASES = {
    "qkv_projection": (projection_inputs, run_projection),
    # Tall and skinny: B*L = 4096 rows into E = 16 (a long reduction in the weight gradient).
    "qkv_projection_tall": (
        lambda dtype, seed: projection_inputs(
            dtype, seed, B=32, L=128, S=128, Eq=16, Ek=16, Ev=16, E=16, H=2
        ),
        run_projection,
    ),
    # Few rows (B*L = 7) and long rows: a threaded MKL GEMM splits these reductions.
    "qkv_projection_few_rows": (
        lambda dtype, seed: projection_inputs(
            dtype, seed, B=1, L=7, S=7, Eq=512, Ek=100, Ev=2048, E=16, H=2
        ),
        run_projection,
    ),
    "qkv_projection_packed": (packed_projection_inputs, run_packed_projection),
    "qkv_projection_packed_position_major": (
        lambda dtype, seed: packed_projection_inputs(
            dtype, seed, B=2, L=33, E=40, H=5, position_major=True
        ),
        run_packed_projection,
    ),
    # The module benchmark's size, B*L = 2048 rows of E = 512: many tiles per GEMM.
    "qkv_projection_packed_many_tiles": (
        lambda dtype, seed: packed_projection_inputs(dtype, seed, B=4, L=512, E=512, H=8),
        run_packed_projection,
    ),
    "merge_heads": (merge_inputs, run_merge),
    "merge_heads_tall": (
        lambda dtype, seed: merge_inputs(dtype, seed, B=32, H=2, L=128, D=8, Eout=16),
        run_merge,
    ),
    "merge_heads_few_rows": (
        lambda dtype, seed: merge_inputs(dtype, seed, B=1, H=8, L=7, D=64, Eout=256),
        run_merge,
    ),
    "merge_heads_many_tiles": (
        lambda dtype, seed: merge_inputs(dtype, seed, B=4, H=8, L=512, D=64, Eout=512),
        run_merge,
    ),
}
ALL_CASES = {**CASES, **GEMM_CASES}


def assert_bitwise_equal(results, expected, what):
    assert len(results) == len(expected)
    for i, (a, b) in enumerate(zip(results, expected)):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, i)
        # Compare the bits, so that NaN == NaN and -0.0 != 0.0 would both show.
        same = torch.equal(
            a.detach().contiguous().view(torch.uint8), b.detach().contiguous().view(torch.uint8)
        )
        if not same:
            diff = (a.double() - b.double()).abs()
            raise AssertionError(
                f"{what}: result {i} of shape {tuple(a.shape)} differs, max "
                f"|difference| {diff.max().item():.3e}, relative to max "
                f"{(diff.max() / b.double().abs().max()).item():.3e}"
            )


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", ALL_CASES)
def test_repeated_calls_are_bitwise_identical(case, dtype):
    make_inputs, run = ALL_CASES[case]
    inputs = make_inputs(dtype, seed=0)
    first = run(inputs)
    assert_bitwise_equal(run(inputs), first, f"{case} second call")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", ALL_CASES)
def test_thread_count_does_not_change_any_bit(case, dtype, restore_threads):
    make_inputs, run = ALL_CASES[case]
    inputs = make_inputs(dtype, seed=1)
    torch.set_num_threads(1)
    expected = run(inputs)
    for threads in THREAD_COUNTS[1:]:
        torch.set_num_threads(threads)
        assert_bitwise_equal(run(inputs), expected, f"{case} with {threads} threads vs 1")


def test_dropout_differs_between_seeds_so_the_seeded_comparisons_mean_something():
    inputs = attention_inputs(torch.float32, 0, dropout_p=0.3)
    first, second = run_attention(inputs, seed=1), run_attention(inputs, seed=2)
    assert not torch.equal(first[1], second[1])


# -- many Python threads at once --------------------------------------------------------------

PYTHON_THREADS = 8
CALLS_PER_THREAD = 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_concurrent_calls_from_python_threads_agree_with_serial_calls(dtype):
    """Every op (no dropout) from 8 Python threads at once, each on its own inputs: every
    result is bitwise the serial one."""
    names = [
        "attention",
        "attention_noncausal_long_rows",
        "qkv_projection",
        "qkv_projection_few_rows",
        "merge_heads",
        "merge_heads_few_rows",
    ]
    work = [(name, seed) for name in names for seed in range(3)]
    inputs = {(n, s): ALL_CASES[n][0](dtype, s) for n, s in work}
    serial = {(n, s): ALL_CASES[n][1](inputs[(n, s)]) for n, s in work}

    barrier = threading.Barrier(PYTHON_THREADS)

    def worker(index):
        barrier.wait()  # start together, so the calls overlap
        results = []
        for call in range(CALLS_PER_THREAD):
            name, seed = work[(index * 7 + call * 3) % len(work)]
            results.append(((name, seed), ALL_CASES[name][1](inputs[(name, seed)])))
        return results

    with ThreadPoolExecutor(PYTHON_THREADS) as pool:
        outcomes = list(pool.map(worker, range(PYTHON_THREADS)))
    checked = 0
    for results in outcomes:
        for key, result in results:
            assert_bitwise_equal(result, serial[key], f"{key} from a thread vs serial")
            checked += 1
    assert checked == PYTHON_THREADS * CALLS_PER_THREAD


def test_concurrent_dropout_calls_draw_distinct_streams_and_match_their_masks():
    """Dropout from 8 threads at once: each call draws its own (seed, offset) from the default
    generator (under its lock: no two calls share a draw), and its output and weights are the
    attention with the keep-mask that _attention_dropout_mask regenerates from that draw."""
    B, H, L, S, D, p = 2, 2, 33, 47, 16, 0.4
    g = torch.Generator().manual_seed(5)
    q, k, v = (_randn(g, B, H, n, D, dtype=torch.float32) for n in (L, S, S))

    def worker(_):
        out = []
        for _ in range(3):
            rng_state = qkv_attention.ops._draw_dropout_rng_state(p)
            output, _, weights = ops._attention_forward(
                q, k, v, None, None, p, False, None, True, rng_state
            )
            out.append((output, weights, rng_state))
        return out

    with ThreadPoolExecutor(PYTHON_THREADS) as pool:
        results = [r for rs in pool.map(worker, range(PYTHON_THREADS)) for r in rs]
    states = {tuple(state.tolist()) for _, _, state in results}
    assert len(states) == len(results), "two concurrent calls drew the same dropout stream"
    tolerance = VS_FLOAT64_TOLERANCE[torch.float32]
    for output, weights, rng_state in results:
        keep = ops._attention_dropout_mask(rng_state, B, H, L, S, p)
        ref_output, ref_weights = reference_attention(q, k, v, dropout_keep=keep, dropout_p=p)
        torch.testing.assert_close(output.double(), ref_output, **tolerance)
        torch.testing.assert_close(weights.double(), ref_weights, **tolerance)
