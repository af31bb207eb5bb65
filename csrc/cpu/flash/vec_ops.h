// The building blocks of the blocked kernels for one CPU level: the element-wise steps of the
// online softmax and its backward, written with at::vec::Vectorized (AVX-512, AVX2, NEON or
// ATen's generic vectors, whichever this level's build selects), and the block GEMMs through
// BLAS (cpu/flash/blas.h). The kernels (forward.h, backward.h) are templates over such a set;
// avx512_ops.h swaps in hand-written AVX-512 GEMMs and dropout bits for the avx512 level.
//
// Scores stay in natural units (scale * q.k + masks); exp(s - m) is taken only after the row
// maximum is subtracted, so its rounding is relative to s - m, not to s (logits of 1e4 keep
// their precision).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/flash/blas.h"
#include "cpu/flash/dropout_bits.h"
#include "cpu/flash/level_namespace.h"
#include "cpu/flash/row_masks.h"
#include "cpu/flash/score_terms.h"
#include "cpu/rounding.h"

QKV_FLASH_LEVEL_BEGIN

template <typename Acc>
struct VecElementwise {
  using acc_t = Acc;
  using Vec = at::vec::Vectorized<Acc>;
  static constexpr int64_t kWidth = Vec::size();
#if defined(CPU_CAPABILITY_DEFAULT) && !defined(__aarch64__)
  // ATen's generic vectors (x86 default level): arrays with a loop per operation. Their blendv
  // and fmadd are out-of-line calls here, so the hot loops avoid them (measured with perf).
  static constexpr bool kGenericVectors = true;
#else
  static constexpr bool kGenericVectors = false;
#endif

  // Vec::loadu / store of `count` lanes, with the whole-vector case taken apart: with a count,
  // ATen's vectors go through a copy of `count` elements (at the default level a memcpy call per
  // load and store: 10% of the float32 forward there, measured with perf), without one they
  // load the vector directly.
  static Vec load(const Acc* src, int64_t count) {
    return count == kWidth ? Vec::loadu(src) : Vec::loadu(src, count);
  }
  static void store(const Vec& x, Acc* dst, int64_t count) {
    if (count == kWidth) {
      x.store(dst);
    } else {
      x.store(dst, count);
    }
  }

  // Lanes [0, count) of a vector as a blend mask (all bits set where true).
  static Vec first_lanes(int64_t count) {
    return Vec::arange(Acc(0), Acc(1)) < Vec(static_cast<Acc>(count));
  }

  // 1 where bit j0 + t of `keep` is set, else 0, for the lanes of one vector.
  static Vec keep_factors(const uint64_t* keep, int64_t j0, int64_t count) {
    __at_align__ Acc factors[kWidth];
    for (int64_t t = 0; t < kWidth; ++t) {
      factors[t] = t < count && keep_bit(keep, j0 + t) ? Acc(1) : Acc(0);
    }
    return Vec::loadu(factors);
  }

