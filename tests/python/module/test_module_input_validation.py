"""MultiheadAttention's checks of what each argument is (before its shape and dtype checks):
constructor sizes that are not ints or are out of range, and forward arguments that are not
tensors or not dense (sparse, mkldnn, nested of either layout). Each raises an exception whose
message names the argument and what was found, of the type torch.nn.MultiheadAttention raises
for the same input; where torch's module fails on the input with an AttributeError (it reads an
attribute of a non-tensor) ours raises TypeError instead."""

import warnings

import numpy
import pytest
import torch
from torch import nn

import qkv_attention
from qkv_attention.functional import scaled_dot_product_attention

E, H, L, S, N = 8, 2, 3, 5, 2

pytestmark = pytest.mark.filterwarnings(
    "ignore:The PyTorch API of nested tensors is in prototype",
    "ignore:Sparse CSR tensor support is in beta",
    "ignore:Support for mismatched key_padding_mask",  # torch's module, a float mkldnn mask
)


def raised_by(call):
    """The exception `call` raises (the test fails if it raises none)."""
    with pytest.raises(Exception) as error:
        call()
    return error.value


# -- constructor ------------------------------------------------------------------------------

# (argument, bad value, regex of what our message must say about the value)
CONSTRUCTOR_CASES = [
    ("embed_dim", None, r"embed_dim must be an int, but got NoneType"),
    ("embed_dim", "8", r"embed_dim must be an int, but got str \('8'\)"),
    ("embed_dim", 8.0, r"embed_dim must be an int, but got float \(8.0\)"),
    ("embed_dim", 0, r"embed_dim=0"),
    ("num_heads", None, r"num_heads must be an int, but got NoneType"),
    ("num_heads", "2", r"num_heads must be an int, but got str \('2'\)"),
    ("num_heads", 2.0, r"num_heads must be an int, but got float \(2.0\)"),
    ("num_heads", -2, r"num_heads=-2"),
    ("kdim", -5, r"kdim must be None or >= 0, but got -5"),
    ("kdim", "5", r"kdim must be an int, but got str \('5'\)"),
    ("kdim", 2.5, r"kdim must be an int, but got float \(2.5\)"),
    ("vdim", -5, r"vdim must be None or >= 0, but got -5"),
    ("vdim", "5", r"vdim must be an int, but got str \('5'\)"),
]


@pytest.mark.parametrize(
    "argument, value, message",
    CONSTRUCTOR_CASES,
    ids=[f"{a}={v!r}" for a, v, _ in CONSTRUCTOR_CASES],
)
def test_constructor_rejects_like_torch_naming_the_argument(argument, value, message):
    config = {"embed_dim": E, "num_heads": H, argument: value}
    # torch's constructor accepts num_heads=2.0 and its forward then raises TypeError: ours
    # raises that type already in the constructor.
    x = torch.randn(L, N, E)
    theirs = raised_by(lambda: nn.MultiheadAttention(**config)(x, x, x))
    ours = raised_by(lambda: qkv_attention.MultiheadAttention(**config))
    assert type(ours) is type(theirs), f"torch raised {theirs!r}, we raised {ours!r}"
    assert isinstance(ours, (TypeError, ValueError, RuntimeError))
    with pytest.raises(type(ours), match=message):
        raise ours


@pytest.mark.parametrize(
    "make_int", [numpy.int64, numpy.int32, int], ids=["np.int64", "np.int32", "int"]
)
def test_constructor_accepts_integer_types_torch_accepts(make_int):
    """Anything with __index__ is a size to torch's constructor; ours stores it as an int and
    builds the same parameters from the same seed."""
    config = dict(embed_dim=make_int(E), num_heads=make_int(H), kdim=make_int(5), vdim=make_int(0))
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(**config)
    torch.manual_seed(0)
    ours = qkv_attention.MultiheadAttention(**config)
    for name in ("embed_dim", "num_heads", "kdim", "vdim", "head_dim"):
        assert type(getattr(ours, name)) is int, name
        assert getattr(ours, name) == getattr(theirs, name), name
    theirs_state = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs_state[name]), name


# -- forward ----------------------------------------------------------------------------------


def valid_forward_args():
    return dict(
        query=torch.randn(L, N, E),
        key=torch.randn(S, N, E),
        value=torch.randn(S, N, E),
        key_padding_mask=torch.zeros(N, S, dtype=torch.bool),
        attn_mask=torch.zeros(L, S, dtype=torch.bool),
    )


def jagged(t):
    """A jagged-layout nested tensor of the rows of `t` (dim 0 is the batch)."""
    return torch.nested.nested_tensor(list(t.unbind(0)), layout=torch.jagged)


