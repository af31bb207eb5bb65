// The avx512 level's own GEMMs and dropout bits (cpu/flash/avx512_ops.h), written with AVX-512
// intrinsics, and the calls of oneDNN's AMX brgemm. Built only for x86-64, with the avx512
// level's flags; called only after cpu/flash/levels.cpp has checked that the CPU has AVX-512
// (and, for the bfloat16 dot product, AVX512_BF16, which the functions that use it name in
// their own target attribute; for AMX, that oneDNN may use it).
#include "cpu/flash/avx512_ops.h"

#include <ATen/native/CPUBlas.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/flash/tile_state.h"

// GCC 12's intrinsic headers build their "undefined" vectors from a self-initialised variable;
// once inlined into the masked loads and stores here, -Wall reports that idiom as
// (maybe-)uninitialised. The lanes involved are never read, so the warning is noise for this file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace qkv_attention::cpu::flash {

#define QKV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,bmi2,fma,f16c")))
#define QKV_AVX512_INLINE QKV_AVX512 __attribute__((always_inline)) inline

namespace {

// Lanes [0, n) of a 16-lane vector: none for n <= 0, all for n >= 16.
QKV_AVX512_INLINE __mmask16 first_lanes(int64_t n) {
  if (n <= 0) return 0;
  return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u);
}

// ---- GEMM -----------------------------------------------------------------------------------
// One register tile: MR rows of C times NV vectors of 16 columns (the last one masked), kept in
// registers over the whole K loop. With MR = 6 and NV = 4 that is 24 accumulators, 4 loads of B
// and 6 broadcasts of A per 24 fused multiply-adds.
template <int MR, int NV>
QKV_AVX512_INLINE void gemm_tile(int64_t K, const float* __restrict a, int64_t a_row, int64_t a_col,
                                 const float* __restrict b, int64_t ldb, float* __restrict c,
                                 int64_t ldc, bool accumulate, __mmask16 last) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    __m512 b_vec[NV];
    const float* b_row = b + k * ldb;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      b_vec[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, b_row + 16 * v)
                             : _mm512_loadu_ps(b_row + 16 * v);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a_rk = _mm512_set1_ps(a[r * a_row + k * a_col]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a_rk, b_vec[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const __mmask16 lanes = v == NV - 1 ? last : __mmask16(0xffff);
      float* c_ptr = c + r * ldc + 16 * v;
      __m512 x = acc[r][v];
      if (accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(lanes, c_ptr));
      _mm512_mask_storeu_ps(c_ptr, lanes, x);
    }
  }
}

using TileFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                        int64_t, bool, __mmask16);

template <int MR, int NV>
QKV_AVX512 void gemm_tile_fn(int64_t K, const float* a, int64_t a_row, int64_t a_col,
                             const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate,
                             __mmask16 last) {
  gemm_tile<MR, NV>(K, a, a_row, a_col, b, ldb, c, ldc, accumulate, last);
}

constexpr int kTileRows = 6;
constexpr int kTileVectors = 4;

// [rows - 1][vectors - 1]
const TileFn kTiles[kTileRows][kTileVectors] = {
    {gemm_tile_fn<1, 1>, gemm_tile_fn<1, 2>, gemm_tile_fn<1, 3>, gemm_tile_fn<1, 4>},
    {gemm_tile_fn<2, 1>, gemm_tile_fn<2, 2>, gemm_tile_fn<2, 3>, gemm_tile_fn<2, 4>},
    {gemm_tile_fn<3, 1>, gemm_tile_fn<3, 2>, gemm_tile_fn<3, 3>, gemm_tile_fn<3, 4>},
    {gemm_tile_fn<4, 1>, gemm_tile_fn<4, 2>, gemm_tile_fn<4, 3>, gemm_tile_fn<4, 4>},
    {gemm_tile_fn<5, 1>, gemm_tile_fn<5, 2>, gemm_tile_fn<5, 3>, gemm_tile_fn<5, 4>},
    {gemm_tile_fn<6, 1>, gemm_tile_fn<6, 2>, gemm_tile_fn<6, 3>, gemm_tile_fn<6, 4>},
};

