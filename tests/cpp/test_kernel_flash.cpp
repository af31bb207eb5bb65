// The building blocks of the blocked attention kernels (cpu/flash_ops.h) and the blocked
// algorithm itself (cpu/flash_attention.h), on plain pointers, without the dispatcher:
//   - each AVX-512 building block against its portable definition (skipped, with a message,
//     on a CPU without AVX-512);
//   - the whole forward and backward run with the portable set in float and in double, and with
//     the AVX-512 sets, against each other: this is where the portable fallback (what a CPU
//     without AVX-512 runs) is checked on a machine that has AVX-512.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "cpu/attention_kernel.h"
#include "cpu/flash_attention.h"
#include "cpu/flash_ops.h"

namespace {

using namespace qkv_attention::cpu;
using namespace qkv_attention::cpu::flash;

std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

// Rounds to the nearest bfloat16 (as a float).
float to_bf16(float x) { return float(c10::BFloat16(x)); }

}  // namespace

TEST_CASE("vectorised dropout keep-bits equal the scalar Philox stream", "[flash][dropout]") {
  if (!cpu_has_avx512()) {
    WARN("no AVX-512 on this CPU: the vectorised keep-bits are not used here");
    return;
  }
  std::mt19937_64 gen(7);
  for (double p : {0.1, 0.5, 0.9}) {
    const DropoutKey key = DropoutKey::make(gen(), gen(), p);
    for (int trial = 0; trial < 200; ++trial) {
      // Offsets around a 2^32 counter boundary as well as small ones.
      const uint64_t first = trial % 3 == 0 ? (uint64_t(1) << 34) - 37 + uint64_t(trial)
                                            : gen() % 100000;
      const int64_t count = 1 + int64_t(gen() % 700);
      std::vector<uint64_t> expected((count + 63) / 64), actual((count + 63) / 64, ~0ull);
      keep_bits_reference(key, first, count, expected.data());
      Avx512Ops::keep_bits(key, first, count, actual.data());
      REQUIRE(expected == actual);
    }
  }
}

TEST_CASE("keep-bits agree with DropoutStream::keep element by element", "[flash][dropout]") {
  const qkv_attention::DropoutStream stream(123456789, 42, 0.3);
  const DropoutKey key = DropoutKey::make(123456789, 42, 0.3);
  std::vector<uint64_t> bits(4);
  keep_bits_reference(key, 1001, 250, bits.data());
  for (int64_t j = 0; j < 250; ++j) REQUIRE(keep_bit(bits.data(), j) == stream.keep(1001 + j));
}

TEST_CASE("AVX-512 GEMM equals the portable GEMM on every tile shape", "[flash][gemm]") {
  if (!cpu_has_avx512()) {
    WARN("no AVX-512 on this CPU");
    return;
  }
  uint32_t seed = 1;
  for (int64_t M : {1, 5, 6, 7, 13, 48}) {
    for (int64_t N : {1, 15, 16, 17, 64, 65, 130}) {
      for (int64_t K : {0, 1, 3, 64}) {
        for (bool transposed_a : {false, true}) {
          for (bool accumulate : {false, true}) {
            const auto a = random_floats(size_t(std::max<int64_t>(M * K, 1)), seed++);
            const auto b = random_floats(size_t(std::max<int64_t>(K * N, 1)), seed++);
            const auto c0 = random_floats(size_t(M * N), seed++);
            const int64_t a_row = transposed_a ? 1 : K, a_col = transposed_a ? M : 1;
            std::vector<float> expected = c0, actual = c0;
            PortableOps<float>::gemm(M, N, K, a.data(), a_row, a_col, b.data(), N,
                                     expected.data(), N, accumulate);
            Avx512Ops::gemm(M, N, K, a.data(), a_row, a_col, b.data(), N, actual.data(), N,
                            accumulate);
            for (size_t i = 0; i < expected.size(); ++i) {
              // K <= 64 products of N(0, 1) values, summed in another order: |error| is a few
              // ulps of sqrt(K) ~ 8.
              REQUIRE(actual[i] == Approx(expected[i]).margin(1e-5));
            }
          }
        }
      }
    }
  }
}

