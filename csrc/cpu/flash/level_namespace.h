// The kernel templates (blocking.h .. backward.h, vec_ops.h) are compiled once per CPU level,
// each time with that level's instruction flags. Everything they define lives in a namespace
// named after the level (CPU_CAPABILITY, as ATen's own per-level kernels and at::vec do), so the
// copies of different levels never share a symbol and the linker cannot hand one level's code to
// another. Only the per-level sources (level_*.cpp) and the tests include these headers.
#pragma once

#ifndef CPU_CAPABILITY
#error "cpu/flash kernel headers need CPU_CAPABILITY (see cpu/flash/level_*.cpp)"
#endif

#define QKV_FLASH_LEVEL_BEGIN namespace qkv_attention::cpu::flash::CPU_CAPABILITY {
#define QKV_FLASH_LEVEL_END }
