"""DistributedDataParallel with our operators: examples/train_ddp.py under torchrun, 2 processes.

Proves that DDP on 2 ranks (gloo, CPU) ends with identical parameters on both ranks, equal to
single-process training on the combined batch, in float64.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "examples" / "train_ddp.py"
TIMEOUT_S = 240  # normally ~15 s; generous for a loaded shared machine, but never a hang

# A short float64 run: long enough to move every weight, short enough for a test.
TRAINING = [
    "--dtype",
    "float64",
    "--steps",
    "6",
    "--global-batch",
    "8",
    "--lr",
    "0.05",
    "--no-progress",
]

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no torch.distributed gloo backend",
)


def _environment():
    env = dict(os.environ)
    # Keep gloo's connections on the loopback interface: the test is one machine, and the
    # host name may resolve to an address of another interface.
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    env["OMP_NUM_THREADS"] = "1"  # both processes share the cores; also for the single run
    return env


def _run(command, cwd):
    result = subprocess.run(
        command, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} failed ({result.returncode}):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def _largest_difference(a, b):
    assert list(a) == list(b), "the state_dicts hold different parameters"
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_ddp_two_ranks_equal_each_other_and_single_process_on_combined_batch(tmp_path):
    # --standalone: the rendezvous is a TCP store on localhost (127.0.0.1) on a free port.
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(SCRIPT),
            *TRAINING,
            "--save",
            str(tmp_path / "rank{rank}.pt"),
        ],
        cwd=ROOT,
    )
    _run([sys.executable, str(SCRIPT), *TRAINING, "--save", str(tmp_path / "single.pt")], cwd=ROOT)
    _run(
        [
            sys.executable,
            str(SCRIPT),
            *TRAINING,
            "--steps",
            "0",
            "--save",
            str(tmp_path / "initial.pt"),
        ],
        cwd=ROOT,
    )

    rank0, rank1, single, initial = (
        torch.load(tmp_path / f"{name}.pt") for name in ("rank0", "rank1", "single", "initial")
    )
    assert all(t.dtype == torch.float64 for t in single.values())

    # The training must have moved the weights, or the comparisons below would prove nothing.
    assert _largest_difference(single, initial) > 1e-3

    # Both ranks applied the same all-reduced gradients to the same weights: bit-identical.
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks differ in {name}"

    # DDP averages the two half-batch gradients; one process takes the mean over the whole
    # batch. The sums run in another order, so the results differ by float64 rounding
    # (~1e-16 per operation, a few steps) and no more.
    assert _largest_difference(rank0, single) <= 1e-10
