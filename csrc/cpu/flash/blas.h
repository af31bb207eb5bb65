// The block GEMMs of the default and AVX2 levels (and of float64 everywhere) go to the BLAS that
// torch links (MKL on x86, OpenBLAS on ARM), one single-threaded call per block: inside the
// kernels' parallel region the BLAS does not start threads of its own, and it follows the
// instruction-set limits torch users already set for it (MKL_ENABLE_INSTRUCTIONS).
// Compiled for the baseline ISA: the BLAS picks its own code path.
#pragma once

#include <cstdint>

namespace qkv_attention::cpu::flash {

// C (M x N) = [C +] A (M x K) . B (K x N), all row-major views:
//   A[r, k] = a[r * a_row + k * a_col] with a_col == 1 or a_row == 1,
//   B[k, n] = b[k * ldb + n],  C[r, n] = c[r * ldc + n].
// Returns false, touching nothing, when a stride cannot be passed to the BLAS (not a valid
// leading dimension, or past its 32-bit integers); the caller then multiplies itself.
bool blas_gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col,
               const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);
bool blas_gemm(int64_t M, int64_t N, int64_t K, const double* a, int64_t a_row, int64_t a_col,
               const double* b, int64_t ldb, double* c, int64_t ldc, bool accumulate);

}  // namespace qkv_attention::cpu::flash
