"""Peak resident memory of one benchmark case, run in a process of its own.

    python benchmarks/memory_child.py '<case as JSON>' ours|torch [steps]

Prints one JSON line: the resident set (MiB) just before the first run (torch imported, inputs
and modules built), the peak resident set during the first run and during `steps` runs in a row
(default 3: a training loop's steady state), and their differences from the first: what the
case added at its peak. The kernel's high-water mark is reset before the first run
(/proc/self/clear_refs), so the peak is the runs' own, not that of the imports before them.

Both peaks count what malloc keeps resident, not only live tensors: glibc's heap holds on to
freed blocks, and how much depends on the order of allocations, so the first step and the
steady state can rank two implementations differently.
"""

import json
import resource
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from cases import Case, runners  # noqa: E402


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> bool:
    """Resets VmHWM to the current resident set (Linux >= 4.0); False where that fails."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main() -> None:
    case = Case.from_json(json.loads(sys.argv[1]))
    which = sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    torch.manual_seed(0)
    ours, theirs = runners(case)
    run = ours if which == "ours" else theirs
    before = status_mib("VmRSS")
    if not reset_peak():  # fall back on the process's whole high-water mark
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    run()
    peak = status_mib("VmHWM")
    for _ in range(steps - 1):
        run()
    peak_steps = status_mib("VmHWM")
    print(
        json.dumps(
            dict(
                before_mib=before,
                peak_mib=peak,
                added_mib=peak - before,
                steps=steps,
                peak_steps_mib=peak_steps,
                added_steps_mib=peak_steps - before,
            )
        )
    )


if __name__ == "__main__":
    main()
