"""Calls with nothing to compute return at once, whatever the sizes that multiply to nothing;
calls with a sliding window do the work of the band of keys it leaves each row, not of all keys.

Before, attention with D = Dv = 0 computed all L*S scores for an empty output (L = S = 2^18:
16-23 s; torch 0.0 s), and _attention_dropout_mask with S = 0 walked every one of a huge number
of empty rows (killed after 40 s). The sizes below are chosen so that the L*S (or row) work
could never finish: a call that does it hangs, and the generous timeout of the child process
catches the hang. This is not a speed assertion: a call with nothing to do passes in well under
a second, a call that does the work fails by timing out.

The results are also checked: empty outputs, and the right values for the outputs that are not
empty (zero gradients, the logsumexp of no computation).
"""

import json
import subprocess
import sys
import textwrap

import pytest

TIMEOUT_S = 240  # for all cases together; each one returns in milliseconds when right

CASES = {
    "attention, D = Dv = 0, L = S = 2^18": """
        q = torch.zeros(1, 1, 2**18, 0); k = torch.zeros(1, 1, 2**18, 0)
        v = torch.zeros(1, 1, 2**18, 0)
        out = ops.attention(q, k, v)
        assert out.shape == (1, 1, 2**18, 0)
    """,
    "attention, D = Dv = 0, L = S = 2^18, causal, masks and dropout": """
        q = torch.zeros(2, 2, 2**18, 0); k = torch.zeros(2, 2, 2**18, 0)
        v = torch.zeros(2, 2, 2**18, 0)
        mask = torch.ones(1, 1, 1, 1, dtype=torch.bool).expand(2, 2, 2**18, 2**18)
        padding = torch.zeros(2, 2**18)
        out = ops.attention(q, k, v, mask, 0.5, True, None, padding)
        assert out.shape == (2, 2, 2**18, 0)
    """,
    "attention, D = 64, Dv = 0 (an empty output), L = S = 2^16": """
        q = torch.zeros(1, 1, 2**16, 64); k = torch.zeros(1, 1, 2**16, 64)
        v = torch.zeros(1, 1, 2**16, 0)
        assert ops.attention(q, k, v).shape == (1, 1, 2**16, 0)
    """,
    "attention backward, D = Dv = 0, L = S = 2^18": """
        q = torch.zeros(1, 1, 2**18, 0, requires_grad=True)
        k = torch.zeros(1, 1, 2**18, 0, requires_grad=True)
        v = torch.zeros(1, 1, 2**18, 0, requires_grad=True)
        mask = torch.zeros(1, 1, 1, 2**18, requires_grad=True)
        ops.attention(q, k, v, mask, 0.3).sum().backward()
        assert q.grad.shape == q.shape and v.grad.shape == v.shape
        assert mask.grad.shape == mask.shape and torch.equal(mask.grad, torch.zeros_like(mask))
    """,
    "attention double backward (create_graph), D = Dv = 0, L = S = 2^18": """
        q = torch.zeros(1, 1, 2**18, 0, dtype=torch.float64, requires_grad=True)
        k = torch.zeros(1, 1, 2**18, 0, dtype=torch.float64, requires_grad=True)
        v = torch.zeros(1, 1, 2**18, 0, dtype=torch.float64, requires_grad=True)
        mask = torch.zeros(1, 1, 1, 2**18, dtype=torch.float64, requires_grad=True)
        out = ops.attention(q, k, v, mask)
        (grad_mask,) = torch.autograd.grad(out.sum(), mask, create_graph=True)
        assert torch.equal(grad_mask, torch.zeros_like(mask))
    """,
    "attention_with_kv_cache, Dv = 0, L = S_max = 2^16: no attention, the write still done": """
        q = torch.zeros(1, 1, 2**16, 64); k_cache = torch.zeros(1, 1, 2**16, 64)
        v_cache = torch.zeros(1, 1, 2**16, 0)
        key = torch.ones(1, 1, 16, 64); value = torch.zeros(1, 1, 16, 0)
        out = ops.attention_with_kv_cache(q, k_cache, v_cache, key, value, torch.tensor([100]))
        assert out.shape == (1, 1, 2**16, 0)
        assert k_cache[0, 0, 100:116].eq(1).all() and k_cache[0, 0, 116:].eq(0).all()
    """,
    "attention_with_kv_cache, L = 0 against S_max = 2^18": """
        caches = torch.zeros(1, 1, 2**18, 64)
        out = ops.attention_with_kv_cache(torch.zeros(1, 1, 0, 64), caches, caches)
        assert out.shape == (1, 1, 0, 64)
    """,
    "attention_with_kv_cache, int8 caches, L = 0 against S_max = 2^18": """
        caches = torch.zeros(1, 1, 2**18, 64, dtype=torch.int8)
        scales = torch.zeros(1, 1, 2**18)
        out = ops.attention_with_kv_cache(
            torch.zeros(1, 1, 0, 64), caches, caches.clone(), k_cache_scale=scales,
            v_cache_scale=scales.clone())
        assert out.shape == (1, 1, 0, 64)
    """,
    "attention_with_kv_cache, int8 caches, Dv = 0: the write still done, scales 0": """
        k_cache = torch.zeros(1, 1, 2**16, 64, dtype=torch.int8)
        v_cache = torch.zeros(1, 1, 2**16, 0, dtype=torch.int8)
        k_scale, v_scale = torch.full((1, 1, 2**16), -1.0), torch.full((1, 1, 2**16), -1.0)
        key = torch.ones(1, 1, 16, 64); value = torch.zeros(1, 1, 16, 0)
        out = ops.attention_with_kv_cache(torch.zeros(1, 1, 2**16, 64), k_cache, v_cache, key,
            value, torch.tensor([100]), k_cache_scale=k_scale, v_cache_scale=v_scale)
        assert out.shape == (1, 1, 2**16, 0)
        assert k_cache[0, 0, 100:116].eq(127).all() and k_cache[0, 0, 116:].eq(0).all()
        assert v_scale[0, 0, 100:116].eq(0).all() and v_scale[0, 0, 116:].eq(-1).all()
    """,
    "_attention_forward, Dv = 0: logsumexp of no computation, backward zeros": """
        q = torch.zeros(1, 2, 2**18, 8); k = torch.zeros(1, 2, 2**18, 8)
        v = torch.zeros(1, 2, 2**18, 0)
        out, lse, weights = ops._attention_forward(q, k, v, None, None, 0.0, False, None, False)
        assert out.shape == (1, 2, 2**18, 0) and weights.numel() == 0
        assert lse.shape == (1, 2, 2**18) and bool((lse == float("-inf")).all())
        grads = ops._attention_backward(out, None, q, k, v, out, lse, None, None, 0.0, False,
                                        None, None, False, False)
        assert all(bool((g == 0).all()) for g in grads[:3])
    """,
    # A window leaves each row a band of keys: the kernels skip every key block outside it, so
    # the work is L x (band), not L x S = 2^40 (hours).
    "attention, window (0, 0), L = S = 2^20: the band only, forward and backward": """
        q, k, v = (torch.randn(1, 1, 2**20, 1, requires_grad=True) for _ in range(3))
        sinks = torch.zeros(1, requires_grad=True)
        out = ops.attention(q, k, v, window_size=(0, 0), sinks=sinks)
        out.sum().backward()
        expected = v / (1 + torch.exp(-q * k))  # one key and the sink: p = e^s / (e^0 + e^s)
        assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
        assert q.grad.shape == q.shape and sinks.grad.shape == (1,)
    """,
    "attention, causal window (3, 0) with dropout, L = S = 2^20": """
        q, k, v = (torch.randn(1, 1, 2**20, 1, requires_grad=True) for _ in range(3))
        out = ops.attention(q, k, v, None, 0.3, True, window_size=(3, 0))
        out.sum().backward()
        assert out.shape == (1, 1, 2**20, 1) and v.grad.shape == v.shape
    """,
    "attention_varlen, window (1, 1), one sequence of 2^20": """
        q, k, v = (torch.randn(2**20, 1, 1, requires_grad=True) for _ in range(3))
        cu = torch.tensor([0, 2**20])
        out = ops.attention_varlen(q, k, v, cu, cu, 2**20, 2**20, window_size=(1, 1))
        out.sum().backward()
        assert out.shape == (2**20, 1, 1) and k.grad.shape == k.shape
    """,
    "attention_with_kv_cache, window (1023, 0) decoding over 2^30 cached keys": """
        caches = torch.ones(1, 1, 1, 1).expand(2**8, 1, 2**30, 1)  # all valid, never written
        q = torch.ones(2**8, 1, 1, 1)
        out = ops.attention_with_kv_cache(q, caches, caches, window_size=(1023, 0))
        assert out.shape == (2**8, 1, 1, 1) and bool((out == 1).all())
    """,
    "_attention_dropout_mask, S = 0, 2^50 rows": """
        keep = ops._attention_dropout_mask(torch.tensor([1, 2]), 2**20, 2**10, 2**20, 0, 0.5)
        assert keep.shape == (2**20, 2**10, 2**20, 0)
    """,
    "_attention_dropout_mask, L = 0": """
        keep = ops._attention_dropout_mask(torch.tensor([1, 2]), 2**20, 2**10, 0, 2**20, 0.5)
        assert keep.shape == (2**20, 2**10, 0, 2**20)
    """,
    "qkv_projection, E = 0, a long expanded input": """
        x = torch.zeros(1, 1, 3).expand(2**12, 2**20, 3)
        w = torch.zeros(0, 3)
        q, k, v = ops.qkv_projection(x, x, x, w, w, w, None, None, None, 1)
        assert q.shape == (2**12, 1, 2**20, 0)
    """,
    "merge_heads, Eout = 0, a long expanded input": """
        x = torch.zeros(1, 1, 1, 4).expand(2**12, 2, 2**20, 4)
        out = ops.merge_heads(x, torch.zeros(0, 8), None)
        assert out.shape == (2**12, 2**20, 0)
    """,
}

