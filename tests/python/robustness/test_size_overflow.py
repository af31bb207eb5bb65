"""Sizes whose element or byte counts overflow: a clear error naming the argument, never a crash.

A stride-0 (expanded) tensor can have any sizes at all with one element of storage. Before this
was checked, a head dimension of 2^62 + 2^23 float32 features made a byte count wrap around
size_t: the scratch buffer came out small and the kernel wrote past it (SIGSEGV). Every op and
helper now checks the sizes of every tensor it reads, writes or allocates before computing any
count from them (at most 2^47 elements counted as if contiguous, no size above 2^36; see
csrc/ops/checks.h).

The cases run in a child process, one after another, so that a crash is reported as the case
that caused it (with its signal) instead of killing the test run.
"""

import json
import subprocess
import sys
import textwrap

import pytest

# One case: (name, code that calls the op, a fragment the message must contain). The code sees
# torch, ops = torch.ops.qkv_attention, qkv_attention, and `huge(*sizes)`: a float32 tensor of
# those sizes expanded from one element (every stride 0).
WRAPS = 2**62 + 2**23  # * 4 bytes wraps a 64-bit count to 2^25 bytes (one row: torch
# refuses to make a view of more than 2^63 elements itself)
BIG = 2**40  # above the 2^36 limit on one size, far below any wrap
CASES = [
    # attention and its helpers: each dimension of each operand
    (
        "attention: head dim D wraps (the SIGSEGV)",
        f"ops.attention(huge(1, 1, 1, {WRAPS}), huge(1, 1, 1, {WRAPS}), huge(1, 1, 1, 2))",
        "query has size 4611686018435776512",
    ),
    (
        "attention: value dim Dv",
        f"ops.attention(huge(1, 1, 1, 2), huge(1, 1, 1, 2), huge(1, 1, 1, {WRAPS}))",
        "value has size",
    ),
    (
        "attention: query length L",
        f"ops.attention(huge(1, 1, {BIG}, 2), huge(1, 1, 4, 2), huge(1, 1, 4, 2))",
        "query has size 1099511627776",
    ),
    (
        "attention: key length S",
        f"ops.attention(huge(1, 1, 4, 2), huge(1, 1, {BIG}, 2), huge(1, 1, {BIG}, 2))",
        "key has size",
    ),
    (
        "attention: batch B",
        f"ops.attention(huge({BIG}, 1, 4, 2), huge({BIG}, 1, 4, 2), huge({BIG}, 1, 4, 2))",
        "query has size",
    ),
    (
        "attention: heads H",
        f"ops.attention(huge(1, {BIG}, 4, 2), huge(1, {BIG}, 4, 2), huge(1, {BIG}, 4, 2))",
        "query has size",
    ),
    (
        "attention: elements of query, each size allowed",
        "ops.attention(huge(2**20, 2**20, 2**8, 2), huge(2**20, 2**20, 4, 2), "
        "huge(2**20, 2**20, 4, 2))",
        "query of shape",
    ),
    (
        "attention: the weights (B, H, L, S) of attention_with_weights",
        "ops.attention_with_weights(huge(1, 1, 2**25, 2), huge(1, 1, 2**25, 2), "
        "huge(1, 1, 2**25, 2))",
        "the attention weights (B, H, L, S)",
    ),
    (
        "attention: the scores count overflows int64 (no weights materialised)",
        "ops.attention(huge(2**10, 2**10, 2**25, 1), huge(2**10, 2**10, 2**25, 1), "
        "huge(2**10, 2**10, 2**25, 1))",
        "the attention scores (B, H, L, S)",
    ),
    (
        "attention: attn_mask",
        "ops.attention(huge(1, 1, 4, 2), huge(1, 1, 4, 2), "
        "huge(1, 1, 4, 2), huge(1, 1, 4, 4).expand(1, 1, 4, 4))",
        None,
    ),  # fine: small
    (
        "attention: key_padding_mask of a huge key length",
        f"ops.attention(huge(1, 1, 4, 2), huge(1, 1, {BIG}, 2), huge(1, 1, {BIG}, 2), None, 0.0, "
        f"False, None, huge(1, {BIG}))",
        "key has size",
    ),
    (
        "_attention_forward",
        f"ops._attention_forward(huge(1, 1, 1, {WRAPS}), "
        f"huge(1, 1, 1, {WRAPS}), huge(1, 1, 1, 2), None, None, 0.0, False, None, False)",
        "query has size",
    ),
    (
        "_attention_backward: grad_output / output of a huge Dv",
        f"ops._attention_backward(huge(1, 1, 1, {WRAPS}), None, huge(1, 1, 1, 2), "
        f"huge(1, 1, 1, 2), huge(1, 1, 1, {WRAPS}), huge(1, 1, 1, {WRAPS}), "
        "huge(1, 1, 1), None, None, 0.0, False, None, None, False, False)",
        "value has size",
    ),
    (
        "_attention_backward: grad_weights of a huge S",
        f"ops._attention_backward(huge(1, 1, 4, 2), huge(1, 1, 4, {BIG}), huge(1, 1, 4, 2), "
        f"huge(1, 1, {BIG}, 2), huge(1, 1, {BIG}, 2), huge(1, 1, 4, 2), huge(1, 1, 4), None, None, "
        "0.0, False, None, None, False, False)",
        "key has size",
    ),
    (
        "_attention_dropout_mask: (B, H, L, S) wraps",
        "ops._attention_dropout_mask(torch.tensor([1, 2]), 2**31, 2**31, 2**31, 2**31, 0.5)",
        "the mask (batch, heads, q_len, kv_len)",
    ),
    (
        "_attention_dropout_mask: more than 2^47 elements",
        "ops._attention_dropout_mask(torch.tensor([1, 2]), 2**12, 2**12, 2**12, 2**12, 0.5)",
        "the mask (batch, heads, q_len, kv_len)",
    ),
    (
        "_attention_dropout_mask: empty but its strides overflow",
        "ops._attention_dropout_mask(torch.tensor([1, 2]), 2**40, 2**40, 2**40, 0, 0.5)",
        "has no elements",
    ),
    # the KV-cache op: each operand, and what it would allocate
    (
        "attention_with_kv_cache: head dim D wraps",
        f"ops.attention_with_kv_cache(huge(1, 1, 1, {WRAPS}), huge(1, 1, 1, {WRAPS}), "
        "huge(1, 1, 1, 2))",
        "query has size 4611686018435776512",
    ),
    (
        "attention_with_kv_cache: cache length S_max",
        f"ops.attention_with_kv_cache(huge(1, 1, 1, 2), huge(1, 1, {BIG}, 2), "
        f"huge(1, 1, {BIG}, 2))",
        "k_cache has size",
    ),
    (
        "attention_with_kv_cache: new keys L_new",
        f"ops.attention_with_kv_cache(huge(1, 1, 1, 2), huge(1, 1, 4, 2), huge(1, 1, 4, 2), "
        f"huge(1, 1, {BIG}, 2), huge(1, 1, {BIG}, 2), torch.tensor([0]))",
        "key has",
    ),
    (
        "attention_with_kv_cache: the output (B, H, L, Dv)",
        "ops.attention_with_kv_cache(huge(2**20, 2**10, 2**10, 1), huge(2**20, 1, 1, 1), "
        "huge(2**20, 1, 1, 2**10))",
        "the output (B, H, L, Dv)",
    ),
    (
        "attention_with_kv_cache: the scores (B, H, L, S_max)",
        "ops.attention_with_kv_cache(huge(2**20, 2**8, 2**12, 1), huge(2**20, 1, 2**12, 1), "
        "huge(2**20, 1, 2**12, 1))",
        "the attention scores (B, H, L, S_max)",
    ),
    (
        "attention_with_kv_cache: int8 caches of length S_max, their scales first",
        f"ops.attention_with_kv_cache(huge(1, 1, 1, 2), "
        f"torch.zeros(1, 1, 1, 1, dtype=torch.int8).expand(1, 1, {BIG}, 2), "
        f"torch.zeros(1, 1, 1, 1, dtype=torch.int8).expand(1, 1, {BIG}, 2), "
        f"k_cache_scale=huge(1, 1, {BIG}), v_cache_scale=huge(1, 1, {BIG}))",
        "k_cache_scale has size",
    ),
    # the projections
    (
        "qkv_projection: in_features wraps",
        f"ops.qkv_projection(huge(1, 1, {WRAPS}), huge(1, 1, {WRAPS}), huge(1, 1, {WRAPS}), "
        f"huge(1, {WRAPS}), huge(1, {WRAPS}), huge(1, {WRAPS}), None, None, None, 1)",
        "query has size",
    ),
    (
        "qkv_projection: embedding size E",
        f"ops.qkv_projection(huge(1, 4, 3), huge(1, 4, 3), huge(1, 4, 3), huge({BIG}, 3), "
        f"huge({BIG}, 3), huge({BIG}, 3), None, None, None, 2)",
        "q_weight has size",
    ),
    (
        "qkv_projection: the projected q, all operands consistent",
        "ops.qkv_projection(huge(2**20, 2**10, 3), huge(2**20, 4, 3), huge(2**20, 4, 3), "
        "huge(2**20, 3), huge(2**20, 3), huge(2**20, 3), None, None, None, 2)",
        "the projected q (B, H, L, E/H)",
    ),
    (
        "qkv_projection_backward: grad of a huge projection",
        f"ops.qkv_projection_backward(huge(1, 1, 1, {WRAPS}), None, None, huge(1, 1, 1), "
        f"huge(1, 1, 1), huge(1, 1, 1), huge({WRAPS}, 1), huge({WRAPS}, 1), huge({WRAPS}, 1), 1)",
        "q_weight has size",
    ),
    (
        "merge_heads: features per head wraps",
        f"ops.merge_heads(huge(1, 1, 1, {WRAPS}), huge(1, {WRAPS}), None)",
        "x has size",
    ),
    (
        "merge_heads: output features Eout",
        f"ops.merge_heads(huge(1, 2, 4, 3), huge({BIG}, 6), None)",
        "out_weight has size",
    ),
    (
        "merge_heads: the output (B, L, Eout)",
        "ops.merge_heads(huge(2**20, 1, 2**20, 1), huge(2**10, 1), None)",
        "the output (B, L, Eout)",
    ),
    (
        "merge_heads_backward",
        f"ops.merge_heads_backward(huge(1, 4, {BIG}), huge(1, 2, 4, 3), huge({BIG}, 6))",
        "out_weight has size",
    ),
    # attention_varlen: the packed operands, the output, one sequence's score count
    (
        "attention_varlen: head dim D wraps",
        f"ops.attention_varlen(huge(1, 1, {WRAPS}), huge(1, 1, {WRAPS}), huge(1, 1, 2), "
        "torch.tensor([0, 1]), torch.tensor([0, 1]), 1, 1)",
        "query has size",
    ),
    (
        "attention_varlen: packed rows total_k",
        f"ops.attention_varlen(huge(2, 1, 2), huge({BIG}, 1, 2), huge({BIG}, 1, 2), "
        f"torch.tensor([0, 2]), torch.tensor([0, {BIG}]), 2, {BIG})",
        "key has size",
    ),
    (
        "attention_varlen: the output (total_q, H, Dv)",
        "ops.attention_varlen(huge(2**30, 2**10, 1), huge(2, 2**10, 1), huge(2, 2**10, 2**10), "
        "torch.tensor([0, 2**30]), torch.tensor([0, 2]), 2**30, 2)",
        "the output (total_q, H, Dv)",
    ),
    (
        # Counted from the real lengths (max_seqlen is only a bound): 2^30 * 2^17 * 2^17.
        "attention_varlen: one sequence's scores overflow int64",
        "ops.attention_varlen(huge(2**17, 2**30, 1), huge(2**17, 2**30, 1), "
        "huge(2**17, 2**30, 1), torch.tensor([0, 2**17]), torch.tensor([0, 2**17]), "
        "2**17, 2**17)",
        "a sequence's attention scores (H, L_b, S_b)",
    ),
    (
        "_attention_varlen_backward: grad_output of a huge Dv",
        f"ops._attention_varlen_backward(huge(1, 1, {WRAPS}), huge(1, 1, 2), huge(1, 1, 2), "
        f"huge(1, 1, {WRAPS}), huge(1, 1, {WRAPS}), huge(1, 1), torch.tensor([0, 1]), "
        "torch.tensor([0, 1]), 1, 1, 0.0, False, None, None)",
        "value has size",
    ),
    # the variant arguments' tensors
    (
        "attention: sinks of 2^40 heads",
        f"ops.attention(huge(1, 1, 4, 2), huge(1, 1, 4, 2), huge(1, 1, 4, 2), sinks=huge({BIG}))",
        "sinks",
    ),
    (
        "attention: alibi_slopes of 2^40 batch entries",
        f"ops.attention(huge(1, 1, 4, 2), huge(1, 1, 4, 2), huge(1, 1, 4, 2), "
        f"alibi_slopes=huge({BIG}, 1))",
        "alibi_slopes",
    ),
    (
        "attention_with_kv_cache: sinks of a huge length",
        f"ops.attention_with_kv_cache(huge(1, 1, 1, 2), huge(1, 1, 4, 2), huge(1, 1, 4, 2), "
        f"sinks=huge({WRAPS}))",
        "sinks",
    ),
    (
        "attention_varlen: alibi_slopes of a huge head count",
        "ops.attention_varlen(huge(2, 1, 2), huge(2, 1, 2), huge(2, 1, 2), torch.tensor([0, 2]), "
        f"torch.tensor([0, 2]), 2, 2, alibi_slopes=huge(1, {BIG}))",
        "alibi_slopes",
    ),
    # through the Python API
    (
        "functional.scaled_dot_product_attention",
        f"qkv_attention.functional.scaled_dot_product_attention(huge(1, 1, 1, {WRAPS}), "
        f"huge(1, 1, 1, {WRAPS}), huge(1, 1, 1, 2))",
        "query has size",
    ),
    (
        "MultiheadAttention: a huge expanded sequence",
        f"m = qkv_attention.MultiheadAttention(4, 2, batch_first=True); x = huge(1, {BIG}, 4); "
        "m(x, x, x, need_weights=False)",
        "query has size",
    ),
    (
        "attention backward through autograd with a huge D",
        f"q = huge(1, 1, 1, {WRAPS}).requires_grad_(); "
        f"ops.attention(q, huge(1, 1, 1, {WRAPS}), huge(1, 1, 1, 2)).sum().backward()",
        "query has size",
    ),
]
# The attn_mask case above is a control: a small expanded mask is fine.
CONTROL = "attention: attn_mask"

