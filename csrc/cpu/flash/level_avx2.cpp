// The attention kernels of the avx2 CPU level: AVX2 + FMA, x86-64 only:
// 256-bit at::vec code; block GEMMs as at::vec register tiles (VecTiledOps in vec_ops.h).
// The build compiles this file with the level's instruction flags (csrc/sources.txt).
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/flash/level_kernels.h"