CHILD = textwrap.dedent("""
    import json, sys, textwrap
    import torch
    import qkv_attention
    ops = torch.ops.qkv_attention
    torch.set_num_threads(2)
    for name, code in json.loads(sys.argv[1]).items():
        print(json.dumps({"start": name}), flush=True)
        try:
            exec(textwrap.dedent(code))
            print(json.dumps({"name": name, "error": None}), flush=True)
        except Exception as error:
            print(json.dumps({"name": name, "error": f"{type(error).__name__}: {error}"}),
                  flush=True)
""")


@pytest.fixture(scope="module")
def outcomes():
    started, results = None, {}
    try:
        child = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(CASES)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        stdout, returncode, stderr = child.stdout, child.returncode, child.stderr
    except subprocess.TimeoutExpired as expired:
        stdout = (
            expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        )
        returncode, stderr = None, ""
    for line in stdout.splitlines():
        record = json.loads(line)
        if "start" in record:
            started = record["start"]
        else:
            results[record["name"]] = record["error"]
    assert returncode is not None, (
        f"no result after {TIMEOUT_S} s: case {started!r} is doing the work it has not got"
    )
    assert returncode == 0, f"the child died in case {started!r}:\n{stderr[-3000:]}"
    return results


@pytest.mark.parametrize("name", CASES)
def test_empty_work_returns_at_once(outcomes, name):
    assert outcomes[name] is None, outcomes[name]