// ---- conversions ----------------------------------------------------------------------------
// float -> bfloat16 bits, rounding to nearest even like c10::BFloat16 (NaN stays a quiet NaN).
QKV_AVX512_INLINE __m256i to_bf16_bits(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  const __mmask16 is_nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512i result =
      _mm512_mask_blend_epi32(is_nan, _mm512_srli_epi32(rounded, 16), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(result);
}

// ---- Philox ---------------------------------------------------------------------------------
// Ten Philox4x32 rounds on 16 counters, as two sets of eight with one counter per 64-bit lane:
// _mm512_mul_epu32 multiplies the low 32 bits of each lane into the full 64-bit product, so
// the product's high word is one shift away and its low word is the lane itself (the high half
// of a lane then carries bits that no later multiply or comparison reads). The three-way XORs
// are single vpternlogq instructions.
struct PhiloxLanes {
  __m512i c0, c1, c2, c3;
};

QKV_AVX512_INLINE void philox_round(PhiloxLanes& x, __m512i k0, __m512i k1) {
  const __m512i mul0 = _mm512_set1_epi64(0xD2511F53u);
  const __m512i mul1 = _mm512_set1_epi64(0xCD9E8D57u);
  const __m512i p0 = _mm512_mul_epu32(x.c0, mul0);
  const __m512i p1 = _mm512_mul_epu32(x.c2, mul1);
  constexpr int kXor3 = 0x96;  // a ^ b ^ c
  x.c0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), x.c1, k0, kXor3);
  x.c1 = p1;
  x.c2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), x.c3, k1, kXor3);
  x.c3 = p0;
}

// Whether the low 32 bits of each lane, shifted right by 8, reach the threshold.
QKV_AVX512_INLINE __mmask8 kept_lanes(__m512i word, __m512i threshold) {
  const __m512i low = _mm512_and_si512(word, _mm512_set1_epi64(0xffffffffu));
  return _mm512_cmpge_epu64_mask(_mm512_srli_epi64(low, 8), threshold);
}

// Keep bits of the 64 elements 4 * counter .. 4 * counter + 63 (bit t = element 4 * counter + t).
QKV_AVX512_INLINE uint64_t keep_word(const DropoutKey& key, uint64_t counter) {
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i first = _mm512_add_epi64(_mm512_set1_epi64(int64_t(counter)), lane);
  const __m512i second = _mm512_add_epi64(first, _mm512_set1_epi64(8));
  const __m512i offset0 = _mm512_set1_epi64(key.offset0), offset1 = _mm512_set1_epi64(key.offset1);
  // Counter words: (low 32 bits of the counter, high 32 bits, offset low, offset high).
  PhiloxLanes a{first, _mm512_srli_epi64(first, 32), offset0, offset1};
  PhiloxLanes b{second, _mm512_srli_epi64(second, 32), offset0, offset1};
  uint32_t k0 = key.key0, k1 = key.key1;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = _mm512_set1_epi64(k0), key1 = _mm512_set1_epi64(k1);
    philox_round(a, key0, key1);
    philox_round(b, key0, key1);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const __m512i threshold = _mm512_set1_epi64(key.threshold);
  // 16-bit masks per output word w: counters 0..7 from a, 8..15 from b.
  const uint64_t w0 = uint64_t(kept_lanes(a.c0, threshold)) | uint64_t(kept_lanes(b.c0, threshold))
                                                                  << 8;
  const uint64_t w1 = uint64_t(kept_lanes(a.c1, threshold)) | uint64_t(kept_lanes(b.c1, threshold))
                                                                  << 8;
  const uint64_t w2 = uint64_t(kept_lanes(a.c2, threshold)) | uint64_t(kept_lanes(b.c2, threshold))
                                                                  << 8;
  const uint64_t w3 = uint64_t(kept_lanes(a.c3, threshold)) | uint64_t(kept_lanes(b.c3, threshold))
                                                                  << 8;
  // Element 4c + w is word w of counter c: interleave the four 16-bit masks.
  return _pdep_u64(w0, 0x1111111111111111ull) | _pdep_u64(w1, 0x2222222222222222ull) |
         _pdep_u64(w2, 0x4444444444444444ull) | _pdep_u64(w3, 0x8888888888888888ull);
}

}  // namespace

