"""Jagged nested tensors (layout=torch.jagged) through functional.scaled_dot_product_attention
and MultiheadAttention, computed without padding by attention_varlen: against each sequence
computed on its own (our dense path and torch's SDPA) in float64 with gradients, causal, GQA,
dropout, torch.compile; strided nested tensors in the module as torch's fast path takes them."""

import pytest
import torch
import torch.nn.functional as F

import qkv_attention
from qkv_attention.functional import scaled_dot_product_attention as sdpa

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")

F64 = dict(atol=1e-10, rtol=1e-10)  # float64 against float64 (see test_varlen.py)


def jagged_bhjd(parts):
    """(B, H, j, D) jagged from per-sequence (L_b, H, D) tensors, as torch's docs build it."""
    nt = torch.nested.nested_tensor_from_jagged(
        torch.cat(parts), torch.tensor([0] + [p.size(0) for p in parts]).cumsum(0)
    )
    return nt.transpose(1, 2)


def leaf_parts(lengths, H, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, H, D, generator=g, dtype=torch.float64) for n in lengths]


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_functional_jagged_matches_per_sequence_sdpa_with_gradients(is_causal, kv_heads):
    lengths_q, lengths_k = [1, 7, 40, 2], [3, 7, 40, 5]
    values = [
        torch.cat(leaf_parts(lengths_q, 4, 8, 0)),
        torch.cat(leaf_parts(lengths_k, kv_heads, 8, 1)),
        torch.cat(leaf_parts(lengths_k, kv_heads, 6, 2)),
    ]
    leaves = [t.clone().requires_grad_() for t in values]
    cu_q = torch.tensor([0] + lengths_q).cumsum(0)
    cu_k = torch.tensor([0] + lengths_k).cumsum(0)
    q = torch.nested.nested_tensor_from_jagged(leaves[0], cu_q).transpose(1, 2)
    k = torch.nested.nested_tensor_from_jagged(leaves[1], cu_k).transpose(1, 2)
    v = torch.nested.nested_tensor_from_jagged(leaves[2], cu_k).transpose(1, 2)
    out = sdpa(q, k, v, is_causal=is_causal, scale=0.4, enable_gqa=True)
    assert out.is_nested and out.layout == torch.jagged and out._ragged_idx == 2
    out_values = out.transpose(1, 2).values()  # (total_q, H, Dv)
    grad = torch.randn_like(out_values)
    grads = torch.autograd.grad(out_values, leaves, grad)

    refs = [t.clone().requires_grad_() for t in values]
    expected = []
    for b in range(len(lengths_q)):
        qb = refs[0][cu_q[b] : cu_q[b + 1]].transpose(0, 1)
        kb = refs[1][cu_k[b] : cu_k[b + 1]].transpose(0, 1)
        vb = refs[2][cu_k[b] : cu_k[b + 1]].transpose(0, 1)
        mask = torch.ones(qb.size(1), kb.size(1), dtype=torch.bool).tril() if is_causal else None
        expected.append(
            F.scaled_dot_product_attention(
                qb, kb, vb, attn_mask=mask, scale=0.4, enable_gqa=True
            ).transpose(0, 1)
        )
    expected = torch.cat(expected)
    torch.testing.assert_close(out_values, expected, **F64)
    for got, want in zip(grads, torch.autograd.grad(expected, refs, grad)):
        torch.testing.assert_close(got, want, **F64)


def test_functional_jagged_matches_torchs_jagged_sdpa():
    parts = leaf_parts([5, 1, 12], 2, 8, 3)
    q = jagged_bhjd(parts)
    ours = sdpa(q, q, q)
    theirs = F.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(
        ours.transpose(1, 2).values(), theirs.transpose(1, 2).values(), **F64
    )


def test_functional_jagged_dropout_is_reproducible():
    q = jagged_bhjd(leaf_parts([5, 9, 12], 2, 8, 4))
    torch.manual_seed(0)
    a = sdpa(q, q, q, dropout_p=0.5)
    torch.manual_seed(0)
    b = sdpa(q, q, q, dropout_p=0.5)
    assert torch.equal(a.transpose(1, 2).values(), b.transpose(1, 2).values())


def test_functional_jagged_refuses_attn_mask_and_mixed_inputs():
    q = jagged_bhjd(leaf_parts([2, 3], 2, 4, 5))
    with pytest.raises(RuntimeError, match="attn_mask is not supported with jagged"):
        sdpa(q, q, q, attn_mask=torch.ones(1, dtype=torch.bool))
    with pytest.raises(
        NotImplementedError, match="key must be a dense tensor, but is a NestedTensor"
    ):
        sdpa(torch.randn(2, 2, 3, 4, dtype=torch.float64), q, q)
    kv = jagged_bhjd(leaf_parts([2, 3], 1, 4, 6))
    with pytest.raises(RuntimeError, match="pass enable_gqa=True"):
        sdpa(q, kv, kv)