TEST_CASE("packed B operands give the same product as the plain matrix", "[flash][gemm]") {
  const int64_t M = 7, K = 9, N = 21;
  const auto a = random_floats(size_t(M * K), 11);
  const auto src = random_floats(size_t(K * N), 12);  // B row-major
  std::vector<float> bt(size_t(N * K));               // B^T row-major, as K^T is packed from K
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t n = 0; n < N; ++n) bt[size_t(n * K + k)] = src[size_t(k * N + n)];
  }
  std::vector<float> expected(size_t(M * N));
  PortableOps<float>::gemm(M, N, K, a.data(), K, 1, src.data(), N, expected.data(), N, false);

  const int64_t ld = PortableOps<float>::packed_ld(N) + 16;  // a wider panel than needed
  for (bool from_transposed : {false, true}) {
    std::vector<float> packed(size_t(K * ld), -1.0f);
    if (from_transposed) {
      PortableOps<float>::pack_b(bt.data(), 1, K, K, N, packed.data(), ld);
    } else {
      PortableOps<float>::pack_b(src.data(), N, 1, K, N, packed.data(), ld);
    }
    std::vector<float> actual(size_t(M * N));
    PortableOps<float>::gemm(M, N, K, a.data(), K, 1, packed.data(), ld, actual.data(), N, false);
    for (size_t i = 0; i < expected.size(); ++i) REQUIRE(actual[i] == Approx(expected[i]));
    for (int64_t k = 0; k < K; ++k) {  // padding is zero
      for (int64_t n = N; n < ld; ++n) REQUIRE(packed[size_t(k * ld + n)] == 0.0f);
    }
    if (cpu_has_avx512()) {
      std::vector<float> packed_avx(size_t(K * ld), -1.0f);
      if (from_transposed) {
        Avx512Ops::pack_b(bt.data(), 1, K, K, N, packed_avx.data(), ld);
      } else {
        Avx512Ops::pack_b(src.data(), N, 1, K, N, packed_avx.data(), ld);
      }
      REQUIRE(packed_avx == packed);
    }
  }
}

TEST_CASE("bfloat16 GEMM multiplies the bfloat16-rounded operands exactly", "[flash][gemm][bf16]") {
  if (!cpu_has_avx512_bf16()) {
    WARN("no AVX-512 BF16 on this CPU: the bfloat16 GEMM is not used here");
    return;
  }
  uint32_t seed = 100;
  for (int64_t M : {1, 6, 11}) {
    for (int64_t N : {3, 16, 70}) {
      for (int64_t K : {1, 2, 7, 64}) {
        for (bool from_transposed : {false, true}) {
          for (bool transposed_a : {false, true}) {
            const auto a = random_floats(size_t(M * K), seed++);
            const auto b = random_floats(size_t(K * N), seed++);  // B row-major
            std::vector<float> bt(size_t(N * K));
            for (int64_t k = 0; k < K; ++k) {
              for (int64_t n = 0; n < N; ++n) bt[size_t(n * K + k)] = b[size_t(k * N + n)];
            }
            const int64_t ld = Avx512Bf16Ops::packed_ld(N);
            std::vector<uint16_t> packed(size_t(Avx512Bf16Ops::packed_size(K, N)), 0xffff);
            if (from_transposed) {
              Avx512Bf16Ops::pack_b(bt.data(), 1, K, K, N, packed.data(), ld);
            } else {
              Avx512Bf16Ops::pack_b(b.data(), N, 1, K, N, packed.data(), ld);
            }
            const int64_t a_row = transposed_a ? 1 : K, a_col = transposed_a ? M : 1;
            std::vector<float> actual(size_t(M * N));
            Avx512Bf16Ops::gemm(M, N, K, a.data(), a_row, a_col, packed.data(), ld,
                                actual.data(), N, false);
            for (int64_t r = 0; r < M; ++r) {
              for (int64_t n = 0; n < N; ++n) {
                double expected = 0;
                for (int64_t k = 0; k < K; ++k) {
                  expected += double(to_bf16(a[size_t(r * a_row + k * a_col)])) *
                              double(to_bf16(b[size_t(k * N + n)]));
                }
                // Products of bfloat16 values are exact in float; only the float sums round.
                REQUIRE(actual[size_t(r * N + n)] == Approx(expected).margin(1e-5));
              }
            }
          }
        }
      }
    }
  }
}

