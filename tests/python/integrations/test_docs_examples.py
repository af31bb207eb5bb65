"""Every ```python block of README.md and docs/*.md runs as written, each in a fresh interpreter.

A block is a whole program (imports and inputs included), so a reader can paste it. Where a
block shows what it prints, with a comment ``# prints: <text>``, the text must appear in its
output. Blocks that use transformers are skipped only when transformers is not installed.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A fence opens with ```python and closes with ``` alone on a line; the lazy match stops at the
# first closing fence.
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_PRINTS = re.compile(r"#\s*prints:\s*(.+?)\s*$", re.MULTILINE)


class Block(NamedTuple):
    document: str
    line: int
    code: str


def python_blocks(path: Path) -> List[Block]:
    text = path.read_text()
    return [
        Block(path.relative_to(ROOT).as_posix(), text.count("\n", 0, match.start()) + 1, match[1])
        for match in _BLOCK.finditer(text)
    ]


BLOCKS = [block for path in DOCUMENTS for block in python_blocks(path)]


def test_the_documents_hold_python_blocks():
    # A fence typo (```py, ```Python) would silently drop a block from the test.
    for path in DOCUMENTS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```") and line.rstrip() not in (
                "```",
                "```python",
                "```bash",
                "```text",
            ):
                pytest.fail(f"{path.name}:{number}: fence {line!r} (use python, bash or text)")
    assert any(block.document == "README.md" for block in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: f"{block.document}:{block.line}")
def test_block_runs_as_written(block, tmp_path):
    if "transformers" in block.code and importlib.util.find_spec("transformers") is None:
        pytest.skip("the block uses transformers, which is not installed")
    # One thread: the blocks are small, and this machine is shared (docs/troubleshooting.md).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", block.code],
        cwd=tmp_path,  # blocks that write files write them here
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    where = f"{block.document}, block at line {block.line}"
    assert result.returncode == 0, f"{where} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    for shown in _PRINTS.findall(block.code):
        assert shown in result.stdout, (
            f"{where} says it prints {shown!r}; it printed:\n{result.stdout}"
        )


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than - and _ dropped,
    spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set:
    text = _BLOCK.sub("", path.read_text())  # a "# comment" in a block is no heading
    return {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_links_between_the_documents_resolve(path):
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name}: link to {target!r}: no such file"
        if anchor:
            assert anchor in _anchors(linked), f"{path.name}: link to {target!r}: no such heading"
