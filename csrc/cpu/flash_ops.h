// The building blocks of the blocked (flash) attention kernels in cpu/flash_attention.h: a small
// GEMM, the per-row softmax steps, the dropout keep-bits and the conversions. Two sets implement
// them with the same signatures:
//   PortableOps<Acc>  plain C++ (the compiler vectorises what it can), for float64 and for CPUs
//                     without AVX-512;
//   Avx512Ops         hand-written AVX-512 (cpu/flash_ops_avx512.cpp), float accumulation,
//                     chosen at run time when the CPU has AVX-512 (see cpu_has_avx512()).
// The kernels are templates over the set, so both run the same algorithm.
//
// Scores stay in natural units (scale * q.k + masks); exp(s - m) is computed as
// exp2((s - m) * log2(e)) only after the row maximum is subtracted, so that the rounding of the
// conversion is relative to s - m, not to s (logits of 1e4 keep their precision).
//
// Everything here sees plain pointers and sizes; nothing depends on ATen.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/philox.h"

namespace qkv_attention::cpu::flash {

constexpr double kLog2e = 1.4426950408889634074;

// One mask's values for a run of consecutive keys of one query row, contiguous in memory.
enum class MaskSegmentKind : uint8_t { kBool, kFloat, kDouble, kBFloat16, kHalf };
struct MaskSegment {
  MaskSegmentKind kind;
  const void* data;  // the first key's value
};

// Philox key, counter offset and keep threshold of one call's dropout stream (cpu/philox.h).
struct DropoutKey {
  uint32_t key0, key1, offset0, offset1, threshold;

  static DropoutKey make(uint64_t seed, uint64_t offset, double dropout_p) {
    return DropoutKey{uint32_t(seed), uint32_t(seed >> 32), uint32_t(offset),
                      uint32_t(offset >> 32), DropoutStream::threshold_for(dropout_p)};
  }
};

// Bit j of keep[j / 64] is whether element first + j of the dropout stream is kept: the scalar
// definition, shared by PortableOps and the tests of the vectorised version.
inline void keep_bits_reference(const DropoutKey& key, uint64_t first, int64_t count,
                                uint64_t* keep) {
  std::memset(keep, 0, sizeof(uint64_t) * size_t((count + 63) / 64));
  int64_t j = 0;
  while (j < count) {
    const uint64_t n = first + uint64_t(j);
    const uint64_t counter = n >> 2;
    const Philox4x32 r = Philox4x32::generate(uint32_t(counter), uint32_t(counter >> 32),
                                              key.offset0, key.offset1, key.key0, key.key1);
    for (uint64_t lane = n & 3; lane < 4 && j < count; ++lane, ++j) {
      if ((r.v[lane] >> 8) >= key.threshold) keep[j >> 6] |= uint64_t(1) << (j & 63);
    }
  }
}

inline bool keep_bit(const uint64_t* keep, int64_t j) { return (keep[j >> 6] >> (j & 63)) & 1; }

// ---------------------------------------------------------------------------------------------
// Portable set.

inline int64_t round_up16(int64_t x) { return (x + 15) / 16 * 16; }

template <typename Acc>
struct PortableOps {
  using acc_t = Acc;
  // The element of a packed B operand, and whether a row-major matrix of Acc with unit column
  // stride may serve as B as it is (ldb = its row stride) instead of being packed.
  using b_elem = Acc;
  static constexpr bool kPlainB = true;
  static constexpr int64_t kForwardKeys = 128;  // key block of the forward

  // Packed B operands: K x N, row-major with ld = packed_ld(N), zero-padded.
  static int64_t packed_ld(int64_t N) { return round_up16(N); }
  static int64_t packed_size(int64_t K, int64_t N) { return K * packed_ld(N); }

