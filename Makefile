# make test   bootstrap (system packages when root, a .venv with pinned torch), build, ctest, pytest,
#             the attention tests again at the lower CPU levels, the levels' instruction check
# make demo   the demo's bootstrap only (a C++ compiler, a .venv with torch and the demo's
#             packages), build, then the demo: twin training, then HuggingFace models (see README)
# make bench  bootstrap, build, then the benchmarks against torch
#
# Everything runs in $(VENV); nothing is installed into the system Python.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
JOBS ?= 2
CMAKE_BUILD ?= build/cmake
ASAN_BUILD ?= build/asan
PYTEST_ARGS ?=

.PHONY: test demo bench build bootstrap bootstrap-demo system-deps system-deps-demo cmake-build \
  test-cpp test-python test-levels check-isa check-aarch64 test-asan lint format clean

test: test-cpp test-python test-levels check-isa

# The one Debian package the extension's build needs: a C++ compiler (ninja comes from pip).
# Installed with apt-get when running as root; otherwise named, with the command to install it.
system-deps-demo:
	@if ! command -v g++ >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: g++"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && apt-get install -y -qq g++ >/dev/null; \
	  else \
	    echo "missing: a C++ compiler, g++ (run: sudo apt-get install g++)" >&2; exit 1; \
	  fi; \
	fi

# Debian packages for the C++ tests and lint, and the aarch64 cross compiler of check-aarch64.
# Installed with apt-get when running as root (as CI does); otherwise the missing ones are named
# (the cross compiler only with a note: nothing but check-aarch64 needs it).
system-deps: system-deps-demo
	@missing=""; \
	[ -f /usr/include/catch2/catch.hpp ] || missing="$$missing catch2"; \
	command -v cmake >/dev/null || missing="$$missing cmake"; \
	command -v ninja >/dev/null || missing="$$missing ninja-build"; \
	command -v objdump >/dev/null || missing="$$missing binutils"; \
	command -v clang-format >/dev/null || missing="$$missing clang-format"; \
	optional=""; \
	command -v aarch64-linux-gnu-g++ >/dev/null || optional="g++-aarch64-linux-gnu"; \
	if [ -n "$$missing$$optional" ] && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian packages:$$missing $$optional"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq $$missing $$optional >/dev/null; \
	elif [ -n "$$missing" ]; then \
	  echo "missing Debian packages:$$missing (run: sudo apt-get install$$missing)" >&2; exit 1; \
	elif [ -n "$$optional" ]; then \
	  echo "note: make check-aarch64 needs $$optional (sudo apt-get install $$optional)"; \
	fi

# TORCH_INDEX=https://download.pytorch.org/whl/cpu installs torch from that index first (PyTorch's
# CPU-only wheel instead of the multi-GB CUDA build PyPI serves on Linux x86-64); empty: pip's
# configured indexes.
TORCH_INDEX ?=
TORCH_PIN := $(shell sed -n 's/^torch==//p' constraints.txt)

# pip, not python: a venv whose creation failed half-way (Debian without python3-venv) has a
# python but no pip, and is created again on the next run.
$(VENV)/bin/pip:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(VENV)/bin/pip install -q torch==$(TORCH_PIN) --index-url $(TORCH_INDEX))

$(VENV)/.bootstrapped-demo: requirements-demo.txt constraints.txt | $(VENV)/bin/pip
	$(VENV)/bin/pip install -q -r requirements-demo.txt -c constraints.txt
	touch $@

$(VENV)/.bootstrapped: requirements-dev.txt requirements-demo.txt constraints.txt | $(VENV)/bin/pip
	$(VENV)/bin/pip install -q -r requirements-dev.txt -c constraints.txt
	touch $@

bootstrap-demo: system-deps-demo $(VENV)/.bootstrapped-demo
bootstrap: system-deps $(VENV)/.bootstrapped

# --no-build-isolation: compile against the torch in $(VENV), never a freshly downloaded one.
# The venv's bin first on PATH: torch's build finds pip's ninja where Debian's is not installed.
BUILD_EXTENSION = PATH="$(abspath $(VENV))/bin:$$PATH" MAX_JOBS=$(JOBS) \
  $(VENV)/bin/pip install -q --no-build-isolation -e .

build: bootstrap
	$(BUILD_EXTENSION)

$(CMAKE_BUILD)/build.ninja: CMakeLists.txt | bootstrap
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"

cmake-build: $(CMAKE_BUILD)/build.ninja
	cmake --build $(CMAKE_BUILD) -j $(JOBS)

test-cpp: cmake-build
	cd $(CMAKE_BUILD) && ctest --output-on-failure

test-python: build
	$(PY) -m pytest tests/python -q $(PYTEST_ARGS)

# The attention kernels are compiled once per CPU level and follow torch's capability, so the
# level test-python runs is this CPU's best. These are the attention op's tests again with torch
# (and so our kernels) forced down to each lower level; MKL is held to AVX2 at the avx2 level,
# as it would be on an AVX2 machine. About 3-4 minutes per level on 2 busy cores.
LEVEL_TESTS = tests/python/ops/test_attention_vs_sdpa.py tests/python/ops/test_kernel_boundaries.py \
  tests/python/ops/test_threads_determinism.py tests/python/ops/test_dropout.py \
  tests/python/ops/test_ops_gradcheck.py tests/python/ops/test_gqa.py \
  tests/python/ops/test_kv_cache.py tests/python/ops/test_varlen.py \
  tests/python/ops/test_variants.py

