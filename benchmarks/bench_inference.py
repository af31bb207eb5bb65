"""Inference against torch (`make bench`): decoding, grouped-query attention, and the module in
eval with its default need_weights=True.

    python benchmarks/bench_inference.py [--quick]

Both sides run in this process, interleaved (ours, torch, torch, ours, ...) after a warm-up;
each time is the median of the repetitions and the ratio is torch / ours (> 1: ours faster).
Decoding (one query against a long key/value history) is memory-bound: its rows also give the
bytes of K and V read per second, against a triad (a = b + s * c over 256 MiB) measured in the
same run. Writes benchmarks/results/inference-latest.json.
"""

import argparse
import json
import os
import statistics
import time

import sys

import torch
import torch.nn.functional as F

import qkv_attention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import interleaved_medians  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def triad_bandwidth(reps=5):
    """Bytes per second of a = b + s * c over 256 MiB arrays (3 arrays touched)."""
    n = 64 * 1024 * 1024  # elements: 256 MiB of float32 per array
    b, c, a = torch.rand(n), torch.rand(n), torch.empty(n)
    best = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best.append(time.perf_counter() - t0)
    return 3 * 4 * n / statistics.median(best)


def decode_rows(reps, triad):
    rows = []
    for name, B, H, Hkv, S, D in [
        ("B1 H32 S4096 D128", 1, 32, 32, 4096, 128),
        ("B8 H8 S2048 D64", 8, 8, 8, 2048, 64),
        ("GQA B1 H32/8 S4096 D128", 1, 32, 8, 4096, 128),
    ]:
        torch.manual_seed(0)
        q = torch.randn(B, H, 1, D)
        k, v = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
        ours = lambda: torch.ops.qkv_attention.attention(q, k, v)  # noqa: E731
        theirs = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=Hkv != H)  # noqa: E731
        t_ours, t_torch = interleaved_medians(ours, theirs, reps)
        moved = (k.numel() + v.numel()) * 4
        rows.append(
            {
                "case": f"decode {name}",
                "ours_ms": 1e3 * t_ours,
                "torch_ms": 1e3 * t_torch,
                "ratio": t_torch / t_ours,
                "bandwidth_share": moved / t_ours / triad,
            }
        )
    return rows


def gqa_training_rows(reps):
    torch.manual_seed(0)
    B, H, Hkv, L, D = 1, 32, 8, 1024, 128
    q = torch.randn(B, H, L, D, requires_grad=True)
    k = torch.randn(B, Hkv, L, D, requires_grad=True)
    v = torch.randn(B, Hkv, L, D, requires_grad=True)
    g = torch.randn(B, H, L, D)

    def step(fn):
        return lambda: torch.autograd.grad(fn(), (q, k, v), g)

    ours = step(lambda: torch.ops.qkv_attention.attention(q, k, v, None, 0.0, True))
    theirs = step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    t_ours, t_torch = interleaved_medians(ours, theirs, reps)
    return [
        {
            "case": "GQA fwd+bwd B1 H32/8 L1024 D128 causal",
            "ours_ms": 1e3 * t_ours,
            "torch_ms": 1e3 * t_torch,
            "ratio": t_torch / t_ours,
        }
    ]


def module_rows(reps):
    rows = []
    for B, L, E, H in [(8, 128, 512, 8), (1, 1024, 512, 8), (4, 512, 512, 8)]:
        torch.manual_seed(0)
        theirs_mod = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
        ours_mod = qkv_attention.MultiheadAttention(E, H, batch_first=True).eval()
        ours_mod.load_state_dict(theirs_mod.state_dict())
        x = torch.randn(B, L, E)
        for label, grad in (("eval", False), ("train", True)):

            def run(mod):
                def step():
                    if grad:
                        out, w = mod(x, x, x)  # need_weights=True, torch's default
                        (out.sum() + w.sum()).backward()
                    else:
                        with torch.no_grad():
                            mod(x, x, x)

                return step

            if grad:
                ours_mod.train()
                theirs_mod.train()
            t_ours, t_torch = interleaved_medians(run(ours_mod), run(theirs_mod), reps)
            rows.append(
                {
                    "case": f"module {label} need_weights B{B} L{L} E{E} H{H}",
                    "ours_ms": 1e3 * t_ours,
                    "torch_ms": 1e3 * t_torch,
                    "ratio": t_torch / t_ours,
                }
            )
            ours_mod.eval()
            theirs_mod.eval()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    reps = 7 if args.quick else 21
    triad = triad_bandwidth()
    rows = decode_rows(reps, triad) + gqa_training_rows(max(3, reps // 3)) + module_rows(reps)
    info = qkv_attention.build_info()
    print(
        f"kernel_isa={info['kernel_isa']} threads={torch.get_num_threads()} "
        f"triad={triad / 1e9:.1f} GB/s"
    )
    print(
        f"| {'case':<44} | {'ours ms':>8} | {'torch ms':>8} | {'torch/ours':>10} | {'of triad':>8} |"
    )
    for row in rows:
        share = f"{100 * row['bandwidth_share']:.0f}%" if "bandwidth_share" in row else ""
        print(
            f"| {row['case']:<44} | {row['ours_ms']:8.2f} | {row['torch_ms']:8.2f} | "
            f"{row['ratio']:10.2f} | {share:>8} |"
        )
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "inference-latest.json"), "w") as f:
        json.dump(
            {"kernel_isa": info["kernel_isa"], "triad_bytes_per_s": triad, "rows": rows},
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
