"""qkv_attention.functional.scaled_dot_product_attention against torch's, argument for argument:
any number of leading batch dims, broadcast batch dims and masks, enable_gqa, dropout."""

import pytest
import torch
import torch.nn.functional as F

from helpers import SAME_DTYPE_TOLERANCE, random_bool_mask, random_tensor
from qkv_attention.functional import scaled_dot_product_attention

ops = torch.ops.qkv_attention
pytestmark = pytest.mark.usefixtures("seed_torch")

L, S, E, EV = 4, 6, 5, 3


def compare_with_torch(dtype, query_shape, key_shape, value_shape, mask=None, **kwargs):
    """Forward and every gradient (query, key, value and a float mask that requires grad) of
    ours against torch's on the same inputs."""
    leaves = {
        "query": random_tensor(*query_shape, dtype=dtype),
        "key": random_tensor(*key_shape, dtype=dtype),
        "value": random_tensor(*value_shape, dtype=dtype),
    }
    if mask is not None and mask.is_floating_point():
        leaves["attn_mask"] = mask

    def run(function):
        inputs = {name: t.detach().clone().requires_grad_() for name, t in leaves.items()}
        inputs.setdefault("attn_mask", mask)
        out = function(**inputs, **kwargs)
        grad_output = torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)
        out.backward(grad_output)
        return out.detach(), {name: inputs[name].grad for name in leaves}

    ours, our_grads = run(scaled_dot_product_attention)
    theirs, their_grads = run(F.scaled_dot_product_attention)
    tolerance = SAME_DTYPE_TOLERANCE[dtype]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, **tolerance)
    for name in leaves:
        assert our_grads[name].shape == leaves[name].shape, name
        torch.testing.assert_close(our_grads[name], their_grads[name], **tolerance, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("batch", [(), (3,), (2, 3), (2, 1, 3)], ids=lambda b: f"batch{len(b)}")
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_leading_batch_dims(dtype, batch, is_causal):
    compare_with_torch(
        dtype, (*batch, L, E), (*batch, S, E), (*batch, S, EV), is_causal=is_causal, scale=0.45
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "query_batch, key_batch, value_batch",
    [((2, 3), (1, 3), (2, 1)), ((2, 1, 3), (4, 1), (2, 4, 3)), ((3,), (2, 3), (1,))],
    ids=["pairs", "three_dims", "query_broadcast"],
)
def test_broadcast_batch_dims(dtype, query_batch, key_batch, value_batch):
    compare_with_torch(dtype, (*query_batch, L, E), (*key_batch, S, E), (*value_batch, S, EV))


MASK_SHAPES = {
    "LS": (L, S),
    "S": (S,),
    "head_only": (3, 1, S),
    "batch_only": (2, 1, 1, L, S),
    "column": (1, 2, 3, L, 1),
    "full": (2, 2, 3, L, S),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", MASK_SHAPES.values(), ids=MASK_SHAPES.keys())
def test_masks_broadcast_in_any_dim(dtype, mask_kind, mask_shape):
    batch = (2, 2, 3)
    if mask_kind == "bool":
        mask = random_bool_mask(*mask_shape, keep_probability=0.8)
    else:
        mask = random_tensor(*mask_shape, dtype=dtype, scale=0.5)
    compare_with_torch(dtype, (*batch, L, E), (*batch, S, E), (*batch, S, EV), mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kv_heads", [1, 2, 6])
def test_enable_gqa(dtype, kv_heads):
    mask = random_tensor(6, L, S, dtype=dtype, scale=0.5)
    compare_with_torch(
        dtype,
        (2, 6, L, E),
        (2, kv_heads, S, E),
        (2, kv_heads, S, EV),
        mask=mask,
        enable_gqa=True,
        scale=0.7,
    )


def test_dropout_is_reproducible_and_is_our_operator():
    query, key, value = (
        random_tensor(2, 3, n, f, dtype=torch.float32) for n, f in ((L, E), (S, E), (S, EV))
    )
    torch.manual_seed(4)
    first = scaled_dot_product_attention(query, key, value, dropout_p=0.4)
    torch.manual_seed(4)
    second = scaled_dot_product_attention(query, key, value, dropout_p=0.4)
    assert torch.equal(first, second)
    # It draws exactly the mask the operator draws for the same (B, H, L, S) under that seed.
    torch.manual_seed(4)
    assert torch.equal(first, ops.attention(query, key, value, None, 0.4))
    assert not torch.allclose(first, scaled_dot_product_attention(query, key, value))
    # and with leading dims flattened: (2, 3) batch -> (B, H) = (2, 3)
    torch.manual_seed(5)
    reshaped = scaled_dot_product_attention(query[None], key[None], value[None], dropout_p=0.4)
    torch.manual_seed(5)
    assert torch.equal(reshaped[0], ops.attention(query, key, value, None, 0.4))
