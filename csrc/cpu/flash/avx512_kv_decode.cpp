// The avx512 level's products over quantized key and value chunks (cpu/flash/avx512_kv_decode.h),
// written with AVX-512 intrinsics. Built only for x86-64, with the avx512 level's flags.
#include "cpu/flash/avx512_kv_decode.h"

#include <immintrin.h>

#include <algorithm>
#include <limits>

// GCC 12's intrinsic headers build their "undefined" vectors from a self-initialised variable;
// inlined into the masked loads below, -Wall reports that idiom as (maybe-)uninitialised. The
// lanes involved are never read.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace qkv_attention::cpu::flash {
namespace {

#define QKV_INLINE __attribute__((always_inline)) inline

// Lanes [0, n) of a 16-lane vector: none for n <= 0, all for n >= 16.
QKV_INLINE __mmask16 first_lanes(int64_t n) {
  if (n <= 0) return 0;
  return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u);
}

// The codes codes[0, 16) (lanes outside `lanes` neither read nor used: 0) as float32, exactly,
// in units of kUnit<S> (the value is the result times kUnit<S>, a power of two the callers apply
// once per sum). int8: sign-extended and converted. float8: widened into a float16, which the
// F16C conversion turns into float32 exactly, subnormals included (it ignores the
// denormals-are-zero setting): e5m2 is the upper byte of a float16 (1, 5, 2 bits). e4m3's
// exponent and mantissa bits, shifted into a float16's exponent and mantissa fields, give its
// value times 2^-8 (bias 15 instead of 7, and float16's subnormals 2^-8 times e4m3's), so
// kUnit is 2^8; S.1111.111, e4m3's NaN, is set apart.
template <CacheStorage S>
constexpr float kUnit = S == CacheStorage::kFloat8E4M3 ? 256.0f : 1.0f;

template <CacheStorage S>
QKV_INLINE __m512 decode16(const uint8_t* codes, __mmask16 lanes) {
  const __m128i raw = _mm_maskz_loadu_epi8(lanes, codes);
  if constexpr (S == CacheStorage::kInt8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
  } else if constexpr (S == CacheStorage::kFloat8E5M2) {
    return _mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(raw), 8));
  } else {
    static_assert(S == CacheStorage::kFloat8E4M3);
    // Sign-extended to 16 bits and shifted left by 7: the sign lands in bits 15 and 14, the
    // exponent and mantissa in bits 13..7; bit 14 cleared, that is the float16.
    const __m256i shifted = _mm256_slli_epi16(_mm256_cvtepi8_epi16(raw), 7);
    const __m256i half = _mm256_and_si256(shifted, _mm256_set1_epi16(int16_t(0xBFFF)));
    const __m256i nan_bits = _mm256_set1_epi16(0x3F80);  // exponent and mantissa all ones
    const __mmask16 nan = _mm256_cmpeq_epi16_mask(_mm256_and_si256(half, nan_bits), nan_bits);
    return _mm512_mask_mov_ps(_mm512_cvtph_ps(half), nan,
                              _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
  }
}

// Rows are asked for this far ahead: a chunk's rows are short runs that the hardware
// prefetchers barely warm up to, and a row's decoding takes less time than the memory's latency.
constexpr int64_t kPrefetchKeys = 32;

// Lane i of the result is the sum of the 16 lanes of v[slot_of(i)]: a transposing tree of
// shuffles and adds (45 instructions for 16 sums, against 16 separate horizontal sums).
QKV_INLINE int slot_of(int64_t key) { return int(key % 4 * 4 + key / 4); }

QKV_INLINE __m512 sum_each(const float (*v)[16]) {
  __m512 w[8], x[4], y[2];
  for (int k = 0; k < 8; ++k) {  // each 128-bit quarter: 4 partial sums of one vector
    const __m512 a = _mm512_load_ps(v[2 * k]), b = _mm512_load_ps(v[2 * k + 1]);
    w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int k = 0; k < 4; ++k) {  // quarter c of x[k]: 4 partial sums of v[4k + c]
    x[k] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0xDD));
  }
  for (int k = 0; k < 2; ++k) {
    y[k] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * k], x[2 * k + 1]),
                         _mm512_unpackhi_ps(x[2 * k], x[2 * k + 1]));
  }
  // Quarter c, lane l: the sum of v[4l + c].
  return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x44), _mm512_shuffle_ps(y[0], y[1], 0xEE));
}