  // Turns raw dot products s[0, n) into scores (cpu/attention_kernel.h): s * scale, capped
  // when row.softcap > 0, minus ALiBi's slope * |distance - j|, plus row.bias and the masks
  // (additive masks added, a false bool gives -inf), and -inf outside [row.first, row.valid).
  // Returns the largest score, ignoring NaN (-inf when every score is -inf); NaN scores stay
  // NaN.
  template <typename T>
  static Acc prepare_row(Acc* s, int64_t n, const RowScores<Acc>& row,
                         const MaskSegment<T, Acc>* masks, int mask_count) {
    constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
    const Vec neg_inf(kNegInf), scale_v(row.scale), bias_v(row.bias);
    const Vec cap_v(row.softcap), slope_v(row.slope), distance_v(row.distance);
    const bool capped = row.softcap > Acc(0), alibi = row.slope != Acc(0);
    const int64_t first = row.first, valid = row.valid;
    if constexpr (kGenericVectors) {
      if (!capped && !alibi && mask_count == 0) {
        // The plain case as one scalar loop: ATen's generic vectors (arrays with a loop per
        // operation) made this a fifth of the default level's float32 forward, against torch's
        // 14% for the same step (perf).
        // The row's terms in locals (read through `row`, they were reloaded after every store
        // to s), and one running maximum per lane: a single one made the loop a chain of
        // dependent max instructions (perf: 60% of its samples on that chain).
        const Acc scale = row.scale, bias = row.bias;
        Acc best[kWidth];
        std::fill(best, best + kWidth, kNegInf);
        for (int64_t j0 = 0; j0 < n; j0 += kWidth) {
          const int64_t count = std::min<int64_t>(kWidth, n - j0);
          for (int64_t t = 0; t < count; ++t) {
            const int64_t j = j0 + t;
            const Acc x = j >= first && j < valid ? s[j] * scale + bias : kNegInf;
            s[j] = x;
            best[t] = x > best[t] ? x : best[t];  // false for NaN, as below
          }
        }
        Acc top = kNegInf;
        for (int64_t t = 0; t < kWidth; ++t) top = best[t] > top ? best[t] : top;
        return top;
      }
    }
    Vec row_max = neg_inf;
    Acc scalar_max = kNegInf;
    for (int64_t j = 0; j < n; j += kWidth) {
      const int64_t count = std::min<int64_t>(kWidth, n - j);
      Vec x;
      if (!capped && !alibi) {
        x = load(s + j, count) * scale_v + bias_v;
      } else {
        x = load(s + j, count) * scale_v;
        if (capped) {
          const Vec t = (x / cap_v).tanh();
          if (row.cap_grad) (Vec(Acc(1)) - t * t).store(row.cap_grad + j, count);
          x = t * cap_v;
        }
        if (alibi) {
          // |i + o - (j0 + j + t)| for lane t: small integers, exact in Acc.
          x = x - slope_v * (distance_v - Vec::arange(static_cast<Acc>(j), Acc(1))).abs();
        }
        x = x + bias_v;
      }
      bool any_bool = false;
      __at_align__ Acc blocked[kWidth];
      __at_align__ Acc added[kWidth];
      if (mask_count > 0) std::fill(blocked, blocked + kWidth, Acc(0));
      for (int m = 0; m < mask_count; ++m) {
        const MaskSegment<T, Acc>& mask = masks[m];
        if (mask.bools) {
          any_bool = true;
          for (int64_t t = 0; t < count; ++t) {
            if (!mask.bools[j + t]) blocked[t] = Acc(1);
          }
        } else if (mask.gathered) {
          x = x + Vec::loadu(mask.gathered + j, count);
        } else if constexpr (std::is_same_v<T, Acc>) {
          x = x + Vec::loadu(mask.values + j, count);
        } else {
          for (int64_t t = 0; t < count; ++t) added[t] = static_cast<Acc>(mask.values[j + t]);
          x = x + Vec::loadu(added, count);
        }
      }
      if (valid - j < count) x = Vec::blendv(neg_inf, x, first_lanes(valid - j));
      if (first > j) x = Vec::blendv(x, neg_inf, first_lanes(first - j));
      if (any_bool) x = Vec::blendv(x, neg_inf, Vec::loadu(blocked) != Vec(Acc(0)));
      store(x, s + j, count);
      if constexpr (kGenericVectors) {
        for (int64_t t = 0; t < count; ++t)
          scalar_max = s[j + t] > scalar_max ? s[j + t] : scalar_max;
      } else {
        if (count < kWidth) x = Vec::blendv(neg_inf, x, first_lanes(count));
        row_max = larger(x, row_max);
      }
    }
    __at_align__ Acc lanes[kWidth];
    row_max.store(lanes);
    // Comparisons are false for NaN: NaN scores never become the maximum.
    for (int64_t t = 0; t < kWidth; ++t) scalar_max = lanes[t] > scalar_max ? lanes[t] : scalar_max;
    return scalar_max;
  }