QKV_AVX512 void Avx512Ops::gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row,
                                int64_t a_col, const float* b, int64_t ldb, float* c, int64_t ldc,
                                bool accumulate) {
  constexpr int64_t kPanel = 16 * kTileVectors;
  for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
    const int64_t width = std::min(kPanel, N - n0);
    const int64_t vectors = ceil_div(width, 16);
    const __mmask16 last = first_lanes(width - 16 * (vectors - 1));
    for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
      const int64_t rows = std::min<int64_t>(kTileRows, M - m0);
      kTiles[rows - 1][vectors - 1](K, a + m0 * a_row, a_row, a_col, b + n0, ldb, c + m0 * ldc + n0,
                                    ldc, accumulate, last);
    }
  }
}

QKV_AVX512 void Avx512Ops::keep_bits(const DropoutKey& key, uint64_t first, int64_t count,
                                     uint64_t* keep) {
  // Raw word r holds elements 4 * counter0 + 64 r + t; output bit j is element first + j,
  // i.e. raw bit j + shift.
  const uint64_t counter0 = first >> 2;
  const unsigned shift = unsigned(first & 3);
  const int64_t words = ceil_div(count, 64);
  uint64_t raw = keep_word(key, counter0);
  for (int64_t w = 0; w < words; ++w) {
    uint64_t out = raw >> shift;
    const bool needs_next = w + 1 < words || (shift != 0 && count - 64 * w + shift > 64);
    uint64_t next = 0;
    if (needs_next) next = keep_word(key, counter0 + 16 * uint64_t(w + 1));
    if (shift != 0) out |= next << (64 - shift);
    keep[w] = out;
    raw = next;
  }
  // Bits past `count` in the last word are not used by the callers; clear them anyway.
  if (count % 64 != 0) keep[words - 1] &= (uint64_t(1) << (count % 64)) - 1;
}

QKV_AVX512 void Avx512Ops::pack_b(const float* src, int64_t src_row, int64_t src_col, int64_t K,
                                  int64_t N, float* dst, int64_t ld) {
  if (src_col == 1) {  // rows of B are rows of src
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t n = 0; n < ld; n += 16) {
        _mm512_storeu_ps(dst + k * ld + n,
                         _mm512_maskz_loadu_ps(first_lanes(N - n), src + k * src_row + n));
      }
    }
    return;
  }
  if (src_row == 1 && src_col <= (int64_t(1) << 26)) {  // a transpose; 32-bit gather offsets
    const __m512i offsets =
        _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                           _mm512_set1_epi32(int32_t(src_col)));
    for (int64_t n = 0; n < ld; n += 16) {
      const __mmask16 lanes = first_lanes(N - n);
      const float* column0 = src + n * src_col;
      for (int64_t k = 0; k < K; ++k) {
        _mm512_storeu_ps(dst + k * ld + n, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes,
                                                                    offsets, column0 + k, 4));
      }
    }
    return;
  }
  for (int64_t k = 0; k < K; ++k) {  // any other layout, element by element
    for (int64_t n = 0; n < ld; ++n) dst[k * ld + n] = n < N ? src[k * src_row + n * src_col] : 0.f;
  }
}

// ---- bfloat16 dot products ------------------------------------------------------------------

#define QKV_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,bmi2,fma,f16c")))
#define QKV_AVX512_BF16_INLINE QKV_AVX512_BF16 __attribute__((always_inline)) inline

namespace {

// 32 bfloat16: the 16 floats of `low` then the 16 of `high`, each rounded to nearest even.
QKV_AVX512_INLINE __m512i to_bf16_bits_32(__m512 low, __m512 high) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16_bits(low)), to_bf16_bits(high), 1);
}

