"""replace_attention: torch's transformer modules give the same outputs and gradients after
their nn.MultiheadAttention modules are swapped for ours, and ours is what actually runs
(also where torch's layers would take their fused inference path)."""

import copy

import pytest
import torch
from torch import nn

import qkv_attention
from qkv_attention import replace_attention

D_MODEL, HEADS, FF = 16, 4, 32
N, S_SRC, S_TGT = 3, 6, 5
f64 = torch.float64
# float64 on both sides, the same math in a different summation order, through two or three
# layers with layer norms: measured differences <= 1e-13; 1e-10 as for the module itself.
TOL = dict(atol=1e-10, rtol=1e-10)


def count_our_attention_calls(monkeypatch):
    """Counts calls of our attention operators made by our module."""
    calls = {"n": 0}
    for name in ("attention", "attention_with_weights"):
        original = getattr(qkv_attention.ops, name)

        def counting(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(qkv_attention.ops, name, counting)
    return calls


def build(kind, batch_first, norm_first=False, dropout=0.1):
    torch.manual_seed(0)
    common = dict(
        d_model=D_MODEL,
        nhead=HEADS,
        dim_feedforward=FF,
        dropout=dropout,
        batch_first=batch_first,
        norm_first=norm_first,
        dtype=f64,
    )
    if kind == "encoder":
        model = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**common), num_layers=2, enable_nested_tensor=False
        )
    elif kind == "decoder":
        model = nn.TransformerDecoder(nn.TransformerDecoderLayer(**common), num_layers=2)
    else:
        model = nn.Transformer(num_encoder_layers=2, num_decoder_layers=2, **common)
    # Attention dropout off (the layers' own nn.Dropout stays on): the two attentions draw
    # random numbers differently, so only then do both models see the same dropout masks.
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.0
    return model


def make_inputs(kind, batch_first, with_masks):
    generator = torch.Generator().manual_seed(1)

    def seq(length):
        shape = (N, length, D_MODEL) if batch_first else (length, N, D_MODEL)
        return torch.randn(shape, generator=generator, dtype=f64).requires_grad_()

    def padding(length):
        mask = torch.rand(N, length, generator=generator) < 0.3
        mask[:, 0] = False
        return mask

    causal = nn.Transformer.generate_square_subsequent_mask(S_TGT, dtype=f64)
    if kind == "encoder":
        inputs = dict(src=seq(S_SRC))
        if with_masks:
            inputs.update(
                mask=nn.Transformer.generate_square_subsequent_mask(S_SRC, dtype=f64),
                src_key_padding_mask=padding(S_SRC),
                is_causal=True,
            )
    elif kind == "decoder":
        inputs = dict(tgt=seq(S_TGT), memory=seq(S_SRC))
        if with_masks:
            inputs.update(
                tgt_mask=causal,
                tgt_is_causal=True,
                tgt_key_padding_mask=padding(S_TGT),
                memory_key_padding_mask=padding(S_SRC),
            )
    else:
        inputs = dict(src=seq(S_SRC), tgt=seq(S_TGT))
        if with_masks:
            inputs.update(
                tgt_mask=causal,
                tgt_is_causal=True,
                src_key_padding_mask=padding(S_SRC),
                memory_key_padding_mask=padding(S_SRC),
            )
    return inputs


def run_with_grads(model, inputs, seed=5):
    inputs = {
        k: (v.detach().clone().requires_grad_() if torch.is_tensor(v) and v.requires_grad else v)
        for k, v in inputs.items()
    }
    torch.manual_seed(seed)  # the layers' dropout masks
    out = model(**inputs)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=f64)
    named = {f"input.{k}": v for k, v in inputs.items() if torch.is_tensor(v) and v.requires_grad}
    named.update({f"param.{k}": p for k, p in model.named_parameters()})
    grads = torch.autograd.grad((out * cotangent).sum(), list(named.values()))
    return out, dict(zip(named, grads))


