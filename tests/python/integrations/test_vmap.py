"""torch.func.vmap over every op: the same results as per-sample calls, the randomness modes
honoured with dropout, gradients through vmap, and the grad-family transforms refused with an
error that names the limitation and the alternative (the autograd stays in C++)."""

import pytest
import torch
import torch.nn.functional as F

import qkv_attention
from qkv_attention import ops as typed_ops

ops = torch.ops.qkv_attention

N = 3  # the vmapped size
B, H, L, S, D, Dv = 2, 2, 5, 6, 4, 3
# float64: per-sample calls and the folded batch round the same products in the same order
# per (batch, head) row, up to the GEMM blocking; 1e-12 is ~5000 eps on O(1) values.
TOL = dict(rtol=1e-12, atol=1e-12)


def randn(*shape, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=generator).requires_grad_(
        requires_grad
    )


def per_sample(fn, in_dims, *args):
    """Stacks fn over the samples of the arguments whose in_dim is 0."""
    results = []
    for n in range(N):
        results.append(fn(*(a[n] if d == 0 else a for a, d in zip(args, in_dims))))
    if isinstance(results[0], torch.Tensor):
        return torch.stack(results)
    return tuple(torch.stack([r[i] for r in results]) for i in range(len(results[0])))


def assert_all_close(actual, expected, **tolerance):
    if isinstance(expected, torch.Tensor):
        actual, expected = (actual,), (expected,)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **(tolerance or TOL))


# ---- attention without dropout: every argument vmapped or not, against per-sample calls ----

ATTENTION_IN_DIMS = [
    (0, 0, 0, None, None),
    (0, None, None, None, None),
    (None, 0, 0, None, None),
    (0, 0, 0, 0, 0),
    (None, None, None, 0, None),
    (None, None, None, None, 0),
]


def attention_args(in_dims):
    q, k, v = (
        randn(*((N,) if d == 0 else ()), B, H, n, f, seed=i)
        for i, (n, f, d) in enumerate([(L, D, in_dims[0]), (S, D, in_dims[1]), (S, Dv, in_dims[2])])
    )
    mask = randn(*((N,) if in_dims[3] == 0 else ()), H, L, S, seed=4)
    padding = randn(*((N,) if in_dims[4] == 0 else ()), B, S, seed=5)
    return q, k, v, mask, padding


@pytest.mark.parametrize("in_dims", ATTENTION_IN_DIMS, ids=str)
@pytest.mark.parametrize("op_name", ["attention", "attention_with_weights"])
def test_attention_vmap_matches_per_sample_calls(op_name, in_dims):
    op = getattr(ops, op_name)
    fn = lambda q, k, v, m, p: op(q, k, v, m, 0.0, True, 0.8, p)  # noqa: E731
    args = attention_args(in_dims)
    assert_all_close(torch.func.vmap(fn, in_dims=in_dims)(*args), per_sample(fn, in_dims, *args))


def test_attention_vmap_with_a_bool_mask_and_another_vmapped_dimension():
    q, k, v = (randn(B, N, H, n, f, seed=i) for i, (n, f) in enumerate([(L, D), (S, D), (S, Dv)]))
    mask = torch.rand(B, 1, L, S, generator=torch.Generator().manual_seed(1)) < 0.7
    fn = lambda q, k, v: ops.attention(q, k, v, mask)  # noqa: E731
    expected = torch.stack([fn(q[:, n], k[:, n], v[:, n]) for n in range(N)], dim=1)
    torch.testing.assert_close(torch.func.vmap(fn, in_dims=1, out_dims=1)(q, k, v), expected, **TOL)


@pytest.mark.parametrize("need_weights", [False, True])
def test_attention_forward_vmap_matches_per_sample_calls(need_weights):
    in_dims = (0, 0, 0, 0, 0, None)
    q, k, v, mask, padding = attention_args(in_dims)
    fn = lambda q, k, v, m, p, rng: ops._attention_forward(  # noqa: E731
        q, k, v, m, p, 0.0, False, None, need_weights, rng
    )
    actual = torch.func.vmap(fn, in_dims=in_dims)(q, k, v, mask, padding, None)
    expected = per_sample(fn, in_dims, q, k, v, mask, padding, None)
    assert_all_close(actual[:2], expected[:2])
    if need_weights:
        torch.testing.assert_close(actual[2], expected[2], **TOL)


