// The avx512 level's hand-written parts (avx512_ops.cpp, x86-64 only): register-tiled GEMM
// micro-kernels, measured faster than BLAS calls on the backward's small blocks, the dropout keep
// bits with Philox on 64-bit lanes, and for bfloat16 GEMMs with the vdpbf16ps dot product or,
// where the CPU has AMX, on AMX tiles through oneDNN's brgemm.
// Nothing here is called unless cpu/flash/levels.cpp found the instructions on the CPU.
#pragma once

#include <cstdint>

#include "cpu/flash/dropout_bits.h"
#include "cpu/rounding.h"

namespace qkv_attention::cpu::flash {

struct Avx512Ops {
  using b_elem = float;
  static constexpr bool kPlainB = true;
  static constexpr int64_t kColumnStride = 1;     // elements between columns of a B operand
  static constexpr int64_t kForwardQueries = 48;  // 8 register tiles of 6 rows
  static constexpr int64_t kForwardKeys = 256;
  static int64_t packed_ld(int64_t N) { return round_up(N, 16); }
  static int64_t packed_size(int64_t K, int64_t N) { return K * packed_ld(N); }

  // dst = B with B[k, n] = src[k * src_row + n * src_col], ld >= packed_ld(N), zero-padded.
  static void pack_b(const float* src, int64_t src_row, int64_t src_col, int64_t K, int64_t N,
                     float* dst, int64_t ld);
  // C (M x N) = [C +] A (M x K) . B (K x N); A[r, k] = a[r * a_row + k * a_col],
  // B[k, n] = b[k * ldb + n], C[r, n] = c[r * ldc + n].
  static void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col,
                   const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);
  static void keep_bits(const DropoutKey& key, uint64_t first, int64_t count, uint64_t* keep);
};

// For bfloat16 inputs on CPUs with AVX512_BF16: the GEMMs round their operands to bfloat16 and
// multiply pairs of them with vdpbf16ps (twice the float rate), accumulating in float. Packed B
// operands are pairs of rows interleaved (ceil(K / 2) x ld x 2 bfloat16, "VNNI" order), so
// that one 32-bit lane holds B[2k, n] and B[2k + 1, n]. What is rounded besides the inputs
// (P, W, dS) gets the precision torch's own bfloat16 kernels give it.
struct Avx512Bf16Ops : Avx512Ops {
  using b_elem = uint16_t;
  static constexpr bool kPlainB = false;
  static constexpr int64_t kColumnStride = 2;  // B[k, n] pairs with B[k + 1, n]
  static constexpr int64_t kForwardKeys = 512;
  static int64_t packed_size(int64_t K, int64_t N) { return (K + 1) / 2 * 2 * packed_ld(N); }

  static void pack_b(const float* src, int64_t src_row, int64_t src_col, int64_t K, int64_t N,
                     uint16_t* dst, int64_t ld);
  static void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col,
                   const uint16_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);
};

// For bfloat16 on CPUs with AMX: the same packed B operands (VNNI pairs, the layout oneDNN's
// brgemm takes with is_vnni), multiplied on AMX tiles by at::native::cpublas::brgemm, one
// single-threaded call per block; A is rounded to bfloat16 rows first (into a buffer each thread
// keeps). A thread that ran one holds the tile state until the task pool releases it
// (tile_state.h). Fewer than 16 rows of A (a decoding step's queries) go to the vdpbf16ps
// kernels instead: a tile holds 16 rows. oneDNN generates a kernel for each new GEMM shape, once
// per thread and process (torch keeps them), so the calls split their shapes into a bounded set
// (avx512_ops.cpp). Only chosen where levels.h's amx_bf16_usable().
struct Avx512AmxOps : Avx512Bf16Ops {
  // 128 x 512 blocks: 48 x 512 was 10% slower (B2 H8 L1024 D64 forward, one thread).
  static constexpr int64_t kForwardQueries = 128;
  // B operands may also be packed straight from bfloat16 rows (the forward's K^T and V blocks),
  // with no float copy of the operand in between: the same bits, moved.
  static constexpr bool kPacksBf16Rows = true;
  using Avx512Bf16Ops::pack_b;
  static void pack_b(const uint16_t* src, int64_t src_row, int64_t src_col, int64_t K, int64_t N,
                     uint16_t* dst, int64_t ld);
  // gemm with A already bfloat16 bits, A[r, k] = a[r * lda + k], and a zero at k = K when K is
  // odd (the forward's P, written so by VecElementwise::exp_row_bf16).
  static constexpr bool kTakesBf16A = true;
  static void gemm_bf16_a(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t lda,
                          const uint16_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);
  static void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col,
                   const uint16_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);
};

}  // namespace qkv_attention::cpu::flash