TEST_CASE("exp_row: exp(s - m) within a few ulps, exact zeros for -inf, NaN kept",
          "[flash][softmax]") {
  std::vector<float> x(200);
  for (size_t i = 0; i < x.size(); ++i) x[i] = -60.0f + 0.3f * float(i) / 1.7f;
  x[5] = -std::numeric_limits<float>::infinity();
  x[6] = std::numeric_limits<float>::quiet_NaN();
  x[7] = -1e30f;
  const float m = 2.5f;
  for (int use_avx = 0; use_avx < 2; ++use_avx) {
    if (use_avx && !cpu_has_avx512()) continue;
    std::vector<float> s = x;
    const int64_t n = int64_t(s.size());
    const float sum = use_avx ? Avx512Ops::exp_row(s.data(), n, m, nullptr)
                              : PortableOps<float>::exp_row(s.data(), n, m, nullptr);
    REQUIRE(std::isnan(sum));
    REQUIRE(s[5] == 0.0f);
    REQUIRE(s[7] == 0.0f);
    REQUIRE(std::isnan(s[6]));
    for (size_t i = 0; i < x.size(); ++i) {
      if (i >= 5 && i <= 7) continue;
      // The kernels subtract in float (that rounding is not theirs to undo), then the AVX-512
      // one scales by log2(e) in float: a relative error of |x - m| * 6e-8 on top of the
      // polynomial's 1e-7.
      const double y = double(x[i] - m);
      const double expected = std::exp(y);
      REQUIRE(double(s[i]) == Approx(expected).epsilon(2.5e-7 + 1.2e-7 * std::abs(y)));
    }
  }
}

TEST_CASE("prepare_row: scale, masks of every kind, causal limit, NaN ignored by the max",
          "[flash][softmax]") {
  const int64_t n = 37;
  auto raw = random_floats(size_t(n), 5);
  raw[3] = std::numeric_limits<float>::quiet_NaN();
  std::vector<uint8_t> keep_mask(n);
  for (int64_t j = 0; j < n; ++j) keep_mask[size_t(j)] = (j % 5) != 1;
  const auto additive = random_floats(size_t(n), 6);
  std::vector<c10::BFloat16> additive_bf16(additive.begin(), additive.end());
  std::vector<c10::Half> additive_half(additive.begin(), additive.end());
  const int64_t valid = 30;
  const float scale = 0.7f, bias = 0.25f;
  for (const MaskSegmentKind kind :
       {MaskSegmentKind::kFloat, MaskSegmentKind::kBFloat16, MaskSegmentKind::kHalf}) {
    const void* data = static_cast<const void*>(additive_half.data());
    if (kind == MaskSegmentKind::kFloat) data = additive.data();
    if (kind == MaskSegmentKind::kBFloat16) data = additive_bf16.data();
    const MaskSegment segments[2] = {{MaskSegmentKind::kBool, keep_mask.data()}, {kind, data}};
    std::vector<float> expected = raw;
    const float expected_max =
        PortableOps<float>::prepare_row(expected.data(), n, scale, bias, valid, segments, 2);
    float manual_max = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      const float e = expected[size_t(j)];
      if (j >= valid || !keep_mask[size_t(j)]) {
        REQUIRE(e == -std::numeric_limits<float>::infinity());
      } else if (j == 3) {
        REQUIRE(std::isnan(e));
      } else {
        float value = additive[size_t(j)];
        if (kind == MaskSegmentKind::kBFloat16) value = float(additive_bf16[size_t(j)]);
        if (kind == MaskSegmentKind::kHalf) value = float(additive_half[size_t(j)]);
        REQUIRE(e == Approx(raw[size_t(j)] * scale + bias + value).epsilon(1e-6));
        manual_max = std::max(manual_max, e);
      }
    }
    REQUIRE(expected_max == manual_max);
    if (cpu_has_avx512()) {
      std::vector<float> actual = raw;
      const float actual_max =
          Avx512Ops::prepare_row(actual.data(), n, scale, bias, valid, segments, 2);
      REQUIRE(actual_max == Approx(expected_max).epsilon(1e-6));
      for (int64_t j = 0; j < n; ++j) {
        if (std::isnan(expected[size_t(j)])) {
          REQUIRE(std::isnan(actual[size_t(j)]));
        } else {
          REQUIRE(actual[size_t(j)] == Approx(expected[size_t(j)]).epsilon(1e-6));
        }
      }
    }
  }
}

