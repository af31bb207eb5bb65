"""Speed and memory of qkv_attention against torch, on this machine (`make bench`).

    python benchmarks/bench_attention.py            # the full set (about 10 minutes)
    python benchmarks/bench_attention.py --quick    # a few cases, for development
    python benchmarks/bench_attention.py --filter "op fwd float32"   # cases whose name has it

Timings: our attention op against F.scaled_dot_product_attention, and our MultiheadAttention
against torch.nn.MultiheadAttention (training mode, batch_first), forward and forward+backward,
float32 and bfloat16, causal or not, dropout 0 and 0.1. Both sides run in this one process,
interleaved (ours, torch, torch, ours, ...), after a warm-up; each time is the median of the
repetitions. The machine may be shared, so read the ratios, not the absolute times.

GEMM share: attention FLOPs (4·B·H·L·S·D forward, halved when causal, 3.5x for forward+backward)
per second of our op, over the rate of one 2048^3 torch.mm of the same dtype measured in this
run (the median of measurements at the start, middle and end).

Memory: peak resident set of a separate process per case and implementation
(benchmarks/memory_child.py), above the process's resident set before the run: in the first
forward+backward, and over three in a row (a training loop's steady state).

Writes benchmarks/results/bench-<time>.json and .png, and copies them to latest.json and
latest.png.
"""

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import Case, describe_machine, gemm_rate, module_cases, op_cases, runners  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def time_pair(ours, theirs, budget_s: float, min_reps: int, max_reps: int):
    """Median seconds of ours and theirs, run interleaved, alternating which goes first."""
    start = time.perf_counter()
    ours()
    theirs()  # warm-up (allocator, thread pool, lazy initialisation)
    warm = time.perf_counter() - start
    reps = int(min(max_reps, max(min_reps, math.floor(budget_s / max(warm, 1e-6)))))
    times = {"ours": [], "torch": []}
    for rep in range(reps):
        order = [("ours", ours), ("torch", theirs)]
        if rep % 2:
            order.reverse()
        for name, fn in order:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return statistics.median(times["ours"]), statistics.median(times["torch"]), reps


def available_mib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return math.inf


def torch_math_path_mib(case: Case) -> float:
    """A rough upper bound of what torch's unfused path keeps: a few (B, H, L, S) tensors."""
    element = 4 if case.dtype == "float32" else 2
    return 6 * case.batch * case.heads * case.length**2 * max(element, 4) / 2**20


