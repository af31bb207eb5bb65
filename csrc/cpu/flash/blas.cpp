// cpu/flash/blas.h through the Fortran BLAS interface (sgemm_/dgemm_, 32-bit integers).
#include "cpu/flash/blas.h"

#include <algorithm>
#include <climits>

#include "cpu/one_blas_thread.h"

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
}

namespace qkv_attention::cpu::flash {
namespace {

bool fits_int(int64_t x) { return x >= 0 && x <= INT_MAX; }

// The column-major call behind the row-major product: C^T (N x M) = B^T (N x K) . A^T (K x M).
// B's memory is B^T column-major (ld = ldb); A's memory is A^T column-major (ld = a_row) when
// A's rows are contiguous, else A itself column-major (ld = a_col), transposed by the call.
template <typename Acc, typename Gemm>
bool column_major_call(Gemm gemm, int64_t M, int64_t N, int64_t K, const Acc* a, int64_t a_row,
                       int64_t a_col, const Acc* b, int64_t ldb, Acc* c, int64_t ldc,
                       bool accumulate) {
  if (M <= 0 || N <= 0) return true;
  const bool rows_contiguous = a_col == 1 && (a_row >= K || M == 1);
  const bool cols_contiguous = !rows_contiguous && a_row == 1 && (a_col >= M || K == 1);
  if (!rows_contiguous && !cols_contiguous) return false;
  const char transa = 'N', transb = rows_contiguous ? 'N' : 'T';
  const int64_t lda = std::max<int64_t>(ldb, std::max<int64_t>(N, 1));
  const int64_t ld_a = rows_contiguous ? std::max<int64_t>(a_row, std::max<int64_t>(K, 1))
                                       : std::max<int64_t>(a_col, std::max<int64_t>(M, 1));
  if (ldb < N && K > 1) return false;
  if (ldc < N || !fits_int(M) || !fits_int(N) || !fits_int(K) || !fits_int(lda) ||
      !fits_int(ld_a) || !fits_int(ldc)) {
    return false;
  }
  const int m = int(N), n = int(M), k = int(K), lda_i = int(lda), ldb_i = int(ld_a),
            ldc_i = int(ldc);
  const Acc alpha = 1, beta = accumulate ? 1 : 0;
  const OneBlasThread one_thread;
  gemm(&transa, &transb, &m, &n, &k, &alpha, b, &lda_i, a, &ldb_i, &beta, c, &ldc_i);
  return true;
}

}  // namespace

bool blas_gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col,
               const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  return column_major_call(sgemm_, M, N, K, a, a_row, a_col, b, ldb, c, ldc, accumulate);
}

bool blas_gemm(int64_t M, int64_t N, int64_t K, const double* a, int64_t a_row, int64_t a_col,
               const double* b, int64_t ldb, double* c, int64_t ldc, bool accumulate) {
  return column_major_call(dgemm_, M, N, K, a, a_row, a_col, b, ldb, c, ldc, accumulate);
}

}  // namespace qkv_attention::cpu::flash
