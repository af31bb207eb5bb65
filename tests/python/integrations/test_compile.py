"""torch.compile(fullgraph=True) and torch.export of code that uses all three operators.

fullgraph=True turns any graph break into an error, so these tests prove that Dynamo traces the
operators through their Meta kernels; comparing with eager proves the compiled code computes the
same values and gradients.
"""

import pytest
import torch
import torch._inductor.config

from helpers import SAME_DTYPE_TOLERANCE, random_bool_mask, random_tensor

ops = torch.ops.qkv_attention
pytestmark = pytest.mark.usefixtures("seed_torch")

HEADS = 2
E, KDIM = 8, 6  # embedding size; the memory's features (kdim = vdim != E)
TOLERANCE = SAME_DTYPE_TOLERANCE[torch.float32]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def attention_block(
    x, memory, wq, wk, wv, bq, bk, bv, wo, bo, attn_mask, key_padding_mask, dropout_p: float = 0.0
):
    """x (B, L, E) attends to memory (B, S, KDIM); returns (B, L, E)."""
    q, k, v = ops.qkv_projection(x, memory, memory, wq, wk, wv, bq, bk, bv, HEADS)
    attended = ops.attention(q, k, v, attn_mask, dropout_p, True, None, key_padding_mask)
    return ops.merge_heads(attended, wo, bo)


def block_inputs(B, L, S):
    """The differentiable inputs (all float32, requiring grad) and the bool key_padding_mask."""
    differentiable = [
        random_tensor(B, L, E, dtype=torch.float32),  # x
        random_tensor(B, S, KDIM, dtype=torch.float32),  # memory
        random_tensor(E, E, dtype=torch.float32, scale=E**-0.5),  # wq
        random_tensor(E, KDIM, dtype=torch.float32, scale=KDIM**-0.5),  # wk
        random_tensor(E, KDIM, dtype=torch.float32, scale=KDIM**-0.5),  # wv
        random_tensor(E, dtype=torch.float32),  # bq
        random_tensor(E, dtype=torch.float32),  # bk
        random_tensor(E, dtype=torch.float32),  # bv
        random_tensor(E, E, dtype=torch.float32, scale=E**-0.5),  # wo
        random_tensor(E, dtype=torch.float32),  # bo
        random_tensor(HEADS, L, S, dtype=torch.float32, scale=0.5),  # attn_mask, broadcast
    ]
    padding = random_bool_mask(B, S, keep_probability=0.8)
    return differentiable, padding


def value_and_grads(fn, differentiable, padding, dropout_p=0.0, seed=None):
    leaves = [t.detach().clone().requires_grad_() for t in differentiable]
    if seed is not None:
        torch.manual_seed(seed)
    out = fn(*leaves, padding, dropout_p)
    grad_output = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    out.backward(grad_output)
    return out.detach(), [t.grad for t in leaves]


def assert_same(eager, compiled):
    torch.testing.assert_close(compiled[0], eager[0], **TOLERANCE)
    for index, (a, b) in enumerate(zip(compiled[1], eager[1])):
        assert a is not None, f"no gradient for input {index}"
        torch.testing.assert_close(a, b, **TOLERANCE, msg=f"gradient of input {index}")


def test_compile_fullgraph_matches_eager_values_and_gradients():
    differentiable, padding = block_inputs(2, 5, 7)
    compiled = torch.compile(attention_block, fullgraph=True)
    assert_same(
        value_and_grads(attention_block, differentiable, padding),
        value_and_grads(compiled, differentiable, padding),
    )


def test_compile_dynamic_shapes_matches_eager_without_recompiling():
    compiled = torch.compile(attention_block, fullgraph=True, dynamic=True)
    # Sizes that equal no other size (nor HEADS, E, KDIM): Dynamo's duck sizing would give
    # equal sizes one symbol, and the mask check H == 2 would then specialise B == 2.
    for index, (B, L, S) in enumerate(((3, 5, 7), (4, 9, 10), (5, 11, 13))):
        differentiable, padding = block_inputs(B, L, S)
        eager = value_and_grads(attention_block, differentiable, padding)
        # the first call compiles; the other shapes must reuse that graph
        with torch._dynamo.config.patch(error_on_recompile=index > 0):
            assert_same(eager, value_and_grads(compiled, differentiable, padding))


def test_compiled_dropout_reproduces_eager_under_the_same_seed():
    # The dropout seed is drawn by torch.randint, which Inductor replaces with its own random
    # stream (as it does for torch's own random ops) unless fallback_random is set: then the
    # compiled call draws eager's seed, so eager's mask.
    differentiable, padding = block_inputs(2, 6, 6)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(attention_block, fullgraph=True)
        eager = value_and_grads(attention_block, differentiable, padding, 0.25, seed=17)
        assert_same(eager, value_and_grads(compiled, differentiable, padding, 0.25, seed=17))
    # and dropout did act (the check above is not the no-dropout result twice)
    no_dropout = value_and_grads(attention_block, differentiable, padding, 0.0)
    assert not torch.allclose(eager[0], no_dropout[0])


class SelfAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.in_weight = torch.nn.Parameter(torch.randn(3, E, E) * E**-0.5)
        self.in_bias = torch.nn.Parameter(torch.randn(3, E))
        self.out_weight = torch.nn.Parameter(torch.randn(E, E) * E**-0.5)

    def forward(self, x):  # (B, L, E) -> (B, L, E)
        q, k, v = ops.qkv_projection(x, x, x, *self.in_weight, *self.in_bias, HEADS)
        return ops.merge_heads(ops.attention(q, k, v, None, 0.0, True), self.out_weight, None)


def test_export_runs_and_matches_eager():
    module = SelfAttention()
    length = torch.export.Dim("length", min=2, max=64)
    program = torch.export.export(
        module, (torch.randn(2, 5, E),), dynamic_shapes={"x": {1: length}}
    )
    targets = {node.target for node in program.graph.nodes if node.op == "call_function"}
    assert {ops.qkv_projection.default, ops.attention.default, ops.merge_heads.default} <= targets
    exported = program.module()
    for L in (5, 13):
        x = torch.randn(2, L, E)
        torch.testing.assert_close(exported(x), module(x), **TOLERANCE)