// Scores of R query rows against keys [0, n), 16 keys at a time: each key row is decoded once
// for the R rows; its R vectors of partial sums are reduced together with the next 15 keys'.
template <CacheStorage S, int R>
void scores_rows(const QuantizedChunk& keys, int64_t n, int64_t D, const float* q, float* scores,
                 int64_t ld_scores) {
  // The chunk's fields in locals (read through the reference, GCC reloads them on every vector).
  const uint8_t* const codes = keys.codes;
  const int64_t row_stride = keys.row_stride, scale_stride = keys.scale_stride;
  const float* const scales = keys.scales;
  const int64_t full = D / 16 * 16;
  const __mmask16 tail = first_lanes(D - full);
  alignas(64) float partial[R][16][16];
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t count = std::min<int64_t>(16, n - j0);
    for (int64_t t = 0; t < 16; ++t) {
      __m512 acc[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
      if (t < count) {
        const int64_t j = j0 + t;
        const uint8_t* row = codes + j * row_stride;
        if (j + kPrefetchKeys < n) {
          const auto* ahead = reinterpret_cast<const char*>(row + kPrefetchKeys * row_stride);
          for (int64_t c = 0; c < D; c += 64) _mm_prefetch(ahead + c, _MM_HINT_T0);
        }
#pragma GCC unroll 8
        for (int64_t d = 0; d < full; d += 16) {
          const __m512 k = decode16<S>(row + d, 0xffff);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(q + r * D + d), k, acc[r]);
          }
        }
        if (tail != 0) {
          const __m512 k = decode16<S>(row + full, tail);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, q + r * D + full), k, acc[r]);
          }
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) _mm512_store_ps(partial[r][slot_of(t)], acc[r]);
    }
    // The 16 keys' scales, applied to the sums.
    const __mmask16 keys_here = first_lanes(count);
    __m512 scale;
    if (scale_stride == 1) {
      scale = _mm512_maskz_loadu_ps(keys_here, scales + j0);
    } else {
      alignas(64) float gathered[16] = {};
      for (int64_t t = 0; t < count; ++t) gathered[t] = scales[(j0 + t) * scale_stride];
      scale = _mm512_load_ps(gathered);
    }
    for (int r = 0; r < R; ++r) {
      __m512 sums = sum_each(partial[r]);
      if constexpr (kUnit<S> != 1.0f) sums = _mm512_mul_ps(sums, _mm512_set1_ps(kUnit<S>));
      _mm512_mask_storeu_ps(scores + r * ld_scores + j0, keys_here, _mm512_mul_ps(sums, scale));
    }
  }
}

// out rows [0, R) x columns [d0, d0 + 16 NV) = sum over keys j < n of p[r, j] * value_j: the
// accumulators stay in registers over all keys; each value row's codes are decoded once for
// the R rows.
template <CacheStorage S, int R, int NV>
void values_block(const QuantizedChunk& values, int64_t n, int64_t d0, int64_t Dv, const float* p,
                  int64_t ld_p, float* out, int64_t ld_out) {
  // The chunk's fields in locals: read through the reference, GCC keeps storing the
  // accumulators back to the stack on every key in case they alias.
  const uint8_t* const codes = values.codes + d0;
  const int64_t row_stride = values.row_stride, scale_stride = values.scale_stride;
  const float* const scales = values.scales;
  __m512 acc[R][NV];
#pragma GCC unroll 4
  for (int t = 0; t < NV; ++t) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r][t] = _mm512_setzero_ps();
  }
  const __mmask16 last = first_lanes(Dv - d0 - 16 * (NV - 1));
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* row = codes + j * row_stride;
    if (d0 == 0 && j + kPrefetchKeys < n) {  // the whole row, on the first pass over the columns
      const auto* ahead = reinterpret_cast<const char*>(row + kPrefetchKeys * row_stride);
      for (int64_t c = 0; c < Dv; c += 64) _mm_prefetch(ahead + c, _MM_HINT_T0);
    }
    // The row's scale goes into the R weights: R multiplications instead of one per vector.
    const float scale = scales[j * scale_stride];
    __m512 weight[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) weight[r] = _mm512_set1_ps(p[r * ld_p + j] * kUnit<S> * scale);
#pragma GCC unroll 4
    for (int t = 0; t < NV; ++t) {
      const __m512 v = decode16<S>(row + 16 * t, t == NV - 1 ? last : 0xffff);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(weight[r], v, acc[r][t]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int t = 0; t < NV; ++t) {
      _mm512_mask_storeu_ps(out + r * ld_out + d0 + 16 * t, t == NV - 1 ? last : 0xffff, acc[r][t]);
    }
  }
}