namespace {

// One attention problem with all its inputs, run through flash_forward/flash_backward with a
// chosen op set and element type.
struct Problem {
  int64_t B = 2, H = 2, L = 0, S = 0, D = 0, Dv = 0;
  bool causal = false;
  double dropout = 0.0;
  bool with_mask = false;
  std::vector<double> q, k, v, grad_out, mask;  // mask: (L, S) additive, broadcast over B, H

  Problem(int64_t L_, int64_t S_, int64_t D_, int64_t Dv_, bool causal_, double dropout_,
          bool with_mask_)
      : L(L_), S(S_), D(D_), Dv(Dv_), causal(causal_), dropout(dropout_), with_mask(with_mask_) {
    auto fill = [](std::vector<double>& x, size_t n, uint32_t seed) {
      const auto f = random_floats(n, seed);
      x.assign(f.begin(), f.end());
    };
    fill(q, size_t(B * H * L * D), 1);
    fill(k, size_t(B * H * S * D), 2);
    fill(v, size_t(B * H * S * Dv), 3);
    fill(grad_out, size_t(B * H * L * Dv), 4);
    fill(mask, size_t(L * S), 5);
    if (with_mask) {  // a fully masked row, to check it gives zeros
      for (int64_t j = 0; j < S; ++j) {
        mask[size_t(1 * S + j)] = -std::numeric_limits<double>::infinity();
      }
    }
  }

  template <typename T>
  static std::vector<T> as(const std::vector<double>& x) {
    return std::vector<T>(x.begin(), x.end());
  }

  template <typename T>
  void fill_shape(AttentionShape& shape, const std::vector<T>& mask_t) const {
    shape.batch = B, shape.heads = H, shape.q_len = L, shape.kv_len = S;
    shape.head_dim = D, shape.value_dim = Dv;
    shape.scale = 1.0 / std::sqrt(double(std::max<int64_t>(D, 1)));
    shape.is_causal = causal;
    shape.dropout_p = dropout;
    shape.seed = 0x1234567890abcdefull, shape.offset = 77;
    if (with_mask) {
      shape.masks[0].kind = MaskKind::kAdditive;
      shape.masks[0].data = mask_t.data();
      shape.masks[0].strides = Strides4{0, 0, S, 1};
    }
  }

