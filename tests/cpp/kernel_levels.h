// What the kernel-level tests (test_kernel_flash.cpp, test_kernel_variants.cpp) share: the CPU
// levels this machine can run, and a guard that restores the thread count a test changes.
#pragma once

#include <ATen/Parallel.h>

#include <vector>

#include "cpu/flash/levels.h"

namespace qkv_attention::testing {

inline constexpr cpu::flash::CpuLevel kAllLevels[] = {
    cpu::flash::CpuLevel::kDefault, cpu::flash::CpuLevel::kAvx2, cpu::flash::CpuLevel::kAvx512};

inline std::vector<cpu::flash::CpuLevel> runnable_levels() {
  std::vector<cpu::flash::CpuLevel> levels;
  for (cpu::flash::CpuLevel level : kAllLevels) {
    if (cpu::flash::level_available(level)) levels.push_back(level);
  }
  return levels;
}

// Restores the thread count a test changed, however it ends.
struct ThreadCountGuard {
  int saved = at::get_num_threads();
  ~ThreadCountGuard() { at::set_num_threads(saved); }
};

}  // namespace qkv_attention::testing
