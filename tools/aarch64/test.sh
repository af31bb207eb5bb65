#!/usr/bin/env bash
# make test-aarch64: the Catch2 suite built for aarch64 and run under qemu user-mode emulation on
# this (x86-64) machine, so that the NEON default level of the kernels runs somewhere in CI.
#
#   tools/aarch64/test.sh [Catch2 arguments]   (none: the whole suite; e.g. "[flash]" for some)
#
# Environment: PYTHON (a Python with pip, for pip download; default python3), JOBS (parallel
# compiles, default 2), QKV_AARCH64_CACHE (where the torch wheel and the generated files live,
# default ~/.cache/qkv_attention/aarch64), QKV_AARCH64_BUILD (default build/aarch64).
#
# The steps, each skipped when its result is already there:
#  1. Debian packages: the cross compiler, qemu-user-static, CMake, Ninja, Catch2 (installed
#     with apt-get when running as root).
#  2. PyPI's aarch64 wheel of the pinned torch (constraints.txt), downloaded once into the cache,
#     and its torch/lib and torch/include unpacked.
#  3. Stub CUDA libraries. The wheel is a CUDA build: libtorch_cpu.so needs libcudart.so.13 and
#     libcupti.so.13 to load, though CPU code never calls them, and the CUDA runtime wheels for
#     aarch64 are not on PyPI. The stubs carry the sonames, symbol versions and the names
#     libtorch_cpu.so imports; each function aborts with its name if it were ever called.
#  4. A sysroot for qemu -L: the cross runtime's lib/ and an ARM /proc/cpuinfo and MIDR register
#     (torch's cpuinfo cannot parse the x86 host's /proc/cpuinfo; qemu serves guest paths that
#     exist in the sysroot from there). It describes a Neoverse N1 (NEON, no SVE) and qemu
#     emulates that CPU, so torch picks its DEFAULT capability and at::vec is NEON.
#  5. CMake with tools/aarch64/toolchain.cmake and tools/aarch64/torch/TorchConfig.cmake
#     builds the project's Catch2 binary (CMakeLists.txt; Catch2's test discovery runs it under
#     qemu too), and the suite runs in one emulated process.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-2}
CACHE=${QKV_AARCH64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qkv_attention/aarch64}
BUILD=${QKV_AARCH64_BUILD:-build/aarch64}
# The torch the project pins (constraints.txt).
TORCH_VERSION=$(sed -n 's/^torch==//p' constraints.txt)
[[ -n $TORCH_VERSION ]] || { echo "test-aarch64: no torch==VERSION line in constraints.txt" >&2; exit 1; }

step_start=$SECONDS
say() { echo "test-aarch64 [$((SECONDS - step_start)) s]: $*"; }

# 1. Debian packages.
missing=""
command -v aarch64-linux-gnu-g++ >/dev/null || missing="$missing g++-aarch64-linux-gnu"
command -v qemu-aarch64-static >/dev/null || missing="$missing qemu-user-static"
command -v readelf >/dev/null || missing="$missing binutils"
command -v cmake >/dev/null || missing="$missing cmake"
command -v ninja >/dev/null || missing="$missing ninja-build"
[[ -f /usr/include/catch2/catch.hpp ]] || missing="$missing catch2"
if [[ -n $missing ]]; then
  if [[ $(id -u) != 0 ]]; then
    echo "test-aarch64: missing Debian packages:$missing (run: sudo apt-get install$missing)" >&2
    exit 1
  fi
  say "installing Debian packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086  # one word per package
  apt-get install -y -qq $missing >/dev/null
fi

# 2. The torch wheel for aarch64 (CPython 3.11: any version would do, only the C++ libraries and
# headers are used).
mkdir -p "$CACHE"
TORCH=$CACHE/torch-$TORCH_VERSION/torch
if [[ ! -f $CACHE/torch-$TORCH_VERSION/.unpacked ]]; then
  wheel=$(ls "$CACHE"/wheel/torch-$TORCH_VERSION-*aarch64.whl 2>/dev/null | head -n 1 || true)
  if [[ -z $wheel ]]; then
    say "downloading torch==$TORCH_VERSION for aarch64 into $CACHE/wheel"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
      --python-version 3.11 "torch==$TORCH_VERSION" -d "$CACHE/wheel"
    wheel=$(ls "$CACHE"/wheel/torch-$TORCH_VERSION-*aarch64.whl)
  fi
  say "unpacking $(basename "$wheel")"
  rm -rf "$CACHE/torch-$TORCH_VERSION"
  "$PYTHON" - "$wheel" "$CACHE/torch-$TORCH_VERSION" <<'EOF'
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as wheel:
    wanted = [n for n in wheel.namelist() if n.startswith(("torch/lib/", "torch/include/"))]
    wheel.extractall(sys.argv[2], wanted)