# A float causal mask with a bool padding mask: torch's deprecation warning, in both models.
@pytest.mark.filterwarnings("ignore:Support for mismatched")
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("with_masks", [False, True], ids=["no_masks", "masks"])
@pytest.mark.parametrize("mode", ["train", "eval_with_grad"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("kind", ["encoder", "decoder", "transformer"])
def test_same_outputs_and_gradients_after_replace(kind, batch_first, mode, with_masks, monkeypatch):
    theirs = build(kind, batch_first)
    ours = replace_attention(copy.deepcopy(theirs))
    for model in (theirs, ours):
        model.train(mode == "train")
    inputs = make_inputs(kind, batch_first, with_masks)
    expected_out, expected_grads = run_with_grads(theirs, inputs)
    calls = count_our_attention_calls(monkeypatch)
    out, grads = run_with_grads(ours, inputs)

    attention_modules = {"encoder": 2, "decoder": 4, "transformer": 6}[kind]
    assert calls["n"] == attention_modules
    torch.testing.assert_close(out, expected_out, **TOL)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(
            grads[name], expected_grads[name], **TOL, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_fused_inference_path_is_not_taken_after_replace(norm_first, monkeypatch):
    """Eval mode without grad: torch's TransformerEncoderLayer would run
    torch._transformer_encoder_layer_fwd on in_proj_weight, bypassing self_attn. After
    replace_attention our module runs, with the same result."""
    layer = nn.TransformerEncoderLayer(
        D_MODEL, HEADS, FF, batch_first=True, norm_first=norm_first, dtype=f64
    ).eval()
    ours = replace_attention(copy.deepcopy(layer))
    x = torch.randn(N, S_SRC, D_MODEL, dtype=f64)
    fused_calls = {"n": 0}
    original_fused = torch._transformer_encoder_layer_fwd

    def counting_fused(*args, **kwargs):
        fused_calls["n"] += 1
        return original_fused(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting_fused)
    with torch.no_grad():
        expected = layer(x)
        assert fused_calls["n"] == 1, "torch's fused path was expected for the original layer"
        calls = count_our_attention_calls(monkeypatch)
        out = ours(x)
    assert fused_calls["n"] == 1 and calls["n"] == 1
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")
def test_encoder_nested_tensor_path_is_switched_off_after_replace(monkeypatch):
    """nn.TransformerEncoder turns padded input into nested tensors in eval mode without
    grad; after replace_attention it passes the padded input and the mask to our module. The
    outputs agree with torch's at every position that is not padding (torch's nested path
    gives zeros at padding, its regular path does not)."""
    layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, FF, batch_first=True, dtype=f64)
    theirs = nn.TransformerEncoder(layer, num_layers=2).eval()
    assert theirs.use_nested_tensor
    ours = replace_attention(copy.deepcopy(theirs))
    assert not ours.use_nested_tensor
    x = torch.randn(N, S_SRC, D_MODEL, dtype=f64)
    padding = torch.zeros(N, S_SRC, dtype=torch.bool)
    padding[0, 4:] = True
    padding[2, 2:] = True
    calls = count_our_attention_calls(monkeypatch)
    with torch.no_grad():
        expected = theirs(x, src_key_padding_mask=padding)
        assert calls["n"] == 0
        out = ours(x, src_key_padding_mask=padding)
    assert calls["n"] == 2
    torch.testing.assert_close(out[~padding], expected[~padding], **TOL)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_replace_keeps_parameters_mode_dtype_and_requires_grad():
    model = build("transformer", batch_first=True).eval()
    model.encoder.layers[0].self_attn.in_proj_bias.requires_grad_(False)
    before = [
        (name, id(p), p.dtype, p.device, p.requires_grad) for name, p in model.named_parameters()
    ]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert replace_attention(model) is model
    after = [
        (name, id(p), p.dtype, p.device, p.requires_grad) for name, p in model.named_parameters()
    ]
    assert after == before  # the same Parameter objects: an existing optimizer keeps working
    assert list(model.state_dict()) == list(state)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name])
    attentions = [m for m in model.modules() if isinstance(m, qkv_attention.MultiheadAttention)]
    assert len(attentions) == 6
    assert not any(type(m) is nn.MultiheadAttention for m in model.modules())
    assert all(not m.training for m in attentions)
    model.train()
    assert all(m.training for m in attentions)


def test_replace_does_not_draw_random_numbers():
    """A seeded run is the same with or without the swap."""
    model = build("encoder", batch_first=True)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    replace_attention(model)
    assert torch.equal(torch.get_rng_state(), state)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2)
        self.blocks = nn.ModuleList([self.attention, nn.Linear(8, 8)])
        self.custom = CustomAttention(8, 2)


class CustomAttention(nn.MultiheadAttention):
    """A subclass may change forward; replace_attention leaves it alone."""


def test_shared_module_gets_one_replacement_and_subclasses_are_kept():
    model = replace_attention(Tied())
    assert isinstance(model.attention, qkv_attention.MultiheadAttention)
    assert model.blocks[0] is model.attention
    assert type(model.custom) is CustomAttention


def test_model_that_is_a_multihead_attention_gets_its_replacement_returned():
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(8, 2, kdim=3, vdim=5, add_bias_kv=True, dtype=f64)
    ours = replace_attention(theirs)
    assert type(ours) is qkv_attention.MultiheadAttention
    q, k, v = (
        torch.randn(4, 2, 8, dtype=f64),
        torch.randn(3, 2, 3, dtype=f64),
        torch.randn(3, 2, 5, dtype=f64),
    )
    for a, b in zip(ours(q, k, v), theirs(q, k, v)):
        torch.testing.assert_close(a, b, **TOL)