def measure_memory(case: Case, which: str):
    child = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_child.py")
    proc = subprocess.run(
        [sys.executable, child, json.dumps(case.to_json()), which],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        return dict(error=proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def select_cases(args):
    if args.quick:
        timing = op_cases(
            [512, 1024],
            modes=("fwd", "fwd+bwd"),
            dropouts=(0.0, 0.1),
            causals=(False,),
            dtypes=("float32", "bfloat16"),
        )
        timing += module_cases(modes=("fwd+bwd",))
        memory = [
            Case("module", "fwd+bwd", "float32", 1, 8, 2048, 64, False, p) for p in (0.0, 0.1)
        ]
    else:
        timing = op_cases([128, 512, 1024, 4096])
        timing += module_cases(dtypes=("float32",))
        timing += module_cases(dtypes=("bfloat16",), modes=("fwd+bwd",), weights=(False,))
        memory = [
            Case("module", "fwd+bwd", "float32", 1, 8, 8192, 64, False, p) for p in (0.0, 0.1)
        ]
        memory += [
            Case("module", "fwd+bwd", "float32", 4, 8, 512, 64, False, p, w)
            for p in (0.0, 0.1)
            for w in (False, True)
        ]
        memory += [Case("op", "fwd+bwd", "float32", 1, 4, 4096, 64, False, p) for p in (0.0, 0.1)]
    if args.filter:
        timing = [c for c in timing if args.filter in c.name]
        memory = [c for c in memory if args.filter in c.name]
    if args.no_memory:
        memory = []
    return timing, memory


def format_table(rows, columns):
    widths = [
        max([len(str(col))] + [len(str(r.get(key, ""))) for r in rows]) for col, key in columns
    ]
    line = "  ".join(str(col).ljust(w) for (col, _), w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(str(r.get(key, "")).ljust(w) for (_, key), w in zip(columns, widths)))
    return "\n".join(out)


def plot(timing_rows, memory_rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if memory_rows else 1
    fig, axes = plt.subplots(
        1,
        panels,
        figsize=(16 if panels == 2 else 10, max(4, 0.22 * len(timing_rows) + 1.5)),
        squeeze=False,
    )
    ax = axes[0][0]
    names = [r["case"] for r in timing_rows]
    speedups = [r["speedup_value"] for r in timing_rows]
    colors = ["tab:green" if s >= 1 else "tab:red" for s in speedups]
    ax.barh(range(len(names)), speedups, color=colors)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speedup over torch (torch time / our time), log scale")
    ax.set_title("time (interleaved medians, same process)")
    if memory_rows:
        ax = axes[0][1]
        names = [r["case"] for r in memory_rows]
        ours = [r.get("ours_added_value", 0) for r in memory_rows]
        theirs = [r.get("torch_added_value", 0) for r in memory_rows]
        y = range(len(names))
        ax.barh([i - 0.2 for i in y], theirs, height=0.4, label="torch", color="tab:gray")
        ax.barh([i + 0.2 for i in y], ours, height=0.4, label="qkv_attention", color="tab:blue")
        ax.set_yticks(list(y))
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("peak memory added by the first forward+backward (MiB), log scale")
        ax.set_title("memory (separate process per case)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few cases, for development")
    parser.add_argument("--filter", help="only the cases whose name contains this text")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory cases")
    parser.add_argument(
        "--budget",
        type=float,
        default=1.5,
        help="seconds of repetitions per implementation and case (default 1.5)",
    )
    parser.add_argument("--min-reps", type=int, default=3)
    parser.add_argument("--max-reps", type=int, default=9)
    args = parser.parse_args()
    if args.quick:
        args.budget = min(args.budget, 0.8)

    timing_cases, memory_cases = select_cases(args)
    machine = describe_machine()
    print(
        f"machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, torch "
        f"{machine['torch']} with {machine['torch_threads']} threads, load average "
        f"{machine['load_average'][0]:.2f}"
    )
    started = time.time()

    gemm = {"float32": [], "bfloat16": []}

    def measure_gemm():
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            gemm[name].append(gemm_rate(dtype))

    measure_gemm()
    timing_rows = []
    for index, case in enumerate(timing_cases):
        if index == len(timing_cases) // 2:
            measure_gemm()
        torch.manual_seed(0)
        ours, theirs = runners(case)
        ours_s, torch_s, reps = time_pair(ours, theirs, args.budget, args.min_reps, args.max_reps)
        del ours, theirs
        row = dict(
            case=case.name,
            spec=case.to_json(),
            ours_ms=round(ours_s * 1e3, 2),
            torch_ms=round(torch_s * 1e3, 2),
            speedup_value=torch_s / ours_s,
            speedup=f"{torch_s / ours_s:.2f}x",
            reps=reps,
        )
        if case.kind == "op":
            row["ours_gflops_value"] = case.attention_flops() / ours_s / 1e9
            row["ours_gflops"] = f"{row['ours_gflops_value']:.0f}"
        timing_rows.append(row)
        print(
            f"[{index + 1}/{len(timing_cases)}] {case.name}: ours {row['ours_ms']} ms, "
            f"torch {row['torch_ms']} ms, {row['speedup']}",
            flush=True,
        )
    measure_gemm()
    gemm_median = {name: statistics.median(v) for name, v in gemm.items()}
    for row in timing_rows:
        if "ours_gflops_value" in row:
            share = row["ours_gflops_value"] / gemm_median[row["spec"]["dtype"]]
            row["gemm_share_value"] = share
            row["gemm_share"] = f"{100 * share:.0f}%"

    memory_rows = []
    for case in memory_cases:
        row = dict(case=case.name, spec=case.to_json())
        for which in ("ours", "torch"):
            if (
                which == "torch"
                and case.dropout > 0
                and available_mib() < 1.5 * torch_math_path_mib(case)
            ):
                row[f"{which}_peak"] = "skipped (not enough free memory)"
                continue
            result = measure_memory(case, which)
            if "error" in result:
                row[f"{which}_peak"] = f"error: {result['error']}"
                continue
            row[f"{which}_peak_value"] = result["peak_mib"]
            row[f"{which}_added_value"] = result["added_mib"]
            row[f"{which}_added_steps_value"] = result["added_steps_mib"]
            row[f"{which}_peak"] = f"{result['peak_mib']:.0f}"
            row[f"{which}_added"] = f"{result['added_mib']:.0f}"
            row[f"{which}_added_steps"] = f"{result['added_steps_mib']:.0f}"
        if row.get("torch_added_value") and "ours_added_value" in row:
            row["added_ratio"] = f"{row['ours_added_value'] / row['torch_added_value']:.2f}"
            row["added_steps_ratio"] = (
                f"{row['ours_added_steps_value'] / row['torch_added_steps_value']:.2f}"
            )
        memory_rows.append(row)
        print(
            f"memory {case.name}: added by 1 step / 3 steps: ours +{row.get('ours_added')} / "
            f"+{row.get('ours_added_steps')} MiB, torch +{row.get('torch_added')} / "
            f"+{row.get('torch_added_steps')} MiB",
            flush=True,
        )

    elapsed = time.time() - started
    machine["load_average_end"] = os.getloadavg()
    print()
    print(
        f"GEMM rate (torch.mm 2048^3, median of {len(gemm['float32'])}): "
        f"float32 {gemm_median['float32']:.0f} GFLOP/s, "
        f"bfloat16 {gemm_median['bfloat16']:.0f} GFLOP/s"
    )
    print()
    print(
        format_table(
            timing_rows,
            [
                ("case", "case"),
                ("ours ms", "ours_ms"),
                ("torch ms", "torch_ms"),
                ("speedup", "speedup"),
                ("ours GFLOP/s", "ours_gflops"),
                ("of GEMM rate", "gemm_share"),
            ],
        )
    )
    if memory_rows:
        print()
        print(
            format_table(
                memory_rows,
                [
                    ("case (MiB added to peak RSS)", "case"),
                    ("ours 1 step", "ours_added"),
                    ("torch 1 step", "torch_added"),
                    ("ratio", "added_ratio"),
                    ("ours 3 steps", "ours_added_steps"),
                    ("torch 3 steps", "torch_added_steps"),
                    ("ratio ", "added_steps_ratio"),
                ],
            )
        )
    print(
        f"\n{len(timing_rows)} timing and {len(memory_rows)} memory cases in {elapsed:.0f} s; "
        f"load average {machine['load_average'][0]:.2f} at the start, "
        f"{machine['load_average_end'][0]:.2f} at the end"
    )

    os.makedirs(RESULTS, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(RESULTS, f"bench-{stamp}")
    record = dict(
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        machine=machine,
        gemm_gflops=gemm,
        gemm_gflops_median=gemm_median,
        seconds=elapsed,
        timing=timing_rows,
        memory=memory_rows,
    )
    with open(base + ".json", "w") as f:
        json.dump(record, f, indent=1)
    plot(timing_rows, memory_rows, base + ".png")
    shutil.copyfile(base + ".json", os.path.join(RESULTS, "latest.json"))
    shutil.copyfile(base + ".png", os.path.join(RESULTS, "latest.png"))
    print(f"wrote {base}.json and {base}.png (and latest.*)")


if __name__ == "__main__":
    main()
