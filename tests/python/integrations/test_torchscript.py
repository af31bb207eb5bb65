"""TorchScript: torch.jit.script compiles our MultiheadAttention (as torch's), and the scripted
module gives exactly the eager module's outputs, weights and gradients with every kind of
mask; it saves and loads; a scripted torch TransformerEncoderLayer/Encoder holding our module
after replace_attention runs our module (never torch's fused layer kernel)."""

import io

import pytest
import torch
from torch import nn

import qkv_attention
from qkv_attention import replace_attention

# torch 2.13 deprecates TorchScript (torch.jit.script/save/load warn) but still runs it, and
# production pipelines still script models.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")

E, HEADS, N, L, S = 16, 4, 2, 5, 6
f64 = torch.float64

CONFIGS = {
    "packed": dict(),
    "packed_batch_first": dict(batch_first=True),
    "separate_weights": dict(kdim=10, vdim=12),
    "no_bias": dict(bias=False),
    "bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
}


def padding(batch):
    mask = torch.zeros(batch, S, dtype=torch.bool)
    mask[0, -2:] = True
    return mask


MASKS = {
    "none": lambda: {},
    "bool_attn_mask_2d": lambda: dict(attn_mask=torch.rand(L, S) > 0.7),
    "float_attn_mask_3d": lambda: dict(attn_mask=torch.randn(N * HEADS, L, S, dtype=f64)),
    "bool_key_padding_mask": lambda: dict(key_padding_mask=padding(N)),
    "float_key_padding_mask": lambda: dict(key_padding_mask=torch.randn(N, S, dtype=f64)),
    "both_bool": lambda: dict(attn_mask=torch.rand(L, S) > 0.7, key_padding_mask=padding(N)),
    "causal_hint": lambda: dict(
        attn_mask=torch.triu(torch.ones(L, S, dtype=torch.bool), diagonal=1),
        is_causal=True,
        need_weights=False,
    ),
    "per_head_weights": lambda: dict(average_attn_weights=False),
    "no_weights": lambda: dict(need_weights=False),
}


def inputs(config, batched=True):
    kdim, vdim = config.get("kdim", E), config.get("vdim", E)
    lead = (N,) if batched else ()

    def make(length, features):
        shape = (
            (*lead, length, features) if config.get("batch_first") else (length, *lead, features)
        )
        return torch.randn(*shape, dtype=f64, requires_grad=True)

    return make(L, E), make(S, kdim), make(S, vdim)


def run_and_grad(module, args, kwargs):
    output, weights = module(*args, **kwargs)
    loss = output.square().sum() + (0 if weights is None else weights.square().sum())
    grads = torch.autograd.grad(loss, [*args, *module.parameters()], allow_unused=True)
    return output, weights, grads


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("masks", list(MASKS))
def test_scripted_module_equals_eager(config, masks):
    torch.manual_seed(0)
    module = qkv_attention.MultiheadAttention(E, HEADS, dtype=f64, **CONFIGS[config])
    scripted = torch.jit.script(module)
    args = inputs(CONFIGS[config])
    kwargs = MASKS[masks]()
    expected = run_and_grad(module, args, kwargs)
    result = run_and_grad(scripted, args, kwargs)
    # The same operators on the same tensors: bit for bit.
    assert torch.equal(result[0], expected[0])
    assert (result[1] is None) == (expected[1] is None)
    if expected[1] is not None:
        assert torch.equal(result[1], expected[1])
    for mine, reference in zip(result[2], expected[2]):
        assert (mine is None) == (reference is None)
        if reference is not None:
            assert torch.equal(mine, reference)


def test_scripted_module_unbatched_and_eval_equal_eager():
    torch.manual_seed(0)
    module = qkv_attention.MultiheadAttention(E, HEADS, dtype=f64).eval()
    scripted = torch.jit.script(module)
    args = inputs({}, batched=False)
    with torch.no_grad():
        for kwargs in ({}, dict(key_padding_mask=torch.tensor([False] * 4 + [True] * 2))):
            output, weights = scripted(*args, **kwargs)
            expected, expected_weights = module(*args, **kwargs)
            assert torch.equal(output, expected) and torch.equal(weights, expected_weights)


def test_scripted_module_dropout_reproduces_eager_under_the_same_seed():
    module = qkv_attention.MultiheadAttention(E, HEADS, dropout=0.3, dtype=f64).train()
    scripted = torch.jit.script(module)
    args = inputs({})
    torch.manual_seed(7)
    expected = module(*args)
    torch.manual_seed(7)
    result = scripted(*args)
    assert torch.equal(result[0], expected[0]) and torch.equal(result[1], expected[1])