  // x where x > m, else m: a NaN x leaves m as it is (the comparison is false). On x86 one
  // vmaxps, whose result is its second operand when either is NaN: a blend of a comparison
  // (what at::vec gives) made prepare_row's running maximum a chain of four dependent
  // instructions per vector (a quarter of the bfloat16 forward's own time with AMX GEMMs, perf).
  static Vec larger(const Vec& x, const Vec& m) {
#if defined(CPU_CAPABILITY_AVX512) && !defined(_MSC_VER)
    if constexpr (std::is_same_v<Acc, float>) return Vec(_mm512_max_ps(x, m));
    if constexpr (std::is_same_v<Acc, double>) return Vec(_mm512_max_pd(x, m));
#elif defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
    if constexpr (std::is_same_v<Acc, float>) return Vec(_mm256_max_ps(x, m));
    if constexpr (std::is_same_v<Acc, double>) return Vec(_mm256_max_pd(x, m));
#endif
    return Vec::blendv(m, x, x > m);
  }

  static Vec exp(const Vec& x) {
    if constexpr (std::is_same_v<Acc, float>) {
      return x.exp_u20();
    } else {
      return x.exp();
    }
  }

  // p = exp(s - m) for s[0, n); returns sum(p) and stores p (times the keep bit when `keep`
  // is given) back into s. `m` must be finite or +inf.
  static Acc exp_row(Acc* s, int64_t n, Acc m, const uint64_t* keep) {
    if constexpr (kGenericVectors) {
      if (!keep) {  // as in prepare_row: a scalar loop, with one partial sum per lane as below
        Acc lanes[kWidth] = {};
        for (int64_t j = 0; j < n; j += kWidth) {
          const int64_t count = std::min<int64_t>(kWidth, n - j);
          for (int64_t t = 0; t < count; ++t) {
            const Acc p = std::exp(s[j + t] - m);
            s[j + t] = p;
            lanes[t] += p;
          }
        }
        Acc sum = 0;
        for (int64_t t = 0; t < kWidth; ++t) sum += lanes[t];
        return sum;
      }
    }
    const Vec m_v(m);
    Vec sum(Acc(0));
    for (int64_t j = 0; j < n; j += kWidth) {
      const int64_t count = std::min<int64_t>(kWidth, n - j);
      Vec p = exp(load(s + j, count) - m_v);
      if (count < kWidth) p = Vec::blendv(Vec(Acc(0)), p, first_lanes(count));
      sum = sum + p;
      if (keep) p = p * keep_factors(keep, j, count);
      store(p, s + j, count);
    }
    return at::vec::vec_reduce_all<Acc>([](Vec& a, Vec& b) { return a + b; }, sum);
  }

#if defined(CPU_CAPABILITY_AVX512)
  // exp_row for the A operand of a bfloat16 GEMM (avx512_ops.h's AMX set): p goes to out[0, n)
  // as bfloat16 bits (vcvtneps2bf16: to nearest even, NaN kept, denormals to zero as the AMX
  // dot product takes them anyway), a zero after it when n is odd, instead of back into s, so
  // that the GEMM reads it as it is with no second pass over the row; the returned sum is
  // exp_row's, term for term. Only called on CPUs with AMX, which have AVX512_BF16.
  __attribute__((target("avx512bf16"))) static Acc exp_row_bf16(
      const Acc* s, int64_t n, Acc m, const uint64_t* keep,
      uint16_t* out) requires std::is_same_v<Acc, float> {
    const Vec m_v(m);
    Vec sum(Acc(0));
    for (int64_t j = 0; j < n; j += kWidth) {
      const int64_t count = std::min<int64_t>(kWidth, n - j);
      Vec p = exp(load(s + j, count) - m_v);
      if (count < kWidth) p = Vec::blendv(Vec(Acc(0)), p, first_lanes(count));
      sum = sum + p;
      if (keep) p = p * keep_factors(keep, j, count);
      // The zero lanes past count give the odd row's zero pair element.
      const __mmask16 lanes =
          count + 1 >= kWidth ? __mmask16(0xffff) : __mmask16((1u << (count + (count & 1))) - 1u);
      _mm256_mask_storeu_epi16(out + j, lanes, (__m256i)_mm512_cvtneps_pbh(__m512(p)));
    }
    return at::vec::vec_reduce_all<Acc>([](Vec& a, Vec& b) { return a + b; }, sum);
  }
#endif