EOF
  touch "$CACHE/torch-$TORCH_VERSION/.unpacked"
fi

# 3. The stubs: for each library libtorch_cpu.so needs that neither the wheel nor the cross
# runtime has (the CUDA ones), a library of that soname defining, in its version node, each
# function libtorch_cpu.so imports from it (readelf prints those as "name@library").
STUBS=$CACHE/stubs-$TORCH_VERSION
needed=$(readelf -d "$TORCH/lib/libtorch_cpu.so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
for lib in $needed; do
  [[ -e $TORCH/lib/$lib || -e /usr/aarch64-linux-gnu/lib/$lib || -f $STUBS/$lib ]] && continue
  mkdir -p "$STUBS"
  imports=$(readelf --dyn-syms -W "$TORCH/lib/libtorch_cpu.so" |
    awk -v lib="$lib" '$7 == "UND" && index($8, "@" lib) { split($8, s, "@"); print $4, s[1] }' |
    sort -u)
  if [[ -z $imports ]] || grep -qv '^FUNC ' <<<"$imports"; then
    echo "test-aarch64: cannot stub $lib: libtorch_cpu.so imports no versioned functions from it," \
      "or something else: ${imports:-nothing}" >&2
    exit 1
  fi
  {
    echo '#include <stdio.h>'
    echo '#include <stdlib.h>'
    echo 'static void never(const char* name) {'
    echo "  fprintf(stderr, \"%s of the stub $lib was called: CPU code must not use it\\n\", name);"
    echo '  abort();'
    echo '}'
    for name in $(cut -d' ' -f2 <<<"$imports"); do
      echo "int $name(void) { never(\"$name\"); return 1; }"
    done
  } >"$STUBS/$lib.c"
  echo "$lib { global: *; };" >"$STUBS/$lib.map"
  aarch64-linux-gnu-gcc -shared -fPIC -O1 -o "$STUBS/$lib.tmp" "$STUBS/$lib.c" \
    -Wl,--version-script="$STUBS/$lib.map" -Wl,-soname,"$lib"
  mv "$STUBS/$lib.tmp" "$STUBS/$lib"
  say "generated the stub $STUBS/$lib ($(wc -l <<<"$imports") functions)"
done

# 4. The sysroot, with one ARM processor entry per CPU the host has (guest threads run on them).
ROOT=$CACHE/sysroot
cpus=$(nproc --all)
if [[ ! -f $ROOT/proc/cpuinfo || $(grep -c '^processor' "$ROOT/proc/cpuinfo") != "$cpus" ]]; then
  rm -rf "$ROOT"
  mkdir -p "$ROOT/proc" "$ROOT/usr"
  ln -s /usr/aarch64-linux-gnu/lib "$ROOT/lib"
  ln -s /usr/aarch64-linux-gnu/lib "$ROOT/usr/lib"
  for ((i = 0; i < cpus; i++)); do
    # Neoverse N1 (implementer 0x41 Arm, part 0xd0c, r3p1), as /proc/cpuinfo prints it.
    printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' \
      "$i" >>"$ROOT/proc/cpuinfo"
    mkdir -p "$ROOT/sys/devices/system/cpu/cpu$i/regs/identification"
    echo 0x00000000413fd0c1 >"$ROOT/sys/devices/system/cpu/cpu$i/regs/identification/midr_el1"
  done
  say "sysroot $ROOT ($cpus Neoverse N1 CPUs)"
fi

# qemu runs a guest program with the sysroot; the guest's dynamic loader finds torch's libraries
# and the stubs through LD_LIBRARY_PATH (set in the guest only).
QEMU=(qemu-aarch64-static -L "$ROOT" -cpu neoverse-n1
  -E "LD_LIBRARY_PATH=$TORCH/lib:$STUBS")

# 5. Build and run.
say "configuring $BUILD"
emulator=$(IFS=';' && echo "${QEMU[*]}")
# No build RPATH: the libraries come from LD_LIBRARY_PATH above, torch's libgomp.so.1 among them
# (one OpenMP runtime for torch and our code, as in the wheel).
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_SKIP_BUILD_RPATH=ON \
  -DCMAKE_TOOLCHAIN_FILE="$PWD/tools/aarch64/toolchain.cmake" \
  -DCMAKE_CROSSCOMPILING_EMULATOR="$emulator" \
  -DTorch_DIR="$PWD/tools/aarch64/torch" -DQKV_AARCH64_TORCH="$TORCH" \
  -DQKV_AARCH64_STUBS="$STUBS" >/dev/null
say "building with $JOBS jobs"
cmake --build "$BUILD" -j "$JOBS"

# --warn NoTests: a test name given that matches nothing fails instead of passing.
say "running the Catch2 suite under ${QEMU[0]} $*"
"${QEMU[@]}" "$BUILD/qkv_attention_tests" --warn NoTests "$@"
say "passed"