// Interleaves the two halves of x (16-bit lanes): a0 b0 a1 b1 ... a15 b15.
QKV_AVX512_INLINE __m512i interleave_halves_16(__m512i x) {
  alignas(64) static const uint16_t kOrder[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                  21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                  11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_permutexvar_epi16(_mm512_load_si512(kOrder), x);
}

template <int MR, int NV>
QKV_AVX512_BF16_INLINE void bf16_tile(int64_t K2, const uint32_t* __restrict a, int64_t a_row,
                                      int64_t a_col, const uint16_t* __restrict b, int64_t ldb,
                                      float* __restrict c, int64_t ldc, bool accumulate,
                                      __mmask16 last) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    __m512bh b_vec[NV];
    const uint16_t* b_row = b + k2 * ldb * 2;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b_vec[v] = (__m512bh)_mm512_loadu_si512(b_row + 32 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh a_pair = (__m512bh)_mm512_set1_epi32(int32_t(a[r * a_row + k2 * a_col]));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a_pair, b_vec[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const __mmask16 lanes = v == NV - 1 ? last : __mmask16(0xffff);
      float* c_ptr = c + r * ldc + 16 * v;
      __m512 x = acc[r][v];
      if (accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(lanes, c_ptr));
      _mm512_mask_storeu_ps(c_ptr, lanes, x);
    }
  }
}

using Bf16TileFn = void (*)(int64_t, const uint32_t*, int64_t, int64_t, const uint16_t*, int64_t,
                            float*, int64_t, bool, __mmask16);

template <int MR, int NV>
QKV_AVX512_BF16 void bf16_tile_fn(int64_t K2, const uint32_t* a, int64_t a_row, int64_t a_col,
                                  const uint16_t* b, int64_t ldb, float* c, int64_t ldc,
                                  bool accumulate, __mmask16 last) {
  bf16_tile<MR, NV>(K2, a, a_row, a_col, b, ldb, c, ldc, accumulate, last);
}

const Bf16TileFn kBf16Tiles[kTileRows][kTileVectors] = {
    {bf16_tile_fn<1, 1>, bf16_tile_fn<1, 2>, bf16_tile_fn<1, 3>, bf16_tile_fn<1, 4>},
    {bf16_tile_fn<2, 1>, bf16_tile_fn<2, 2>, bf16_tile_fn<2, 3>, bf16_tile_fn<2, 4>},
    {bf16_tile_fn<3, 1>, bf16_tile_fn<3, 2>, bf16_tile_fn<3, 3>, bf16_tile_fn<3, 4>},
    {bf16_tile_fn<4, 1>, bf16_tile_fn<4, 2>, bf16_tile_fn<4, 3>, bf16_tile_fn<4, 4>},
    {bf16_tile_fn<5, 1>, bf16_tile_fn<5, 2>, bf16_tile_fn<5, 3>, bf16_tile_fn<5, 4>},
    {bf16_tile_fn<6, 1>, bf16_tile_fn<6, 2>, bf16_tile_fn<6, 3>, bf16_tile_fn<6, 4>},
};

