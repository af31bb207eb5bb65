"""Helpers shared by the module tests (tests/python/module): torch's and our module built alike,
forward and backward runs, their comparison per dtype, masks and a reference written with plain
torch ops. Imported as ``from helpers.module import ...``."""

import math
from typing import Dict, List, Optional

import torch
from torch import nn

import qkv_attention


# Tolerances of our module against torch's module, both computing in the same dtype.
#   float64: eps 2.2e-16. The two differ only in summation order (GEMM blocking, softmax sums,
#            the 1/sqrt(D) applied to q by torch and to the scores by us). Measured over the
#            whole option matrix: <= 1.1e-13 absolute, for parameter gradients of magnitude ~20
#            (sums over B*L*S terms); 1e-10 absolute and relative is the bar.
#   float32: eps 1.2e-7. The rounding error of a sum scales with its terms, i.e. with the
#            largest element of the tensor rather than with each element (a gradient element
#            that cancels to ~0 keeps the error of its O(1) terms). Measured over the matrix:
#            max|diff| <= 2.1e-6 * max|expected| for outputs, weights and all gradients. The
#            bound used is 2e-5 * max(max|expected|, 1) (~170 eps, 10x the measured worst),
#            far below the O(1e-2) a wrong term would cause.
FLOAT64_TOLERANCE = dict(atol=1e-10, rtol=1e-10)
FLOAT32_TOLERANCE_OF_MAX = 2e-5


def assert_close_for_dtype(actual, expected, dtype, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if dtype == torch.float64:
        torch.testing.assert_close(
            actual, expected, **FLOAT64_TOLERANCE, msg=lambda m: f"{what}: {m}"
        )
        return
    assert dtype == torch.float32, dtype
    assert actual.dtype == expected.dtype, what
    if expected.numel() == 0:
        return
    bound = FLOAT32_TOLERANCE_OF_MAX * max(expected.abs().max().item(), 1.0)
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= bound, f"{what}: max |difference| {error:.3e} > {bound:.3e}"


def module_pair(dtype=torch.float64, seed=0, **config):
    """torch.nn.MultiheadAttention and ours with identical, random parameters.

    Parameters are drawn as N(0, 0.5^2) rather than kept at torch's init, so that every bias
    (zero at init) is exercised."""
    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(**config, dtype=dtype)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    ours = qkv_attention.MultiheadAttention(**config, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def forward_and_grads(
    module, inputs: Dict[str, Optional[torch.Tensor]], cotangent_seed=1, **kwargs
):
    """Runs ``module(**inputs, **kwargs)`` and backpropagates fixed random cotangents of the
    output and the weights. Returns (output, weights, {name: grad}) for every input tensor that
    requires grad and every parameter."""
    out, weights = module(**inputs, **kwargs)
    generator = torch.Generator().manual_seed(cotangent_seed)
    loss = (out * torch.randn(out.shape, generator=generator, dtype=out.dtype)).sum()
    if weights is not None:
        loss = (
            loss
            + (weights * torch.randn(weights.shape, generator=generator, dtype=weights.dtype)).sum()
        )
    leaves = {
        f"input.{k}": v
        for k, v in inputs.items()
        if isinstance(v, torch.Tensor) and v.requires_grad
    }
    leaves.update({f"param.{k}": p for k, p in module.named_parameters()})
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return out, weights, dict(zip(leaves.keys(), grads))


def clone_inputs(inputs):
    """Fresh leaves with the same values (and requires_grad), keeping aliasing: inputs that
    are the same tensor stay the same tensor."""
    cloned = {}
    memo = {}
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor):
            cloned[name] = t
        elif id(t) in memo:
            cloned[name] = memo[id(t)]
        else:
            memo[id(t)] = cloned[name] = t.detach().clone().requires_grad_(t.requires_grad)
    return cloned


def assert_results_match(ours, theirs, dtype, what=""):
    """Outputs, weights and every gradient agree to the dtype's tolerance."""
    out_a, w_a, g_a = ours
    out_b, w_b, g_b = theirs
    assert_close_for_dtype(out_a, out_b, dtype, f"{what} output")
    assert (w_a is None) == (w_b is None), what
    if w_a is not None:
        assert_close_for_dtype(w_a, w_b, dtype, f"{what} weights")
    assert g_a.keys() == g_b.keys(), what
    for name in g_a:
        assert (g_a[name] is None) == (g_b[name] is None), f"{what} {name}"
        if g_a[name] is not None:
            assert_close_for_dtype(g_a[name], g_b[name], dtype, f"{what} grad {name}")


def bool_mask_keeping_first_column(*shape, masked_probability=0.4, generator=None):
    """torch's module convention (True = masked out), never masking column 0, so that no
    query row loses every key (torch's module gives NaN there, we give zeros)."""
    mask = torch.rand(*shape, generator=generator) < masked_probability
    mask[..., 0] = False
    return mask


def float_mask_keeping_first_column(*shape, dtype, masked_probability=0.3, generator=None):
    """N(0, 1) values added to the scores, with -inf (masked out) at random places except
    column 0."""
    mask = torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)
    minus_inf = torch.rand(*shape, generator=generator) < masked_probability
    minus_inf[..., 0] = False
    return mask.masked_fill(minus_inf, -math.inf)


