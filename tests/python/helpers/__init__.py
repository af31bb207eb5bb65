"""Helpers shared by the Python tests: a float64 reference attention written with plain torch ops,
random-input factories and per-dtype tolerances.

``pyproject.toml`` puts ``tests/python`` on ``sys.path`` (pytest's ``pythonpath``), so the tests of
every sub-folder import these with ``from helpers import ...``; ``helpers.module`` holds what the
module tests share.
"""

import math

import torch

import qkv_attention  # noqa: F401  (registers torch.ops.qkv_attention)

ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
HALF_DTYPES = (torch.bfloat16, torch.float16)

# Tolerances of our result against a reference computed in the same dtype by another
# implementation (torch's SDPA, F.linear): both sides round, in different orders.
#   float64: eps 2.2e-16; sums of at most ~100 products of O(1) values stay within ~1e-14, so
#            1e-12 leaves 100x margin and still catches any real formula error.
#   float32: eps 1.2e-7; measured differences at these sizes are <= 3e-6 (dot products over
#            <= 64 terms, softmax sums over <= 64 keys), so 1e-5 (~80 eps) is tight and safe.
#   bfloat16: 8-bit mantissa, one rounding costs up to 2^-9 = 2e-3 relative; two implementations
#            that each round the result (and possibly the probabilities before P @ V, as torch
#            does) differ by a few of those: 4 ulps at 1.0 = 2^-6 = 1.6e-2.
#   float16: 11-bit mantissa, same reasoning: 4 ulps at 1.0 = 2^-8 = 3.9e-3.
SAME_DTYPE_TOLERANCE = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float16: dict(atol=3.9e-3, rtol=3.9e-3),
}

# Tolerances of our result against the float64 reference run on the same (already rounded)
# inputs. The reference is exact to ~1e-15, so this is our own rounding alone:
#   float64/float32: as above (accumulation error only).
#   bfloat16/float16: we accumulate in float32 and round once at the end (half an ulp, measured
#            <= 2^-9 relative for bf16 and 2^-12 for fp16); a kernel that also rounds the
#            probabilities to the half type before P @ V (torch's does) adds about one more ulp
#            of the largest term. 2 ulps at 1.0 covers both: 2^-7 (bf16) and 2^-9 (fp16).
VS_FLOAT64_TOLERANCE = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2.0**-7, rtol=2.0**-7),
    torch.float16: dict(atol=2.0**-9, rtol=2.0**-9),
}

# Half-type gradients against the float64 reference, relative to the largest reference gradient:
# the backward rounds dO, the probabilities and the results to the half type and sums over
# L or S terms, so its error scales with the gradient's magnitude, not each element's. Measured
# for us <= 0.7 ulp of the max (torch's own SDPA: <= 1.8 ulp); 4 ulps of the max:
HALF_GRAD_TOLERANCE_OF_MAX = {torch.bfloat16: 2.0**-6, torch.float16: 2.0**-8}