test-levels: build
	@status=0; levels=default; \
	if [ "$$(uname -m)" = x86_64 ]; then levels="default avx2"; fi; \
	for level in $$levels; do \
	  mkl=""; if [ $$level = avx2 ]; then mkl=MKL_ENABLE_INSTRUCTIONS=AVX2; fi; \
	  echo "ATEN_CPU_CAPABILITY=$$level $$mkl pytest $(LEVEL_TESTS)"; \
	  env ATEN_CPU_CAPABILITY=$$level $$mkl \
	    $(PY) -m pytest $(LEVEL_TESTS) -q -p no:cacheprovider $(PYTEST_ARGS) || status=1; \
	done; \
	exit $$status

# The machine code of the avx2 and default levels' objects uses only their own instructions
# (tools/check_isa.py): no AVX-512 in the avx2 one, no VEX/EVEX in the default one.
check-isa: cmake-build
	@if [ "$$(uname -m)" = x86_64 ]; then \
	  $(PY) tools/check_isa.py $(CMAKE_BUILD); \
	else \
	  echo "check-isa: the levels above default are x86-64 only; nothing to check on $$(uname -m)"; \
	fi

# Every C++ source built for aarch64 (tools/sources.py --arch aarch64) compiles there:
# syntax-only with the cross compiler against the installed torch's headers (module.cpp, which
# needs the Python headers, is setup.py's alone and not in the list). -Wno-psabi: GCC's notes that
# passing torch's vector pairs changed ABI in GCC 10.1 say nothing about our code.
AARCH64_CXX ?= aarch64-linux-gnu-g++
check-aarch64: bootstrap
	@command -v $(AARCH64_CXX) >/dev/null || \
	  { echo "check-aarch64: no $(AARCH64_CXX) (Debian: g++-aarch64-linux-gnu)" >&2; exit 1; }
	@torch_include="$$($(PY) -c 'import torch.utils.cpp_extension as e; print(e.include_paths()[0])')"; \
	sources="$$($(PY) tools/sources.py --arch aarch64)"; \
	echo "$$sources" | xargs -P $(JOBS) -n 1 sh -c \
	  'out=$$($(AARCH64_CXX) -std=c++20 -fsyntax-only -fopenmp -Wno-psabi -I csrc -I "$$0" \
	     -I "$$0/torch/csrc/api/include" "$$1" 2>&1) || { printf "FAILED: %s\n%s\n" "$$1" "$$out"; exit 1; }; \
	   [ -z "$$out" ] || printf "%s:\n%s\n" "$$1" "$$out"' "$$torch_include" \
	  && echo "check-aarch64: $$(echo "$$sources" | wc -l) sources compile for aarch64 (syntax only)"

# The Catch2 suite cross-built for aarch64 and run under qemu user-mode emulation, so that the
# kernels' NEON default level runs against the float64 reference, through the dispatcher and across
# thread counts (tools/aarch64/test.sh: Debian packages when root, torch's aarch64 wheel downloaded
# once into ~/.cache/qkv_attention/aarch64, stub CUDA libraries, an ARM sysroot for qemu).
# AARCH64_TEST_ARGS: Catch2 test names or tags to run instead of the whole suite.
AARCH64_TEST_ARGS ?=
.PHONY: test-aarch64
test-aarch64: bootstrap
	PYTHON=$(PY) JOBS=$(JOBS) tools/aarch64/test.sh $(AARCH64_TEST_ARGS)

# The Catch2 suite built with AddressSanitizer and UndefinedBehaviorSanitizer (our sources and
# the tests; LibTorch is not instrumented). It runs clean with the strict settings below, so
# nothing is turned off or suppressed: leak detection stays on, stack use after return and
# static-initialisation order are checked too, and any UB report aborts the run
# (-fno-sanitize-recover). The build step runs the binary as well (Catch2 test discovery); the
# suite then runs in one process (ctest would start, and load LibTorch, once per test case).
SANITIZER_ENV = \
  ASAN_OPTIONS=detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:strict_string_checks=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

test-asan: bootstrap
	cmake -S . -B $(ASAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Debug -DQKV_SANITIZE=ON \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	$(SANITIZER_ENV) cmake --build $(ASAN_BUILD) -j $(JOBS)
	cd $(ASAN_BUILD) && $(SANITIZER_ENV) ./qkv_attention_tests

# Formatting and lint as code: .clang-format for C++, ruff's settings in pyproject.toml for
# Python. `make format` applies both; `make lint` fails on any difference or lint finding.
CXX_SOURCES = git ls-files --cached --others --exclude-standard '*.cpp' '*.h'
PY_SOURCES = git ls-files --cached --others --exclude-standard '*.py'

lint: bootstrap
	$(CXX_SOURCES) | xargs clang-format --dry-run -Werror
	$(PY_SOURCES) | xargs $(VENV)/bin/ruff check
	$(PY_SOURCES) | xargs $(VENV)/bin/ruff format --check

format: bootstrap
	$(CXX_SOURCES) | xargs clang-format -i
	$(PY_SOURCES) | xargs $(VENV)/bin/ruff format

# Not `build`: the demo needs neither the test tool-chain nor the test packages.
demo: bootstrap-demo
	$(BUILD_EXTENSION)
	$(PY) -m qkv_attention.check
	$(PY) examples/train_transformer.py
	$(PY) examples/huggingface_demo.py

bench: build
	$(PY) benchmarks/bench_attention.py
	$(PY) benchmarks/bench_levels.py
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_kv_cache.py
	$(PY) benchmarks/bench_varlen.py
	$(PY) benchmarks/bench_variants.py
	$(PY) benchmarks/bench_huggingface.py

clean:
	rm -rf build $(CMAKE_BUILD) $(ASAN_BUILD) python/qkv_attention/*.so
