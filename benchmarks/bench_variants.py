"""The attention variants against what torch offers for them (`make bench`).

    python benchmarks/bench_variants.py [--quick] [--reps N] [--threads N]

- Sliding window, forward + backward, B1 H8 D64 float32, causal with a window of 512 keys
  (transformers' sliding_window=512, our window_size=(511, 0)), at L = 4096 and 8192: our op,
  which skips the key blocks outside the band, against F.scaled_dot_product_attention given the
  same band as a (L, L) bool mask (what a torch user runs), and against our own full causal
  attention at the same L.
- Decoding with a window: one query (B1 H8 D64 float32) against a cache of 16384 valid entries
  with window_size=(1023, 0), against the same step over a cache of 1024 entries: a windowed
  step reads the window's entries only, so the two should take about the same time.

Both sides of a row run in this process, interleaved (cases.interleaved_medians); times are
medians, ratios are theirs / ours (> 1: ours faster). Writes
benchmarks/results/variants-latest.json.
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

import qkv_attention
from qkv_attention import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import describe_machine, interleaved_medians  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def band_mask(L: int, window: int) -> torch.Tensor:
    """(L, L) bool: query i sees keys i - window + 1 .. i (causal sliding window)."""
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    return (j <= i) & (j > i - window)


def training_step(fn, q, k, v, grad):
    """Forward and backward of fn(q, k, v), gradients cleared first."""

    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(grad)

    return step


def window_rows(L: int, window: int, reps: int):
    torch.manual_seed(0)
    B, H, D = 1, 8, 64
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, L, D)
    mask = band_mask(L, window)

    def ours(q, k, v):
        return ops.attention(q, k, v, is_causal=True, window_size=(window - 1, 0))

    def sdpa_band(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def ours_full_causal(q, k, v):
        return ops.attention(q, k, v, is_causal=True)

    difference = (ours(q, k, v) - sdpa_band(q, k, v)).abs().max().item()
    ours_step = training_step(ours, q, k, v, grad)
    t_ours, t_sdpa = interleaved_medians(ours_step, training_step(sdpa_band, q, k, v, grad), reps)
    rows = [
        {
            "case": f"window {window} causal fwd+bwd B1 H8 L{L} D64 float32",
            "against": "SDPA with the band as a bool mask",
            "ours_ms": 1e3 * t_ours,
            "theirs_ms": 1e3 * t_sdpa,
            "ratio": t_sdpa / t_ours,
            "max_abs_difference": difference,
        }
    ]
    if L <= 4096:
        t_ours2, t_full = interleaved_medians(
            ours_step, training_step(ours_full_causal, q, k, v, grad), reps
        )
        rows.append(
            {
                "case": f"window {window} causal fwd+bwd B1 H8 L{L} D64 float32",
                "against": "our full causal attention",
                "ours_ms": 1e3 * t_ours2,
                "theirs_ms": 1e3 * t_full,
                "ratio": t_full / t_ours2,
            }
        )
    return rows


def decode_row(reps: int):
    torch.manual_seed(0)
    H, D, window, long_s, short_s = 8, 64, 1024, 16384, 1024
    q = torch.randn(1, H, 1, D)

    def step(S, window_size):
        k_cache, v_cache = torch.randn(1, H, S, D), torch.randn(1, H, S, D)

        def run():
            return ops.attention_with_kv_cache(q, k_cache, v_cache, window_size=window_size)

        return run

    with torch.no_grad():
        t_window, t_short = interleaved_medians(
            step(long_s, (window - 1, 0)), step(short_s, (-1, -1)), reps
        )
    return {
        "case": f"decode L1 B1 H8 D64 float32, window {window} over {long_s} valid entries",
        "against": f"the same step over a cache of {short_s} entries",
        "ours_ms": 1e3 * t_window,
        "theirs_ms": 1e3 * t_short,
        "ratio": t_short / t_window,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions, L = 4096 only")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 7)
    print(
        f"{torch.get_num_threads()} threads, kernel level "
        f"{qkv_attention.build_info()['kernel_isa']}, ratio = theirs / ours"
    )
    rows = []
    for L in (4096,) if args.quick else (4096, 8192):
        rows += window_rows(L, 512, reps)
    rows.append(decode_row(max(reps, 20)))
    print(f"{'case':62s} {'against':46s} {'ours ms':>9s} {'theirs ms':>10s} {'ratio':>6s}")
    for row in rows:
        print(
            f"{row['case']:62s} {row['against']:46s} {row['ours_ms']:9.2f} "
            f"{row['theirs_ms']:10.2f} {row['ratio']:6.2f}"
        )
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "variants-latest.json"), "w") as f:
        json.dump({"machine": describe_machine(), "reps": reps, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
