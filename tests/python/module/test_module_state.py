"""Construction, parameters, state_dict, serialization and repr of our MultiheadAttention,
each against torch.nn.MultiheadAttention."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

import qkv_attention
from helpers.module import module_pair

CONFIGS = [
    dict(embed_dim=12, num_heads=3),
    dict(embed_dim=12, num_heads=3, bias=False),
    dict(embed_dim=8, num_heads=2, kdim=5, vdim=7),
    dict(
        embed_dim=8,
        num_heads=4,
        kdim=8,
        vdim=3,
        add_bias_kv=True,
        add_zero_attn=True,
        dropout=0.25,
        batch_first=True,
    ),
]
IDS = ["packed", "no_bias", "kdim_vdim", "everything"]
ATTRIBUTES = [
    "embed_dim",
    "kdim",
    "vdim",
    "_qkv_same_embed_dim",
    "num_heads",
    "head_dim",
    "dropout",
    "batch_first",
    "add_zero_attn",
    "training",
]


def check_same_outputs(a, b, batch_first=False):
    """Both modules give the same output and weights on one random input."""
    E, Ek, Ev = a.embed_dim, a.kdim, a.vdim
    dtype = next(a.parameters()).dtype
    shape = (lambda s, f: (2, s, f)) if batch_first else (lambda s, f: (s, 2, f))
    q = torch.randn(shape(3, E), dtype=dtype)
    k, v = torch.randn(shape(4, Ek), dtype=dtype), torch.randn(shape(4, Ev), dtype=dtype)
    a.eval(), b.eval()
    out_a, w_a = a(q, k, v)
    out_b, w_b = b(q, k, v)
    # Two implementations rounding in different orders (blocked kernels vs torch's math path):
    # float32's tolerance in helpers (1e-5); measured differences reach 2e-6.
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_a, w_b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_same_seed_gives_torchs_initial_parameters(config):
    """Same generator draws in the same order: xavier_uniform_ in-projection, zero biases,
    xavier_normal_ bias_k/bias_v, and Linear's own init of out_proj.weight."""
    torch.manual_seed(42)
    theirs = nn.MultiheadAttention(**config)
    torch.manual_seed(42)
    ours = qkv_attention.MultiheadAttention(**config)
    theirs_state, ours_state = theirs.state_dict(), ours.state_dict()
    assert list(ours_state) == list(theirs_state)
    for name in theirs_state:
        assert torch.equal(ours_state[name], theirs_state[name]), name
    # The generator is left where torch leaves it, so later draws agree as well.
    assert torch.equal(
        torch.randn(5), (torch.manual_seed(42), nn.MultiheadAttention(**config), torch.randn(5))[2]
    )


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_parameters_attributes_and_structure_match_torch(config):
    theirs, ours = module_pair(dtype=torch.float32, **config)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    for name in ATTRIBUTES:
        assert getattr(ours, name) == getattr(theirs, name), name
    for name in [
        "in_proj_weight",
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "in_proj_bias",
        "bias_k",
        "bias_v",
    ]:
        theirs_value, ours_value = getattr(theirs, name), getattr(ours, name)
        assert (ours_value is None) == (theirs_value is None), name
        if theirs_value is not None:
            assert isinstance(ours_value, nn.Parameter) and ours_value.shape == theirs_value.shape
    assert type(ours.out_proj) is NonDynamicallyQuantizableLinear


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_state_dict_round_trips_through_torch_save_both_ways(config):
    """A state_dict saved from torch's module loads into ours (torch.load's default
    weights_only=True) and gives the same outputs; and the other way."""
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(**config)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ours = qkv_attention.MultiheadAttention(**config)
    ours.load_state_dict(torch.load(buffer))  # strict: same keys and shapes
    check_same_outputs(ours, theirs, config.get("batch_first", False))

    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(-0.5)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    back = nn.MultiheadAttention(**config)
    back.load_state_dict(torch.load(buffer))
    check_same_outputs(ours, back, config.get("batch_first", False))


def test_state_dict_of_other_layout_is_rejected_like_torch():
    """Packed weights do not load into a kdim/vdim module: both raise the same error type."""
    source = nn.MultiheadAttention(8, 2).state_dict()
    for cls in (nn.MultiheadAttention, qkv_attention.MultiheadAttention):
        with pytest.raises(RuntimeError, match="in_proj_weight"):
            cls(8, 2, kdim=5, vdim=5).load_state_dict(source)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_whole_module_survives_torch_save_pickle_and_deepcopy(config):
    _, ours = module_pair(dtype=torch.float32, **config)
    ours.train(False)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copies = [loaded, pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)]
    for other in copies:
        assert type(other) is qkv_attention.MultiheadAttention
        for name in ATTRIBUTES:
            assert getattr(other, name) == getattr(ours, name), name
        check_same_outputs(other, ours, config.get("batch_first", False))
        # It still keeps nn.TransformerEncoderLayer's fused path off (see replace tests).
        assert len(other._forward_pre_hooks) == 1


