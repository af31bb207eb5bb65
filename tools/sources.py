"""Reads csrc/sources.txt, the one list of the operators' C++ sources (CMakeLists.txt reads it too).

python tools/sources.py [--arch ARCH]   prints the sources built for ARCH (default: this machine)
"""

import argparse
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_SECTION = re.compile(r"^\[(\w+)(?:\s+(\w+))?\]\s*(.*)$")


@dataclass
class Source:
    path: str  # relative to the repository root
    level: str = ""  # the CPU level of a per-level source, "" for the others
    flags: list = field(default_factory=list)  # the level's instruction flags


def read_sources(arch=None):
    """The sources built for `arch` (platform.machine() by default), in link order."""
    arch = arch or platform.machine()
    sources, level, level_arch, flags = [], "", None, []
    for raw in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        section = _SECTION.match(line)
        if section:
            level, level_arch, flags = section.group(1), section.group(2), section.group(3).split()
            continue
        if level_arch is not None and level_arch != arch:
            continue
        sources.append(Source(f"csrc/{line}", level, list(flags)))
    return sources


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=None)
    for source in read_sources(parser.parse_args().arch):
        print(source.path)