def reference_multihead_attention(
    module,
    query,
    key,
    value,
    key_padding_mask=None,
    attn_mask=None,
    need_weights=True,
    average_attn_weights=True,
    dropout_keep=None,
):
    """The math of multi-head attention written out plainly in float64, reading the
    parameters of ``module`` (either class): our independent reference.

    Conventions of torch's module: bool True = masked out, float masks added; attn_mask (L, S)
    or (N * H, L, S); extra key/value columns for bias_kv and zero_attn. A query row without
    any key to attend to gets zero weights (our contract). ``dropout_keep`` (N, H, L, S') is an
    explicit dropout mask (the weights are multiplied by keep / (1 - p)).
    """
    f64 = torch.float64
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0).flatten(0, 1)
    elif module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    # Now (L, N, E), (S, N, Ek), (S, N, Ev).
    L, N, E = query.shape
    S = key.shape[0]
    H = module.num_heads
    D = E // H
    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = module.in_proj_weight.to(f64).split(E)
    else:
        w_q, w_k, w_v = (
            w.to(f64) for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        )
    b_q = b_k = b_v = None
    if module.in_proj_bias is not None:
        b_q, b_k, b_v = module.in_proj_bias.to(f64).split(E)

    def project(x, w, b):
        y = x.to(f64) @ w.T
        return y if b is None else y + b

    q = project(query, w_q, b_q)  # (L, N, E)
    k = project(key, w_k, b_k)  # (S, N, E)
    v = project(value, w_v, b_v)

    # Additive mask (N, H, L, S) in float64: -inf where torch's bool masks say True.
    def additive(mask):
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=f64).masked_fill(mask, -math.inf)
        return mask.to(f64)

    total = torch.zeros(N, H, L, S, dtype=f64)
    if attn_mask is not None:
        am = additive(attn_mask)
        total = total + (am if am.dim() == 2 else am.view(N, H, L, S))
    if key_padding_mask is not None:
        total = total + additive(key_padding_mask)[:, None, None, :]

    extra_k: List[torch.Tensor] = []
    extra_v: List[torch.Tensor] = []
    if module.bias_k is not None:
        extra_k.append(module.bias_k.to(f64).expand(1, N, E))
        extra_v.append(module.bias_v.to(f64).expand(1, N, E))
    if module.add_zero_attn:
        extra_k.append(torch.zeros(1, N, E, dtype=f64))
        extra_v.append(torch.zeros(1, N, E, dtype=f64))
    if extra_k:
        k = torch.cat([k, *extra_k])
        v = torch.cat([v, *extra_v])
        total = torch.cat([total, torch.zeros(N, H, L, len(extra_k), dtype=f64)], dim=-1)

    heads = lambda x: x.reshape(x.shape[0], N, H, D).permute(1, 2, 0, 3)  # (N, H, seq, D)
    qh, kh, vh = heads(q), heads(k), heads(v)
    scores = qh @ kh.transpose(-2, -1) / math.sqrt(D) + total  # (N, H, L, S')
    alive = torch.isfinite(scores).any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~alive, 0.0), dim=-1) * alive
    if dropout_keep is not None:
        p = module.dropout
        probs = probs * dropout_keep.to(f64) / (1.0 - p)
    attended = probs @ vh  # (N, H, L, D)
    merged = attended.permute(2, 0, 1, 3).reshape(L, N, E)
    out = merged @ module.out_proj.weight.to(f64).T
    if module.out_proj.bias is not None:
        out = out + module.out_proj.bias.to(f64)
    if not batched:
        out = out.squeeze(1)
    elif module.batch_first:
        out = out.transpose(0, 1)
    weights = None
    if need_weights:
        weights = probs.mean(1) if average_attn_weights else probs
        if not batched:
            weights = weights.squeeze(0)
    return out, weights