# (label, function of the valid argument -> the bad one, regex of what our message says after
# "MultiheadAttention: <argument> ")
DENSE = r"must be a dense tensor \(layout torch\.strided\), but has layout "
# query/key/value (AssertionError, with a hint) | masks (NotImplementedError)
NESTED = r"(is a NestedTensor; .*use_nested_tensor|must be a dense tensor, but is a NestedTensor)"
BAD_KINDS = [
    ("None", lambda t: None, r"must be a Tensor, but got NoneType"),
    ("list", lambda t: t.tolist(), r"must be a Tensor( or None)?, but got list"),
    ("str", lambda t: "not a tensor", r"must be a Tensor( or None)?, but got str"),
    ("sparse_coo", lambda t: t.to_sparse(), DENSE + r"torch\.sparse_coo"),
    ("sparse_csr", lambda t: t.to_sparse_csr(), DENSE + r"torch\.sparse_csr"),
    ("mkldnn", lambda t: t.float().to_mkldnn(), DENSE + r"torch\._mkldnn"),
    ("nested", lambda t: torch.nested.nested_tensor(list(t.unbind(0))), NESTED),
    ("jagged", jagged, NESTED),
]
ARGUMENTS = ("query", "key", "value", "key_padding_mask", "attn_mask")
FORWARD_CASES = [
    (argument, label)
    for argument in ARGUMENTS
    for label, _, _ in BAD_KINDS
    # None is a valid mask; an (L, S) attn_mask has no batch dim to nest over.
    if not (label == "None" and argument.endswith("mask"))
    and not (label in ("nested", "jagged") and argument == "attn_mask")
]


def bad_forward_args(argument, label):
    args = valid_forward_args()
    mutate = next(mutation for name, mutation, _ in BAD_KINDS if name == label)
    args[argument] = mutate(args[argument])
    return args


@pytest.mark.parametrize(
    "argument, label", FORWARD_CASES, ids=[f"{a}-{k}" for a, k in FORWARD_CASES]
)
def test_forward_rejects_like_torch_naming_the_argument(argument, label):
    torch.manual_seed(0)
    theirs_module = nn.MultiheadAttention(E, H)
    torch.manual_seed(0)
    ours_module = qkv_attention.MultiheadAttention(E, H)
    theirs = raised_by(lambda: theirs_module(**bad_forward_args(argument, label)))
    ours = raised_by(lambda: ours_module(**bad_forward_args(argument, label)))
    if isinstance(theirs, AttributeError):
        # torch's module reads .dim() / .is_nested of the non-tensor.
        assert type(ours) is TypeError, f"we raised {ours!r}"
    else:
        # Ours may be more specific (NotImplementedError is a RuntimeError), never another kind.
        assert isinstance(ours, type(theirs)), f"torch raised {theirs!r}, we raised {ours!r}"
    message = next(m for name, _, m in BAD_KINDS if name == label)
    with pytest.raises(type(ours), match=rf"MultiheadAttention: {argument} {message}"):
        raise ours


MODES = dict(grad=torch.enable_grad, no_grad=torch.no_grad, inference_mode=torch.inference_mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("argument", ["query", "key", "value", "key_padding_mask"])
def test_jagged_nested_tensor_is_refused_in_every_grad_mode(argument, mode):
    """Under inference_mode the operators see a jagged tensor only through its Python
    dispatch (which names no argument): the module refuses it before, in every mode."""
    module = qkv_attention.MultiheadAttention(E, H)
    with MODES[mode]():
        args = bad_forward_args(argument, "jagged")
        with pytest.raises(
            (AssertionError, NotImplementedError),
            match=rf"MultiheadAttention: {argument} (is a|must be a dense "
            r"tensor, but is a) NestedTensor",
        ):
            module(**args)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("argument", ["query", "key", "value", "attn_mask"])
def test_functional_refuses_a_jagged_nested_tensor_in_every_grad_mode(argument, mode):
    args = dict(
        query=torch.randn(2, 3, 4, 5),
        key=torch.randn(2, 3, 6, 5),
        value=torch.randn(2, 3, 6, 7),
        attn_mask=torch.zeros(2, 3, 4, 6).bool(),
    )
    with MODES[mode]():
        args[argument] = jagged(args[argument])
        with pytest.raises(
            NotImplementedError,
            match=rf"scaled_dot_product_attention: {argument} must be a dense "
            r"tensor, but is a NestedTensor",
        ):
            scaled_dot_product_attention(**args)


def test_checks_trace_under_compile_and_name_the_argument():
    """The checks are attribute reads Dynamo traces: a valid call compiles into one graph
    (fullgraph=True), and a bad one raises our exception (fullgraph=False falls back to
    eager for it; with fullgraph=True Dynamo reports our exception as its context)."""
    torch._dynamo.reset()
    module = qkv_attention.MultiheadAttention(E, H)
    args = valid_forward_args()
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(**args)[0], module(**args)[0], rtol=0, atol=0)
    with pytest.raises(
        Exception,
        match=r"MultiheadAttention: attn_mask must be a Tensor or "
        r"None, but got list",
    ):
        compiled(**dict(args, attn_mask=[[True]]))
    lenient = torch.compile(module, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            TypeError,
            match=r"MultiheadAttention: query must be a Tensor, but "
            r"got list",
        ):
            lenient(**dict(args, query=[1.0]))