  // The backward of softmax and dropout for one row: with k_j = keep_j * kept_scale,
  // w = p * k (the weights, for dV; skipped when w is null) and ds = p * (dp * k - delta).
  // ds may alias dp.
  static void softmax_grad_row(const Acc* p, const Acc* dp, const uint64_t* keep, Acc kept_scale,
                               Acc delta, int64_t n, Acc* w, Acc* ds) {
    const Vec delta_v(delta), scale_v(kept_scale);
    for (int64_t j = 0; j < n; j += kWidth) {
      const int64_t count = std::min<int64_t>(kWidth, n - j);
      const Vec k = keep ? keep_factors(keep, j, count) * scale_v : scale_v;
      const Vec p_v = load(p + j, count);
      if (w) store(p_v * k, w + j, count);
      store(p_v * (load(dp + j, count) * k - delta_v), ds + j, count);
    }
  }

  static void keep_bits(const DropoutKey& key, uint64_t first, int64_t count, uint64_t* keep) {
    keep_bits_reference(key, first, count, keep);
  }

  // out[r * ld_out + j] = q_r . k_j for r < M, j < n: q rows contiguous (M x D), k_j = k + j * ldk
  // with unit stride. Each key row is read from memory once for all M query rows (the decoding
  // path, where the keys are many and the queries few).
  static void dot_scores(int64_t M, int64_t n, int64_t D, const Acc* q, const Acc* k, int64_t ldk,
                         Acc* out, int64_t ld_out) {
    for (int64_t j = 0; j < n; ++j) {
      const Acc* k_j = k + j * ldk;
      for (int64_t r = 0; r < M; ++r) {
        const Acc* q_r = q + r * D;
        Vec sum0(Acc(0)), sum1(Acc(0));
        int64_t d = 0;
        for (; d + 2 * kWidth <= D; d += 2 * kWidth) {
          sum0 = sum0 + Vec::loadu(q_r + d) * Vec::loadu(k_j + d);
          sum1 = sum1 + Vec::loadu(q_r + d + kWidth) * Vec::loadu(k_j + d + kWidth);
        }
        for (; d < D; d += kWidth) {
          const int64_t count = std::min<int64_t>(kWidth, D - d);
          sum0 = sum0 + Vec::loadu(q_r + d, count) * Vec::loadu(k_j + d, count);
        }
        out[r * ld_out + j] =
            at::vec::vec_reduce_all<Acc>([](Vec& a, Vec& b) { return a + b; }, sum0 + sum1);
      }
    }
  }

  // dst[0, n) = src[0, n) converted.
  template <typename T>
  static void to_acc(const T* src, int64_t n, Acc* dst) {
    if constexpr (std::is_same_v<T, Acc>) {
      std::memcpy(dst, src, sizeof(Acc) * size_t(n));
    } else {
      at::vec::convert(src, dst, n);
    }
  }

  // dst[0, n) = src[0, n) * factor, converted.
  template <typename T>
  static void from_acc(const Acc* src, int64_t n, Acc factor, T* dst) {
    const Vec f(factor);
    for (int64_t j = 0; j < n; j += kWidth) {
      const int64_t count = std::min<int64_t>(kWidth, n - j);
      const Vec x = load(src + j, count) * f;
      if constexpr (std::is_same_v<T, Acc>) {
        store(x, dst + j, count);
      } else {
        __at_align__ Acc scaled[kWidth];
        x.store(scaled);
        at::vec::convert(scaled, dst + j, count);
      }
    }
  }
};

