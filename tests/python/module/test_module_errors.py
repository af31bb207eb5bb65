"""Bad inputs: our MultiheadAttention raises the exception type torch.nn.MultiheadAttention
raises, with a message that names the offending argument and what was found."""

import pytest
import torch
from torch import nn

import qkv_attention

E, H = 8, 2
f64 = torch.float64


def x(*shape, dtype=f64):
    return torch.randn(*shape, dtype=dtype)


PACKED = dict(embed_dim=E, num_heads=H)
SEPARATE = dict(embed_dim=E, num_heads=H, kdim=5, vdim=6)

# (id, module config, query/key/value, forward kwargs, exception type, regex our message matches)
CASES = [
    (
        "query_4d",
        PACKED,
        (x(3, 2, 1, E),) * 3,
        {},
        AssertionError,
        r"unbatched 2D or batched 3D.*4-D query",
    ),
    ("query_1d", PACKED, (x(E),) * 3, {}, AssertionError, r"unbatched 2D or batched 3D.*1-D"),
    (
        "batched_query_2d_key",
        PACKED,
        (x(3, 2, E), x(4, E), x(4, E)),
        {},
        AssertionError,
        r"batched \(3-D\) `query`.*`key` and `value` to be 3-D.*2-D",
    ),
    (
        "unbatched_query_3d_value",
        PACKED,
        (x(3, E), x(4, E), x(4, 1, E)),
        {},
        AssertionError,
        r"unbatched \(2-D\) `query`.*`key` and `value` to be 2-D",
    ),
    (
        "batched_kpm_1d",
        PACKED,
        (x(3, 2, E),) * 3,
        dict(key_padding_mask=torch.zeros(3).bool()),
        AssertionError,
        r"key_padding_mask.*2-D.*1-D",
    ),
    (
        "batched_kpm_3d",
        PACKED,
        (x(3, 2, E),) * 3,
        dict(key_padding_mask=torch.zeros(2, 3, 1).bool()),
        AssertionError,
        r"key_padding_mask.*2-D.*3-D",
    ),
    (
        "unbatched_kpm_2d",
        PACKED,
        (x(3, E),) * 3,
        dict(key_padding_mask=torch.zeros(1, 3).bool()),
        AssertionError,
        r"key_padding_mask.*1-D.*2-D",
    ),
    (
        "attn_mask_4d",
        PACKED,
        (x(3, 2, E),) * 3,
        dict(attn_mask=torch.zeros(2, 2, 3, 3).bool()),
        AssertionError,
        r"attn_mask.*2-D or 3-D.*4-D",
    ),
    (
        "unbatched_attn_mask_3d_wrong",
        PACKED,
        (x(3, E),) * 3,
        dict(attn_mask=torch.zeros(4, 3, 3).bool()),
        AssertionError,
        r"attn_mask.*\(2, 3, 3\).*\(4, 3, 3\)",
    ),
    (
        "attn_mask_int",
        PACKED,
        (x(3, 2, E),) * 3,
        dict(attn_mask=torch.zeros(3, 3).long()),
        AssertionError,
        r"bool and floating types of attn_mask.*int64",
    ),
    (
        "kpm_int",
        PACKED,
        (x(3, 2, E),) * 3,
        dict(key_padding_mask=torch.zeros(2, 3).int()),
        AssertionError,
        r"bool and floating types of key_padding_mask.*int32",
    ),
    (
        "query_features",
        PACKED,
        (x(3, 2, E + 1), x(3, 2, E), x(3, 2, E)),
        {},
        AssertionError,
        r"embedding dimension of 8, but got 9",
    ),
    (
        "packed_key_value_shapes",
        PACKED,
        (x(3, 2, E), x(4, 2, E), x(5, 2, E)),
        {},
        AssertionError,
        r"key shape does not match value shape.*key \(4, 2, 8\), value \(5, 2, 8\)",
    ),
    (
        "packed_key_features",
        PACKED,
        (x(3, 2, E), x(4, 2, 5), x(4, 2, 5)),
        {},
        RuntimeError,
        r"key and value have 5 features but kdim = vdim = embed_dim = 8",
    ),
    (
        "separate_key_value_lengths",
        SEPARATE,
        (x(3, 2, E), x(4, 2, 5), x(7, 2, 6)),
        {},
        AssertionError,
        r"key and value must have the same batch size and sequence length",
    ),
    (
        "separate_key_features",
        SEPARATE,
        (x(3, 2, E), x(4, 2, 4), x(4, 2, 6)),
        {},
        AssertionError,
        r"key has 4 features, kdim is 5",
    ),
    (
        "separate_value_features",
        SEPARATE,
        (x(3, 2, E), x(4, 2, 5), x(4, 2, 5)),
        {},
        AssertionError,
        r"value has 5 features, vdim is 6",
    ),
    (
        "attn_mask_2d_shape",
        PACKED,
        (x(3, 2, E), x(4, 2, E), x(4, 2, E)),
        dict(attn_mask=torch.zeros(3, 3).bool()),
        RuntimeError,
        r"2D attn_mask is torch.Size\(\[3, 3\]\), but should be \(3, 4\)",
    ),
    (
        "attn_mask_3d_shape",
        PACKED,
        (x(3, 2, E), x(4, 2, E), x(4, 2, E)),
        dict(attn_mask=torch.zeros(2, 3, 4).bool()),
        RuntimeError,
        r"3D attn_mask is torch.Size\(\[2, 3, 4\]\), but should be \(4, 3, 4\)",
    ),
    (
        "kpm_batch",
        PACKED,
        (x(3, 2, E), x(4, 2, E), x(4, 2, E)),
        dict(key_padding_mask=torch.zeros(3, 4).bool()),
        AssertionError,
        r"key_padding_mask must have shape \(N, S\) = \(2, 4\), but has shape \(3, 4\)",
    ),
    (
        "kpm_length",
        PACKED,
        (x(3, 2, E), x(4, 2, E), x(4, 2, E)),
        dict(key_padding_mask=torch.zeros(2, 3).bool()),
        AssertionError,
        r"key_padding_mask must have shape \(N, S\) = \(2, 4\), but has shape \(2, 3\)",
    ),
    (
        "unbatched_kpm_length",
        PACKED,
        (x(3, E), x(4, E), x(4, E)),
        dict(key_padding_mask=torch.zeros(3).bool()),
        AssertionError,
        r"key_padding_mask must have shape \(S,\) = \(4,\), but has shape \(3,\)",
    ),
    (
        "key_batch",
        PACKED,
        (x(3, 2, E), x(4, 3, E), x(4, 3, E)),
        {},
        RuntimeError,
        r"key and value have batch size 3 but query has 2",
    ),
    (
        "key_batch_with_bias_kv",
        dict(PACKED, add_bias_kv=True),
        (x(3, 2, E), x(4, 3, E), x(4, 3, E)),
        {},
        RuntimeError,
        r"key and value have batch size 3 but query has 2",
    ),
    (
        "is_causal_without_mask",
        PACKED,
        (x(3, 2, E),) * 3,
        dict(is_causal=True),
        RuntimeError,
        r"Need attn_mask if specifying the is_causal hint",
    ),
    (
        "query_dtype_vs_parameters",
        PACKED,
        (x(3, 2, E, dtype=torch.float32),) * 3,
        {},
        RuntimeError,
        r"query has dtype torch.float32 but the module's parameters have dtype "
        r"torch.float64",
    ),
    (
        "key_dtype",
        PACKED,
        (x(3, 2, E), x(3, 2, E, dtype=torch.float32), x(3, 2, E)),
        {},
        RuntimeError,
        r"key has dtype torch.float32 but query has dtype torch.float64",
    ),
    (
        "integer_query",
        PACKED,
        (torch.ones(3, 2, E, dtype=torch.long),) * 3,
        {},
        RuntimeError,
        r"query must be a floating point tensor.*int64",
    ),
    (
        "float_mask_dtype_with_weights",
        PACKED,
        (x(3, 2, E),) * 3,
        dict(attn_mask=torch.zeros(3, 3, dtype=torch.float32)),
        RuntimeError,
        r"float masks must have the query's dtype torch.float64.*attn_mask: torch.float32",
    ),
    (
        "float64_mask_float32_query",
        dict(PACKED),
        (x(3, 2, E, dtype=torch.float32),) * 3,
        dict(attn_mask=torch.zeros(3, 3, dtype=torch.float64), need_weights=False),
        RuntimeError,
        r"float masks must have the query's dtype torch.float32, .*attn_mask: "
        r"torch.float64",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_like_torch(case):
    name, config, (query, key, value), kwargs, error, message = case
    dtype = torch.float32 if name == "float64_mask_float32_query" else f64
    theirs = nn.MultiheadAttention(**config, dtype=dtype)
    ours = qkv_attention.MultiheadAttention(**config, dtype=dtype)
    with pytest.raises(Exception) as theirs_error:
        theirs(query, key, value, **kwargs)
    assert type(theirs_error.value) is error, f"torch raised {theirs_error.value!r}"
    with pytest.raises(Exception) as ours_error:
        ours(query, key, value, **kwargs)
    assert type(ours_error.value) is error, f"we raised {ours_error.value!r}"
    assert ours_error.match(message)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")
def test_nested_query_with_dense_key_and_value_is_refused_with_a_hint():
    """Nested inputs are taken when query, key and value all are (test_jagged.py); a nested
    query among dense key and value is refused, as by torch's module."""
    ours = qkv_attention.MultiheadAttention(E, H, batch_first=True)
    nested = torch.nested.nested_tensor([torch.randn(3, E), torch.randn(2, E)])
    dense = torch.randn(2, 3, E)
    with pytest.raises(AssertionError, match="use_nested_tensor"):
        ours(nested, dense, dense)
