"""Every operator of the qkv_attention namespace is covered by the unsupported-layout guard.

csrc/ops/unsupported_layouts.cpp registers, for each operator of csrc/ops/operators.h, a kernel
at every dispatch key of a tensor layout the operators do not support; it raises an error naming
the argument. An operator missing from that list would give the dispatcher's "Could not run
... with arguments from the 'SparseCPU' backend" instead, naming nothing. So every registered
operator of the namespace must have a kernel at each of these keys, unless it is a composition
(CompositeImplicitAutograd: attention, attention_with_weights), which reaches the guarded
operators through its body.
"""

import pytest
import torch

import qkv_attention  # noqa: F401  (registers torch.ops.qkv_attention)

GUARDED_KEYS = (
    "SparseCPU",
    "SparseMeta",
    "SparseCsrCPU",
    "SparseCsrMeta",
    "QuantizedCPU",
    "MkldnnCPU",
    "NestedTensorCPU",
    "NestedTensorMeta",
)


def registered_operators():
    return sorted(
        name for name in torch._C._dispatch_get_all_op_names() if name.startswith("qkv_attention::")
    )


def is_composite(name):
    return torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd")


def test_the_namespace_has_the_operators_we_expect():
    # A guard against an empty or misread list making the next test pass vacuously.
    names = registered_operators()
    for expected in (
        "qkv_attention::qkv_projection",
        "qkv_attention::_attention_forward",
        "qkv_attention::merge_heads",
        "qkv_attention::attention",
    ):
        assert expected in names
    assert is_composite("qkv_attention::attention")
    assert not is_composite("qkv_attention::_attention_forward")


@pytest.mark.parametrize("name", registered_operators())
def test_every_operator_with_kernels_has_the_layout_guard(name):
    if is_composite(name):
        return  # runs _attention_forward (or another guarded op) in its body
    missing = [
        key for key in GUARDED_KEYS if not torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
    ]
    assert not missing, (
        f"{name} has no unsupported-layout kernel at {missing}: add it to kOperators in "
        "csrc/ops/operators.h"
    )


def test_the_guard_names_the_argument_of_a_sparse_input():
    x = torch.randn(2, 3, 4).to_sparse()
    weight = torch.randn(8, 4)
    with pytest.raises(NotImplementedError, match=r"qkv_projection: query must be a dense tensor"):
        torch.ops.qkv_attention.qkv_projection(x, x, x, weight, weight, weight, None, None, None, 2)
