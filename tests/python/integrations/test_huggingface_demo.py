"""The demo's part two (examples/huggingface_demo.py), run small: MiniLM and a Llama-style model
give the same results with our attention as with sdpa, a gpt-oss-style model (sliding window,
attention sinks) the same as with eager, and the script appends its section and picture to the
report of part one."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "examples" / "huggingface_demo.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PART_ONE = "# qkv_attention demo: sequence reversal\n\n| a | table |\n"


def load_demo_module():
    spec = importlib.util.spec_from_file_location("huggingface_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    (out / "report.md").write_text(PART_ONE)  # what part one leaves there
    result = subprocess.run(
        [sys.executable, str(DEMO), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout, (out / "report.md").read_text()


def test_demo_appends_its_section_after_part_one(quick_demo):
    _, _, report = quick_demo
    assert report.startswith(PART_ONE)
    assert report.count("## Part two: HuggingFace transformers models") == 1
    assert "![HuggingFace models: semantic search, speed, time per step](huggingface.png)" in report


def test_demo_writes_a_picture(quick_demo):
    out, _, _ = quick_demo
    data = (out / "huggingface.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 20_000, f"huggingface.png is suspiciously small ({len(data)} bytes)"


def test_demo_minilm_embeddings_and_search_agree_with_sdpa(quick_demo):
    _, stdout, report = quick_demo
    difference = float(
        re.search(
            r"largest difference of the sentence embeddings, ours vs "
            r"sdpa: (\S+)",
            report,
        ).group(1)
    )
    assert difference <= 1e-5  # unit vectors in float32; measured 1.3e-7
    # all-MiniLM-L6-v2 has 6 layers: our operator runs in each of them, and never under sdpa.
    assert "`qkv_attention::attention` calls in one forward (profiler): ours 6, sdpa 0" in report
    assert "ranking under both identical" in report
    assert "semantic search rankings identical" in stdout
    # The search finds what a reader expects (the pretrained weights are really in use).
    assert re.search(
        r"^\| Will it rain this weekend\? \| It will be sunny and warm all weekend\."
        r" \|",
        report,
        re.MULTILINE,
    )
    assert re.search(
        r"^\| My kitten naps in the sun\. \| The cat is sleeping on the warm "
        r"windowsill\. \|",
        report,
        re.MULTILINE,
    )
    ratio = float(re.search(r"speed ratio sdpa / ours: (\S+)", report).group(1))
    assert ratio > 0


def test_demo_llama_generates_the_same_tokens_and_reports_rates(quick_demo):
    _, stdout, report = quick_demo
    assert "generated tokens identical: yes" in report
    layers = int(re.search(r"### Llama-style decoder, random weights \((\d+) layers", report)[1])
    assert f"calls in one forward (profiler): ours {layers}, sdpa 0" in report.split("### Llama")[1]
    assert re.search(
        r"8 greedy tokens identical; ours \d+\.\d tokens/s, sdpa \d+\.\d tokens/s", stdout
    )
    row = re.search(r"^\| tokens per second \| (\S+) \| (\S+) \|$", report, re.MULTILINE)
    ours, sdpa = float(row.group(1)), float(row.group(2))
    assert ours > 0 and sdpa > 0
    ratio = float(re.search(r"tokens/s ratio ours / sdpa: (\S+)", report).group(1))
    assert ratio == pytest.approx(ours / sdpa, rel=0.02)  # the report rounds to 1 decimal


def test_demo_gpt_oss_matches_eager_and_runs_on_our_operator(quick_demo):
    _, stdout, report = quick_demo
    gpt_oss = report.split("### gpt-oss-style decoder")[1]
    assert "generated tokens identical: yes" in gpt_oss
    # 2 layers in the quick run, one with a sliding window: both run our operator.
    assert "calls in one forward (profiler): ours 2, eager 0" in gpt_oss
    difference = float(
        re.search(r"largest difference of the prompt's logits, ours vs eager: (\S+)", gpt_oss)[1]
    )
    assert difference <= 2e-4  # float32 through 2 layers
    assert re.search(r"8 greedy tokens identical; prefill ours \d+ ms, eager \d+ ms", stdout)


def test_a_second_run_replaces_the_section_instead_of_repeating_it(tmp_path):
    demo = load_demo_module()
    report = tmp_path / "report.md"
    report.write_text(PART_ONE)
    demo.append_section(report, [demo.SECTION, "", "first run", ""])
    demo.append_section(report, [demo.SECTION, "", "second run", ""])
    text = report.read_text()
    assert text.startswith(PART_ONE)
    assert text.count(demo.SECTION) == 1
    assert "second run" in text and "first run" not in text


def test_section_alone_when_part_one_did_not_run(tmp_path):
    demo = load_demo_module()
    report = tmp_path / "report.md"
    demo.append_section(report, [demo.SECTION, "", "only part two", ""])
    assert report.read_text() == f"{demo.SECTION}\n\nonly part two\n"