def random_tensor(*shape, dtype=torch.float64, requires_grad=False, scale=1.0):
    """Standard normal values (times ``scale``), rounded to ``dtype``; a leaf tensor."""
    t = (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def random_qkv(B, H, L, S, D, Dv=None, dtype=torch.float64, requires_grad=False):
    """query (B, H, L, D), key (B, H, S, D), value (B, H, S, Dv)."""
    Dv = D if Dv is None else Dv
    return (
        random_tensor(B, H, L, D, dtype=dtype, requires_grad=requires_grad),
        random_tensor(B, H, S, D, dtype=dtype, requires_grad=requires_grad),
        random_tensor(B, H, S, Dv, dtype=dtype, requires_grad=requires_grad),
    )


def random_bool_mask(*shape, keep_probability=0.7):
    """True (may attend) with probability ``keep_probability``."""
    return torch.rand(*shape) < keep_probability


def noncontiguous(t):
    """The same values as ``t`` in a non-contiguous leaf: stored with every dim at stride 2
    (a slice of a twice-as-large tensor) and, for 2 or more dims, the last two dims transposed."""
    storage_shape = list(t.shape)
    if t.dim() >= 2:
        storage_shape[-2], storage_shape[-1] = storage_shape[-1], storage_shape[-2]
    wide = torch.zeros([2 * n for n in storage_shape], dtype=t.dtype)
    view = wide[tuple(slice(None, None, 2) for _ in storage_shape)]
    if t.dim() >= 2:
        view = view.transpose(-2, -1)
    with torch.no_grad():
        view.copy_(t)
    assert torch.equal(view, t) and (t.numel() <= 1 or not view.is_contiguous())
    return view.detach().requires_grad_(t.requires_grad)


def reference_attention(
    query,
    key,
    value,
    attn_mask=None,
    is_causal=False,
    scale=None,
    key_padding_mask=None,
    dropout_keep=None,
    dropout_p=0.0,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    sinks=None,
    causal_offset=0,
):
    """Attention in float64 with plain, differentiable torch ops (never torch's SDPA).

    Follows the contract of docs/design.md: key/value with fewer heads (Hkv dividing H) serve
    query head h from head h // (H / Hkv); score(i, j) = q_i . k_j * scale; with ``softcap`` > 0
    it becomes softcap * tanh(score / softcap); ``alibi_slopes`` ((H,) or (B, H)) then add
    -slope_h * |i + o - j|; then the masks (broadcast to (B, H, L, S), bool True = may attend,
    float added). Query i sees key j only where causality (j <= i + o) and ``window_size =
    (left, right)`` (i + o - left <= j <= i + o + right, -1 an open side) allow it; o is
    ``causal_offset``, an int or one per batch entry (the KV cache's bottom-right alignment).
    ``sinks`` ((H,)) add exp(sinks[h]) to each row's softmax denominator, with no value. A row
    with no key to attend to gives zero weights and zero gradient; ``dropout_keep`` (bool,
    (B, H, L, S)) zeroes weights, the kept ones scaled by 1/(1 - dropout_p). Returns (output
    (B, H, L, Dv), weights (B, H, L, S), the sink excluded) in float64.
    """
    q, k, v = (t.to(torch.float64) for t in (query, key, value))
    B, H, L = q.shape[:3]
    if k.size(1) != H:  # grouped-query heads: (B, Hkv, S, D) -> (B, H, S, D)
        k = k.repeat_interleave(H // k.size(1), dim=1)
        v = v.repeat_interleave(H // v.size(1), dim=1)
    S = k.size(2)
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1)) if q.size(-1) > 0 else 1.0
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, L, S)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    # i + o - j for every (batch, row, key): (B, 1, L, S)
    offsets = torch.as_tensor(causal_offset, dtype=torch.int64).reshape(-1, 1, 1, 1)
    distance = torch.arange(L).view(1, 1, L, 1) + offsets - torch.arange(S).view(1, 1, 1, S)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(torch.float64)
        slopes = slopes.view(1, H, 1, 1) if slopes.dim() == 1 else slopes.view(B, H, 1, 1)
        scores = scores - slopes * distance.abs().to(torch.float64)

    def apply(scores, mask):
        if mask.dtype == torch.bool:
            return scores.masked_fill(~mask, -math.inf)
        return scores + mask.to(torch.float64)

    if attn_mask is not None:
        scores = apply(scores, attn_mask)
    if key_padding_mask is not None:
        scores = apply(scores, key_padding_mask[:, None, None, :])  # (B, S) -> (B, 1, 1, S)
    hidden = torch.zeros_like(distance, dtype=torch.bool)
    if is_causal:
        hidden |= distance < 0
    left, right = window_size
    if left >= 0:
        hidden |= distance > left
    if right >= 0:
        hidden |= distance < -right
    scores = scores.masked_fill(hidden, -math.inf)
    # Rows with no finite score attend to nothing: zero weights, zero gradient.
    has_key = torch.isfinite(scores).any(-1, keepdim=True)  # (B, H, L, 1)
    safe_scores = torch.where(has_key, scores, torch.zeros_like(scores))
    if sinks is None:
        weights = torch.softmax(safe_scores, dim=-1) * has_key
    else:
        # The sink as one more column of every row's softmax, then dropped: (B, H, L, S + 1).
        sink_column = sinks.to(torch.float64).view(1, H, 1, 1).expand(B, H, L, 1)
        weights = torch.softmax(torch.cat([safe_scores, sink_column], dim=-1), dim=-1)
        weights = weights[..., :S] * has_key
    if dropout_keep is not None:
        kept_scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0
        weights = weights * dropout_keep.to(torch.float64) * kept_scale
    return weights @ v, weights


def assert_close_to_max(actual, expected, relative_to_max):
    """|actual - expected| <= relative_to_max * max|expected| elementwise (for half types)."""
    actual, expected = actual.double(), expected.double()
    bound = relative_to_max * max(expected.abs().max().item() if expected.numel() else 0.0, 1e-3)
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= bound, f"max error {error:.3e} exceeds {bound:.3e}"
