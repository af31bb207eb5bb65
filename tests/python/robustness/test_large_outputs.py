"""Outputs of 16 MiB and more get pages of their own (csrc/cpu/large_tensor.h): they must behave
as any other CPU tensor does — in-place ops, resize, shared memory, pickling, autograd."""

import io

import torch

import qkv_attention  # noqa: F401

ops = torch.ops.qkv_attention
MiB = 1 << 20


def large_projection(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8192, 512, generator=g, requires_grad=requires_grad)
    w = [torch.randn(512, 512, generator=g) / 512**0.5 for _ in range(3)]
    return x, w, ops.qkv_projection(x, x, x, *w, None, None, None, 8)


def test_large_outputs_hold_the_projection():
    x, w, (q, k, v) = large_projection()
    assert q.numel() * q.element_size() >= 16 * MiB
    for out, weight in zip((q, k, v), w):
        expected = (x @ weight.T).view(1, 8192, 8, 64).transpose(1, 2)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert out.is_contiguous()


def test_large_outputs_take_in_place_ops_resize_and_shared_memory():
    _, _, (q, _, _) = large_projection()
    expected = q.clone()
    q.add_(1.0)
    torch.testing.assert_close(q, expected + 1.0)
    q.resize_(2, 8, 8192, 64)  # grows past the mapping: a new block, the old values kept
    torch.testing.assert_close(q[:1], expected + 1.0)
    q.fill_(3.0)
    assert bool((q == 3.0).all())
    q.resize_(16)
    assert q.shape == (16,)
    _, _, (k, _, _) = large_projection()
    shared = k.share_memory_()
    assert shared.is_shared()
    torch.testing.assert_close(shared, expected)


def test_large_outputs_round_trip_through_torch_save():
    _, _, (q, _, _) = large_projection()
    buffer = io.BytesIO()
    torch.save(q, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer), q, rtol=0, atol=0)


def test_large_outputs_and_gradients_flow_through_autograd():
    x, w, outs = large_projection(requires_grad=True)
    sum(o.sum() for o in outs).backward()
    # d/dx of sum(x W^T) over the three projections is the column sums of the W's.
    expected = sum(weight.sum(0) for weight in w).expand(1, 8192, 512)
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-3)
    del outs  # the mapped blocks go back here; nothing may touch them afterwards
    assert x.grad.abs().sum() > 0