inline uint16_t bf16_bits_scalar(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if (std::isnan(x)) return 0x7fc0;
  return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// The A operand as bfloat16 pairs along K: pairs[r * row + k2 * col] holds A[r, 2 k2] (low half)
// and A[r, 2 k2 + 1] (high half, 0 past K). Rows of A contiguous in memory give a row-major
// result; columns of A contiguous (a transposed source) give a column-major one, so that both
// are converted with full-vector loads.
struct PairedA {
  const uint32_t* data;
  int64_t row, col;
};

QKV_AVX512_BF16 PairedA pair_a(int64_t M, int64_t K, const float* a, int64_t a_row, int64_t a_col,
                               std::vector<uint32_t>& buffer) {
  const int64_t K2 = (K + 1) / 2;
  if (a_col == 1) {  // rows of A contiguous: row-major pairs
    const int64_t ld = round_up(K2, 16);
    if (int64_t(buffer.size()) < M * ld) buffer.resize(size_t(M * ld));
    for (int64_t r = 0; r < M; ++r) {
      const float* row = a + r * a_row;
      uint32_t* out = buffer.data() + r * ld;
      for (int64_t k = 0; k < K; k += 32) {
        const __m512 low = _mm512_maskz_loadu_ps(first_lanes(K - k), row + k);
        const __m512 high = _mm512_maskz_loadu_ps(first_lanes(K - k - 16), row + k + 16);
        _mm512_storeu_si512(out + k / 2, to_bf16_bits_32(low, high));
      }
    }
    return PairedA{buffer.data(), ld, 1};
  }
  if (a_row == 1) {  // columns of A contiguous: column-major pairs
    const int64_t ld = round_up(M, 16);
    if (int64_t(buffer.size()) < K2 * ld) buffer.resize(size_t(K2 * ld));
    for (int64_t k2 = 0; k2 < K2; ++k2) {
      const float* col0 = a + 2 * k2 * a_col;
      const bool has_second = 2 * k2 + 1 < K;
      uint32_t* out = buffer.data() + k2 * ld;
      for (int64_t r = 0; r < M; r += 16) {
        const __mmask16 lanes = first_lanes(M - r);
        const __m512 first = _mm512_maskz_loadu_ps(lanes, col0 + r);
        const __m512 second =
            has_second ? _mm512_maskz_loadu_ps(lanes, col0 + a_col + r) : _mm512_setzero_ps();
        _mm512_storeu_si512(out + r, interleave_halves_16(to_bf16_bits_32(first, second)));
      }
    }
    return PairedA{buffer.data(), 1, ld};
  }
  const int64_t ld = K2;
  if (int64_t(buffer.size()) < M * ld) buffer.resize(size_t(M * ld));
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t k2 = 0; k2 < K2; ++k2) {
      const uint32_t low = bf16_bits_scalar(a[r * a_row + 2 * k2 * a_col]);
      const uint32_t high =
          2 * k2 + 1 < K ? bf16_bits_scalar(a[r * a_row + (2 * k2 + 1) * a_col]) : 0;
      buffer[size_t(r * ld + k2)] = low | (high << 16);
    }
  }
  return PairedA{buffer.data(), ld, 1};
}

}  // namespace

QKV_AVX512_BF16 void Avx512Bf16Ops::pack_b(const float* src, int64_t src_row, int64_t src_col,
                                           int64_t K, int64_t N, uint16_t* dst, int64_t ld) {
  const int64_t K2 = (K + 1) / 2;
  if (src_col == 1) {  // rows of B are rows of src: interleave pairs of rows
    for (int64_t k2 = 0; k2 < K2; ++k2) {
      const float* row0 = src + 2 * k2 * src_row;
      const bool has_second = 2 * k2 + 1 < K;
      for (int64_t n = 0; n < ld; n += 16) {
        const __mmask16 lanes = first_lanes(N - n);
        const __m512 first = _mm512_maskz_loadu_ps(lanes, row0 + n);
        const __m512 second =
            has_second ? _mm512_maskz_loadu_ps(lanes, row0 + src_row + n) : _mm512_setzero_ps();
        _mm512_storeu_si512(dst + (k2 * ld + n) * 2,
                            interleave_halves_16(to_bf16_bits_32(first, second)));
      }
    }
    return;
  }
  if (src_row == 1 && src_col <= (int64_t(1) << 26)) {
    // B[2 k2 + t, n] = src[n * src_col + 2 k2 + t]: each pair is adjacent in src, so a 64-bit
    // gather fetches eight of them.
    const __m256i offsets = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                               _mm256_set1_epi32(int32_t(src_col)));
    for (int64_t n = 0; n < ld; n += 8) {
      const __mmask8 lanes = __mmask8(first_lanes(std::min<int64_t>(N - n, 8)) & 0xff);
      const float* column0 = src + n * src_col;
      for (int64_t k2 = 0; k2 < K2; ++k2) {
        __m512 pairs;
        if (2 * k2 + 1 < K) {
          pairs = _mm512_castsi512_ps(_mm512_mask_i32gather_epi64(_mm512_setzero_si512(), lanes,
                                                                  offsets, column0 + 2 * k2, 4));
        } else {  // K odd: the last pair's second element is 0
          const __m256 singles =
              _mm256_mmask_i32gather_ps(_mm256_setzero_ps(), lanes, offsets, column0 + 2 * k2, 4);
          pairs = _mm512_castsi512_ps(_mm512_cvtepu32_epi64(_mm256_castps_si256(singles)));
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (k2 * ld + n) * 2),
                            to_bf16_bits(pairs));
      }
    }
    return;
  }
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    for (int64_t n = 0; n < ld; ++n) {
      for (int64_t t = 0; t < 2; ++t) {
        const int64_t k = 2 * k2 + t;
        dst[(k2 * ld + n) * 2 + t] =
            k < K && n < N ? bf16_bits_scalar(src[k * src_row + n * src_col]) : uint16_t(0);
      }
    }
  }
}

