// The attention kernels of the avx512 CPU level: AVX-512, x86-64 only:
// 512-bit at::vec code; hand-written GEMMs (avx512_ops.h).
// The build compiles this file with the level's instruction flags (csrc/sources.txt).
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/flash/level_kernels.h"