  // (output, logsumexp, grad_q, grad_k, grad_v), all as double.
  template <typename T, class Ops>
  std::vector<std::vector<double>> run() const {
    using Acc = typename Ops::acc_t;
    const auto qt = as<T>(q), kt = as<T>(k), vt = as<T>(v), got = as<T>(grad_out);
    const auto mt = as<T>(mask);
    std::vector<T> out(size_t(B * H * L * Dv));
    std::vector<Acc> lse(size_t(B * H * L));
    AttentionForwardParams<T> fp;
    fill_shape(fp, mt);
    fp.query = qt.data(), fp.key = kt.data(), fp.value = vt.data();
    fp.query_strides = Strides4{H * L * D, L * D, D, 1};
    fp.key_strides = Strides4{H * S * D, S * D, D, 1};
    fp.value_strides = Strides4{H * S * Dv, S * Dv, Dv, 1};
    fp.output = out.data();
    fp.logsumexp = lse.data();
    flash_forward<T, Ops>(fp);

    std::vector<T> gq(q.size()), gk(k.size()), gv(v.size());
    AttentionBackwardParams<T> bp;
    fill_shape(bp, mt);
    bp.query = qt.data(), bp.key = kt.data(), bp.value = vt.data(), bp.output = out.data();
    bp.grad_output = got.data();
    bp.logsumexp = lse.data();
    bp.query_strides = fp.query_strides, bp.key_strides = fp.key_strides;
    bp.value_strides = fp.value_strides;
    bp.output_strides = bp.grad_output_strides = Strides4{H * L * Dv, L * Dv, Dv, 1};
    bp.grad_query = gq.data(), bp.grad_key = gk.data(), bp.grad_value = gv.data();
    flash_backward<T, Ops>(bp);

    auto to_double = [](const auto& x) {
      std::vector<double> d;
      for (const auto& e : x) d.push_back(double(float(e)));
      return d;
    };
    std::vector<double> lse_d(lse.begin(), lse.end());
    if constexpr (std::is_same_v<T, double>) {
      return {std::vector<double>(out.begin(), out.end()), lse_d,
              std::vector<double>(gq.begin(), gq.end()), std::vector<double>(gk.begin(), gk.end()),
              std::vector<double>(gv.begin(), gv.end())};
    } else {
      return {to_double(out), lse_d, to_double(gq), to_double(gk), to_double(gv)};
    }
  }
};

void require_close(const std::vector<std::vector<double>>& actual,
                   const std::vector<std::vector<double>>& expected, double tolerance) {
  const char* names[] = {"output", "logsumexp", "grad_query", "grad_key", "grad_value"};
  for (size_t t = 0; t < expected.size(); ++t) {
    INFO(names[t]);
    REQUIRE(actual[t].size() == expected[t].size());
    for (size_t i = 0; i < expected[t].size(); ++i) {
      const double e = expected[t][i], a = actual[t][i];
      if (std::isinf(e)) {
        REQUIRE(a == e);
      } else {
        REQUIRE(std::abs(a - e) <= tolerance * (1.0 + std::abs(e)));
      }
    }
  }
}

}  // namespace

TEST_CASE("blocked attention: float (portable and AVX-512) and bfloat16 agree with float64",
          "[flash][attention]") {
  struct Shape {
    int64_t L, S, D, Dv;
    bool causal;
    double dropout;
    bool mask;
  };
  // Sizes around the block sizes (48 queries; 128/256/512 keys) and odd head sizes.
  const Shape shapes[] = {
      {1, 1, 8, 8, false, 0.0, false},   {47, 129, 64, 64, false, 0.0, true},
      {49, 257, 64, 32, true, 0.0, false}, {100, 60, 17, 5, true, 0.2, true},
      {130, 513, 64, 64, false, 0.1, false}, {300, 200, 64, 64, true, 0.0, true},
  };
  for (const Shape& s : shapes) {
    INFO("L=" << s.L << " S=" << s.S << " D=" << s.D << " Dv=" << s.Dv << " causal=" << s.causal
              << " dropout=" << s.dropout << " mask=" << s.mask);
    const Problem problem(s.L, s.S, s.D, s.Dv, s.causal, s.dropout, s.mask);
    const auto reference = problem.run<double, PortableOps<double>>();
    // float: sums of at most a few hundred O(1) terms, about 1e-6 relative.
    require_close(problem.run<float, PortableOps<float>>(), reference, 2e-5);
    if (cpu_has_avx512()) {
      require_close(problem.run<float, Avx512Ops>(), reference, 2e-5);
      require_close(problem.run<c10::Half, Avx512Ops>(), reference, 4e-2);
    }
    if (cpu_has_avx512_bf16()) {
      // bfloat16 rounds inputs and the probabilities and dS fed to the GEMMs: 8 bits of
      // mantissa, errors of a few 2^-9 on O(1) results.
      require_close(problem.run<c10::BFloat16, Avx512Bf16Ops>(), reference, 6e-2);
    }
  }
}
