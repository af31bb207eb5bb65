"""The installed package: version, build information and the operator registrations."""

import importlib.metadata
import re

import torch

import qkv_attention
from qkv_attention import _C

ops = torch.ops.qkv_attention

PUBLIC_SCHEMAS = {
    # argument names in order: public API (docs/design.md section 2), new ones only go at the end
    "qkv_projection": [
        "query",
        "key",
        "value",
        "q_weight",
        "k_weight",
        "v_weight",
        "q_bias",
        "k_bias",
        "v_bias",
        "num_heads",
    ],
    "attention": [
        "query",
        "key",
        "value",
        "attn_mask",
        "dropout_p",
        "is_causal",
        "scale",
        "key_padding_mask",
        "window_size",
        "softcap",
        "alibi_slopes",
        "sinks",
    ],
    "attention_with_weights": [
        "query",
        "key",
        "value",
        "attn_mask",
        "dropout_p",
        "is_causal",
        "scale",
        "key_padding_mask",
        "average_attn_weights",
        "window_size",
        "softcap",
        "alibi_slopes",
        "sinks",
    ],
    "merge_heads": ["x", "out_weight", "out_bias"],
    "attention_with_kv_cache": [
        "query",
        "k_cache",
        "v_cache",
        "key",
        "value",
        "cache_seqlens",
        "attn_mask",
        "is_causal",
        "scale",
        "window_size",
        "softcap",
        "alibi_slopes",
        "sinks",
        "k_cache_scale",
        "v_cache_scale",
    ],
    "attention_varlen": [
        "query",
        "key",
        "value",
        "cu_seqlens_q",
        "cu_seqlens_k",
        "max_seqlen_q",
        "max_seqlen_k",
        "dropout_p",
        "is_causal",
        "scale",
        "window_size",
        "softcap",
        "alibi_slopes",
        "sinks",
    ],
}
# Operators with kernels of their own at these keys; the others are compositions of
# _attention_forward or _attention_varlen_forward (CompositeImplicitAutograd), so they inherit
# its CPU, Meta and autograd.
KERNEL_KEYS = ("CPU", "Meta", "Autograd")
OWN_KERNELS = {
    "qkv_projection": KERNEL_KEYS,
    "qkv_projection_backward": KERNEL_KEYS,
    "_attention_forward": KERNEL_KEYS,
    "_attention_backward": KERNEL_KEYS,
    "_attention_dropout_mask": ("CPU", "Meta"),  # returns bool: nothing to differentiate
    "merge_heads": KERNEL_KEYS,
    "merge_heads_backward": KERNEL_KEYS,
    # Its Autograd kernel refuses inputs that require grad (an inference op).
    "attention_with_kv_cache": KERNEL_KEYS,
    "_attention_varlen_forward": KERNEL_KEYS,
    "_attention_varlen_backward": KERNEL_KEYS,
}
COMPOSITE = ("attention", "attention_with_weights", "attention_varlen")


def test_version_is_the_same_everywhere():
    assert re.fullmatch(r"\d+\.\d+\.\d+", _C.__version__)
    assert qkv_attention.__version__ == _C.__version__
    assert _C.build_info()["version"] == _C.__version__
    assert importlib.metadata.version("qkv_attention") == _C.__version__


def test_build_info_describes_this_build():
    info = qkv_attention.build_info()
    assert set(info) >= {
        "version",
        "torch_version",
        "compiler",
        "openmp",
        "cxx11_abi",
        "cpu_capability",
        "num_threads",
    }
    # built against the torch that runs it (local suffixes such as +cpu aside)
    assert info["torch_version"] == re.match(r"\d+\.\d+\.\d+", torch.__version__).group()
    assert info["openmp"] is True  # without it at::parallel_for runs on one thread
    assert info["cxx11_abi"] == torch.compiled_with_cxx11_abi()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert re.match(r"(gcc|clang) \d+", info["compiler"]), info["compiler"]


def test_build_info_reports_the_current_thread_count():
    threads = torch.get_num_threads()
    assert _C.build_info()["num_threads"] == threads
    try:
        torch.set_num_threads(1)
        assert _C.build_info()["num_threads"] == 1
    finally:
        torch.set_num_threads(threads)


def test_operators_are_registered_with_their_kernels():
    for name, keys in OWN_KERNELS.items():
        qualified = f"qkv_attention::{name}"
        for key in keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key), (name, key)
    for name in COMPOSITE:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            f"qkv_attention::{name}", "CompositeImplicitAutograd"
        ), name


def test_public_schemas_keep_their_argument_order():
    for name, arguments in PUBLIC_SCHEMAS.items():
        schema = getattr(ops, name).default._schema
        assert [a.name for a in schema.arguments] == arguments, name
    attention = ops.attention.default._schema.arguments
    defaults = {a.name: a.default_value for a in attention if a.has_default_value()}
    assert defaults == {
        "attn_mask": None,
        "dropout_p": 0.0,
        "is_causal": False,
        "scale": None,
        "key_padding_mask": None,
        "window_size": [-1, -1],
        "softcap": 0.0,
        "alibi_slopes": None,
        "sinks": None,
    }


def test_python_wrappers_call_the_operators():
    assert set(qkv_attention.ops.__all__) == set(PUBLIC_SCHEMAS)
    for name in PUBLIC_SCHEMAS:
        wrapper = getattr(qkv_attention.ops, name)
        assert wrapper.__doc__ and "(B" in wrapper.__doc__, f"{name} documents its shapes"
    x = torch.randn(2, 3, 4, 5)
    weight = torch.randn(6, 15)
    assert torch.equal(qkv_attention.ops.merge_heads(x, weight), ops.merge_heads(x, weight, None))
