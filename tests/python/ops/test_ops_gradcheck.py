"""gradcheck and gradgradcheck in float64 on every public op, and gradcheck of the backward ops.

Each case runs first and second derivatives of the op against finite differences. Cases marked
``exact`` check the full Jacobian (slow mode); the others use gradcheck's fast mode (a random
projection of the Jacobian), which keeps the whole file within a few seconds.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

import qkv_attention
from torch.autograd import gradcheck, gradgradcheck

from helpers import noncontiguous, random_bool_mask, random_tensor
from qkv_attention._cases import gradient_cases

ops = torch.ops.qkv_attention
pytestmark = pytest.mark.usefixtures("seed_torch")

DROPOUT_SEED = 1234


def check_first_and_second_derivatives(fn, inputs, exact):
    """gradcheck, then gradgradcheck. ``exact`` checks full Jacobians; gradgradcheck's full
    check is O(inputs x outputs) backward-of-backward calls, so only tiny cases may ask for it
    (see ``test_attention_gradgradcheck_full_jacobian``) and the rest use fast mode."""
    assert gradcheck(fn, inputs, fast_mode=not exact)
    assert gradgradcheck(fn, inputs, fast_mode=True)


def sizes_of(spec, dims):
    """'B11S' -> (B, 1, 1, S) using ``dims`` = {'B': .., 'H': .., 'L': .., 'S': ..}."""
    return tuple(1 if letter == "1" else dims[letter] for letter in spec)


# ---------------------------------------------------------------------------------------------
# attention and attention_with_weights


@dataclass
class AttentionCase:
    dims: Tuple[int, int, int, int, int, int]  # B, H, L, S, D, Dv
    mask: Optional[Tuple[str, str, bool]] = (
        None  # (dtype "bool"/"float", shape spec, requires_grad)
    )
    padding: Optional[Tuple[str, bool]] = None  # key_padding_mask (dtype, requires_grad)
    is_causal: bool = False
    scale: Optional[float] = None
    dropout_p: float = 0.0
    noncontiguous: bool = False
    with_weights: bool = False
    exact: bool = False
    fully_masked_row: bool = False  # one (b, h, i) row of a bool attn_mask is all False
    neg_inf_in_float_mask: bool = False


ATTENTION_CASES = {
    "plain": AttentionCase((2, 3, 4, 5, 3, 2), exact=True),
    "all_dims_1": AttentionCase((1, 1, 1, 1, 1, 1), exact=True),
    "causal_L_gt_S_D_ne_Dv": AttentionCase((1, 2, 5, 3, 3, 4), is_causal=True, exact=True),
    "causal_L_lt_S": AttentionCase((2, 1, 3, 6, 2, 3), is_causal=True),
    "custom_scale": AttentionCase((2, 2, 3, 4, 5, 2), scale=0.7),
    "zero_scale": AttentionCase((1, 2, 3, 4, 2, 2), scale=0.0),
    "with_weights": AttentionCase((2, 2, 3, 4, 3, 2), with_weights=True, exact=True),
    "bool_mask_LS": AttentionCase((2, 2, 3, 5, 2, 3), mask=("bool", "LS", False)),
    "bool_mask_B11S": AttentionCase((3, 2, 4, 3, 2, 2), mask=("bool", "B11S", False)),
    "bool_mask_S": AttentionCase((2, 2, 3, 4, 2, 2), mask=("bool", "S", False)),
    "bool_mask_HLS_causal": AttentionCase(
        (2, 3, 4, 4, 2, 3), mask=("bool", "HLS", False), is_causal=True, with_weights=True
    ),
    "bool_mask_BHLS_fully_masked_row": AttentionCase(
        (2, 2, 3, 4, 3, 2),
        mask=("bool", "BHLS", False),
        fully_masked_row=True,
        with_weights=True,
        exact=True,
    ),
    "float_mask_LS_grad": AttentionCase((2, 2, 3, 4, 2, 3), mask=("float", "LS", True), exact=True),
    "float_mask_B11S_grad": AttentionCase((3, 2, 2, 4, 2, 2), mask=("float", "B11S", True)),
    "float_mask_HLS_grad": AttentionCase((2, 3, 3, 2, 3, 2), mask=("float", "HLS", True)),
    "float_mask_1111_grad": AttentionCase((2, 2, 3, 3, 2, 2), mask=("float", "1111", True)),
    "float_mask_BHLS_no_grad": AttentionCase((2, 2, 3, 4, 2, 2), mask=("float", "BHLS", False)),
    "float_mask_with_neg_inf_grad": AttentionCase(
        (2, 2, 4, 3, 2, 2),
        mask=("float", "BHLS", True),
        neg_inf_in_float_mask=True,
        with_weights=True,
    ),
    "padding_bool_fully_masked_batch": AttentionCase(
        (3, 2, 3, 4, 2, 3), padding=("bool", False), with_weights=True
    ),
    "padding_float_grad": AttentionCase((2, 2, 3, 4, 2, 2), padding=("float", True), exact=True),
    "float_mask_and_padding_grad_causal": AttentionCase(
        (2, 2, 4, 4, 2, 2),
        mask=("float", "1LS", True),
        padding=("float", True),
        is_causal=True,
        with_weights=True,
    ),
    "bool_mask_and_float_padding_grad": AttentionCase(
        (2, 2, 3, 4, 2, 2), mask=("bool", "B1LS", False), padding=("float", True)
    ),
    "dropout": AttentionCase((2, 2, 3, 5, 3, 2), dropout_p=0.3, with_weights=True, exact=True),
    "dropout_float_mask_grad_causal": AttentionCase(
        (2, 2, 4, 4, 2, 3), mask=("float", "HLS", True), is_causal=True, dropout_p=0.5
    ),
    "noncontiguous": AttentionCase(
        (2, 2, 3, 4, 3, 2),
        mask=("float", "BHLS", True),
        padding=("float", True),
        noncontiguous=True,
        exact=True,
    ),
    "noncontiguous_dropout_causal": AttentionCase(
        (2, 3, 4, 3, 2, 3), noncontiguous=True, dropout_p=0.4, is_causal=True, with_weights=True
    ),
}


def attention_inputs(case):
    """(differentiable tensor inputs, function of them that calls the op)."""
    B, H, L, S, D, Dv = case.dims
    dims = dict(B=B, H=H, L=L, S=S)
    tensors = {
        "query": random_tensor(B, H, L, D, requires_grad=True),
        "key": random_tensor(B, H, S, D, requires_grad=True),
        "value": random_tensor(B, H, S, Dv, requires_grad=True),
    }
    constants = {}
    if case.mask is not None:
        kind, spec, requires_grad = case.mask
        shape = sizes_of(spec, dims)
        if kind == "bool":
            mask = random_bool_mask(*shape)
            if case.fully_masked_row:
                mask[0, 1, 2, :] = False
        else:
            mask = random_tensor(*shape, scale=0.5)
            if case.neg_inf_in_float_mask:
                mask[0, 0, 1, 0] = float("-inf")  # one masked-out key
                mask[1, 1, 2, :] = float("-inf")  # and one row with no key at all
        (tensors if requires_grad else constants)["attn_mask"] = mask.requires_grad_(requires_grad)
    if case.padding is not None:
        kind, requires_grad = case.padding
        if kind == "bool":
            padding = random_bool_mask(B, S)
            padding[-1] = False  # the last batch entry attends to nothing
        else:
            padding = random_tensor(B, S, scale=0.5)
        (tensors if requires_grad else constants)["key_padding_mask"] = padding.requires_grad_(
            requires_grad
        )
    if case.noncontiguous:
        tensors = {name: noncontiguous(t) for name, t in tensors.items()}
        constants = {name: noncontiguous(t) for name, t in constants.items()}
    names = list(tensors)
    op = ops.attention_with_weights if case.with_weights else ops.attention

    def fn(*args):
        kwargs = dict(zip(names, args), **constants)
        if case.dropout_p > 0:
            torch.manual_seed(DROPOUT_SEED)  # every call draws the same dropout mask
        return op(
            kwargs["query"],
            kwargs["key"],
            kwargs["value"],
            kwargs.get("attn_mask"),
            case.dropout_p,
            case.is_causal,
            case.scale,
            kwargs.get("key_padding_mask"),
        )

    return tuple(tensors.values()), fn


@pytest.mark.parametrize("case", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
def test_attention_gradcheck_and_gradgradcheck(case):
    inputs, fn = attention_inputs(case)
    check_first_and_second_derivatives(fn, inputs, case.exact)


@pytest.mark.parametrize("name", ["causal_L_gt_S_D_ne_Dv", "dropout_float_mask_grad_causal"])
def test_attention_gradgradcheck_full_jacobian(name):
    case = ATTENTION_CASES[name]
    B, H, L, S, D, Dv = case.dims
    small = AttentionCase(
        (1, 1, L, S, D, Dv),
        **{k: v for k, v in vars(case).items() if k in ("is_causal", "dropout_p", "with_weights")},
        mask=None if case.mask is None else (case.mask[0], "LS", case.mask[2]),
    )
    inputs, fn = attention_inputs(small)
    assert gradgradcheck(fn, inputs, fast_mode=False)


def test_attention_inputs_really_are_noncontiguous():
    inputs, _ = attention_inputs(ATTENTION_CASES["noncontiguous"])
    assert len(inputs) == 5 and not any(t.is_contiguous() for t in inputs)


# ---------------------------------------------------------------------------------------------
# qkv_projection

QKV_PROJECTION_CASES = {
    # (B, L, S, Eq, Ek, Ev, E, H), biases given (q, k, v), non-contiguous, exact
    "square_with_biases": ((2, 3, 4, 6, 6, 6, 6, 2), (True, True, True), False, True),
    "kdim_vdim_differ": ((2, 3, 2, 4, 3, 5, 6, 3), (True, True, True), False, True),
    "no_biases": ((2, 2, 3, 3, 2, 4, 4, 4), (False, False, False), False, False),
    "some_biases": ((1, 3, 2, 2, 5, 3, 6, 2), (True, False, True), False, False),
    "one_head_size_1_dims": ((1, 1, 1, 1, 1, 1, 3, 1), (True, True, True), False, True),
    "noncontiguous": ((2, 3, 4, 5, 3, 4, 6, 3), (True, True, True), True, False),
}


def qkv_projection_inputs(dims, biases, make_noncontiguous):
    B, L, S, Eq, Ek, Ev, E, H = dims
    tensors = [
        random_tensor(B, L, Eq, requires_grad=True),
        random_tensor(B, S, Ek, requires_grad=True),
        random_tensor(B, S, Ev, requires_grad=True),
        random_tensor(E, Eq, requires_grad=True),
        random_tensor(E, Ek, requires_grad=True),
        random_tensor(E, Ev, requires_grad=True),
    ]
    tensors += [random_tensor(E, requires_grad=True) if given else None for given in biases]
    if make_noncontiguous:
        tensors = [None if t is None else noncontiguous(t) for t in tensors]
    return tensors, H


@pytest.mark.parametrize(
    "dims, biases, make_noncontiguous, exact",
    QKV_PROJECTION_CASES.values(),
    ids=QKV_PROJECTION_CASES.keys(),
)
def test_qkv_projection_gradcheck_and_gradgradcheck(dims, biases, make_noncontiguous, exact):
    tensors, H = qkv_projection_inputs(dims, biases, make_noncontiguous)
    given = [i for i, t in enumerate(tensors) if t is not None]

    def fn(*args):
        full = list(tensors)
        for i, t in zip(given, args):
            full[i] = t
        return ops.qkv_projection(*full, H)

    check_first_and_second_derivatives(fn, tuple(tensors[i] for i in given), exact)


@pytest.mark.parametrize("used_outputs", [(0,), (1, 2), (0, 2)], ids=["q", "k_v", "q_v"])
def test_qkv_projection_gradcheck_when_only_some_outputs_are_used(used_outputs):
    # The unused projections get no gradient at all (undefined grads reach the backward).
    tensors, H = qkv_projection_inputs((1, 2, 2, 3, 2, 3, 4, 2), (True, True, True), False)

    def fn(*args):
        outputs = ops.qkv_projection(*args, H)
        return tuple(outputs[i] for i in used_outputs)

    assert gradcheck(fn, tuple(tensors))
    # Full Jacobian: the first-order gradients of unused inputs are constant zeros, and
    # torch 2.13's fast mode fails on an output that does not require grad followed by one that
    # does ("The size of tensor a (6) must match the size of tensor b (4)", reproducible with
    # pure torch ops), so fast mode cannot check this function.
    assert gradgradcheck(fn, tuple(tensors), fast_mode=False)


# ---------------------------------------------------------------------------------------------
# merge_heads

MERGE_HEADS_CASES = {
    # (B, H, L, D, Eout), bias, non-contiguous, exact
    "with_bias": ((2, 3, 4, 2, 5), True, False, True),
    "no_bias": ((2, 2, 3, 3, 4), False, False, True),
    "size_1_dims": ((1, 1, 1, 1, 1), True, False, True),
    "more_outputs_than_inputs": ((1, 2, 3, 2, 9), True, False, False),
    "noncontiguous": ((2, 3, 3, 2, 5), True, True, False),
}


@pytest.mark.parametrize(
    "dims, bias, make_noncontiguous, exact",
    MERGE_HEADS_CASES.values(),
    ids=MERGE_HEADS_CASES.keys(),
)
def test_merge_heads_gradcheck_and_gradgradcheck(dims, bias, make_noncontiguous, exact):
    B, H, L, D, Eout = dims
    tensors = [
        random_tensor(B, H, L, D, requires_grad=True),
        random_tensor(Eout, H * D, requires_grad=True),
    ]
    if bias:
        tensors.append(random_tensor(Eout, requires_grad=True))
    if make_noncontiguous:
        tensors = [noncontiguous(t) for t in tensors]

    def fn(x, weight, out_bias=None):
        return ops.merge_heads(x, weight, out_bias)

    check_first_and_second_derivatives(fn, tuple(tensors), exact)


# ---------------------------------------------------------------------------------------------
# The backward ops themselves: their gradients are what double backward uses.


# The backward ops' own cases are those of `python -m qkv_attention.check`
# (python/qkv_attention/_cases.py), written once for the tool and this file.
SHARED_BACKWARD_CASES = {
    case.name: case
    for case in gradient_cases()
    if case.name in ("qkv_projection_backward", "merge_heads_backward")
}


@pytest.mark.parametrize("name", ["qkv_projection_backward", "merge_heads_backward"])
def test_backward_op_gradcheck_and_gradgradcheck(name):
    case = SHARED_BACKWARD_CASES[name]
    inputs = case.make_inputs(torch.Generator().manual_seed(0))
    assert gradcheck(case.function, inputs)
    assert gradgradcheck(case.function, inputs, fast_mode=True)


def test_qkv_projection_backward_gradcheck_with_missing_output_grads():
    B, L, S, E, H = 2, 3, 2, 4, 2
    grad_k = random_tensor(B, H, S, E // H, requires_grad=True)
    inputs = [random_tensor(B, n, E, requires_grad=True) for n in (L, S, S)]
    inputs += [random_tensor(E, E, requires_grad=True) for _ in range(3)]

    def fn(grad_k, *rest):
        return ops.qkv_projection_backward(None, grad_k, None, *rest, H)

    assert gradcheck(fn, (grad_k, *inputs))


ATTENTION_BACKWARD_CASES = {
    "plain": dict(),
    "float_masks_causal_scale": dict(masks=True, is_causal=True, scale=0.6),
    "dropout_with_grad_weights": dict(grad_weights=True, dropout_p=0.3),
    "all": dict(masks=True, grad_weights=True, is_causal=True, dropout_p=0.5),
}


@pytest.mark.parametrize(
    "options", ATTENTION_BACKWARD_CASES.values(), ids=ATTENTION_BACKWARD_CASES.keys()
)
def test_attention_backward_gradcheck_and_gradgradcheck(options):
    # Small: the full Jacobian has (inputs) x (outputs) entries, up to 108 x 72 here.
    B, H, L, S, D, Dv = 1, 2, 3, 4, 2, 2
    dropout_p = options.get("dropout_p", 0.0)
    is_causal = options.get("is_causal", False)
    scale = options.get("scale")
    inputs = [
        random_tensor(B, H, L, Dv, requires_grad=True),  # grad_output
        random_tensor(B, H, L, D, requires_grad=True),
        random_tensor(B, H, S, D, requires_grad=True),
        random_tensor(B, H, S, Dv, requires_grad=True),
    ]
    with_grad_weights = options.get("grad_weights", False)
    with_masks = options.get("masks", False)
    if with_grad_weights:
        inputs.append(random_tensor(B, H, L, S, requires_grad=True))
    if with_masks:
        inputs.append(random_tensor(H, L, S, scale=0.5, requires_grad=True))  # attn_mask
        inputs.append(random_tensor(B, S, scale=0.5, requires_grad=True))  # key_padding_mask

    def fn(grad_output, query, key, value, *rest):
        rest = list(rest)
        grad_weights = rest.pop(0) if with_grad_weights else None
        attn_mask, padding = (rest[0], rest[1]) if with_masks else (None, None)
        torch.manual_seed(DROPOUT_SEED)
        rng_state = qkv_attention.ops._draw_dropout_rng_state(dropout_p)
        output, logsumexp, _ = ops._attention_forward(
            query, key, value, attn_mask, padding, dropout_p, is_causal, scale, False, rng_state
        )
        grads = ops._attention_backward(
            grad_output,
            grad_weights,
            query,
            key,
            value,
            output,
            logsumexp,
            attn_mask,
            padding,
            dropout_p,
            is_causal,
            scale,
            rng_state,
            with_masks,
            with_masks,
        )
        return grads if with_masks else grads[:3]

    assert gradcheck(fn, tuple(inputs))
    assert gradgradcheck(fn, tuple(inputs), fast_mode=True)


@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_attention_fused_backward_matches_differentiable_backward(dropout_p):
    # Outside create_graph, _attention_backward runs the fused CPU kernel; under it, the ATen
    # formulation whose derivatives gradgradcheck verifies. Both must give the same gradients.
    B, H, L, S, D, Dv = 2, 3, 5, 7, 4, 3
    query, key, value = (random_tensor(B, H, n, f) for n, f in ((L, D), (S, D), (S, Dv)))
    grad_output = random_tensor(B, H, L, Dv)
    grad_weights = random_tensor(B, H, L, S)
    attn_mask = random_tensor(H, 1, S, scale=0.5)
    attn_mask[1, 0, :] = float("-inf")  # head 1 attends to nothing
    padding = random_bool_mask(B, S)
    torch.manual_seed(DROPOUT_SEED)
    rng_state = qkv_attention.ops._draw_dropout_rng_state(dropout_p)
    output, logsumexp, _ = ops._attention_forward(
        query, key, value, attn_mask, padding, dropout_p, True, None, False, rng_state
    )
    args = (
        grad_output,
        grad_weights,
        query,
        key,
        value,
        output,
        logsumexp,
        attn_mask,
        padding,
        dropout_p,
        True,
        None,
        rng_state,
        True,
        False,
    )
    with torch.no_grad():
        fused = ops._attention_backward(*args)
    # grad mode on and an input that requires grad: the differentiable path
    differentiable = ops._attention_backward(grad_output.requires_grad_(), *args[1:])
    assert differentiable[0].requires_grad and not fused[0].requires_grad
    for name, a, b in zip(("query", "key", "value", "attn_mask"), fused, differentiable):
        torch.testing.assert_close(a, b.detach(), atol=1e-12, rtol=1e-10, msg=name)
    assert fused[4].numel() == 0 and differentiable[4].numel() == 0  # bool padding: no grad