def test_functional_jagged_compiles():
    q = jagged_bhjd(leaf_parts([3, 6, 2], 2, 8, 7))
    compiled = torch.compile(lambda a: sdpa(a, a, a, is_causal=True), backend="aot_eager")
    torch.testing.assert_close(
        compiled(q).transpose(1, 2).values(),
        sdpa(q, q, q, is_causal=True).transpose(1, 2).values(),
        **F64,
    )


def module_pair(E=16, H=4, **kw):
    torch.manual_seed(0)
    return qkv_attention.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64, **kw)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("self_attention", [True, False])
def test_module_jagged_matches_each_sequence_alone(training, self_attention):
    module = module_pair().train(training)
    module.dropout = 0.0
    lengths, kv_lengths = [3, 1, 11, 6], [4, 2, 11, 1]
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 16, generator=g, dtype=torch.float64) for n in lengths]
    ys = (
        xs
        if self_attention
        else [torch.randn(n, 16, generator=g, dtype=torch.float64) for n in kv_lengths]
    )
    x = torch.nested.as_nested_tensor(xs, layout=torch.jagged).requires_grad_()
    y = x if self_attention else torch.nested.as_nested_tensor(ys, layout=torch.jagged)
    out, weights = module(x, y, y, need_weights=False)
    assert weights is None and out.is_nested and out.layout == torch.jagged
    out.values().sum().backward()
    grad_in = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    expected = [
        module(a.unsqueeze(0), b.unsqueeze(0), b.unsqueeze(0), need_weights=False)[0][0]
        for a, b in zip(xs, ys)
    ]
    torch.testing.assert_close(out.values(), torch.cat(expected), **F64)
    torch.cat(expected).sum().backward()
    for name, p in module.named_parameters():
        torch.testing.assert_close(grad_in[name], p.grad, **F64)


@pytest.mark.parametrize(
    "extra",
    [dict(add_bias_kv=True), dict(add_zero_attn=True), dict(add_bias_kv=True, add_zero_attn=True)],
)
@pytest.mark.parametrize("need_weights", [False, True])
def test_module_jagged_with_extra_key_columns_matches_each_sequence_alone(extra, need_weights):
    module = module_pair(**extra).eval()
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(n, 16, generator=g, dtype=torch.float64) for n in (3, 1, 5)]
    x = torch.nested.as_nested_tensor(xs, layout=torch.jagged)
    out, weights = module(x, x, x, need_weights=need_weights)
    assert out.is_nested and (weights is not None) == need_weights
    expected = [module(a, a, a, need_weights=False)[0] for a in xs]
    torch.testing.assert_close(out.values(), torch.cat(expected), **F64)


def test_module_strided_nested_matches_torchs_fast_path():
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    ours = qkv_attention.MultiheadAttention(16, 4, batch_first=True).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.nested.nested_tensor([torch.randn(3, 16), torch.randn(5, 16)])
    with torch.no_grad():
        for need_weights in (False, True):
            mine, my_weights = ours(x, x, x, need_weights=need_weights)
            ref, ref_weights = theirs(x, x, x, need_weights=need_weights)
            assert mine.is_nested and mine.layout == torch.strided
            for a, b in zip(mine.unbind(), ref.unbind()):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            if need_weights:
                torch.testing.assert_close(my_weights, ref_weights, atol=1e-5, rtol=1e-5)
            else:
                assert my_weights is None and ref_weights is None


def test_module_jagged_refuses_masks_and_needs_batch_first():
    module = module_pair()
    x = torch.nested.as_nested_tensor(
        [torch.randn(2, 16, dtype=torch.float64)], layout=torch.jagged
    )
    with pytest.raises(NotImplementedError, match="key_padding_mask is not supported"):
        module(x, x, x, key_padding_mask=torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(AssertionError, match="batch_first=True"):
        qkv_attention.MultiheadAttention(16, 4, dtype=torch.float64)(x, x, x)


def test_module_refuses_an_empty_nested_tensor_with_torchs_message():
    # torch.nested.nested_tensor([]) is 1-D; torch's own test expects its module's rank error.
    empty = torch.nested.nested_tensor([])
    with pytest.raises(AssertionError, match="received 1-D query tensor"):
        module_pair()(empty, empty, empty)


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")
def test_module_with_jagged_input_still_scripts_for_dense_input():
    module = module_pair()
    scripted = torch.jit.script(module)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    torch.testing.assert_close(scripted(x, x, x)[0], module(x, x, x)[0], **F64)


def test_replace_attention_keeps_encoder_layers_off_torchs_nested_fast_path():
    layer = torch.nn.TransformerEncoderLayer(16, 4, batch_first=True, dropout=0.0)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    qkv_attention.replace_attention(encoder)
    assert not encoder.use_nested_tensor
    x = torch.randn(2, 5, 16)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    calls = []
    for mod in encoder.modules():
        if isinstance(mod, qkv_attention.MultiheadAttention):
            mod.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = encoder(x, src_key_padding_mask=padding)
    assert not out.is_nested and len(calls) == 2  # our module ran in both layers
