"""Proves from the machine code that each CPU level's kernels use only that level's instructions.

    python tools/check_isa.py [BUILD_DIR ...]     (default: build/cmake)

The kernels are compiled once per level (csrc/sources.txt, cpu/flash/levels.h) and the level is
chosen at run time, so an instruction of a higher level in a lower level's object would crash
(SIGILL) only on the CPUs that level exists for. This disassembles the objects built for the
lower levels (objdump -d --no-show-raw-insn) and fails when
  - the avx2 object (cpu/flash/level_avx2.cpp) uses a zmm register, an AVX-512 mask register
    k0-k7, a register only EVEX can encode (xmm16-31, ymm16-31), an EVEX decoration (masking
    {%kN}, zeroing {z}, embedded broadcast {1toN}, rounding {rn-sae}/{sae}) or an AVX-512-only
    mnemonic;
  - the default object (cpu/flash/level_default.cpp) uses any ymm or zmm register, any mask
    register, or any VEX- or EVEX-encoded instruction (a mnemonic starting with 'v').
As evidence that the flags reached the compiler, the avx2 object must also use ymm registers
and FMA, and the avx512 object (when built) zmm registers. One summary line per object.
Only x86-64 objects are checked (the levels above default exist there alone).
"""

import argparse
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# objdump lines of instructions: "  4f:\tvmovups %ymm0,-0x30(%rbp)".
_INSTRUCTION = re.compile(r"^\s*[0-9a-f]+:\t(.*)$")
_ZMM = re.compile(r"%zmm\d+")
_YMM = re.compile(r"%ymm\d+")
_MASK_REGISTER = re.compile(r"%k[0-7]\b")
_EVEX_ONLY_REGISTER = re.compile(r"%[xy]mm(1[6-9]|2\d|3[01])\b")
_EVEX_DECORATION = re.compile(r"\{(%k[0-7]|z|1to\d+|r[nduz]-sae|sae|evex)\}")
# Mnemonics that exist only in AVX-512 (EVEX) encodings, by prefix; their VEX relatives
# (vpand, vmovdqu, vextracti128, vpermd, vpdpbusd of AVX-VNNI...) do not match.
_AVX512_MNEMONIC = re.compile(
    r"^(k[a-z]+[bwdq]?"  # mask-register instructions
    r"|vp?ternlog|vperm[it]2|valign[dq]|v(p?compress|p?expand)"
    r"|vpmov[bwdq]2m|vpmovm2|vpmov(u?s)?[qdw][bwd]\b|vpmovwb"
    r"|vfixupimm|vgetexp|vgetmant|vrndscale|vreduce|vrange|vscalef|vfpclass"
    r"|vrcp14|vrsqrt14|vrcp28|vrsqrt28|vexp2"
    r"|vpro[lr]v?[dq]|vpsraq|vpsravq|vpabsq|vp(min|max)[su]q|vpmullq"
    r"|vcvt(t?p[sd]2u|u|t?p[sd]2qq|qq2|t?s[sd]2usi)|vcvtne2ps2bf16|vcvtneps2bf16|vdpbf16ps"
    r"|v(extract|insert|broadcast)[if](32x[248]|64x[24])|vshuf[if](32x4|64x2)"
    r"|vmovdq[au](8|16|32|64)|vp(and|andn|or|xor)[dq]\b"
    r"|vpcmpu?[bwdq]\b|vpcmp(eq|gt)[bwdq]\s.*%k|vptestn?m"
    r"|vpconflict|vplzcnt|vpopcnt|vpshufbitqmb|vpmultishiftqb|vpermw|vpermt2|vpermi2"
    r"|vpsllvw|vpsrlvw|vpsravw|vdbpsadbw|vpshl[dv]|vpshr[dv]|vpbroadcastm"
    r"|vpermb|vpmadd52|vscatter|vpscatter|v4fmadd|vp4dpwssd)"
)


@dataclass
class Report:
    path: Path
    level: str
    instructions: int = 0
    counts: Counter = field(default_factory=Counter)
    problems: list = field(default_factory=list)  # (what, line), the first few of each kind


def disassemble(path):
    result = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"check_isa: objdump failed on {path}: {result.stderr.strip()}")
    return result.stdout