def test_vmap_folds_the_samples_into_one_kernel_call_without_dropout():
    # The rule calls the op once for all samples (not once per sample).
    calls = []
    original = ops._attention_forward.default

    class Count(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is original:
                calls.append(args[0].shape)
            return func(*args, **(kwargs or {}))

    q, k, v, _, _ = attention_args((0, 0, 0, None, None))
    with Count():
        torch.func.vmap(lambda q, k, v: ops.attention(q, k, v))(q, k, v)
    assert calls == [torch.Size([N * B, H, L, D])]


# ---- dropout and vmap's randomness modes ----


def dropout_args():
    # Softmax weights are strictly positive (no mask), so a zero weight is a dropped one.
    q = randn(N, B, H, L, D, seed=1)
    k, v = randn(B, H, S, D, seed=2), randn(B, H, S, Dv, seed=3)
    return q, k, v


def weights_fn(p):
    return lambda q, k, v: ops.attention_with_weights(q, k, v, None, p)


@pytest.mark.parametrize("op_name", ["attention", "attention_with_weights"])
def test_randomness_error_raises_with_dropout(op_name):
    q, k, v = dropout_args()
    fn = lambda q: getattr(ops, op_name)(q, k, v, None, 0.2)  # noqa: E731
    with pytest.raises(RuntimeError, match="randomness error mode"):
        torch.func.vmap(fn, randomness="error")(q)
    # no dropout: nothing random, nothing to refuse
    torch.func.vmap(lambda q: getattr(ops, op_name)(q, k, v), randomness="error")(q)


def test_randomness_error_raises_in_the_module_with_dropout():
    mha = qkv_attention.MultiheadAttention(8, 2, dropout=0.5, batch_first=True)
    x = torch.randn(N, 2, 5, 8)
    with pytest.raises(RuntimeError, match="randomness error mode"):
        torch.func.vmap(lambda x: mha(x, x, x)[0], randomness="error")(x)
    mha.eval()  # no dropout in eval mode
    out = torch.func.vmap(lambda x: mha(x, x, x)[0], randomness="error")(x)
    torch.testing.assert_close(
        out, torch.stack([mha(x[n], x[n], x[n])[0] for n in range(N)]), rtol=1e-5, atol=1e-6
    )


def check_weights_are_dropout_of_softmax(q, k, v, out, weights, p):
    """Per sample: weights = softmax * keep / (1 - p) and out = weights @ v."""
    for n in range(N):
        plain = F.softmax(q[n] @ k.transpose(-2, -1) / D**0.5, dim=-1)
        keep = weights[n] != 0
        torch.testing.assert_close(weights[n], plain * keep / (1 - p), **TOL)
        torch.testing.assert_close(out[n], weights[n] @ v, **TOL)


def test_randomness_same_gives_every_sample_one_mask():
    q, k, v = dropout_args()
    out, weights = torch.func.vmap(weights_fn(0.5), in_dims=(0, None, None), randomness="same")(
        q, k, v
    )
    kept = weights != 0
    for n in range(1, N):
        assert torch.equal(kept[n], kept[0])
    assert 0.3 < kept.double().mean() < 0.7
    check_weights_are_dropout_of_softmax(q, k, v, out, weights, 0.5)


def test_randomness_same_is_the_mask_of_one_unbatched_call():
    # "same" draws one state as an unbatched call does: after the same seed, every sample has
    # the mask the unbatched call has.
    q, k, v = dropout_args()
    torch.manual_seed(21)
    _, weights = torch.func.vmap(weights_fn(0.5), in_dims=(0, None, None), randomness="same")(
        q, k, v
    )
    torch.manual_seed(21)
    _, unbatched = ops.attention_with_weights(q[0], k, v, None, 0.5)
    for n in range(N):
        assert torch.equal(weights[n] != 0, unbatched != 0)


def test_randomness_different_gives_each_sample_its_own_mask():
    q, k, v = dropout_args()
    q = q[:1].expand(N, *q.shape[1:])  # the same query in every sample: only the masks differ
    out, weights = torch.func.vmap(
        weights_fn(0.5), in_dims=(0, None, None), randomness="different"
    )(q, k, v)
    kept = weights != 0
    for n in range(1, N):
        # B*H*L*S = 120 draws at p = 0.5: equal patterns have probability 2^-120
        assert not torch.equal(kept[n], kept[0])
    check_weights_are_dropout_of_softmax(q, k, v, out, weights, 0.5)


def test_randomness_modes_reproduce_under_manual_seed():
    q, k, v = dropout_args()
    for randomness in ("same", "different"):
        results = []
        for _ in range(2):
            torch.manual_seed(8)
            results.append(
                torch.func.vmap(weights_fn(0.3), in_dims=(0, None, None), randomness=randomness)(
                    q, k, v
                )
            )
        assert torch.equal(results[0][1], results[1][1]), randomness


@pytest.mark.parametrize("rng_batched", [False, True], ids=["one-state", "state-per-sample"])
def test_attention_forward_with_dropout_is_a_pure_function_of_rng_state(rng_batched):
    # A given rng_state draws nothing: vmap gives exactly the per-sample calls, even in
    # randomness="error" mode.
    q, k, v = dropout_args()
    rng = torch.tensor([[11, 1], [12, 2], [13, 3]]) if rng_batched else torch.tensor([11, 1])
    in_dims = (0, None, None, 0 if rng_batched else None)
    fn = lambda q, k, v, rng: ops._attention_forward(  # noqa: E731
        q, k, v, None, None, 0.4, True, None, True, rng
    )
    actual = torch.func.vmap(fn, in_dims=in_dims, randomness="error")(q, k, v, rng)
    expected = per_sample(fn, in_dims, q, k, v, rng)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


def test_dropout_mask_vmap_over_rng_states_matches_per_sample_calls():
    rng = torch.tensor([[1, 2], [3, 4], [5, 6]])
    fn = lambda r: ops._attention_dropout_mask(r, 2, 3, 4, 5, 0.5)  # noqa: E731
    assert torch.equal(torch.func.vmap(fn, randomness="error")(rng), per_sample(fn, (0,), rng))


# ---- the backward ops ----


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize(
    "in_dims", [(0, None, 0, 0, 0, 0, 0, None), (0, 0, None, None, None, None, None, None)], ids=str
)
def test_attention_backward_vmap_matches_per_sample_calls(in_dims, dropout_p):
    q, k, v = randn(B, H, L, D, seed=1), randn(B, H, S, D, seed=2), randn(B, H, S, Dv, seed=3)
    mask = randn(1, H, L, S, seed=4)
    rng = torch.tensor([5, 6]) if dropout_p else None
    output, logsumexp, _ = ops._attention_forward(
        q, k, v, mask, None, dropout_p, True, None, False, rng
    )
    batched = lambda t, d: (
        t.unsqueeze(0).repeat(N, *[1] * t.dim())
        + randn(  # noqa: E731
            N, *t.shape, seed=9
        )
        * 1e-3
        if d == 0
        else t
    )
    grad_output, grad_weights = randn(B, H, L, Dv, seed=7), randn(B, H, L, S, seed=8)
    args = [
        batched(t, d)
        for t, d in zip((grad_output, grad_weights, q, k, v, output, logsumexp, mask), in_dims)
    ]
    fn = lambda go, gw, q, k, v, o, lse, m: ops._attention_backward(  # noqa: E731
        go, gw, q, k, v, o, lse, m, None, dropout_p, True, None, rng, True, False
    )
    assert_all_close(torch.func.vmap(fn, in_dims=in_dims)(*args), per_sample(fn, in_dims, *args))


def test_backward_with_batched_gradients_uses_the_backward_rules():
    # autograd.grad(is_grads_batched=True) vmaps the backward ops over the gradients.
    q, k, v = (
        randn(B, H, n, f, seed=i, requires_grad=True)
        for i, (n, f) in enumerate([(L, D), (S, D), (S, Dv)])
    )
    out = ops.attention(q, k, v, None, 0.0, True)
    grads = randn(N, *out.shape, seed=4)
    batched = torch.autograd.grad(out, (q, k, v), grads, is_grads_batched=True, retain_graph=True)
    for n in range(N):
        single = torch.autograd.grad(out, (q, k, v), grads[n], retain_graph=True)
        assert_all_close(tuple(b[n] for b in batched), single)


# ---- projections ----

E, Ein = 8, 6


@pytest.mark.parametrize(
    "shared_weights", [True, False], ids=["shared-weights", "per-sample-weights"]
)
@pytest.mark.parametrize("self_attention", [True, False], ids=["self", "cross"])
def test_qkv_projection_vmap_matches_per_sample_calls(shared_weights, self_attention):
    x = randn(N, B, L, Ein, seed=1)
    key = x if self_attention else randn(N, B, S, Ein, seed=2)
    in_proj = randn(*(() if shared_weights else (N,)), 3 * E, Ein, seed=3)
    bias = randn(*(() if shared_weights else (N,)), 3 * E, seed=4)
    wd = None if shared_weights else 0

    def fn(x, key, w, b):
        weights, biases = w.chunk(3, dim=-2), b.chunk(3, dim=-1)
        return ops.qkv_projection(x, key, key, *weights, *biases, 2)

    in_dims = (0, 0, wd, wd)
    assert_all_close(
        torch.func.vmap(fn, in_dims=in_dims)(x, key, in_proj, bias),
        per_sample(fn, in_dims, x, key, in_proj, bias),
    )


def test_qkv_projection_backward_vmap_matches_per_sample_calls():
    x = randn(B, L, Ein, seed=1)
    w = [randn(E, Ein, seed=i) for i in (2, 3, 4)]
    grads = [randn(N, B, 2, L, E // 2, seed=i) for i in (5, 6, 7)]
    fn = lambda gq, gk, gv: ops.qkv_projection_backward(  # noqa: E731
        gq, gk, gv, x, x, x, *w, 2
    )
    assert_all_close(torch.func.vmap(fn)(*grads), per_sample(fn, (0, 0, 0), *grads))


@pytest.mark.parametrize(
    "shared_weights", [True, False], ids=["shared-weights", "per-sample-weights"]
)
def test_merge_heads_vmap_matches_per_sample_calls(shared_weights):
    x = randn(N, B, H, L, D, seed=1)
    w = randn(*(() if shared_weights else (N,)), 5, H * D, seed=2)
    b = randn(5, seed=3)
    in_dims = (0, None if shared_weights else 0, None)
    assert_all_close(
        torch.func.vmap(ops.merge_heads, in_dims=in_dims)(x, w, b),
        per_sample(ops.merge_heads, in_dims, x, w, b),
    )


def test_merge_heads_backward_vmap_matches_per_sample_calls():
    x, w = randn(B, H, L, D, seed=1), randn(5, H * D, seed=2)
    grad = randn(N, B, L, 5, seed=3)
    fn = lambda g: ops.merge_heads_backward(g, x, w)  # noqa: E731
    assert_all_close(torch.func.vmap(fn)(grad), per_sample(fn, (0,), grad))


# ---- gradients through vmap, and the module ----


def test_gradients_through_vmap_are_the_per_sample_gradients():
    q = randn(N, B, H, L, D, seed=1, requires_grad=True)
    k = randn(B, H, S, D, seed=2, requires_grad=True)
    v = randn(N, B, H, S, Dv, seed=3, requires_grad=True)
    fn = lambda q, v: ops.attention(q, k, v, None, 0.0, True)  # noqa: E731
    weight = randn(N, B, H, L, Dv, seed=4)
    batched = torch.autograd.grad((torch.func.vmap(fn)(q, v) * weight).sum(), (q, k, v))
    looped = torch.autograd.grad((per_sample(fn, (0, 0), q, v) * weight).sum(), (q, k, v))
    assert_all_close(batched, looped)


def test_module_ensemble_with_functional_call_and_vmap():
    # An ensemble: N copies of the module's parameters, vmapped with functional_call.
    torch.manual_seed(0)
    models = [
        qkv_attention.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
        for _ in range(N)
    ]
    params = {
        name: torch.stack([dict(m.named_parameters())[name].detach() for m in models])
        for name, _ in models[0].named_parameters()
    }
    x = randn(B, L, 8, seed=1)

    def run(p, x):
        return torch.func.functional_call(models[0], p, (x, x, x))[0]

    actual = torch.func.vmap(run, in_dims=(0, None))(params, x)
    expected = torch.stack([m(x, x, x)[0] for m in models])
    torch.testing.assert_close(actual, expected, **TOL)


def test_module_vmap_matches_per_sample_calls():
    torch.manual_seed(0)
    mha = qkv_attention.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    x = randn(N, B, L, 8, seed=1)
    padding = torch.zeros(N, B, L, dtype=torch.bool)
    padding[1, 0, -2:] = True
    fn = lambda x, p: mha(x, x, x, key_padding_mask=p)  # noqa: E731
    actual = torch.func.vmap(fn)(x, padding)
    expected = per_sample(fn, (0, 0), x, padding)
    assert_all_close(actual, expected)


# ---- the grad-family transforms: a documented limitation with a clear error ----

GRAD_TRANSFORMS = {
    "grad": lambda f, x: torch.func.grad(f)(x),
    "vjp": lambda f, x: torch.func.vjp(f, x)[1](torch.ones(())),
    "jacrev": lambda f, x: torch.func.jacrev(f)(x),
    "jacfwd": lambda f, x: torch.func.jacfwd(f)(x),
}


@pytest.mark.parametrize("transform", GRAD_TRANSFORMS, ids=str)
@pytest.mark.parametrize("op_name", ["attention", "qkv_projection", "merge_heads"])
def test_grad_transforms_raise_an_error_naming_the_limitation_and_the_alternative(
    transform, op_name
):
    q, k, v = randn(B, H, L, D, seed=1), randn(B, H, S, D, seed=2), randn(B, H, S, Dv, seed=3)
    x, w = randn(B, L, Ein, seed=4), randn(E, Ein, seed=5)
    out_weight = randn(5, H * D, seed=6)
    functions = {
        "attention": (lambda q: ops.attention(q, k, v).sum(), q),
        "qkv_projection": (
            lambda x: sum(
                t.sum() for t in ops.qkv_projection(x, x, x, w, w, w, None, None, None, 2)
            ),
            x,
        ),
        "merge_heads": (lambda q: ops.merge_heads(q, out_weight, None).sum(), q),
    }
    f, arg = functions[op_name]
    with pytest.raises(
        NotImplementedError, match=r"torch\.func's differentiating transforms"
    ) as error:
        GRAD_TRANSFORMS[transform](f, arg)
    message = str(error.value)
    assert "C++ torch::autograd::Function" in message and "torch.autograd.grad" in message


def test_grad_transform_over_the_module_raises_the_same_error():
    torch.manual_seed(0)
    mha = qkv_attention.MultiheadAttention(8, 2, batch_first=True)
    params = dict(mha.named_parameters())
    x = torch.randn(B, L, 8)

    def loss(p):
        return torch.func.functional_call(mha, p, (x, x, x))[0].sum()

    with pytest.raises(NotImplementedError, match="torch.autograd.grad"):
        torch.func.grad(loss)(params)


def test_autograd_grad_is_the_alternative_and_works():
    # What the error recommends gives the gradient torch's own attention gives.
    q = randn(B, H, L, D, seed=1, requires_grad=True)
    k, v = randn(B, H, S, D, seed=2), randn(B, H, S, Dv, seed=3)
    (ours,) = torch.autograd.grad(typed_ops.attention(q, k, v).sum(), q)
    (theirs,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v).sum(), q)
    torch.testing.assert_close(ours, theirs, **TOL)
