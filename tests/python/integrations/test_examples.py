"""The demo script (examples/train_transformer.py), run small: it trains both twins to the same
result, learns the reversal task with the expected attention pattern, and writes its three files.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "examples" / "train_transformer.py"

# A smaller model and task than `make demo` runs (which learns length 12 in ~100 steps):
# length 8 over 8 letters is learned by step ~110; 160 steps leave a margin. ~10 s.
SMALL_RUN = [
    "--steps",
    "160",
    "--length",
    "8",
    "--vocab",
    "8",
    "--d-model",
    "32",
    "--heads",
    "2",
    "--ff-dim",
    "64",
    "--batch-size",
    "32",
    "--eval-size",
    "256",
    "--threads",
    "1",
    "--no-progress",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _table_row(report: str, label: str):
    """The two cells (ours, torch) of the report's table row ``label``, as floats."""
    match = re.search(rf"^\| {re.escape(label)} \| ([^|]+) \| ([^|]+) \|$", report, re.MULTILINE)
    assert match, f"no row {label!r} in report.md:\n{report}"
    return tuple(float(cell.strip().rstrip("%")) for cell in match.groups())


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    result = subprocess.run(
        [sys.executable, str(DEMO), *SMALL_RUN, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout, (out / "report.md").read_text()


def test_demo_writes_two_pngs_and_a_report(small_demo):
    out, _, report = small_demo
    for name in ("attention.png", "loss.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), f"{name} is not a PNG"
        assert len(data) > 20_000, f"{name} is suspiciously small ({len(data)} bytes)"
    assert "![attention weights](attention.png)" in report
    assert "![loss curves](loss.png)" in report


def test_demo_twins_learn_reversal_to_the_same_result(small_demo):
    _, stdout, report = small_demo
    ours_loss, torch_loss = _table_row(report, "final loss (held-out)")
    ours_accuracy, torch_accuracy = _table_row(report, "token accuracy")
    assert ours_accuracy >= 99.0 and torch_accuracy >= 99.0  # chance is 12.5%
    assert ours_loss < 0.1
    # float32 twins from the same weights on the same batches differ by rounding only.
    assert abs(ours_loss - torch_loss) <= 1e-4 * max(1.0, torch_loss)
    difference = float(
        re.search(r"largest parameter difference between the twins: (\S+)", report).group(1)
    )
    assert difference <= 1e-5  # measured 2.4e-7 (a few float32 ulps of weights of order 1)
    assert f"largest parameter difference between the twins: {difference:.3g}" in stdout


def test_demo_reports_step_times_and_their_ratio(small_demo):
    _, stdout, report = small_demo
    ours_ms, torch_ms = _table_row(report, "ms per training step (median)")
    assert 0 < ours_ms < 10_000 and 0 < torch_ms < 10_000
    ratio = float(re.search(r"step time ratio ours / torch: (\S+)", report).group(1))
    assert ratio == pytest.approx(ours_ms / torch_ms, rel=0.01)  # report rounds to 2 decimals
    assert re.search(r"ms/step ratio ours/torch: \d+\.\d+", stdout)


def test_demo_attention_reads_the_mirrored_position(small_demo):
    """Some head must put most of its weight on key L-1-i for query i (uniform: 1/8)."""
    _, _, report = small_demo
    shares = [
        float(x)
        for line in re.findall(r"^  - layer \d+: (.+)$", report, re.MULTILINE)
        for x in line.replace("%", "").split(", ")
    ]
    assert len(shares) == 2 * 2  # layers x heads
    assert max(shares) >= 80.0