QKV_AVX512_BF16 void Avx512Bf16Ops::gemm(int64_t M, int64_t N, int64_t K, const float* a,
                                         int64_t a_row, int64_t a_col, const uint16_t* b,
                                         int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  // A is rounded to bfloat16 pairs once per call, into a buffer each thread keeps.
  thread_local std::vector<uint32_t> a_buffer;
  const PairedA pairs = pair_a(M, K, a, a_row, a_col, a_buffer);
  const int64_t K2 = (K + 1) / 2;
  constexpr int64_t kPanel = 16 * kTileVectors;
  for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
    const int64_t width = std::min(kPanel, N - n0);
    const int64_t vectors = ceil_div(width, 16);
    const __mmask16 last = first_lanes(width - 16 * (vectors - 1));
    for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
      const int64_t rows = std::min<int64_t>(kTileRows, M - m0);
      kBf16Tiles[rows - 1][vectors - 1](K2, pairs.data + m0 * pairs.row, pairs.row, pairs.col,
                                        b + n0 * 2, ldb, c + m0 * ldc + n0, ldc, accumulate, last);
    }
  }
}

// ---- AMX, through oneDNN's brgemm -----------------------------------------------------------

namespace {

// Transposes a 16 x 16 matrix of 32-bit words held as 16 rows: r[i] lane j becomes r[j] lane i.
QKV_AVX512_INLINE void transpose_16x16_words(__m512i r[16]) {
  __m512i t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // pairs of rows interleaved, within each 128-bit lane
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // then quads: a 4 x 4 block transposed in each 128-bit lane
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {  // the 128-bit lanes moved into place, in two steps
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
  }
}

// The A operand as bfloat16 rows, what brgemm takes: A[r, k] at rows[r * ld + k] for k < K, a
// zero at k = K when K is odd (brgemm multiplies pairs along K). Rows of A contiguous in memory
// are converted row by row; columns of A contiguous (a transposed source, the backward's W^T
// and dS^T) are converted as pairs of columns into 16 x 16 blocks of pairs, transposed in
// registers. Rounded with vcvtneps2bf16 (to nearest even; NaN stays NaN), which flushes
// denormals to zero as the AMX dot product does with its inputs anyway.
QKV_AVX512_BF16 const uint16_t* bf16_rows(int64_t M, int64_t K, const float* a, int64_t a_row,
                                          int64_t a_col, std::vector<uint16_t>& buffer,
                                          int64_t& ld) {
  if (a_col == 1) {
    ld = round_up(K, 16);
    if (int64_t(buffer.size()) < M * ld) buffer.resize(size_t(M * ld));
    for (int64_t r = 0; r < M; ++r) {
      const float* row = a + r * a_row;
      uint16_t* out = buffer.data() + r * ld;
      for (int64_t k = 0; k < ld; k += 16) {
        const __m512 x = _mm512_maskz_loadu_ps(first_lanes(K - k), row + k);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), (__m256i)_mm512_cvtneps_pbh(x));
      }
    }
    return buffer.data();
  }
  const int64_t K2 = (K + 1) / 2;
  if (a_row == 1) {
    const int64_t ld_pairs = round_up(K2, 16), rows = round_up(M, 16);
    ld = 2 * ld_pairs;
    if (int64_t(buffer.size()) < rows * ld) buffer.resize(size_t(rows * ld));
    uint32_t* pairs = reinterpret_cast<uint32_t*>(buffer.data());
    for (int64_t r0 = 0; r0 < M; r0 += 16) {
      const __mmask16 lanes = first_lanes(M - r0);
      for (int64_t p0 = 0; p0 < K2; p0 += 16) {
        // block[j] lane t: the pair (A[r0 + t, 2 (p0 + j)], A[r0 + t, 2 (p0 + j) + 1]).
        __m512i block[16];
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) {
          const int64_t k = 2 * (p0 + j);
          __m512 first = _mm512_setzero_ps(), second = _mm512_setzero_ps();
          if (k < K) first = _mm512_maskz_loadu_ps(lanes, a + k * a_col + r0);
          if (k + 1 < K) second = _mm512_maskz_loadu_ps(lanes, a + (k + 1) * a_col + r0);
          block[j] = interleave_halves_16((__m512i)_mm512_cvtne2ps_pbh(second, first));
        }
        transpose_16x16_words(block);  // block[t]: the pairs p0 .. p0 + 16 of row r0 + t
#pragma GCC unroll 16
        for (int t = 0; t < 16; ++t) {
          _mm512_storeu_si512(pairs + (r0 + t) * ld_pairs + p0, block[t]);
        }
      }
    }
    return buffer.data();
  }
  ld = 2 * K2;  // any other layout, element by element
  if (int64_t(buffer.size()) < M * ld) buffer.resize(size_t(M * ld));
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t k = 0; k < ld; ++k) {
      buffer[size_t(r * ld + k)] = k < K ? bf16_bits_scalar(a[r * a_row + k * a_col]) : 0;
    }
  }
  return buffer.data();
}