  // dst = B with B[k, n] = src[k * src_row + n * src_col] (a transpose when src_row is 1),
  // ld >= packed_ld(N) elements per row (pair of rows, for bfloat16 pairs), zero-padded.
  static void pack_b(const Acc* src, int64_t src_row, int64_t src_col, int64_t K, int64_t N,
                     b_elem* dst, int64_t ld) {
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t n = 0; n < N; ++n) dst[k * ld + n] = src[k * src_row + n * src_col];
      std::fill(dst + k * ld + N, dst + (k + 1) * ld, Acc(0));
    }
  }

  // C (M x N) = [C +] A (M x K) . B (K x N). A[r, k] = a[r * a_row + k * a_col],
  // B[k, n] = b[k * ldb + n] (packed, or a plain matrix), C[r, n] = c[r * ldc + n].
  static void gemm(int64_t M, int64_t N, int64_t K, const Acc* a, int64_t a_row, int64_t a_col,
                   const Acc* b, int64_t ldb, Acc* c, int64_t ldc, bool accumulate) {
    for (int64_t r = 0; r < M; ++r) {
      Acc* c_row = c + r * ldc;
      if (!accumulate) std::fill(c_row, c_row + N, Acc(0));
      for (int64_t k = 0; k < K; ++k) {
        const Acc a_rk = a[r * a_row + k * a_col];
        const Acc* b_row = b + k * ldb;
        for (int64_t n = 0; n < N; ++n) c_row[n] += a_rk * b_row[n];
      }
    }
  }

  // Turns raw dot products s[0, n) into scores: s * scale + bias + the masks (additive masks
  // added; a false bool gives -inf) for j < valid, -inf for j >= valid.
  // Returns the largest score, ignoring NaN (-inf when every score is -inf).
  static Acc prepare_row(Acc* s, int64_t n, Acc scale, Acc bias, int64_t valid,
                         const MaskSegment* masks, int mask_count) {
    constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
    Acc row_max = kNegInf;
    for (int64_t j = 0; j < n; ++j) {
      Acc x = kNegInf;
      if (j < valid) {
        x = s[j] * scale + bias;
        for (int m = 0; m < mask_count; ++m) {
          const MaskSegment& mask = masks[m];
          switch (mask.kind) {
            case MaskSegmentKind::kBool:
              if (!static_cast<const bool*>(mask.data)[j]) x = kNegInf;
              break;
            case MaskSegmentKind::kFloat:
              x += Acc(static_cast<const float*>(mask.data)[j]);
              break;
            case MaskSegmentKind::kDouble:
              x += Acc(static_cast<const double*>(mask.data)[j]);
              break;
            case MaskSegmentKind::kBFloat16:
              x += Acc(float(static_cast<const c10::BFloat16*>(mask.data)[j]));
              break;
            case MaskSegmentKind::kHalf:
              x += Acc(float(static_cast<const c10::Half*>(mask.data)[j]));
              break;
          }
          if (x == kNegInf) break;  // a later float mask must not turn -inf into NaN
        }
      }
      s[j] = x;
      if (x > row_max) row_max = x;
    }
    return row_max;
  }

  // p = exp(s - m) for s[0, n); returns sum(p) and stores p (times the keep bit when `keep`
  // is given) back into s. `m` must be finite or +inf.
  static Acc exp_row(Acc* s, int64_t n, Acc m, const uint64_t* keep) {
    Acc sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      const Acc p = std::exp(s[j] - m);
      sum += p;
      s[j] = keep && !keep_bit(keep, j) ? Acc(0) : p;
    }
    return sum;
  }

  // The backward of softmax and dropout for one row: with k_j = keep_j * kept_scale,
  // w = p * k (the weights, for dV; skipped when w is null) and ds = p * (dp * k - delta).
  // ds may alias dp.
  static void softmax_grad_row(const Acc* p, const Acc* dp, const uint64_t* keep,
                               Acc kept_scale, Acc delta, int64_t n, Acc* w, Acc* ds) {
    for (int64_t j = 0; j < n; ++j) {
      const Acc k = keep && !keep_bit(keep, j) ? Acc(0) : kept_scale;
      if (w) w[j] = p[j] * k;
      ds[j] = p[j] * (dp[j] * k - delta);
    }
  }

  static void keep_bits(const DropoutKey& key, uint64_t first, int64_t count, uint64_t* keep) {
    keep_bits_reference(key, first, count, keep);
  }

  // dst[0, n) = src[0, n) converted.
  template <typename T>
  static void to_acc(const T* src, int64_t n, Acc* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Acc>(src[i]);
  }
  template <typename T>
  static void from_acc(const Acc* src, int64_t n, Acc factor, T* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i] * factor);
  }

};

// ---------------------------------------------------------------------------------------------
// AVX-512 set (float accumulation). Defined in cpu/flash_ops_avx512.cpp with per-function
// target attributes, so the rest of the extension stays portable.

bool cpu_has_avx512();
// AVX-512 with the bfloat16 dot product (vdpbf16ps), as well.
bool cpu_has_avx512_bf16();

struct Avx512Ops {
  using acc_t = float;
  using b_elem = float;
  static constexpr bool kPlainB = true;
  static constexpr int64_t kForwardKeys = 256;
  static int64_t packed_ld(int64_t N) { return round_up16(N); }
  static int64_t packed_size(int64_t K, int64_t N) { return K * packed_ld(N); }

  static void pack_b(const float* src, int64_t src_row, int64_t src_col, int64_t K, int64_t N,
                     float* dst, int64_t ld);
  static void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col,
                   const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);
  static float prepare_row(float* s, int64_t n, float scale, float bias, int64_t valid,
                           const MaskSegment* masks, int mask_count);
  static float exp_row(float* s, int64_t n, float m, const uint64_t* keep);
  static void softmax_grad_row(const float* p, const float* dp, const uint64_t* keep,
                               float kept_scale, float delta, int64_t n, float* w, float* ds);
  static void keep_bits(const DropoutKey& key, uint64_t first, int64_t count, uint64_t* keep);

  static void to_acc(const float* src, int64_t n, float* dst);
  static void to_acc(const c10::BFloat16* src, int64_t n, float* dst);
  static void to_acc(const c10::Half* src, int64_t n, float* dst);
  static void from_acc(const float* src, int64_t n, float factor, float* dst);
  static void from_acc(const float* src, int64_t n, float factor, c10::BFloat16* dst);
  static void from_acc(const float* src, int64_t n, float factor, c10::Half* dst);
};

// For bfloat16 inputs: the same, except that the GEMMs round their operands to bfloat16 and
// multiply pairs of them with vdpbf16ps (twice the float rate), accumulating in float. Packed B
// operands are pairs of rows interleaved (ceil(K / 2) x ld x 2 bfloat16, "VNNI" order), so
// that one 32-bit lane holds B[2k, n] and B[2k + 1, n]. Used for bfloat16 only: its inputs are
// already bfloat16, and what is rounded besides them (P, W, dS) gets the precision torch's own
// bfloat16 kernels give it.
struct Avx512Bf16Ops : Avx512Ops {
  using b_elem = uint16_t;
  static constexpr bool kPlainB = false;
  static constexpr int64_t kForwardKeys = 512;
  static int64_t packed_ld(int64_t N) { return round_up16(N); }
  static int64_t packed_size(int64_t K, int64_t N) { return (K + 1) / 2 * 2 * packed_ld(N); }

  static void pack_b(const float* src, int64_t src_row, int64_t src_col, int64_t K, int64_t N,
                     uint16_t* dst, int64_t ld);
  static void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col,
                   const uint16_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);
};

}  // namespace qkv_attention::cpu::flash
