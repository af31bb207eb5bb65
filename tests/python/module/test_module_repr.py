"""The module's repr says it is ours, so a printed model shows which attention it runs."""

import torch
from torch import nn

import qkv_attention


def test_repr_names_the_implementation_and_the_sizes():
    text = repr(qkv_attention.MultiheadAttention(8, 2, dropout=0.25, batch_first=True))
    assert "implementation=qkv_attention" in text
    assert "embed_dim=8, num_heads=2, dropout=0.25, batch_first=True" in text
    assert "kdim" not in text  # only shown when they differ from embed_dim


def test_repr_shows_kdim_and_vdim_when_they_differ():
    text = repr(qkv_attention.MultiheadAttention(8, 2, kdim=5, vdim=3))
    assert "kdim=5, vdim=3" in text


def test_a_model_prints_differently_after_replace_attention():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    before = repr(layer)
    assert "qkv_attention" not in before  # torch's module prints no fields
    qkv_attention.replace_attention(layer)
    after = repr(layer)
    assert after.count("implementation=qkv_attention") == 1
    assert "embed_dim=16, num_heads=2, dropout=0.1, batch_first=True" in after


def test_the_repr_does_not_stop_the_module_from_scripting():
    scripted = torch.jit.script(qkv_attention.MultiheadAttention(8, 2))
    x = torch.randn(3, 2, 8)
    assert scripted(x, x, x)[0].shape == (3, 2, 8)
