"""Our MultiheadAttention under torch.compile(fullgraph=True) and torch.export, through
gradcheck/gradgradcheck, and without materialising anything of size L x S when the weights
are not asked for."""

import pytest
import torch
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

import qkv_attention

f64 = torch.float64


def random_module(seed=0, **config):
    torch.manual_seed(seed)
    module = qkv_attention.MultiheadAttention(**config, dtype=f64)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


def grads_of(module, call):
    out, weights = call(module)
    loss = out.square().sum() + (0 if weights is None else weights.square().sum())
    return out, weights, torch.autograd.grad(loss, list(module.parameters()))


def assert_same_results(a, b):
    out_a, w_a, g_a = a
    out_b, w_b, g_b = b
    # The compiled graph runs the same operators on the same inputs; only Inductor's own
    # fusions of the surrounding elementwise ops could round differently (float64: ~1e-16).
    torch.testing.assert_close(out_a, out_b, atol=1e-12, rtol=1e-12)
    assert (w_a is None) == (w_b is None)
    if w_a is not None:
        torch.testing.assert_close(w_a, w_b, atol=1e-12, rtol=1e-12)
    for x, y in zip(g_a, g_b):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12)


@pytest.mark.filterwarnings("ignore:Support for mismatched")  # bool and float masks, eager
def test_compile_fullgraph_inductor_matches_eager():
    """The default backend (Inductor), forward and backward, masks of both kinds."""
    torch._dynamo.reset()
    module = random_module(embed_dim=8, num_heads=2, add_bias_kv=True, batch_first=True)
    compiled = torch.compile(module, fullgraph=True)
    q = torch.randn(2, 3, 8, dtype=f64)
    kv = torch.randn(2, 4, 8, dtype=f64)
    kpm = torch.tensor([[False, False, True, False], [False, True, True, False]])
    attn = torch.randn(2 * 2, 3, 4, dtype=f64)

    def call(m):
        return m(q, kv, kv, key_padding_mask=kpm, attn_mask=attn, need_weights=False)

    assert_same_results(grads_of(compiled, call), grads_of(module, call))


@pytest.mark.parametrize("need_weights", [False, True])
def test_compile_fullgraph_every_option_and_new_sizes(need_weights):
    """kdim/vdim, bias_kv, zero_attn, causal hint, seq-first and unbatched input; a second
    call with other sequence lengths recompiles (dynamic shapes) and still matches."""
    torch._dynamo.reset()
    module = random_module(
        embed_dim=6, num_heads=3, kdim=4, vdim=5, add_bias_kv=True, add_zero_attn=True
    )
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for L, S in [(3, 3), (5, 5)]:
        q = torch.randn(L, 2, 6, dtype=f64)
        k, v = torch.randn(S, 2, 4, dtype=f64), torch.randn(S, 2, 5, dtype=f64)
        causal = torch.ones(L, S, dtype=torch.bool).triu(1)

        def call(m):
            return m(
                q,
                k,
                v,
                attn_mask=causal,
                is_causal=True,
                need_weights=need_weights,
                average_attn_weights=False,
            )

        def unbatched(m):
            return m(
                q[:, 0],
                k[:, 0],
                v[:, 0],
                key_padding_mask=torch.zeros(S).bool(),
                need_weights=need_weights,
            )

        assert_same_results(grads_of(compiled, call), grads_of(module, call))
        assert_same_results(grads_of(compiled, unbatched), grads_of(module, unbatched))


def test_export_runs_our_operators_and_matches_eager():
    module = random_module(
        embed_dim=8, num_heads=2, kdim=5, vdim=6, add_zero_attn=True, batch_first=True
    )
    q = torch.randn(2, 3, 8, dtype=f64)
    k, v = torch.randn(2, 4, 5, dtype=f64), torch.randn(2, 4, 6, dtype=f64)
    kwargs = dict(key_padding_mask=torch.rand(2, 4) < 0.3, attn_mask=torch.rand(3, 4) < 0.3)
    exported = torch.export.export(module, (q, k, v), kwargs)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "qkv_attention.qkv_projection.default" in targets
    assert "qkv_attention.merge_heads.default" in targets
    assert any(t.startswith("qkv_attention.attention") for t in targets)
    assert not any("scaled_dot_product" in t or "multi_head" in t for t in targets)
    for a, b in zip(exported.module()(q, k, v, **kwargs), module(q, k, v, **kwargs)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def as_function_of_tensors(module, forward):
    """(inputs..., parameters...) -> outputs, for gradcheck over inputs and parameters."""
    names = [n for n, _ in module.named_parameters()]

    def fn(*tensors):
        inputs, params = tensors[: -len(names)], tensors[-len(names) :]
        return functional_call(module, dict(zip(names, params)), args=(), kwargs=forward(*inputs))

    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())
    return fn, params