def test_old_pickles_without_qkv_same_embed_dim_load():
    """Pickles of torch's module from v1.1.0 lack _qkv_same_embed_dim; it defaults to True."""
    ours = qkv_attention.MultiheadAttention(8, 2)
    state = ours.__dict__.copy()
    del state["_qkv_same_embed_dim"]
    restored = qkv_attention.MultiheadAttention.__new__(qkv_attention.MultiheadAttention)
    restored.__setstate__(state)
    assert restored._qkv_same_embed_dim is True
    check_same_outputs(restored, ours)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_dtype_factory_argument(dtype):
    ours = qkv_attention.MultiheadAttention(8, 2, kdim=4, vdim=4, add_bias_kv=True, dtype=dtype)
    assert all(p.dtype == dtype for p in ours.parameters())
    q = torch.randn(3, 2, 8, dtype=dtype)
    kv = torch.randn(5, 2, 4, dtype=dtype)
    out, weights = ours(q, kv, kv)
    assert out.dtype == dtype and weights.dtype == dtype and out.shape == (3, 2, 8)
    assert weights.shape == (2, 3, 6)
    assert torch.isfinite(out).all()


def test_device_factory_argument():
    ours = qkv_attention.MultiheadAttention(8, 2, device="cpu", dtype=torch.float64)
    assert all(p.device.type == "cpu" for p in ours.parameters())
    meta = qkv_attention.MultiheadAttention(8, 2, kdim=3, vdim=3, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    # A meta module is materialised the usual way and then computes like any other.
    real = meta.to_empty(device="cpu")
    real._reset_parameters()
    q, kv = torch.randn(2, 1, 8), torch.randn(4, 1, 3)
    out, _ = real(q, kv, kv)
    assert out.shape == (2, 1, 8) and torch.isfinite(out).all()


def test_to_and_double_convert_like_any_module():
    theirs, ours = module_pair(dtype=torch.float32, embed_dim=8, num_heads=2)
    check_same_outputs(ours.double(), theirs.double())


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_repr_is_torchs_plus_one_line_naming_the_implementation(config):
    theirs, ours = module_pair(dtype=torch.float32, **config)
    first, fields, *rest = repr(ours).splitlines()
    assert fields.strip().startswith("implementation=qkv_attention, ")
    assert "\n".join([first, *rest]) == repr(theirs)  # torch's module prints no fields


def test_constructor_rejects_bad_sizes_like_torch():
    for cls in (nn.MultiheadAttention, qkv_attention.MultiheadAttention):
        with pytest.raises(ValueError, match="embed_dim and num_heads must be greater than 0"):
            cls(0, 1)
        with pytest.raises(ValueError, match="embed_dim and num_heads must be greater than 0"):
            cls(8, 0)
        with pytest.raises(AssertionError, match="embed_dim must be divisible by num_heads"):
            cls(10, 3)


@pytest.mark.parametrize(
    "masks", ["padding", "attn2d", "attn3d", "both_bool", "both_float", "none"]
)
def test_merge_masks_matches_torch(masks):
    """torch's public helper, for code written against its module."""
    theirs, ours = module_pair(embed_dim=8, num_heads=2, batch_first=True)
    N, L = 3, 4
    query = torch.randn(N, L, 8, dtype=torch.float64)
    padding = torch.rand(N, L) < 0.3
    attn = torch.rand(L, L) < 0.3 if masks != "attn3d" else torch.rand(N * 2, L, L) < 0.3
    if masks == "both_float":
        padding = torch.randn(N, L, dtype=torch.float64)
        attn = torch.randn(L, L, dtype=torch.float64)
    args = dict(
        attn_mask=None if masks in ("padding", "none") else attn,
        key_padding_mask=padding if masks in ("padding", "both_bool", "both_float") else None,
    )
    expected, expected_type = theirs.merge_masks(**args, query=query)
    merged, merged_type = ours.merge_masks(**args, query=query)
    assert merged_type == expected_type
    assert (merged is None) == (expected is None)
    if expected is not None:
        assert merged.dtype == expected.dtype and torch.equal(merged, expected)
