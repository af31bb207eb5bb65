# make test   bootstrap (system packages when root, a .venv with pinned torch), build, ctest, pytest
# make demo   bootstrap, build, then the demo: twin training, then HuggingFace models (see README)
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

.PHONY: test demo bench build bootstrap system-deps test-cpp test-python test-asan clean

test: test-cpp test-python

# Debian packages for the C++ tests and the build. Installed with apt-get when running as root
# (as CI does); otherwise the missing ones are named.
system-deps:
	@missing=""; \
	[ -f /usr/include/catch2/catch.hpp ] || missing="$$missing catch2"; \
	command -v cmake >/dev/null || missing="$$missing cmake"; \
	command -v g++ >/dev/null || missing="$$missing g++"; \
	command -v ninja >/dev/null || missing="$$missing ninja-build"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing (run: sudo apt-get install$$missing)" >&2; exit 1; \
	  fi; \
	fi

$(VENV)/.bootstrapped: requirements-dev.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements-dev.txt -c constraints.txt
	touch $@

bootstrap: system-deps $(VENV)/.bootstrapped

# --no-build-isolation: compile against the torch in $(VENV), never a freshly downloaded one.
build: bootstrap
	MAX_JOBS=$(JOBS) $(VENV)/bin/pip install -q --no-build-isolation -e .

$(CMAKE_BUILD)/build.ninja: CMakeLists.txt | bootstrap
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"

test-cpp: $(CMAKE_BUILD)/build.ninja
	cmake --build $(CMAKE_BUILD) -j $(JOBS)
	cd $(CMAKE_BUILD) && ctest --output-on-failure

test-python: build
	$(PY) -m pytest tests/python -q $(PYTEST_ARGS)

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

demo: build
	$(PY) -m qkv_attention.check
	$(PY) examples/train_transformer.py
	$(PY) examples/huggingface_demo.py

bench: build
	$(PY) benchmarks/bench_attention.py
	$(PY) benchmarks/bench_huggingface.py

clean:
	rm -rf build $(CMAKE_BUILD) $(ASAN_BUILD) python/qkv_attention/*.so
