"""examples/generate_quantized_cache.py, run small: both runs generate, the quantized cache's
report line is there, and the share of differing tokens is a fraction."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "examples" / "generate_quantized_cache.py"
SMALL = ["--layers", "2", "--embed", "64", "--heads", "4", "--kv-heads", "2", "--vocab", "100"]
SMALL += ["--batch", "2", "--prompt", "40", "--new-tokens", "6", "--threads", "1"]


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_generation_with_a_quantized_cache_reports_speed_and_agreement(dtype):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *SMALL, "--cache-dtype", dtype],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r"^float32 cache .* tokens/s$", result.stdout, re.MULTILINE)
    assert re.search(rf"^{dtype} cache .* tokens/s$", result.stdout, re.MULTILINE)
    share = re.search(r"tokens that differ: ([0-9.]+)%", result.stdout)
    assert share and 0.0 <= float(share.group(1)) <= 100.0