// Block GEMMs through BLAS, with B operands as plain row-major matrices.
template <typename Acc>
struct BlasGemm {
  using b_elem = Acc;
  static constexpr bool kPlainB = true;
  static constexpr int64_t kColumnStride = 1;  // elements between columns of a B operand
  // 128 x 512 scores (256 KiB in float) per block: fewer, larger BLAS calls.
  static constexpr int64_t kForwardQueries = 128;
  static constexpr int64_t kForwardKeys = 512;

  static int64_t packed_ld(int64_t N) { return round_up(N, 16); }
  static int64_t packed_size(int64_t K, int64_t N) { return K * packed_ld(N); }

  // dst = B with B[k, n] = src[k * src_row + n * src_col] (a transpose when src_row is 1),
  // ld >= packed_ld(N) elements per row, zero-padded.
  static void pack_b(const Acc* src, int64_t src_row, int64_t src_col, int64_t K, int64_t N,
                     Acc* dst, int64_t ld) {
    for (int64_t k = 0; k < K; ++k) {
      Acc* row = dst + k * ld;
      if (src_col == 1) {
        std::memcpy(row, src + k * src_row, sizeof(Acc) * size_t(N));
      } else {
        for (int64_t n = 0; n < N; ++n) row[n] = src[k * src_row + n * src_col];
      }
      std::fill(row + N, row + ld, Acc(0));
    }
  }

  // C (M x N) = [C +] A (M x K) . B (K x N); A[r, k] = a[r * a_row + k * a_col],
  // B[k, n] = b[k * ldb + n], C[r, n] = c[r * ldc + n].
  static void gemm(int64_t M, int64_t N, int64_t K, const Acc* a, int64_t a_row, int64_t a_col,
                   const Acc* b, int64_t ldb, Acc* c, int64_t ldc, bool accumulate) {
    if (blas_gemm(M, N, K, a, a_row, a_col, b, ldb, c, ldc, accumulate)) return;
    // Strides no BLAS takes (a broadcast operand): rows of C as vectorised sums of B's rows.
    using Vec = at::vec::Vectorized<Acc>;
    for (int64_t r = 0; r < M; ++r) {
      Acc* c_row = c + r * ldc;
      if (!accumulate) std::fill(c_row, c_row + N, Acc(0));
      for (int64_t k = 0; k < K; ++k) {
        const Vec a_rk(a[r * a_row + k * a_col]);
        const Acc* b_row = b + k * ldb;
        int64_t n = 0;
        for (; n + Vec::size() <= N; n += Vec::size()) {
          at::vec::fmadd(a_rk, Vec::loadu(b_row + n), Vec::loadu(c_row + n)).store(c_row + n);
        }
        const int64_t rest = N - n;
        if (rest > 0) {
          at::vec::fmadd(a_rk, Vec::loadu(b_row + n, rest), Vec::loadu(c_row + n, rest))
              .store(c_row + n, rest);
        }
      }
    }
  }
};

// Block GEMMs as register-tiled micro-kernels written with at::vec (for the AVX2 level, where
// they beat single-threaded BLAS calls on these small blocks): a tile of MR rows of C times NV
// vectors of columns stays in registers over the whole K loop. B operands are always packed
// (zero-padded rows whose length is a multiple of 16), so every vector load of B is in bounds.
template <typename Acc>
struct VecGemm {
  using Vec = at::vec::Vectorized<Acc>;
  using b_elem = Acc;
  static constexpr bool kPlainB = false;
  static constexpr int64_t kColumnStride = 1;
  static constexpr int64_t kForwardQueries = 48;
  static constexpr int64_t kForwardKeys = 256;
  static constexpr int kRows = 4, kVectors = 3;  // 12 accumulators of 16 registers (AVX2)

  static int64_t packed_ld(int64_t N) { return BlasGemm<Acc>::packed_ld(N); }
  static int64_t packed_size(int64_t K, int64_t N) { return K * packed_ld(N); }
  static void pack_b(const Acc* src, int64_t src_row, int64_t src_col, int64_t K, int64_t N,
                     Acc* dst, int64_t ld) {
    BlasGemm<Acc>::pack_b(src, src_row, src_col, K, N, dst, ld);
  }