CHILD = textwrap.dedent("""
    import json, sys, traceback
    import torch
    import qkv_attention
    ops = torch.ops.qkv_attention

    def huge(*sizes):
        return torch.zeros((1,) * len(sizes)).expand(*sizes)

    for name, code in json.loads(sys.argv[1]):
        print(json.dumps({"start": name}), flush=True)
        try:
            exec(code)
            result = {"name": name, "raised": None}
        except Exception as error:
            result = {"name": name, "raised": type(error).__name__, "message": str(error)}
        print(json.dumps(result), flush=True)
""")


@pytest.fixture(scope="module")
def outcomes():
    cases = [(name, code) for name, code, _ in CASES]
    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = {}
    started = None
    for line in child.stdout.splitlines():
        record = json.loads(line)
        if "start" in record:
            started = record["start"]
        else:
            results[record["name"]] = record
    assert child.returncode == 0, (
        f"the child process died (return code {child.returncode}) in case {started!r}:\n"
        f"{child.stderr[-3000:]}"
    )
    return results


@pytest.mark.parametrize("name, code, expected", CASES, ids=[c[0] for c in CASES])
def test_huge_expanded_sizes_raise_a_clear_error(outcomes, name, code, expected):
    outcome = outcomes[name]
    if name == CONTROL:
        assert outcome["raised"] is None, outcome
        return
    assert outcome["raised"] == "RuntimeError", outcome
    assert expected in outcome["message"], outcome["message"]
    # the message names the op that refused
    assert any(op in outcome["message"] for op in ("attention", "qkv_projection", "merge_heads")), (
        outcome["message"]
    )