GRADGRAD_CASES = {
    # Packed weights, both masks (the float one differentiated too), per-head weights.
    "packed_masks_weights": (
        dict(embed_dim=4, num_heads=2, batch_first=True),
        lambda: (
            torch.randn(2, 2, 4, dtype=f64),
            torch.randn(2, 3, 4, dtype=f64),
            torch.randn(2 * 2, 2, 3, dtype=f64),
        ),
        lambda q, kv, attn: dict(
            query=q,
            key=kv,
            value=kv,
            attn_mask=attn,
            key_padding_mask=torch.tensor([[False, True, False], [False, False, False]]),
            average_attn_weights=False,
        ),
    ),
    # Separate weights, bias_kv and zero_attn, unbatched, the causal branch.
    "kdim_vdim_bias_kv_zero_attn_causal": (
        dict(embed_dim=4, num_heads=2, kdim=3, vdim=2, add_bias_kv=True, add_zero_attn=True),
        lambda: (
            torch.randn(3, 4, dtype=f64),
            torch.randn(3, 3, dtype=f64),
            torch.randn(3, 2, dtype=f64),
        ),
        lambda q, k, v: dict(
            query=q,
            key=k,
            value=v,
            attn_mask=torch.ones(3, 3, dtype=torch.bool).triu(1),
            is_causal=True,
            need_weights=False,
        ),
    ),
}


@pytest.mark.filterwarnings("ignore:Support for mismatched")  # bool and float masks
@pytest.mark.parametrize("case", GRADGRAD_CASES)
def test_gradcheck_and_gradgradcheck_through_the_module(case):
    config, make_inputs, forward = GRADGRAD_CASES[case]
    module = random_module(**config)
    fn, params = as_function_of_tensors(module, forward)
    inputs = tuple(t.requires_grad_() for t in make_inputs())

    def outputs(*tensors):
        out, weights = fn(*tensors)
        return out if weights is None else (out, weights)

    assert torch.autograd.gradcheck(outputs, inputs + params)
    assert torch.autograd.gradgradcheck(outputs, inputs + params)


def test_gradgradcheck_with_dropout_in_training_mode():
    """The function reseeds before each call: one dropout mask for the forward, the finite
    differences and both backward passes."""
    module = random_module(embed_dim=4, num_heads=2, dropout=0.3).train()
    q = torch.randn(2, 1, 4, dtype=f64, requires_grad=True)
    kv = torch.randn(3, 1, 4, dtype=f64, requires_grad=True)

    def seeded(q, kv):
        torch.manual_seed(11)
        return module(q, kv, kv, average_attn_weights=False)

    assert torch.autograd.gradcheck(seeded, (q, kv))
    assert torch.autograd.gradgradcheck(seeded, (q, kv))


class RecordShapes(TorchDispatchMode):
    """Records the shape of every tensor that any operator returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        flat = result if isinstance(result, (tuple, list)) else (result,)
        self.shapes += [(str(func), tuple(t.shape)) for t in flat if isinstance(t, torch.Tensor)]
        return result


@pytest.mark.parametrize(
    "config",
    [dict(), dict(add_bias_kv=True, add_zero_attn=True)],
    ids=["plain", "bias_kv_zero_attn"],
)
def test_no_weights_means_nothing_of_size_L_by_S(config):
    """need_weights=False, forward and backward: no operator output as large as L x S (here
    L*S = 3072, far above every other tensor); with a 2-D attn_mask and a padding mask, no
    (B, H, L, S) merge, and nothing larger than the caller's own (L, S) mask (its negation,
    the operators' bool convention, is that size)."""
    B, H, E, L, S = 1, 2, 8, 64, 48
    module = random_module(embed_dim=E, num_heads=H, batch_first=True, **config)
    q = torch.randn(B, L, E, dtype=f64, requires_grad=True)
    kv = torch.randn(B, S, E, dtype=f64, requires_grad=True)
    padding = torch.rand(B, S) < 0.3
    padding[:, 0] = False
    extra = 2 if config else 0

    with RecordShapes() as recorder:
        out, _ = module(q, kv, kv, key_padding_mask=padding, need_weights=False)
        out.sum().backward()
    largest = max(recorder.shapes, key=lambda item: torch.Size(item[1]).numel())
    assert torch.Size(largest[1]).numel() < L * S, largest

    attn = torch.rand(L, S) < 0.2
    attn[:, 0] = False
    with RecordShapes() as recorder:
        out, _ = module(q, kv, kv, key_padding_mask=padding, attn_mask=attn, need_weights=False)
        out.sum().backward()
    sizes = [torch.Size(shape).numel() for _, shape in recorder.shapes]
    assert max(sizes) <= L * (S + extra), max(
        recorder.shapes, key=lambda i: torch.Size(i[1]).numel()
    )
    assert not any(len(shape) == 4 and shape[-2:] == (L, S + extra) for _, shape in recorder.shapes)
