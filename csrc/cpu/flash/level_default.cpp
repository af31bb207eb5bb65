// The attention kernels of the default CPU level:
// the baseline build: at::vec's generic code on x86-64, NEON on ARM; BLAS block GEMMs.
// The build compiles this file with the level's instruction flags (csrc/sources.txt).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "cpu/flash/level_kernels.h"