// brgemm on A in bfloat16 rows and B in VNNI pairs (K even), on shapes from a bounded set:
// oneDNN generates a kernel for every new (M, N, K) and torch keeps each one for the rest of the
// process, per thread, so a sequence length seen for the first time (a decoding step's last
// chunk, the last block of a new length) would cost a new kernel each time. Each dimension is
// split into a multiple of its granule and a tail (at most 8 calls, 1 for the full blocks).
void brgemm_bounded(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t lda,
                    const uint16_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  // [start, end) of each dimension's two parts: the multiple of the granule, then the tail.
  const int64_t m_split = M / 16 * 16, n_split = N / 32 * 32, k_split = K / 32 * 32;
  const int64_t m_parts[3] = {0, m_split, M}, n_parts[3] = {0, n_split, N};
  const int64_t k_parts[3] = {0, k_split, K};  // even: K is
  for (int mi = 0; mi < 2; ++mi) {
    const int64_t m0 = m_parts[mi], rows = m_parts[mi + 1] - m0;
    if (rows == 0) continue;
    for (int ni = 0; ni < 2; ++ni) {
      const int64_t n0 = n_parts[ni], cols = n_parts[ni + 1] - n0;
      if (cols == 0) continue;
      for (int ki = 0; ki < 2; ++ki) {
        const int64_t k0 = k_parts[ki], depth = k_parts[ki + 1] - k0;
        if (depth == 0) continue;
        at::native::cpublas::brgemm(
            rows, cols, depth, lda, ldb, ldc, accumulate || k0 > 0,
            reinterpret_cast<const at::BFloat16*>(a + m0 * lda + k0),
            reinterpret_cast<const at::BFloat16*>(b + (k0 / 2 * ldb + n0) * 2), c + m0 * ldc + n0,
            /*is_vnni=*/true);
      }
    }
  }
}

}  // namespace

QKV_AVX512 void Avx512AmxOps::gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row,
                                   int64_t a_col, const uint16_t* b, int64_t ldb, float* c,
                                   int64_t ldc, bool accumulate) {
  if (M < 16 || K <= 0) {  // under one tile's rows, or an empty sum
    return Avx512Bf16Ops::gemm(M, N, K, a, a_row, a_col, b, ldb, c, ldc, accumulate);
  }
  if (N <= 0) return;
  thread_local std::vector<uint16_t> a_buffer;
  int64_t lda = 0;
  const uint16_t* a_rows = bf16_rows(M, K, a, a_row, a_col, a_buffer, lda);
  amx_tiles_configured = true;  // from here on until the task pool releases them
  brgemm_bounded(M, N, round_up(K, 2), a_rows, lda, b, ldb, c, ldc, accumulate);
}

