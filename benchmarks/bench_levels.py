"""The attention op against F.scaled_dot_product_attention at every CPU level (`make bench`).

    python benchmarks/bench_levels.py            # default, avx2 and this machine's own level
    python benchmarks/bench_levels.py --quick    # fewer repetitions

Each level runs in a child process with ATEN_CPU_CAPABILITY forcing it for torch and for our
kernels alike (and MKL_ENABLE_INSTRUCTIONS=AVX2 for avx2, so that MKL behaves as on an
AVX2-only CPU). Inside a child both sides run interleaved (ours, torch, torch, ours, ...) after a
warm-up; each time is the median of the repetitions, and the ratio torch / ours is reported
(> 1: ours is faster). Writes benchmarks/results/levels-latest.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time

# (name, B, H, L, D, causal, mode)
SHAPES = [
    ("B2 H8 L1024 D64", 2, 8, 1024, 64, False, "fwd"),
    ("B2 H8 L1024 D64", 2, 8, 1024, 64, False, "fwd+bwd"),
    ("B2 H8 L1024 D64 causal", 2, 8, 1024, 64, True, "fwd"),
    ("B1 H8 L2048 D128 causal", 1, 8, 2048, 128, True, "fwd+bwd"),
]
DTYPES = ("float32", "bfloat16")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def child(reps: int):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import qkv_attention

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cases import interleaved_medians

    rows = []
    for name, B, H, L, D, causal, mode in SHAPES:
        for dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
            torch.manual_seed(0)
            grad = mode == "fwd+bwd"
            q, k, v = (torch.randn(B, H, L, D, dtype=dtype, requires_grad=grad) for _ in range(3))
            g = torch.randn(B, H, L, D, dtype=dtype)

            def run(fn):
                def step():
                    if grad:
                        torch.autograd.grad(fn(q, k, v), (q, k, v), g)
                    else:
                        with torch.no_grad():
                            fn(q, k, v)

                return step

            ours = run(
                lambda q, k, v: torch.ops.qkv_attention.attention(q, k, v, None, 0.0, causal)
            )
            theirs = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            torch_backend = "flash"
            try:
                theirs()
            except RuntimeError as error:
                # On a CPU with AMX, torch 2.13's flash attention refuses bfloat16 when a level
                # below avx512 is forced (pack_vnni2): its math backend is then what torch runs.
                if "pack_vnni2" not in str(error):
                    raise
                torch_backend = "math"
                flash_only = theirs

                def theirs():
                    with sdpa_kernel(SDPBackend.MATH):
                        flash_only()

            t_ours, t_torch = interleaved_medians(ours, theirs, reps)
            rows.append(
                {
                    "shape": name,
                    "mode": mode,
                    "dtype": dtype_name,
                    "ours_ms": 1e3 * t_ours,
                    "torch_ms": 1e3 * t_torch,
                    "ratio": t_torch / t_ours,
                    "torch_backend": torch_backend,
                }
            )
    info = qkv_attention.build_info()
    print(
        json.dumps(
            {
                "kernel_isa": info["kernel_isa"],
                "torch_level": torch.backends.cpu.get_cpu_capability(),
                "threads": torch.get_num_threads(),
                "rows": rows,
            }
        )
    )


def print_summary(report):
    """The ratios as one row per level: the four shapes in float32, then in bfloat16."""
    print(f"\n## torch/ours ({time.strftime('%Y-%m-%d %H:%M %Z')}, load {os.getloadavg()[0]:.2f})")
    shapes = " / ".join(f"{name} {mode}" for name, *_, mode in SHAPES)
    print(f"| level | float32: {shapes} | bfloat16, same |")
    print("|---|---|---|")  # m: against torch's math backend (its flash refused the level)
    for label, result in report.items():
        cells = []
        for dtype in DTYPES:
            cells.append(
                " / ".join(
                    f"{row['ratio']:.2f}" + ("m" if row["torch_backend"] == "math" else "")
                    for row in result["rows"]
                    if row["dtype"] == dtype
                )
            )
        print(f"| {label} | {cells[0]} | {cells[1]} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument(
        "--levels",
        default="default,avx2,native",
        help="comma-separated subset of default, avx2, native",
    )
    args = parser.parse_args()
    reps = args.reps or (5 if args.quick else 15)
    if args.child:
        child(reps)
        return
    levels = [
        ("default", {"ATEN_CPU_CAPABILITY": "default"}),
        ("avx2", {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
        ("native", {}),
    ]
    wanted = args.levels.split(",")
    levels = [(label, env) for label, env in levels if label in wanted]
    report = {}
    for label, env in levels:
        child_env = dict(os.environ)
        child_env.pop("ATEN_CPU_CAPABILITY", None)
        child_env.update(env)
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--reps", str(reps)],
            env=child_env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        report[label] = result
        print(
            f"\n## level {label}: kernel_isa={result['kernel_isa']} "
            f"torch={result['torch_level']} threads={result['threads']} "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        print(
            f"| {'shape':<26} | {'mode':<7} | {'dtype':<8} | {'ours ms':>8} | {'torch ms':>8} | "
            f"{'torch/ours':>10} | torch's |"
        )
        for row in result["rows"]:
            print(
                f"| {row['shape']:<26} | {row['mode']:<7} | {row['dtype']:<8} | "
                f"{row['ours_ms']:8.2f} | {row['torch_ms']:8.2f} | {row['ratio']:10.2f} | "
                f"{row['torch_backend']:<7} |"
            )
    print_summary(report)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "levels-latest.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
