# CMake toolchain for building the Catch2 suite for aarch64 with Debian's cross compiler
# (g++-aarch64-linux-gnu); tools/aarch64/test.sh passes it. Libraries and headers of the target
# come from the cross runtime in /usr/aarch64-linux-gnu; programs (ninja) from the host.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# Catch2 is header-only: the host's CMake package of it serves the target too (its headers are
# in /usr/include, which the cross compiler searches last). Torch is found through Torch_DIR.
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
# GCC's notes that passing torch's vector pairs changed ABI in GCC 10.1 say nothing about our code
# (make check-aarch64 turns them off too).
set(CMAKE_CXX_FLAGS_INIT "-Wno-psabi")
