"""Gradients with dropout under torch.compile and activation checkpointing are the gradients of
the function that was compiled.

The dropout seed is drawn by an ATen random op (torch.randint) in the composite ops and passed
to _attention_forward, which is a pure function of it. So the compiler knows the random op,
keeps its result for any recomputation of the forward (checkpointing, or the partitioner's own
choice), and the backward regenerates the forward's mask. Were the seed drawn inside the kernel
op, a recomputed forward would draw a new one and the gradient would belong to another mask.

Each test compares the gradient of the compiled function, along a random direction, with the
central finite difference of the same compiled function (every evaluation after the same
torch.manual_seed, so every evaluation applies the same mask; with requires_grad inputs, so the
same compiled graph runs). float64: the difference quotient with step 1e-6 is exact to ~1e-9
relative (truncation ~ step^2, rounding ~ 1e-16 / step); the tolerance 1e-6 leaves margin, and
a gradient of another mask is off by tens of percent.
"""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import qkv_attention

ops = torch.ops.qkv_attention
SEED = 1234
STEP = 1e-6
TOLERANCE = dict(rtol=1e-6, atol=1e-8)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_gradient_is_the_compiled_functions(fn, inputs, wrt):
    """fn(*inputs) -> scalar. Compares d fn / d inputs[wrt] along a random direction with the
    central difference of fn, each evaluation after torch.manual_seed(SEED)."""
    generator = torch.Generator().manual_seed(7)
    x = inputs[wrt]
    direction = torch.randn(x.shape, dtype=x.dtype, generator=generator)

    def evaluate(point):
        # A leaf that requires grad, as in the gradient's run: the same compiled graph.
        leaf = point.detach().requires_grad_()
        args = list(inputs)
        args[wrt] = leaf
        torch.manual_seed(SEED)
        return fn(*args), leaf

    loss, leaf = evaluate(x)
    (grad,) = torch.autograd.grad(loss, [leaf])
    analytic = (grad * direction).sum()
    numeric = (evaluate(x + STEP * direction)[0] - evaluate(x - STEP * direction)[0]) / (2 * STEP)
    torch.testing.assert_close(analytic.detach(), numeric.detach(), **TOLERANCE)
    return grad


def op_inputs():
    generator = torch.Generator().manual_seed(3)
    B, H, L, S, D = 2, 2, 12, 10, 8
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64, generator=generator) for n in (L, S, S))
    weight = torch.randn(B, H, L, D, dtype=torch.float64, generator=generator)
    return [t.requires_grad_() for t in (q, k, v)] + [weight]


def attention_loss(q, k, v, weight):
    # Some work before and after the attention, so that the checkpointed region has
    # activations the partitioner may save or recompute.
    out = ops.attention(torch.tanh(q), k * 1.5, v, None, 0.3, False, None, None)
    return (torch.sin(out) * weight).sum()


def attention_with_weights_loss(q, k, v, weight):
    out, weights = ops.attention_with_weights(torch.tanh(q), k, v, None, 0.4, True, 0.7, None)
    return (out * weight).sum() + (weights * weights).sum()


def checkpointed(loss, use_reentrant):
    def fn(*args):
        return checkpoint(loss, *args, use_reentrant=use_reentrant)

    return fn


def compiled(fn, fullgraph):
    return torch.compile(fn, fullgraph=fullgraph)


# torch.utils.checkpoint with use_reentrant=True is a torch.autograd.Function that dynamo runs
# without tracing into (a graph break), which fullgraph=True refuses, for torch's own ops too:
# that combination compiles nothing and is not ours to test.
CHECKPOINT_SETTINGS = [
    pytest.param(False, False, id="non-reentrant"),
    pytest.param(False, True, id="non-reentrant-fullgraph"),
    pytest.param(True, False, id="reentrant"),
]


@pytest.mark.parametrize("use_reentrant, fullgraph", CHECKPOINT_SETTINGS)
@pytest.mark.parametrize(
    "loss",
    [attention_loss, attention_with_weights_loss],
    ids=["attention", "attention_with_weights"],
)
def test_op_gradient_under_compile_and_checkpointing_is_the_compiled_functions(
    loss, use_reentrant, fullgraph
):
    fn = compiled(checkpointed(loss, use_reentrant), fullgraph)
    inputs = op_inputs()
    for wrt in (0, 2):  # query (through the mask and the softmax), value
        assert_gradient_is_the_compiled_functions(fn, inputs, wrt)