constexpr int kRows = 4;  // query rows per register block

template <CacheStorage S>
void scores_all(const QuantizedChunk& keys, int64_t M, int64_t n, int64_t D, const float* q,
                float* scores, int64_t ld_scores) {
  for (int64_t r0 = 0; r0 < M; r0 += kRows) {
    const float* q_rows = q + r0 * D;
    float* s_rows = scores + r0 * ld_scores;
    switch (std::min<int64_t>(kRows, M - r0)) {
      case 4:
        scores_rows<S, 4>(keys, n, D, q_rows, s_rows, ld_scores);
        break;
      case 3:
        scores_rows<S, 3>(keys, n, D, q_rows, s_rows, ld_scores);
        break;
      case 2:
        scores_rows<S, 2>(keys, n, D, q_rows, s_rows, ld_scores);
        break;
      default:
        scores_rows<S, 1>(keys, n, D, q_rows, s_rows, ld_scores);
        break;
    }
  }
}

template <CacheStorage S, int R>
void values_rows(const QuantizedChunk& values, int64_t n, int64_t Dv, const float* p, int64_t ld_p,
                 float* out, int64_t ld_out) {
  constexpr int64_t kColumns = 64;  // 4 vectors x R rows of accumulators
  for (int64_t d0 = 0; d0 < Dv; d0 += kColumns) {
    switch ((std::min(kColumns, Dv - d0) + 15) / 16) {
      case 4:
        values_block<S, R, 4>(values, n, d0, Dv, p, ld_p, out, ld_out);
        break;
      case 3:
        values_block<S, R, 3>(values, n, d0, Dv, p, ld_p, out, ld_out);
        break;
      case 2:
        values_block<S, R, 2>(values, n, d0, Dv, p, ld_p, out, ld_out);
        break;
      default:
        values_block<S, R, 1>(values, n, d0, Dv, p, ld_p, out, ld_out);
        break;
    }
  }
}

template <CacheStorage S>
void values_all(const QuantizedChunk& values, int64_t M, int64_t n, int64_t Dv, const float* p,
                int64_t ld_p, float* out, int64_t ld_out) {
  for (int64_t r0 = 0; r0 < M; r0 += kRows) {
    const float* p_rows = p + r0 * ld_p;
    float* o_rows = out + r0 * ld_out;
    switch (std::min<int64_t>(kRows, M - r0)) {
      case 4:
        values_rows<S, 4>(values, n, Dv, p_rows, ld_p, o_rows, ld_out);
        break;
      case 3:
        values_rows<S, 3>(values, n, Dv, p_rows, ld_p, o_rows, ld_out);
        break;
      case 2:
        values_rows<S, 2>(values, n, Dv, p_rows, ld_p, o_rows, ld_out);
        break;
      default:
        values_rows<S, 1>(values, n, Dv, p_rows, ld_p, o_rows, ld_out);
        break;
    }
  }
}

}  // namespace

void avx512_quantized_scores(const QuantizedChunk& keys, int64_t M, int64_t n, int64_t D,
                             const float* q, float* scores, int64_t ld_scores) {
  switch (keys.storage) {
    case CacheStorage::kInt8:
      return scores_all<CacheStorage::kInt8>(keys, M, n, D, q, scores, ld_scores);
    case CacheStorage::kFloat8E4M3:
      return scores_all<CacheStorage::kFloat8E4M3>(keys, M, n, D, q, scores, ld_scores);
    case CacheStorage::kFloat8E5M2:
      return scores_all<CacheStorage::kFloat8E5M2>(keys, M, n, D, q, scores, ld_scores);
    case CacheStorage::kPlain:
      break;
  }
}

void avx512_quantized_values(const QuantizedChunk& values, int64_t M, int64_t n, int64_t Dv,
                             const float* p, int64_t ld_p, float* out, int64_t ld_out) {
  switch (values.storage) {
    case CacheStorage::kInt8:
      return values_all<CacheStorage::kInt8>(values, M, n, Dv, p, ld_p, out, ld_out);
    case CacheStorage::kFloat8E4M3:
      return values_all<CacheStorage::kFloat8E4M3>(values, M, n, Dv, p, ld_p, out, ld_out);
    case CacheStorage::kFloat8E5M2:
      return values_all<CacheStorage::kFloat8E5M2>(values, M, n, Dv, p, ld_p, out, ld_out);
    case CacheStorage::kPlain:
      break;
  }
}

}  // namespace qkv_attention::cpu::flash
