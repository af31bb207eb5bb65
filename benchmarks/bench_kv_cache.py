"""The KV-cache decode step against torch (`make bench`): attention_with_kv_cache, which writes
the new key/value into the caches and reads each sequence's valid prefix only, against what a
static cache costs a torch user today: the same write (index assignment) and then
F.scaled_dot_product_attention over the whole S_max cache with a boolean mask of the valid
entries.

    python benchmarks/bench_kv_cache.py [--quick] [--reps N] [--threads N]

Both sides run in this process, interleaved (ours, torch, torch, ours, ...) after a warm-up;
each time is the median of the repetitions and the ratio is torch / ours (> 1: ours faster).
The step is memory-bound: each row also gives the bytes of valid K and V our op reads per
second, against a triad (a = b + s * c over 256 MiB) measured in the same run. The lengths are
not advanced between repetitions (each repetition rewrites the same entries), so every
repetition does the same work. The quantized rows (int8, float8_e4m3fn, float8_e5m2 caches,
B8 H32 Hkv8 D128, 4096 valid entries) compare our decode step, write included, with torch's
SDPA (enable_gqa) over bfloat16 and float32 caches of the same entries, and give the bytes of
codes and scales read per second against the triad. Writes
benchmarks/results/kv-cache-latest.json.
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

import qkv_attention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_inference import triad_bandwidth  # noqa: E402
from cases import describe_machine, interleaved_medians  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def decode_case(name, lengths, H, Hkv, S_max, D, dtype, reps, triad):
    torch.manual_seed(0)
    B = len(lengths)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    # Caches as a user allocates them; the valid prefixes filled, the rest left as it is.
    k_cache = torch.empty(B, Hkv, S_max, D, dtype=dtype)
    v_cache = torch.empty(B, Hkv, S_max, D, dtype=dtype)
    # torch's caches start from zeros: garbage (NaN, inf) in masked entries would reach its
    # output through 0 * NaN in P @ V.
    torch_k, torch_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    for b, n in enumerate(lengths.tolist()):
        k_cache[b, :, :n] = torch_k[b, :, :n] = torch.randn(Hkv, n, D).to(dtype)
        v_cache[b, :, :n] = torch_v[b, :, :n] = torch.randn(Hkv, n, D).to(dtype)
    q = torch.randn(B, H, 1, D).to(dtype)
    k_new, v_new = torch.randn(B, Hkv, 1, D).to(dtype), torch.randn(B, Hkv, 1, D).to(dtype)
    batch_index = torch.arange(B)
    positions = torch.arange(S_max)

    def ours():
        return torch.ops.qkv_attention.attention_with_kv_cache(
            q, k_cache, v_cache, k_new, v_new, lengths
        )

    def theirs():
        # The static-cache step: write at each sequence's position, mask the valid entries.
        torch_k[batch_index, :, lengths] = k_new[:, :, 0]
        torch_v[batch_index, :, lengths] = v_new[:, :, 0]
        valid = (positions[None, :] <= lengths[:, None])[:, None, None, :]  # (B, 1, 1, S_max)
        return F.scaled_dot_product_attention(
            q, torch_k, torch_v, attn_mask=valid, enable_gqa=Hkv != H
        )

    with torch.no_grad():
        out_ours, out_theirs = ours(), theirs()
        difference = (out_ours.float() - out_theirs.float()).abs().max().item()
        t_ours, t_torch = interleaved_medians(ours, theirs, reps)
    element = torch.empty(0, dtype=dtype).element_size()
    read = int((lengths + 1).sum()) * Hkv * D * 2 * element  # valid K and V
    return {
        "case": name,
        "dtype": str(dtype).replace("torch.", ""),
        "ours_ms": 1e3 * t_ours,
        "torch_ms": 1e3 * t_torch,
        "ratio": t_torch / t_ours,
        "valid_read_share_of_triad": read / t_ours / triad,
        "max_abs_difference": difference,
    }


def quantized_case(cache_dtype, reps, triad, B=8, H=32, Hkv=8, D=128, valid=4096):
    """A decode step (L = 1, the write included) over a quantized cache of `valid` entries per
    sequence after the write, against torch's SDPA (enable_gqa) over bfloat16 and float32
    caches holding the same entries (its write included; all entries valid, so no mask)."""
    torch.manual_seed(0)
    S_max = valid
    k_cache = torch.empty(B, Hkv, S_max, D, dtype=cache_dtype)
    v_cache = torch.empty(B, Hkv, S_max, D, dtype=cache_dtype)
    k_scale = torch.empty(B, Hkv, S_max)
    v_scale = torch.empty(B, Hkv, S_max)
    keys, values = torch.randn(B, Hkv, S_max, D), torch.randn(B, Hkv, S_max, D)
    with torch.no_grad():  # the history, quantized by the op's own write
        torch.ops.qkv_attention.attention_with_kv_cache(
            torch.randn(B, H, 1, D),
            k_cache,
            v_cache,
            keys[:, :, :-1],
            values[:, :, :-1],
            torch.zeros(B, dtype=torch.int64),
            k_cache_scale=k_scale,
            v_cache_scale=v_scale,
        )
    lengths = torch.full((B,), valid - 1, dtype=torch.int64)
    q = torch.randn(B, H, 1, D)
    k_new, v_new = keys[:, :, -1:], values[:, :, -1:]
    torch_caches = {dt: (keys.to(dt), values.to(dt)) for dt in (torch.bfloat16, torch.float32)}

    def ours():
        return torch.ops.qkv_attention.attention_with_kv_cache(
            q,
            k_cache,
            v_cache,
            k_new,
            v_new,
            lengths,
            k_cache_scale=k_scale,
            v_cache_scale=v_scale,
        )

    def torch_step(dt):
        tk, tv = torch_caches[dt]
        qd, kn, vn = q.to(dt), k_new.to(dt), v_new.to(dt)

        def step():
            tk[:, :, valid - 1 :] = kn
            tv[:, :, valid - 1 :] = vn
            return F.scaled_dot_product_attention(qd, tk, tv, enable_gqa=True)

        return step

    rows = []
    with torch.no_grad():
        exact = F.scaled_dot_product_attention(
            q.double(), keys.double(), values.double(), enable_gqa=True
        )
        error = (ours().double() - exact).abs().max().item()
        read = B * Hkv * valid * (2 * D + 2 * 4)  # codes and scales of K and V
        for dt in (torch.bfloat16, torch.float32):
            t_ours, t_torch = interleaved_medians(ours, torch_step(dt), reps)
            rows.append(
                {
                    "case": f"decode B{B} H{H}/{Hkv} D{D} {valid} valid, {str(cache_dtype)[6:]} cache",
                    "dtype": f"vs torch {str(dt)[6:]}",
                    "ours_ms": 1e3 * t_ours,
                    "torch_ms": 1e3 * t_torch,
                    "ratio": t_torch / t_ours,
                    "valid_read_share_of_triad": read / t_ours / triad,
                    "max_abs_error_vs_float64_unquantized": error,
                }
            )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 repetitions instead of 30")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (5 if args.quick else 30)
    triad = triad_bandwidth()
    H, Hkv, S_max, D = 32, 8, 4096, 128
    cases = [
        ("decode B1 H32/8 S_max4096 D128 len3000", [3000]),
        (
            "decode B8 H32/8 S_max4096 D128 len 500..3500",
            [500, 1000, 1500, 2000, 2500, 3000, 3500, 3100],
        ),
    ]
    rows = []
    print(
        f"triad {triad / 1e9:.1f} GB/s, {torch.get_num_threads()} threads, "
        f"kernel level {qkv_attention.build_info()['kernel_isa']}"
    )
    print(
        f"{'case':48s} {'dtype':9s} {'ours ms':>8s} {'torch ms':>9s} {'ratio':>6s} "
        f"{'read/triad':>10s}"
    )
    for dtype_name in ("float32", "bfloat16"):
        for name, lengths in cases:
            row = decode_case(name, lengths, H, Hkv, S_max, D, DTYPES[dtype_name], reps, triad)
            rows.append(row)
            print(
                f"{row['case']:48s} {row['dtype']:9s} {row['ours_ms']:8.3f} "
                f"{row['torch_ms']:9.3f} {row['ratio']:6.2f} "
                f"{row['valid_read_share_of_triad']:10.2f}"
            )
    # Quantized caches (int8, float8): the rows and scales read, against torch over bfloat16
    # and float32 caches of the same entries.
    for cache_dtype in (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2):
        for row in quantized_case(cache_dtype, reps, triad):
            rows.append(row)
            print(
                f"{row['case']:48s} {row['dtype']:9s} {row['ours_ms']:8.3f} "
                f"{row['torch_ms']:9.3f} {row['ratio']:6.2f} "
                f"{row['valid_read_share_of_triad']:10.2f}"
            )
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "kv-cache-latest.json"), "w") as f:
        json.dump(
            {"machine": describe_machine(), "reps": reps, "triad_bytes_per_s": triad, "rows": rows},
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