def test_scripted_module_matches_torch_scripted_module():
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, HEADS, dtype=f64)
    ours = qkv_attention.MultiheadAttention(E, HEADS, dtype=f64)
    ours.load_state_dict(theirs.state_dict())
    args = inputs({})
    mask = padding(N)
    output, weights = torch.jit.script(ours)(*args, key_padding_mask=mask)
    expected, expected_weights = torch.jit.script(theirs)(*args, key_padding_mask=mask)
    # float64, the same math in another summation order (as test_module_parity).
    torch.testing.assert_close(output, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(weights, expected_weights, atol=1e-10, rtol=1e-10)


def test_scripted_module_saves_and_loads():
    torch.manual_seed(0)
    module = qkv_attention.MultiheadAttention(E, HEADS, dtype=f64, batch_first=True)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    args = inputs(dict(batch_first=True))
    assert torch.equal(loaded(*args)[0], module(*args)[0])
    assert "qkv_attention::attention_with_weights" in profiled_op_names(lambda: loaded(*args))


def test_scripting_leaves_the_eager_module_and_its_hook_alone():
    module = qkv_attention.MultiheadAttention(E, HEADS)
    hooks_before = list(module._forward_pre_hooks.values())
    torch.jit.script(module)
    assert list(module._forward_pre_hooks.values()) == hooks_before and len(hooks_before) == 1


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda q, k, v: (q[..., :-1], k, v), "was expecting embedding dimension of 16"),
        (
            lambda q, k, v: (q, k, v, torch.zeros(N, S + 1, dtype=torch.bool)),
            r"key_padding_mask must have shape \(N, S\) = \(2, 6\)",
        ),
        (
            lambda q, k, v: (q.float(), k.float(), v.float()),
            "query has dtype torch.float32 but the module's parameters have dtype torch.float64",
        ),
    ],
)
def test_scripted_module_raises_with_the_eager_message(bad, message):
    module = qkv_attention.MultiheadAttention(E, HEADS, dtype=f64)
    scripted = torch.jit.script(module)
    args = bad(*[t.detach() for t in inputs({})])
    with pytest.raises(Exception, match=message):
        module(*args)
    with pytest.raises(torch.jit.Error, match=message):
        scripted(*args)


def profiled_op_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("wrapper", ["layer", "encoder"])
def test_scripted_encoder_layer_after_replace_runs_our_module(training, wrapper):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        E, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True, dtype=f64
    )
    model = (
        layer if wrapper == "layer" else nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    )
    original = nn.TransformerEncoderLayer(
        E, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True, dtype=f64
    )
    original.load_state_dict(layer.state_dict())
    model = replace_attention(model).train(training)
    scripted = torch.jit.script(model)
    x = torch.randn(N, L, E, dtype=f64)
    mask = torch.zeros(N, L, dtype=torch.bool)
    mask[0, -1] = True
    with torch.no_grad():  # eval + no grad: where torch's layer takes its fused kernel
        expected = model(x, src_key_padding_mask=mask)
        names = profiled_op_names(lambda: scripted(x, src_key_padding_mask=mask))
        result = scripted(x, src_key_padding_mask=mask)
        if wrapper == "layer":
            original.train(training)
            torch.testing.assert_close(
                result, original(x, src_key_padding_mask=mask), atol=1e-10, rtol=1e-10
            )
    assert torch.equal(result, expected)
    assert "aten::_transformer_encoder_layer_fwd" not in names
    assert any(name.startswith("qkv_attention::") for name in names), sorted(names)


def test_scripted_layer_without_replace_attention_takes_torch_fused_kernel():
    """Why replace_attention sets activation_relu_or_gelu = 0: a scripted layer cannot see our
    module's hook, so a module placed by hand is bypassed by torch's fused kernel there (in
    eager mode the hook keeps it off); replace_attention on the layer fixes that."""
    layer = nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=32, batch_first=True).eval()
    ours = qkv_attention.MultiheadAttention(E, HEADS, batch_first=True)
    layer.self_attn = ours
    x = torch.randn(N, L, E)
    with torch.no_grad():
        assert "aten::_transformer_encoder_layer_fwd" not in profiled_op_names(lambda: layer(x))
        scripted = torch.jit.script(layer)
        assert "aten::_transformer_encoder_layer_fwd" in profiled_op_names(lambda: scripted(x))
        # Scripting put a copy without the hook in the layer (torch's __prepare_scriptable__
        # protocol), sharing the parameters.
        assert layer.self_attn.in_proj_weight is ours.in_proj_weight
        rescripted = torch.jit.script(replace_attention(layer))
        names = profiled_op_names(lambda: rescripted(x))
    assert "aten::_transformer_encoder_layer_fwd" not in names
    assert "qkv_attention::attention" in names