def module_inputs():
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    mha = qkv_attention.MultiheadAttention(
        16, 4, dropout=0.3, batch_first=True, dtype=torch.float64
    )
    x = torch.randn(2, 9, 16, dtype=torch.float64, generator=generator).requires_grad_()
    weight = torch.randn(2, 9, 16, dtype=torch.float64, generator=generator)
    return mha, [x, weight]


@pytest.mark.parametrize("use_reentrant, fullgraph", CHECKPOINT_SETTINGS)
@pytest.mark.parametrize("need_weights", [False, True], ids=["no-weights", "need-weights"])
def test_module_gradient_under_compile_and_checkpointing_is_the_compiled_functions(
    use_reentrant, fullgraph, need_weights
):
    mha, inputs = module_inputs()
    mha.train()

    def loss(x, weight):
        out, _ = mha(x, x, x, need_weights=need_weights)
        return (out * weight).sum()

    fn = compiled(checkpointed(loss, use_reentrant), fullgraph)
    assert_gradient_is_the_compiled_functions(fn, inputs, 0)
    # and a parameter's gradient: the same check through the projection weight
    x, weight = inputs
    generator = torch.Generator().manual_seed(11)
    direction = torch.randn(mha.in_proj_weight.shape, dtype=torch.float64, generator=generator)
    torch.manual_seed(SEED)
    (grad,) = torch.autograd.grad(fn(x, weight), [mha.in_proj_weight])
    original = mha.in_proj_weight.detach().clone()

    def evaluate(offset):
        with torch.no_grad():
            mha.in_proj_weight.copy_(original + offset * direction)
        torch.manual_seed(SEED)
        return fn(x, weight).detach()

    numeric = (evaluate(STEP) - evaluate(-STEP)) / (2 * STEP)
    with torch.no_grad():
        mha.in_proj_weight.copy_(original)
    torch.testing.assert_close((grad * direction).sum(), numeric, **TOLERANCE)


# Without checkpointing the min-cut partitioner decides on its own what to save and what to
# recompute in the backward (it recomputes cheap ops such as the tanh and the scaling around the
# attention). Forcing it to recompute everything with activation_memory_budget=0 is not covered:
# with that setting torch's own F.scaled_dot_product_attention with dropout gets a gradient
# that disagrees with the finite difference too (measured: -8.37 against -5.46 for this loss),
# the partitioner then recomputes the random ops themselves.


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph-breaks-allowed", "fullgraph"])
def test_op_gradient_with_the_partitioners_own_choices_is_the_compiled_functions(fullgraph):
    fn = compiled(attention_loss, fullgraph)
    inputs = op_inputs()
    for wrt in (0, 1):
        assert_gradient_is_the_compiled_functions(fn, inputs, wrt)


def test_module_gradient_with_the_partitioners_own_choices_is_the_compiled_functions():
    mha, inputs = module_inputs()
    mha.train()

    def loss(x, weight):
        out, weights = mha(x, x, x, need_weights=True)
        return (out * weight).sum() + weights.sum()

    assert_gradient_is_the_compiled_functions(compiled(loss, True), inputs, 0)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_compiled_checkpointed_dropout_matches_eager_bitwise_with_aot_eager(use_reentrant):
    # aot_eager runs torch.randint eagerly: the compiled function draws the seed eager draws,
    # so its values and gradients are the eager ones, with the same mask.
    results = []
    for backend in (None, "aot_eager"):
        fn = checkpointed(attention_loss, use_reentrant)
        if backend is not None:
            fn = torch.compile(fn, backend=backend)
        inputs = op_inputs()
        torch.manual_seed(SEED)
        loss = fn(*inputs)
        loss.backward()  # (reentrant checkpointing refuses torch.autograd.grad)
        results.append((loss.detach(), [t.grad for t in inputs[:3]]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert torch.equal(eager_loss, compiled_loss)
    for eager, compiled_grad in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(compiled_grad, eager, rtol=1e-12, atol=1e-12)
