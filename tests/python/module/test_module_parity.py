"""Our MultiheadAttention against torch.nn.MultiheadAttention itself: outputs, attention weights
and the gradients of the inputs, float masks and every parameter, over a matrix of options."""

import itertools
import warnings

import pytest
import torch

from helpers.module import (
    assert_results_match,
    bool_mask_keeping_first_column,
    clone_inputs,
    float_mask_keeping_first_column,
    forward_and_grads,
    module_pair,
)

# Module configurations: head counts (1, 2, 3, 6), E not a power of two, kdim/vdim, bias,
# add_bias_kv, add_zero_attn and combinations.
CONFIGS = {
    "packed_E12_H3": dict(embed_dim=12, num_heads=3),
    "one_head_E5": dict(embed_dim=5, num_heads=1),
    "E18_H6": dict(embed_dim=18, num_heads=6),
    "kdim_vdim": dict(embed_dim=8, num_heads=2, kdim=5, vdim=7),
    "kdim_only": dict(embed_dim=8, num_heads=2, kdim=6),
    "no_bias": dict(embed_dim=12, num_heads=3, bias=False),
    "bias_kv": dict(embed_dim=12, num_heads=3, add_bias_kv=True),
    "zero_attn": dict(embed_dim=12, num_heads=3, add_zero_attn=True),
    "everything": dict(
        embed_dim=10, num_heads=2, kdim=3, vdim=4, bias=False, add_bias_kv=True, add_zero_attn=True
    ),
}

LAYOUTS = ("seq_first", "batch_first", "unbatched")

# (key_padding_mask kind, attn_mask kind)
MASKS = {
    "none": (None, None),
    "kpm_bool": ("bool", None),
    "kpm_float": ("float", None),
    "attn2d_bool": (None, "bool2d"),
    "attn2d_float": (None, "float2d"),
    "attn3d_bool": (None, "bool3d"),
    "attn3d_float": (None, "float3d"),
    "both_bool": ("bool", "bool2d"),
    "both_float_3d": ("float", "float3d"),
    "mixed_bool_kpm_float_attn": ("bool", "float2d"),
}

WEIGHTS = {
    "no_weights": dict(need_weights=False),
    "averaged": dict(need_weights=True, average_attn_weights=True),
    "per_head": dict(need_weights=True, average_attn_weights=False),
}

N, L, S = 2, 4, 5  # batch, queries, keys (L != S)


