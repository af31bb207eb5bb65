# find_package(Torch) for the aarch64 cross build of tools/aarch64/test.sh (Torch_DIR points
# here). PyPI's aarch64 torch wheel is a CUDA build, and its own TorchConfig.cmake requires a CUDA
# toolkit and links libtorch_cuda; the tests need only the CPU libraries, which this describes.
#   QKV_AARCH64_TORCH  the unpacked wheel's torch/ directory (include/, lib/)
#   QKV_AARCH64_STUBS  the directory of the generated CUDA stub libraries that libtorch_cpu.so
#                      needs to link (tools/aarch64/test.sh makes them)
foreach(var QKV_AARCH64_TORCH QKV_AARCH64_STUBS)
  if(NOT IS_DIRECTORY "${${var}}")
    message(FATAL_ERROR "${var} must name a directory (tools/aarch64/test.sh sets it); got '${${var}}'")
  endif()
endforeach()

set(TORCH_INSTALL_PREFIX "${QKV_AARCH64_TORCH}")
foreach(lib libtorch_cpu.so libc10.so libnvpl_blas_lp64_gomp.so.0)
  if(NOT EXISTS "${TORCH_INSTALL_PREFIX}/lib/${lib}")
    message(FATAL_ERROR "${TORCH_INSTALL_PREFIX}/lib has no ${lib}: not the aarch64 torch wheel this describes")
  endif()
endforeach()
set(TORCH_INCLUDE_DIRS "${TORCH_INSTALL_PREFIX}/include"
                       "${TORCH_INSTALL_PREFIX}/include/torch/csrc/api/include")
# The wheel's own config sets no flags either: torch builds with the C++11 ABI only.
set(TORCH_CXX_FLAGS "")

add_library(torch SHARED IMPORTED)
set_target_properties(torch PROPERTIES
  IMPORTED_LOCATION "${TORCH_INSTALL_PREFIX}/lib/libtorch_cpu.so"
  INTERFACE_INCLUDE_DIRECTORIES "${TORCH_INCLUDE_DIRS}")
# libc10 is called directly. The BLAS that libtorch_cpu.so links (NVIDIA's NVPL in this wheel)
# defines the sgemm_/dgemm_ that cpu/flash/blas.cpp calls, so the executable names it too.
# -rpath-link: the linker resolves libtorch_cpu.so's own dependencies (the CUDA stubs among them)
# from these directories.
target_link_libraries(torch INTERFACE
  "${TORCH_INSTALL_PREFIX}/lib/libc10.so"
  "${TORCH_INSTALL_PREFIX}/lib/libnvpl_blas_lp64_gomp.so.0")
target_link_options(torch INTERFACE
  "LINKER:-rpath-link,${TORCH_INSTALL_PREFIX}/lib" "LINKER:-rpath-link,${QKV_AARCH64_STUBS}")
set(TORCH_LIBRARIES torch)
set(Torch_FOUND TRUE)