QKV_AVX512 void Avx512AmxOps::pack_b(const uint16_t* src, int64_t src_row, int64_t src_col,
                                     int64_t K, int64_t N, uint16_t* dst, int64_t ld) {
  const int64_t K2 = (K + 1) / 2;
  uint32_t* pairs = reinterpret_cast<uint32_t*>(dst);  // pair (k2, n) at k2 * ld + n
  if (src_col == 1) {  // rows of B are rows of src: pairs of rows interleaved
    for (int64_t k2 = 0; k2 < K2; ++k2) {
      const uint16_t* row0 = src + 2 * k2 * src_row;
      const bool has_second = 2 * k2 + 1 < K;
      for (int64_t n = 0; n < ld; n += 16) {
        const __mmask16 lanes = first_lanes(N - n);
        const __m512i first = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, row0 + n));
        const __m512i second =
            has_second ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, row0 + src_row + n))
                       : _mm512_setzero_si512();
        _mm512_storeu_si512(pairs + k2 * ld + n,
                            _mm512_or_si512(first, _mm512_slli_epi32(second, 16)));
      }
    }
    return;
  }
  if (src_row == 1) {
    // B[k, n] = src[n * src_col + k]: pair k2 of column n is 32-bit word k2 of source row n, so
    // the panel is the source's words transposed, 16 x 16 at a time (an odd K's last pair ends
    // in a zero).
    for (int64_t n0 = 0; n0 < ld; n0 += 16) {
      for (int64_t p0 = 0; p0 < K2; p0 += 16) {
        const int64_t elements = std::min<int64_t>(K - 2 * p0, 32);
        const __mmask32 lanes =
            elements >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << elements) - 1u);
        __m512i block[16];
#pragma GCC unroll 16
        for (int t = 0; t < 16; ++t) {
          block[t] = n0 + t < N ? _mm512_maskz_loadu_epi16(lanes, src + (n0 + t) * src_col + 2 * p0)
                                : _mm512_setzero_si512();
        }
        transpose_16x16_words(block);  // block[j]: pair p0 + j of columns n0 .. n0 + 16
        for (int64_t j = 0; j < std::min<int64_t>(16, K2 - p0); ++j) {
          _mm512_storeu_si512(pairs + (p0 + j) * ld + n0, block[j]);
        }
      }
    }
    return;
  }
  for (int64_t k2 = 0; k2 < K2; ++k2) {  // any other layout, element by element
    for (int64_t n = 0; n < ld; ++n) {
      for (int64_t t = 0; t < 2; ++t) {
        const int64_t k = 2 * k2 + t;
        dst[(k2 * ld + n) * 2 + t] = k < K && n < N ? src[k * src_row + n * src_col] : uint16_t(0);
      }
    }
  }
}

QKV_AVX512 void Avx512AmxOps::gemm_bf16_a(int64_t M, int64_t N, int64_t K, const uint16_t* a,
                                          int64_t lda, const uint16_t* b, int64_t ldb, float* c,
                                          int64_t ldc, bool accumulate) {
  if (M < 16 || K <= 0) {  // as gemm: the vdpbf16ps kernels, from A widened to float (exact)
    thread_local std::vector<float> wide;
    if (int64_t(wide.size()) < M * K) wide.resize(size_t(std::max<int64_t>(M * K, 1)));
    for (int64_t r = 0; r < M; ++r) {
      for (int64_t k = 0; k < K; ++k) {
        const uint32_t bits = uint32_t(a[r * lda + k]) << 16;
        std::memcpy(&wide[size_t(r * K + k)], &bits, sizeof(bits));
      }
    }
    return Avx512Bf16Ops::gemm(M, N, K, wide.data(), K, 1, b, ldb, c, ldc, accumulate);
  }
  if (N <= 0) return;
  amx_tiles_configured = true;
  brgemm_bounded(M, N, round_up(K, 2), a, lda, b, ldb, c, ldc, accumulate);
}

}  // namespace qkv_attention::cpu::flash