def make_inputs(config, layout, masks, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    E = config["embed_dim"]
    H = config["num_heads"]
    Ek, Ev = config.get("kdim") or E, config.get("vdim") or E

    def x(seq, features):
        shape = {
            "seq_first": (seq, N, features),
            "batch_first": (N, seq, features),
            "unbatched": (seq, features),
        }[layout]
        return (
            torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
        )

    inputs = dict(query=x(L, E), key=x(S, Ek), value=x(S, Ev))
    kpm_kind, attn_kind = masks
    kpm_shape = (S,) if layout == "unbatched" else (N, S)
    if kpm_kind == "bool":
        inputs["key_padding_mask"] = bool_mask_keeping_first_column(*kpm_shape, generator=generator)
    elif kpm_kind == "float":
        inputs["key_padding_mask"] = float_mask_keeping_first_column(
            *kpm_shape, dtype=dtype, generator=generator
        ).requires_grad_()
    if attn_kind is not None:
        batch_heads = H if layout == "unbatched" else N * H
        shape = (L, S) if attn_kind.endswith("2d") else (batch_heads, L, S)
        if attn_kind.startswith("bool"):
            inputs["attn_mask"] = bool_mask_keeping_first_column(*shape, generator=generator)
        else:
            inputs["attn_mask"] = float_mask_keeping_first_column(
                *shape, dtype=dtype, generator=generator
            ).requires_grad_()
    return inputs


def compare_with_torch(config_name, layout, mask_name, weights_name, dtype):
    config = dict(CONFIGS[config_name], batch_first=(layout == "batch_first"))
    theirs, ours = module_pair(dtype=dtype, **config)
    inputs = make_inputs(config, layout, MASKS[mask_name], dtype)
    kwargs = WEIGHTS[weights_name]
    with warnings.catch_warnings():
        # bool key_padding_mask with a float attn_mask: both modules warn (tested elsewhere).
        warnings.simplefilter("ignore")
        expected = forward_and_grads(theirs, clone_inputs(inputs), **kwargs)
        actual = forward_and_grads(ours, clone_inputs(inputs), **kwargs)
    assert_results_match(
        actual, expected, dtype, f"{config_name}/{layout}/{mask_name}/{weights_name}/{dtype}"
    )


@pytest.mark.parametrize("weights_name", WEIGHTS)
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_matches_torch_float64(config_name, layout, mask_name, weights_name):
    compare_with_torch(config_name, layout, mask_name, weights_name, torch.float64)


# float32: every configuration and layout, with a representative subset of masks.
@pytest.mark.parametrize("weights_name", WEIGHTS)
@pytest.mark.parametrize("mask_name", ["none", "both_bool", "both_float_3d"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_matches_torch_float32(config_name, layout, mask_name, weights_name):
    compare_with_torch(config_name, layout, mask_name, weights_name, torch.float32)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("config_name", ["packed_E12_H3", "bias_kv", "zero_attn", "no_bias"])
def test_self_attention_with_one_input_tensor_matches_torch(config_name, need_weights):
    """query is key is value (the common self-attention call; torch projects it in one GEMM):
    gradients from the three uses accumulate into one tensor."""
    config = dict(CONFIGS[config_name], batch_first=True)
    theirs, ours = module_pair(**config)
    x = torch.randn(N, L, config["embed_dim"], dtype=torch.float64, requires_grad=True)
    inputs = dict(query=x, key=x, value=x, key_padding_mask=bool_mask_keeping_first_column(N, L))
    expected = forward_and_grads(theirs, clone_inputs(inputs), need_weights=need_weights)
    actual = forward_and_grads(ours, clone_inputs(inputs), need_weights=need_weights)
    assert_results_match(actual, expected, torch.float64, config_name)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_has_torchs_shape_and_strides(layout, need_weights):
    """(L, N, E) for seq-first, (N, L, E) for batch_first, (L, E) unbatched, with torch's
    strides (batch_first: a transposed view of (L, N, E) memory, as torch returns): code
    after the module that depends on strides (a .view(), nn.Dropout's draw order) behaves
    the same."""
    config = dict(CONFIGS["packed_E12_H3"], batch_first=(layout == "batch_first"))
    theirs, ours = module_pair(**config)
    inputs = make_inputs(config, layout, (None, None), torch.float64)
    out, weights = ours(**inputs, need_weights=need_weights)
    expected_out, expected_weights = theirs(**inputs, need_weights=need_weights)
    assert out.shape == expected_out.shape
    assert out.stride() == expected_out.stride()
    if need_weights:
        assert weights.shape == expected_weights.shape


def causal_bool_mask(L, S):
    """torch's module convention: True above the diagonal = masked out."""
    return torch.ones(L, S, dtype=torch.bool).triu(1)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize("config_name", ["packed_E12_H3", "bias_kv", "everything"])
def test_is_causal_with_causal_mask_matches_torch(config_name, with_padding, need_weights):
    """is_causal=True with the causal attn_mask, in all of torch 2.13's branches: the causal
    flag alone (no padding mask, no weights), or the mask (with padding or weights)."""
    config = dict(CONFIGS[config_name], batch_first=True)
    theirs, ours = module_pair(**config)
    inputs = make_inputs(
        config, "batch_first", ("bool" if with_padding else None, None), torch.float64
    )
    inputs["attn_mask"] = causal_bool_mask(L, S)
    kwargs = dict(need_weights=need_weights, is_causal=True)
    expected = forward_and_grads(theirs, clone_inputs(inputs), **kwargs)
    actual = forward_and_grads(ours, clone_inputs(inputs), **kwargs)
    assert_results_match(actual, expected, torch.float64, config_name)


def test_is_causal_hint_ignores_attn_mask_where_torch_does():
    """torch 2.13: with is_causal=True, no key_padding_mask and need_weights=False, attn_mask is
    only a required hint and is not read (not even its shape): the causal mask is applied.
    With need_weights=True the mask is applied instead. We do the same."""
    config = dict(CONFIGS["packed_E12_H3"], batch_first=True)
    theirs, ours = module_pair(**config)
    inputs = make_inputs(config, "batch_first", (None, None), torch.float64)
    not_causal = torch.zeros(7, 7, dtype=torch.bool)  # wrong shape and all-visible
    out, _ = ours(**inputs, attn_mask=not_causal, is_causal=True, need_weights=False)
    expected, _ = theirs(**inputs, attn_mask=not_causal, is_causal=True, need_weights=False)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    causal_out, _ = ours(**inputs, attn_mask=causal_bool_mask(L, S), need_weights=False)
    torch.testing.assert_close(out, causal_out, atol=1e-10, rtol=1e-10)

    visible = torch.zeros(L, S, dtype=torch.bool)
    out_w, _ = ours(**inputs, attn_mask=visible, is_causal=True, need_weights=True)
    expected_w, _ = theirs(**inputs, attn_mask=visible, is_causal=True, need_weights=True)
    torch.testing.assert_close(out_w, expected_w, atol=1e-10, rtol=1e-10)
    unmasked, _ = ours(**inputs)
    torch.testing.assert_close(out_w, unmasked, atol=1e-10, rtol=1e-10)


def test_is_causal_without_attn_mask_raises_like_torch():
    theirs, ours = module_pair(**CONFIGS["packed_E12_H3"])
    x = torch.randn(L, N, 12, dtype=torch.float64)
    for module in (theirs, ours):
        with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal"):
            module(x, x, x, is_causal=True, need_weights=False)


def test_mismatched_mask_types_warn_like_torch():
    theirs, ours = module_pair(**CONFIGS["packed_E12_H3"])
    x = torch.randn(L, N, 12, dtype=torch.float64)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    attn = torch.zeros(L, L, dtype=torch.float64)
    for module in (theirs, ours):
        with pytest.warns(
            UserWarning, match="Support for mismatched key_padding_mask and attn_mask is deprecated"
        ):
            module(x, x, x, key_padding_mask=kpm, attn_mask=attn)


@pytest.mark.parametrize("need_weights", [False, True])
def test_float32_masks_with_float64_query_follow_torch(need_weights):
    """torch's SDPA path (need_weights=False) accepts a float32 mask for a float64 query; its
    matmul path (need_weights=True) raises RuntimeError. Same here."""
    theirs, ours = module_pair(**CONFIGS["packed_E12_H3"])
    x = torch.randn(L, N, 12, dtype=torch.float64)
    mask = float_mask_keeping_first_column(L, L, dtype=torch.float32)
    if need_weights:
        for module in (theirs, ours):
            with pytest.raises(RuntimeError):
                module(x, x, x, attn_mask=mask)
    else:
        out, _ = ours(x, x, x, attn_mask=mask, need_weights=False)
        expected, _ = theirs(x, x, x, attn_mask=mask, need_weights=False)
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("need_weights", [False, True])
def test_eval_mode_ignores_dropout_like_torch(need_weights):
    config = dict(CONFIGS["bias_kv"], dropout=0.5)
    theirs, ours = module_pair(**config)
    theirs.eval(), ours.eval()
    inputs = make_inputs(config, "seq_first", ("bool", "bool2d"), torch.float64)
    expected = forward_and_grads(theirs, clone_inputs(inputs), need_weights=need_weights)
    actual = forward_and_grads(ours, clone_inputs(inputs), need_weights=need_weights)
    assert_results_match(actual, expected, torch.float64, "eval")


@pytest.mark.parametrize(
    "config_name,layout",
    list(itertools.product(["packed_E12_H3", "kdim_vdim"], ["seq_first", "unbatched"])),
)
def test_weights_are_plain_tensors_with_torchs_shapes(config_name, layout):
    config = dict(CONFIGS[config_name])
    theirs, ours = module_pair(**config)
    inputs = make_inputs(config, layout, (None, None), torch.float64)
    for average in (True, False):
        _, ours_w = ours(**inputs, average_attn_weights=average)
        _, theirs_w = theirs(**inputs, average_attn_weights=average)
        assert ours_w.shape == theirs_w.shape and ours_w.dtype == theirs_w.dtype