def check_object(path, level):
    report = Report(path, level)
    seen = Counter()

    def problem(what, line):
        seen[what] += 1
        if seen[what] <= 3:
            report.problems.append((what, line))

    for raw in disassemble(path).splitlines():
        match = _INSTRUCTION.match(raw)
        if not match:
            continue
        text = match.group(1).split("#")[0].strip()  # "# 19e <symbol>": objdump's comment
        if not text:
            continue
        report.instructions += 1
        words = text.split()
        # A pseudo-prefix ({vex}, {vex3}, {evex}) names the encoding; the mnemonic follows it.
        pseudo = words[0] if words[0] in ("{vex}", "{vex3}", "{evex}") else None
        mnemonic = words[1] if pseudo and len(words) > 1 else words[0]
        body = text[len(pseudo) :].lstrip() if pseudo else text
        zmm, ymm = bool(_ZMM.search(text)), bool(_YMM.search(text))
        mask = bool(_MASK_REGISTER.search(text))
        report.counts["zmm"] += zmm
        report.counts["ymm"] += ymm
        report.counts["mask"] += mask
        report.counts["v"] += mnemonic.startswith("v")
        report.counts["fma"] += mnemonic.startswith("vfmadd") or mnemonic.startswith("vfnmadd")
        if text.startswith("(bad)"):
            problem("an instruction objdump cannot decode", text)
        if level == "avx2":
            if zmm:
                problem("a zmm register", text)
            if mask:
                problem("an AVX-512 mask register", text)
            if _EVEX_ONLY_REGISTER.search(text):
                problem("a register only EVEX encodes", text)
            if _EVEX_DECORATION.search(text):
                problem("an EVEX decoration", text)
            if _AVX512_MNEMONIC.match(body):
                problem("an AVX-512-only instruction", text)
        elif level == "default":
            if zmm or ymm:
                problem("a ymm/zmm register", text)
            if mask:
                problem("an AVX-512 mask register", text)
            if mnemonic.startswith("v") or pseudo:
                problem("a VEX/EVEX-encoded instruction", text)
    for what, count in seen.items():
        if count > 3:
            report.problems.append((what, f"... {count} instructions in all"))
    # The flags must have reached the compiler: the level's own instructions are there.
    if level == "avx2" and (report.counts["ymm"] == 0 or report.counts["fma"] == 0):
        report.problems.append(
            (
                "no ymm register or FMA instruction at all",
                "was the object compiled with the avx2 flags?",
            )
        )
    if level == "avx512" and report.counts["zmm"] == 0:
        report.problems.append(
            ("no zmm register at all", "was the object compiled with the avx512 flags?")
        )
    return report


def find_objects(build_dir, level):
    """Objects of cpu/flash/level_<level>.cpp: CMake's level_<level>.cpp.o, setup.py's .o."""
    found = []
    for pattern in (f"**/cpu/flash/level_{level}.cpp.o", f"**/cpu/flash/level_{level}.o"):
        found.extend(sorted(build_dir.glob(pattern)))
    return found


def is_x86_64(path):
    result = subprocess.run(
        ["objdump", "-f", str(path)], capture_output=True, text=True, check=False
    )
    return "x86-64" in result.stdout


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build_dirs", nargs="*", type=Path, default=[ROOT / "build" / "cmake"])
    args = parser.parse_args(argv)
    failed = False
    for build_dir in args.build_dirs:
        if not build_dir.is_dir():
            print(f"check_isa: no build directory {build_dir}", file=sys.stderr)
            return 1
        for level in ("avx2", "default", "avx512"):
            objects = [o for o in find_objects(build_dir, level) if is_x86_64(o)]
            if not objects and level in ("avx2", "default"):
                print(
                    f"check_isa: no x86-64 object of cpu/flash/level_{level}.cpp under "
                    f"{build_dir} (build it first)",
                    file=sys.stderr,
                )
                failed = True
            for path in objects:
                report = check_object(path, level)
                try:
                    shown = path.relative_to(ROOT)
                except ValueError:
                    shown = path
                verdict = "FAIL" if report.problems else "ok"
                print(
                    f"{verdict:4} {level:7} {shown}: {report.instructions} instructions, "
                    f"{report.counts['v']} VEX/EVEX, {report.counts['ymm']} ymm, "
                    f"{report.counts['zmm']} zmm, {report.counts['mask']} mask-register"
                )
                for what, line in report.problems:
                    print(f"       {what}: {line}")
                failed |= bool(report.problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