  // C[0, rows) x [0, width) (+)= A . B over the whole K; NV vectors cover `width` columns.
  template <int MR, int NV>
  static void tile(int64_t K, const Acc* a, int64_t a_row, int64_t a_col, const Acc* b, int64_t ldb,
                   Acc* c, int64_t ldc, int64_t width, bool accumulate) {
    constexpr int64_t W = Vec::size();
    const int64_t last = width - (NV - 1) * W;  // columns in the last vector
    Vec acc[MR][NV];
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < NV; ++v) {
        const int64_t count = v == NV - 1 ? last : W;
        acc[r][v] = accumulate ? Vec::loadu(c + r * ldc + v * W, count) : Vec(Acc(0));
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      Vec b_v[NV];
      for (int v = 0; v < NV; ++v) b_v[v] = Vec::loadu(b + k * ldb + v * W);
      for (int r = 0; r < MR; ++r) {
        const Vec a_rk(a[r * a_row + k * a_col]);
        for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(a_rk, b_v[v], acc[r][v]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < NV; ++v) {
        acc[r][v].store(c + r * ldc + v * W, v == NV - 1 ? last : W);
      }
    }
  }

  template <int MR>
  static void row_tile(int vectors, int64_t K, const Acc* a, int64_t a_row, int64_t a_col,
                       const Acc* b, int64_t ldb, Acc* c, int64_t ldc, int64_t width,
                       bool accumulate) {
    switch (vectors) {
      case 1:
        return tile<MR, 1>(K, a, a_row, a_col, b, ldb, c, ldc, width, accumulate);
      case 2:
        return tile<MR, 2>(K, a, a_row, a_col, b, ldb, c, ldc, width, accumulate);
      default:
        return tile<MR, 3>(K, a, a_row, a_col, b, ldb, c, ldc, width, accumulate);
    }
  }

  // C (M x N) = [C +] A (M x K) . B (K x N); A[r, k] = a[r * a_row + k * a_col],
  // B[k, n] = b[k * ldb + n] (packed), C[r, n] = c[r * ldc + n].
  static void gemm(int64_t M, int64_t N, int64_t K, const Acc* a, int64_t a_row, int64_t a_col,
                   const Acc* b, int64_t ldb, Acc* c, int64_t ldc, bool accumulate) {
    constexpr int64_t W = Vec::size(), kPanel = kVectors * W;
    for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
      const int64_t width = std::min(kPanel, N - n0);
      const int vectors = int(ceil_div(width, W));
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const Acc* a_tile = a + m0 * a_row;
        Acc* c_tile = c + m0 * ldc + n0;
        switch (std::min<int64_t>(kRows, M - m0)) {
          case 1:
            row_tile<1>(vectors, K, a_tile, a_row, a_col, b + n0, ldb, c_tile, ldc, width,
                        accumulate);
            break;
          case 2:
            row_tile<2>(vectors, K, a_tile, a_row, a_col, b + n0, ldb, c_tile, ldc, width,
                        accumulate);
            break;
          case 3:
            row_tile<3>(vectors, K, a_tile, a_row, a_col, b + n0, ldb, c_tile, ldc, width,
                        accumulate);
            break;
          default:
            row_tile<4>(vectors, K, a_tile, a_row, a_col, b + n0, ldb, c_tile, ldc, width,
                        accumulate);
            break;
        }
      }
    }
  }
};

// The set for the default level, and for float64 on every level.
template <typename Acc>
struct VecOps : VecElementwise<Acc>, BlasGemm<Acc> {};

// float on the AVX2 level: the at::vec micro-kernels.
template <typename Acc>
struct VecTiledOps : VecElementwise<Acc>, VecGemm<Acc> {};

QKV_FLASH_LEVEL_END
