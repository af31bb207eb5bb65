"""Inference against torch (`make bench`): decoding, grouped-query attention, the module at
small and longer shapes (eval and training), and the per-call cost of each Python path.

    python benchmarks/bench_inference.py [--quick] [--parts module,overhead]

Both sides run in this process, interleaved (ours, torch, torch, ours, ...) after a warm-up;
each time is the median of the repetitions and the ratio is torch / ours (> 1: ours faster).
Decoding (one query against a long key/value history) is memory-bound: its rows also give the
bytes of K and V read per second, against a triad (a = b + s * c over 256 MiB) measured in the
same run. The per-call rows run one thread and compare each of our entry points (the op, the
functional, the HuggingFace attention function) with its torch counterpart at a decoding step's
size. Writes benchmarks/results/inference-latest.json.
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
    """The module against torch's: the small shapes (B8 L128, B16 L64) with need_weights both
    ways, the longer ones with torch's default need_weights=True; eval and training each."""
    rows = []
    shapes = [(8, 128, 512, 8, (False, True)), (16, 64, 512, 8, (False, True))]
    shapes += [(1, 1024, 512, 8, (True,)), (4, 512, 512, 8, (True,))]
    for B, L, E, H, weights in shapes:
        torch.manual_seed(0)
        theirs_mod = torch.nn.MultiheadAttention(E, H, batch_first=True)
        ours_mod = qkv_attention.MultiheadAttention(E, H, batch_first=True)
        ours_mod.load_state_dict(theirs_mod.state_dict())
        x = torch.randn(B, L, E)
        for label, grad in (("eval", False), ("train", True)):
            for need_weights in weights:

                def run(mod):
                    def step():
                        if grad:
                            out, w = mod(x, x, x, need_weights=need_weights)
                            loss = out.sum() if w is None else out.sum() + w.sum()
                            loss.backward()
                        else:
                            with torch.no_grad():
                                mod(x, x, x, need_weights=need_weights)

                    return step

                ours_mod.train(grad)
                theirs_mod.train(grad)
                t_ours, t_torch = interleaved_medians(run(ours_mod), run(theirs_mod), reps)
                rows.append(
                    {
                        "case": f"module {label} weights={int(need_weights)} B{B} L{L} E{E} H{H}",
                        "ours_ms": 1e3 * t_ours,
                        "torch_ms": 1e3 * t_torch,
                        "ratio": t_torch / t_ours,
                    }
                )
    return rows


class _GroupedLayer(torch.nn.Module):
    """What transformers' attention functions read from a Llama-style layer."""

    num_key_value_groups = 4
    is_causal = True


def overhead_rows(reps):
    """Per-call cost at a decoding step's size, one thread: one query against 512 keys,
    H 8 / Hkv 2, D 64. The op, our functional and our HuggingFace function against SDPA and
    transformers' sdpa function, each pair interleaved; the gap to the reference is the Python
    and dispatch cost of each path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        q = torch.randn(1, 8, 1, 64)
        k, v = torch.randn(1, 2, 512, 64), torch.randn(1, 2, 512, 64)
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
        pairs = [
            (
                "op (grouped heads) vs SDPA",
                lambda: torch.ops.qkv_attention.attention(q, k, v),
                sdpa,
            ),
            (
                "functional(enable_gqa) vs SDPA",
                lambda: qkv_attention.functional.scaled_dot_product_attention(
                    q, k, v, enable_gqa=True
                ),
                sdpa,
            ),
        ]
        try:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            from qkv_attention.huggingface import attention_forward
        except ImportError:
            pass  # transformers is optional: no HuggingFace row
        else:
            layer = _GroupedLayer()
            pairs.append(
                (
                    "HF attention function vs transformers sdpa",
                    lambda: attention_forward(layer, q, k, v, None, scaling=0.125),
                    lambda: sdpa_attention_forward(layer, q, k, v, None, scaling=0.125),
                )
            )
        rows = []
        with torch.no_grad():
            for name, ours, theirs in pairs:
                t_ours, t_torch = interleaved_medians(ours, theirs, reps)
                rows.append(
                    {
                        "case": f"1 thread B1 H8/2 L1 S512 D64: {name}",
                        "ours_ms": 1e3 * t_ours,
                        "torch_ms": 1e3 * t_torch,
                        "ratio": t_torch / t_ours,
                    }
                )
        return rows
    finally:
        torch.set_num_threads(threads)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--parts",
        default="decode,gqa,module,overhead",
        help="comma-separated subset of decode, gqa, module, overhead",
    )
    args = parser.parse_args()
    reps = 7 if args.quick else 21
    parts = args.parts.split(",")
    triad = triad_bandwidth() if "decode" in parts else float("nan")
    rows = []
    if "decode" in parts:
        rows += decode_rows(reps, triad)
    if "gqa" in parts:
        rows += gqa_training_rows(max(3, reps // 3))
    if "module" in parts:
        rows += module_rows(reps)
    if "overhead" in parts:
        rows += overhead_rows(20 * reps)
    info = qkv_attention.build_info()
    print(
        f"kernel_isa={info['kernel_isa']} threads={torch.get_num_threads()} "
        f"triad={triad / 1e9:.1f} GB/s load average {os.getloadavg()[0]:.2f} "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}"
    )
    print(
        f"| {'case':<68} | {'ours ms':>8} | {'torch ms':>8} | {'torch/ours':>10} | {'of triad':>8} |"
    )
    for row in rows:
        share = f"{100 * row['bandwidth_share']:.0f}%" if "bandwidth_share" in row else ""
        print(
            f"| {row['case']:<68} | {row['ours_ms']:8.3f} | {row['torch_ms']:8.3f} | "
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