def test_large_expanded_operands_within_the_limits_still_compute():
    # 2^20 features of one expanded element: allowed, and right (every score is 2^20 * q * k).
    import torch
    import torch.nn.functional as F
    import qkv_attention  # noqa: F401

    q = torch.full((1,), 1e-3, dtype=torch.float64).view(1, 1, 1, 1).expand(1, 1, 3, 2**20)
    k = torch.arange(4, dtype=torch.float64).view(1, 1, 4, 1).expand(1, 1, 4, 2**20) * 1e-3
    v = torch.randn(1, 1, 4, 5, dtype=torch.float64)
    out = torch.ops.qkv_attention.attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("window", [(2**62, 2**62), (2**63 - 1, 2**63 - 1), (2**63 - 1, 0)])
def test_window_bounds_past_any_distance_are_open_sides(window):
    """i + o - left and i + o + right must not overflow for the largest bounds an int64 holds:
    such a window hides no key (with causal when right is 0), forward, backward and KV cache."""
    import torch
    import qkv_attention  # noqa: F401

    ops = torch.ops.qkv_attention
    open_window = tuple(-1 if w > 0 else 0 for w in window)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for n in (70, 300, 300))
    results = {}
    for w in (window, open_window):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ops.attention(*leaves, window_size=w, sinks=torch.zeros(2, dtype=torch.float64))
        grads = torch.autograd.grad(out.sum(), leaves)
        k_cache, v_cache = k.clone(), v.clone()
        cached = ops.attention_with_kv_cache(q[:, :, :3], k_cache, v_cache, window_size=w)
        results[w] = [out, *grads, cached]
    for a, b in zip(results[window], results[open_window]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
