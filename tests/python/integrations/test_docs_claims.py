"""What README.md and docs/ say torch 2.13 does, checked against the installed torch.

Each test names the sentence it keeps true (docs/differences.md and the mask table of
docs/api.md). Claims already covered elsewhere are not repeated here: the module's NaN rows
(module/test_module_reference.py), mixed-dtype biases (module/test_module_dtypes.py), the
fused encoder-layer kernel (integrations/test_torchscript.py), Inductor's random stream
(integrations/test_compile.py).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qkv_attention
from qkv_attention import functional


def _qkv(*shape, dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=generator, dtype=dtype) for _ in range(3)]


def test_torch_sdpa_accepts_is_causal_with_attn_mask_and_combines_them_as_we_do():
    """api.md: SDPA's `is_causal` flag combines with `attn_mask` (torch 2.13 on the CPU)."""
    q, k, v = _qkv(2, 2, 5, 4)
    mask = torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) < 0.7
    mask[:, 0] = True
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    torch.testing.assert_close(
        theirs, F.scaled_dot_product_attention(q, k, v, attn_mask=mask & causal)
    )
    ours = functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("module_class", [nn.MultiheadAttention, qkv_attention.MultiheadAttention])
def test_the_modules_is_causal_hint_requires_attn_mask(module_class):
    """api.md: the module's `is_causal` is a hint that requires `attn_mask` (torch 2.13 raises)."""
    module = module_class(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        module(x, x, x, is_causal=True)


def test_torchs_module_takes_nested_tensors_only_on_its_inference_fast_path():
    """differences.md: torch's module takes nested inputs only in eval without grad, strided."""
    theirs = nn.MultiheadAttention(8, 2, batch_first=True)
    parts = [torch.randn(3, 8), torch.randn(5, 8)]
    strided = torch.nested.nested_tensor(parts)
    jagged = torch.nested.nested_tensor(parts, layout=torch.jagged)
    with pytest.raises(AssertionError, match="fast path"):  # training
        theirs(strided, strided, strided, need_weights=False)
    theirs.eval()
    with torch.no_grad():
        theirs(strided, strided, strided, need_weights=False)  # the fast path
        with pytest.raises(AssertionError, match="fast path"):
            theirs(jagged, jagged, jagged, need_weights=False)
    ours = qkv_attention.MultiheadAttention(8, 2, batch_first=True)
    ours.load_state_dict(theirs.state_dict())
    out, _ = ours(jagged, jagged, jagged, need_weights=False)  # training, with grad
    assert [tuple(t.shape) for t in out.unbind()] == [(3, 8), (5, 8)]


def test_torch_func_grad_runs_on_torchs_module_and_raises_on_ours():
    """differences.md: torch.func's grad is not supported on ours; torch's module supports it."""
    x = torch.randn(2, 5, 8)
    theirs = nn.MultiheadAttention(8, 2, batch_first=True)
    params = {name: p.detach() for name, p in theirs.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(theirs, p, (x, x, x))[0].sum())(
        params
    )
    assert set(grads) == set(params)
    ours = qkv_attention.MultiheadAttention(8, 2, batch_first=True)
    params = {name: p.detach() for name, p in ours.named_parameters()}
    with pytest.raises(NotImplementedError, match="torch.autograd.grad"):
        torch.func.grad(lambda p: torch.func.functional_call(ours, p, (x, x, x))[0].sum())(params)


def test_a_scale_beyond_float32_gives_nan_in_torchs_sdpa_and_raises_in_ours():
    """differences.md: a scale above float32's range raises naming `scale`; torch's SDPA: NaN."""
    q, k, v = _qkv(1, 1, 4, 8, dtype=torch.float32)
    assert F.scaled_dot_product_attention(q, k, v, scale=1e39).isnan().any()
    with pytest.raises(RuntimeError, match="scale"):
        qkv_attention.ops.attention(q, k, v, scale=1e39)


def test_torchs_jagged_sdpa_refuses_attn_mask_too():
    """differences.md and api.md: `attn_mask` with jagged inputs raises, as in torch."""
    values = torch.randn(8, 2, 4)
    q = torch.nested.nested_tensor_from_jagged(values, torch.tensor([0, 3, 8])).transpose(1, 2)
    with pytest.raises(ValueError, match="Masks are not yet supported"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(1, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="attn_mask"):
        functional.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(1, dtype=torch.bool))
