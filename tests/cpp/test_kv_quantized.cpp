// Quantized KV caches (int8, float8 e4m3fn, float8 e5m2) below the op layer:
//   - the writer (cpu/kv_quantize.h) against a quantization written here from the definition
//     (scale = max|x| / top in float32, codes the nearest representable value of x / scale,
//     ties to even, saturated), codes and scales bit for bit, on random rows of every magnitude,
//     ties, zero, tiny and non-finite rows, and strided tensors;
//   - the kernels' decoders, through the forward at every level: a value row holding every code
//     comes out as c10's value of each code times its scale, exactly;
//   - the forward over a quantized cache (general path and split-KV decoding, grouped-query
//     heads, causal bottom-right, a valid prefix with garbage past it, strided caches) at every
//     CPU level and for every query dtype, against reference::attention_variants in float64 over
//     the dequantized cache (stored.float() * scale, torch's own conversions); and its error
//     against float64 attention over the unquantized rows, within the bounds docs state;
//   - results bitwise the same for 1, 2 and 3 threads; the backward refuses quantized operands;
//   - the avx512 level's products straight from the codes (cpu/flash/avx512_kv_decode.h) against
//     float64 products over the dequantized rows, on every tail of rows, keys and columns.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/attention_kernel.h"
#include "cpu/flash/levels.h"
#include "cpu/kv_quantize.h"
#if defined(__x86_64__)
#include "cpu/flash/avx512_kv_decode.h"
#endif
#include "kernel_levels.h"
#include "reference.h"
#include "test_support.h"

namespace {

using qkv_attention::cpu::AccType;
using qkv_attention::cpu::AttentionForwardParams;
using qkv_attention::cpu::CacheStorage;
using qkv_attention::cpu::QuantizedRows;
using qkv_attention::cpu::Strides4;
using qkv_attention::cpu::flash::CpuLevel;
using qkv_attention::cpu::flash::level_name;
namespace cpu = qkv_attention::cpu;
namespace flash = qkv_attention::cpu::flash;
namespace testing = qkv_attention::testing;
using testing::IsCloseTo;
using testing::runnable_levels;
using testing::Tolerance;

constexpr at::ScalarType kCacheDtypes[] = {at::kChar, at::kFloat8_e4m3fn, at::kFloat8_e5m2};

double top_of(at::ScalarType dtype) {
  return dtype == at::kChar ? 127.0 : dtype == at::kFloat8_e4m3fn ? 448.0 : 57344.0;
}

// The value of one code, from c10's own conversions (not the kernels' decoders).
float code_value(at::ScalarType dtype, uint8_t code) {
  switch (dtype) {
    case at::kChar:
      return static_cast<float>(static_cast<int8_t>(code));
    case at::kFloat8_e4m3fn:
      return static_cast<float>(c10::Float8_e4m3fn(code, c10::Float8_e4m3fn::from_bits()));
    default:
      return static_cast<float>(c10::Float8_e5m2(code, c10::Float8_e5m2::from_bits()));
  }
}

// The code of q (|q| <= top) by the definition: the finite code nearest to q; of two equally
// near, the one with the even code (the even mantissa: consecutive codes of one sign are
// consecutive values), and of +0 and -0 the one with q's sign.
uint8_t nearest_code(at::ScalarType dtype, float q) {
  int best = -1;
  double best_distance = std::numeric_limits<double>::infinity();
  for (int code = 0; code < 256; ++code) {
    const float v = code_value(dtype, uint8_t(code));
    if (!std::isfinite(v)) continue;
    const double distance = std::abs(double(v) - double(q));
    bool better = distance < best_distance;
    if (distance == best_distance) {
      const float best_value = code_value(dtype, uint8_t(best));
      if (v == best_value) {  // +0 and -0
        better = std::signbit(v) == std::signbit(q);
      } else {
        better = code % 2 == 0;
      }
    }
    if (better) {
      best = code;
      best_distance = distance;
    }
  }
  return uint8_t(best);
}

// The definition applied to rows (H, N, D): codes (H, N, D) as uint8 and scales (H, N).
void reference_quantize(const at::Tensor& rows, at::ScalarType dtype, at::Tensor& codes,
                        at::Tensor& scales) {
  const int64_t H = rows.size(0), N = rows.size(1), D = rows.size(2);
  const at::Tensor x = rows.to(at::kFloat).contiguous();
  codes = at::zeros({H, N, D}, at::kByte);
  scales = at::zeros({H, N}, at::kFloat);
  const float* xs = x.data_ptr<float>();
  uint8_t* cs = codes.data_ptr<uint8_t>();
  float* ss = scales.data_ptr<float>();
  const float top = static_cast<float>(top_of(dtype));
  for (int64_t r = 0; r < H * N; ++r) {
    const float* row = xs + r * D;
    float amax = 0;
    bool finite = true;
    for (int64_t d = 0; d < D; ++d) {
      finite = finite && std::isfinite(row[d]);
      amax = std::max(amax, std::abs(row[d]));
    }
    if (!finite) {
      ss[r] = std::numeric_limits<float>::quiet_NaN();
      continue;  // zeros
    }
    const float s = amax / top;  // float32, as defined
    ss[r] = s;
    if (s == 0.0f) continue;
    for (int64_t d = 0; d < D; ++d) {
      const float q = std::min(std::max(row[d] / s, -top), top);
      cs[r * D + d] = nearest_code(dtype, q);
    }
  }
}

// The codes of a quantized tensor as uint8 (any strides).
at::Tensor codes_of(const at::Tensor& stored) { return stored.contiguous().view(at::kByte); }

// Rows (3, N, D) of `dtype` covering what the writer must handle: random rows of magnitudes from
// 1e-3 to 1e3, a zero row, a row of ties (x / s exactly halfway between two codes, s = 1), a
// row too small for a nonzero scale, rows holding inf and NaN.
at::Tensor writer_rows(at::Generator& gen, at::ScalarType cache_dtype, at::ScalarType dtype,
                       int64_t D) {
  const int64_t N = 9;
  at::Tensor rows = at::randn({3, N, D}, gen, at::kDouble);
  const at::Tensor magnitudes = at::pow(10.0, at::linspace(-3.0, 3.0, 3 * N, at::kDouble));
  rows = rows * magnitudes.view({3, N, 1});
  rows[0][0].zero_();
  // Ties at s = 1: the row's largest magnitude is the top.
  const double top = top_of(cache_dtype);
  std::vector<double> ties;
  if (cache_dtype == at::kChar) {
    ties = {0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 125.5, -126.5};
  } else if (cache_dtype == at::kFloat8_e4m3fn) {
    // Midpoints of 1, 1.125, 1.25 (step 1/8 at exponent 0) and of 256, 288 (step 32).
    ties = {1.0625, 1.1875, -1.0625, -1.1875, 272.0, -304.0, 0x1p-10, 3 * 0x1p-10};
  } else {
    // Midpoints of 1, 1.25, 1.5 (step 1/4) and of 2^-16 subnormals.
    ties = {1.125, 1.375, -1.125, -1.375, 0x1p-17, 3 * 0x1p-17, 40960.0 + 4096.0, -1.625};
  }
  at::Tensor tie_row = rows[0][1];
  tie_row.zero_();
  tie_row[0] = top;
  for (size_t t = 0; t < ties.size() && int64_t(t) + 1 < D; ++t) tie_row[int64_t(t) + 1] = ties[t];
  // Too small: the largest magnitude over the top underflows float32 to 0 (float32 and bfloat16
  // hold 1e-44; float16 rounds it to 0, an all-zero row).
  rows[0][2].fill_(1e-44);
  rows[1][3][D / 2] = std::numeric_limits<double>::infinity();
  rows[2][4][1] = std::numeric_limits<double>::quiet_NaN();
  return rows.to(dtype);
}

}  // namespace

TEST_CASE("quantize_rows writes the codes and scales of the definition", "[kv_quantized]") {
  at::Generator gen = testing::seeded(21);
  for (at::ScalarType cache_dtype : kCacheDtypes) {
    for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
      for (bool strided : {false, true}) {
        INFO("cache " << cache_dtype << ", rows " << dtype << (strided ? ", strided" : ""));
        const int64_t D = 40;
        const at::Tensor source = writer_rows(gen, cache_dtype, dtype, D);
        // Strided: rows read through a transposed copy, codes and scales written into every
        // other element of larger buffers.
        const at::Tensor rows =
            strided ? source.transpose(1, 2).contiguous().transpose(1, 2) : source;
        at::Tensor stored_base = at::full({3, 9, 2 * D}, 0x55, at::kByte).view(cache_dtype);
        at::Tensor stored =
            strided ? stored_base.slice(2, 0, 2 * D, 2) : at::empty(source.sizes(), cache_dtype);
        at::Tensor scale_base = at::full({3, 9, 2}, -7.0f, at::kFloat);
        at::Tensor scales = strided ? scale_base.select(2, 1) : at::empty({3, 9}, at::kFloat);
        cpu::quantize_rows(rows, stored, scales);

        at::Tensor expected_codes, expected_scales;
        reference_quantize(source, cache_dtype, expected_codes, expected_scales);
        CHECK(at::equal(codes_of(stored), expected_codes));
        // Scales bit for bit (NaN where the row is not finite).
        CHECK(at::equal(scales.contiguous().view(at::kInt), expected_scales.view(at::kInt)));
        if (strided) {  // the elements between were not touched
          CHECK(codes_of(stored_base.slice(2, 1, 2 * D, 2)).eq(0x55).all().item<bool>());
          CHECK(scale_base.select(2, 0).eq(-7.0f).all().item<bool>());
        }
        // The special rows: zeros with scale 0, the tie row's scale 1, NaN scales.
        CHECK(scales[0][0].item<float>() == 0.0f);
        CHECK(scales[0][1].item<float>() == 1.0f);
        CHECK(scales[0][2].item<float>() == 0.0f);
        CHECK(codes_of(stored[0][2]).eq(0).all().item<bool>());
        CHECK(std::isnan(scales[1][3].item<float>()));
        CHECK(std::isnan(scales[2][4].item<float>()));
        CHECK(codes_of(stored[2][4]).eq(0).all().item<bool>());
      }
    }
  }
}

TEST_CASE("quantize_rows: rows quantized and read back stay within half a code of the scale",
          "[kv_quantized]") {
  at::Generator gen = testing::seeded(5);
  const at::Tensor rows = at::randn({4, 64, 64}, gen, at::kFloat);
  for (at::ScalarType cache_dtype : kCacheDtypes) {
    INFO("cache " << cache_dtype);
    at::Tensor stored = at::empty({4, 64, 64}, cache_dtype);
    at::Tensor scales = at::empty({4, 64}, at::kFloat);
    cpu::quantize_rows(rows, stored, scales);
    const at::Tensor back = stored.to(at::kFloat) * scales.unsqueeze(-1);
    const at::Tensor error = (back - rows).abs();
    if (cache_dtype == at::kChar) {
      // Integers: half a unit of the scale (plus the quotient's float32 rounding).
      CHECK((error <= scales.unsqueeze(-1) * (0.5 + 1e-4)).all().item<bool>());
    } else {
      // Floats with 3 (e4m3) or 2 (e5m2) mantissa bits: half an ulp, relative to the value, or
      // half the smallest subnormal's spacing times the scale.
      const double rel = cache_dtype == at::kFloat8_e4m3fn ? 0x1p-4 : 0x1p-3;
      const double sub = cache_dtype == at::kFloat8_e4m3fn ? 0x1p-10 : 0x1p-17;
      const at::Tensor allowed = (rows.abs() * rel + scales.unsqueeze(-1) * sub) * 1.0001;
      CHECK((error <= allowed).all().item<bool>());
    }
    // The largest element of each row is stored as the top exactly.
    const at::Tensor amax = stored.to(at::kFloat).abs().amax(-1);
    CHECK(amax.eq(top_of(cache_dtype)).all().item<bool>());
  }
}

TEST_CASE("quantize_rows refuses what it cannot write", "[kv_quantized]") {
  const at::Tensor rows = at::randn({2, 3, 8});
  at::Tensor scales = at::empty({2, 3}, at::kFloat);
  CHECK_THROWS_WITH(cpu::quantize_rows(rows, at::empty({2, 3, 8}, at::kFloat), scales),
                    Catch::Contains("int8, float8_e4m3fn or float8_e5m2"));
  CHECK_THROWS_WITH(cpu::quantize_rows(rows, at::empty({2, 3, 7}, at::kChar), scales),
                    Catch::Contains("one shape"));
  CHECK_THROWS_WITH(
      cpu::quantize_rows(rows, at::empty({2, 3, 8}, at::kChar), at::empty({2, 3}, at::kDouble)),
      Catch::Contains("float32 (H, N)"));
}

namespace {

// A quantized cache: stored (B, Hkv, S_max, D) of a quantized dtype and scales (B, Hkv, S_max).
struct QuantCache {
  at::Tensor stored, scales;
};

QuantizedRows quantized_rows(const QuantCache& cache) {
  QuantizedRows q;
  q.storage = *cpu::quantized_storage_of(cache.stored.scalar_type());
  q.data = cache.stored.const_data_ptr();
  q.scales = cache.scales.const_data_ptr<float>();
  q.scale_batch = cache.scales.stride(0);
  q.scale_head = cache.scales.stride(1);
  q.scale_row = cache.scales.stride(2);
  return q;
}

Strides4 strides_of(const at::Tensor& t) {
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// What torch computes from the cache: stored.float() * scale, (B, Hkv, S_max, D) float32.
at::Tensor dequantized(const QuantCache& cache) {
  return cache.stored.to(at::kFloat) * cache.scales.unsqueeze(-1);
}

// The forward's parameters over the first S positions of quantized caches, causal bottom-right
// when `causal` (o = S - L), output (B, H, L, Dv) and logsumexp (B, H, L) contiguous.
template <typename T>
AttentionForwardParams<T> quantized_params(const at::Tensor& query, const QuantCache& k,
                                           const QuantCache& v, int64_t S, bool causal,
                                           at::Tensor& output, at::Tensor& logsumexp) {
  AttentionForwardParams<T> p;
  p.batch = query.size(0);
  p.heads = query.size(1);
  p.kv_heads = k.stored.size(1);
  p.q_len = query.size(2);
  p.kv_len = S;
  p.head_dim = query.size(3);
  p.value_dim = v.stored.size(3);
  p.scale = 1.0 / std::sqrt(double(p.head_dim));
  p.is_causal = causal;
  p.causal_offset = S - p.q_len;
  p.query = query.const_data_ptr<T>();
  p.query_strides = strides_of(query);
  p.key_strides = strides_of(k.stored);
  p.value_strides = strides_of(v.stored);
  p.quantized_key = quantized_rows(k);
  p.quantized_value = quantized_rows(v);
  p.output = output.mutable_data_ptr<T>();
  p.logsumexp = logsumexp.mutable_data_ptr<AccType<T>>();
  return p;
}

struct CacheCase {
  int64_t B, H, Hkv, L, S, S_max, D;
  bool causal;
  bool strided = false;  // caches with column stride S_max (stored as (B, Hkv, D, S_max))
};

std::string describe(const CacheCase& c) {
  std::ostringstream out;
  out << "(B, H, Hkv, L, S, S_max, D) = (" << c.B << ", " << c.H << ", " << c.Hkv << ", " << c.L
      << ", " << c.S << ", " << c.S_max << ", " << c.D << "), causal " << c.causal
      << (c.strided ? ", strided caches" : "");
  return out.str();
}

// Unit-normal rows quantized by the writer into a cache of `dtype`; positions S .. S_max hold
// garbage the kernels must never read (NaN codes where the format has one, NaN scales).
QuantCache make_cache(const CacheCase& c, const at::Tensor& rows, at::ScalarType dtype) {
  QuantCache cache;
  const std::vector<int64_t> sizes = {c.B, c.Hkv, c.S_max, c.D};
  cache.stored = c.strided ? at::empty({c.B, c.Hkv, c.D, c.S_max}, dtype).transpose(2, 3)
                           : at::empty(sizes, dtype);
  cache.scales = at::empty({c.B, c.Hkv, c.S_max}, at::kFloat);
  cache.stored.view(at::kByte).fill_(0x7F);  // NaN in e4m3fn and e5m2, 127 in int8
  cache.scales.fill_(std::numeric_limits<float>::quiet_NaN());
  for (int64_t b = 0; b < c.B; ++b) {
    cpu::quantize_rows(rows[b].narrow(1, 0, c.S), cache.stored[b].narrow(1, 0, c.S),
                       cache.scales[b].narrow(1, 0, c.S));
  }
  return cache;
}

struct CacheProblem {
  CacheCase c;
  at::Tensor query;       // (B, H, L, D) of the query dtype
  at::Tensor key, value;  // (B, Hkv, S_max, D) float32, unquantized
  QuantCache k, v;
};

CacheProblem make_problem(const CacheCase& c, at::ScalarType cache_dtype, at::ScalarType dtype,
                          uint64_t seed) {
  at::Generator gen = testing::seeded(seed);
  CacheProblem p{c,
                 testing::random_tensor(gen, {c.B, c.H, c.L, c.D}, dtype),
                 at::randn({c.B, c.Hkv, c.S_max, c.D}, gen, at::kFloat),
                 at::randn({c.B, c.Hkv, c.S_max, c.D}, gen, at::kFloat),
                 {},
                 {}};
  p.k = make_cache(c, p.key, cache_dtype);
  p.v = make_cache(c, p.value, cache_dtype);
  return p;
}

template <typename T>
at::Tensor run_forward(CpuLevel level, const CacheProblem& p) {
  const CacheCase& c = p.c;
  const auto acc = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
  at::Tensor output = at::full({c.B, c.H, c.L, c.D}, std::numeric_limits<double>::quiet_NaN(),
                               p.query.scalar_type());
  at::Tensor logsumexp = at::empty({c.B, c.H, c.L}, acc);
  flash::attention_forward_at<T>(
      level, quantized_params<T>(p.query, p.k, p.v, c.S, c.causal, output, logsumexp));
  return output;
}

at::Tensor run_forward(CpuLevel level, const CacheProblem& p) {
  switch (p.query.scalar_type()) {
    case at::kDouble:
      return run_forward<double>(level, p);
    case at::kFloat:
      return run_forward<float>(level, p);
    case at::kBFloat16:
      return run_forward<c10::BFloat16>(level, p);
    default:
      return run_forward<c10::Half>(level, p);
  }
}

// Float64 attention over the first S positions of key/value (B, Hkv, S_max, D), heads repeated.
at::Tensor reference_over(const CacheProblem& p, const at::Tensor& key, const at::Tensor& value) {
  const CacheCase& c = p.c;
  testing::reference::VariantOptions o;
  o.scale = 1.0 / std::sqrt(double(c.D));
  o.causal = c.causal;
  o.offset = c.S - c.L;
  auto heads = [&](const at::Tensor& t) {
    return t.narrow(2, 0, c.S).to(at::kDouble).repeat_interleave(c.H / c.Hkv, 1);
  };
  return testing::reference::attention_variants(p.query.to(at::kDouble), heads(key), heads(value),
                                                o)
      .output;
}

// The forward's largest error against float64 attention over the unquantized rows (unit-normal
// data, D 24..64, every query dtype): measured 0.008 (int8), 0.056 (e4m3fn), 0.12 (e5m2) over
// the cases below; the bounds leave a margin.
double quantization_bound(at::ScalarType cache_dtype) {
  return cache_dtype == at::kChar ? 0.02 : cache_dtype == at::kFloat8_e4m3fn ? 0.1 : 0.2;
}

const std::vector<CacheCase> kCases = {
    // Split-KV decoding (L <= 16, S > 512): one query, grouped heads, a valid prefix.
    {2, 4, 2, 1, 700, 800, 64, true},
    {1, 6, 2, 5, 600, 650, 48, true},
    {1, 2, 2, 3, 530, 530, 40, false, true},  // strided caches
    // The general path: many queries (a prefill against cached keys), causal bottom-right.
    {2, 4, 2, 40, 300, 320, 64, true},
    {1, 2, 1, 70, 70, 90, 40, false},
    {1, 3, 3, 20, 100, 100, 24, true, true},
};

}  // namespace

TEST_CASE("the forward over a quantized cache equals float64 attention over the dequantized cache",
          "[kv_quantized][levels]") {
  const auto levels = runnable_levels();
  uint64_t seed = 100;
  for (const CacheCase& c : kCases) {
    for (at::ScalarType cache_dtype : kCacheDtypes) {
      for (at::ScalarType dtype : testing::all_dtypes()) {
        const CacheProblem p = make_problem(c, cache_dtype, dtype, seed++);
        const at::Tensor expected = reference_over(p, dequantized(p.k), dequantized(p.v));
        const at::Tensor unquantized = reference_over(p, p.key, p.value);
        for (CpuLevel level : levels) {
          INFO("level " << level_name(level) << ", cache " << cache_dtype << ", query " << dtype
                        << ", " << describe(c));
          const at::Tensor out = run_forward(level, p);
          // The dequantized values are float32: a float64 query meets them exactly.
          CHECK_THAT(out, IsCloseTo(expected, testing::output_tolerance(dtype)));
          const double error = (out.to(at::kDouble) - unquantized).abs().max().item<double>();
          INFO("max |error| against unquantized float64 attention: " << error);
          CHECK(error < quantization_bound(cache_dtype));
        }
      }
    }
  }
}

TEST_CASE("the kernels decode every code of each format exactly, at every level",
          "[kv_quantized][levels]") {
  // One value row holds the 256 codes (scale 1/8, a power of two: the products are exact); a
  // key mask lets every query see that row only, so each output row is that row's values.
  // The other rows hold zeros, so that no 0 * inf or 0 * NaN enters the sums.
  for (at::ScalarType cache_dtype : kCacheDtypes) {
    for (int64_t L : {1, 20}) {  // split-KV decoding, the general path
      const int64_t S = 700, D = 8, Dv = 256, seen = 613;
      at::Tensor query = at::randn({1, 1, L, D});
      QuantCache k{at::zeros({1, 1, S, D}, at::kByte).view(cache_dtype),
                   at::ones({1, 1, S}, at::kFloat)};
      QuantCache v{at::zeros({1, 1, S, Dv}, at::kByte).view(cache_dtype),
                   at::ones({1, 1, S}, at::kFloat)};
      v.stored[0][0][seen].view(at::kByte).copy_(at::arange(256, at::kInt).to(at::kByte));
      v.scales[0][0][seen] = 0.125f;
      at::Tensor mask = at::zeros({S}, at::kBool);
      mask[seen] = true;
      at::Tensor expected = at::empty({Dv}, at::kFloat);
      for (int code = 0; code < 256; ++code) {
        expected[code] = code_value(cache_dtype, uint8_t(code)) * 0.125f;
      }
      for (CpuLevel level : runnable_levels()) {
        INFO("level " << level_name(level) << ", cache " << cache_dtype << ", L " << L);
        at::Tensor output = at::empty({1, 1, L, Dv}, at::kFloat);
        at::Tensor logsumexp = at::empty({1, 1, L}, at::kFloat);
        auto params = quantized_params<float>(query, k, v, S, false, output, logsumexp);
        params.masks[0].kind = qkv_attention::cpu::MaskKind::kBool;
        params.masks[0].bool_data = mask.const_data_ptr<bool>();
        params.masks[0].strides = Strides4{0, 0, 0, 1};
        flash::attention_forward_at<float>(level, params);
        for (int64_t i = 0; i < L; ++i) {
          const at::Tensor row = output[0][0][i];
          CHECK(at::equal(row.isnan(), expected.isnan()));
          const at::Tensor finite = expected.isnan().logical_not();
          CHECK(at::equal(row.masked_select(finite), expected.masked_select(finite)));
        }
      }
    }
  }
}

TEST_CASE("quantized-cache results are bitwise the same for 1, 2 and 3 threads at every level",
          "[kv_quantized][levels]") {
  testing::ThreadCountGuard guard;
  uint64_t seed = 300;
  for (const CacheCase& c : {kCases[0], kCases[1], kCases[3]}) {
    for (at::ScalarType cache_dtype : kCacheDtypes) {
      for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
        const CacheProblem p = make_problem(c, cache_dtype, dtype, seed++);
        for (CpuLevel level : runnable_levels()) {
          INFO("level " << level_name(level) << ", cache " << cache_dtype << ", query " << dtype
                        << ", " << describe(c));
          at::set_num_threads(1);
          const at::Tensor one = run_forward(level, p);
          for (int threads : {2, 3}) {
            at::set_num_threads(threads);
            CHECK(testing::bitwise_equal(run_forward(level, p), one));
          }
        }
      }
    }
  }
}

TEST_CASE("the backward refuses quantized key or value", "[kv_quantized]") {
  cpu::AttentionBackwardParams<float> params;
  params.quantized_key.storage = CacheStorage::kInt8;
  CHECK_THROWS_WITH(flash::attention_backward_at<float>(CpuLevel::kDefault, params),
                    Catch::Contains("no quantized key or value"));
}

#if defined(__x86_64__)
TEST_CASE("AVX-512 products over quantized chunks equal float64 products over the dequantized rows",
          "[kv_quantized][avx512]") {
  if (!flash::level_available(CpuLevel::kAvx512)) {
    WARN("no AVX-512 on this CPU: the avx512 level's quantized products are never called here");
    return;
  }
  std::mt19937 gen(11);
  for (at::ScalarType cache_dtype : kCacheDtypes) {
    const CacheStorage storage = cache_dtype == at::kChar            ? CacheStorage::kInt8
                                 : cache_dtype == at::kFloat8_e4m3fn ? CacheStorage::kFloat8E4M3
                                                                     : CacheStorage::kFloat8E5M2;
    for (int64_t M : {1, 3, 4, 5, 9}) {
      for (int64_t n : {1, 15, 16, 17, 40}) {
        for (int64_t D : {1, 15, 16, 17, 64, 130}) {
          for (int64_t scale_stride : {1, 3}) {
            const int64_t row_stride = D + 5;  // rows padded: the codes past D are never read
            // Random codes, non-finite float8 codes replaced by zero except in row 1, column 0,
            // which holds the format's NaN (int8 has none): NaN must reach that key's products.
            std::vector<uint8_t> codes(size_t(n * row_stride));
            for (auto& c : codes) {
              c = uint8_t(gen() & 0xff);
              if (!std::isfinite(code_value(cache_dtype, c))) c = 0;
            }
            const bool nan_row = cache_dtype != at::kChar && n > 1;
            if (nan_row) codes[size_t(row_stride)] = 0x7f;
            std::vector<float> scales(size_t(n * scale_stride));
            for (auto& s : scales) s = std::ldexp(float(gen() % 1000 + 1), -int(gen() % 20));
            std::vector<float> q(size_t(M * D)), p(size_t(M * (n + 2)));
            for (auto& x : q) x = float(int(gen() % 2001) - 1000) / 1000.0f;
            for (auto& x : p) x = float(gen() % 1001) / 1000.0f;
            const cpu::QuantizedChunk chunk{storage, codes.data(), row_stride, scales.data(),
                                            scale_stride};
            auto value = [&](int64_t j, int64_t d) {
              return double(code_value(cache_dtype, codes[size_t(j * row_stride + d)]) *
                            scales[size_t(j * scale_stride)]);
            };
            INFO("cache " << cache_dtype << ", M " << M << ", n " << n << ", D " << D
                          << ", scale stride " << scale_stride);
            // Float32 sums of D (or n) terms: within (terms + 4) units of 2^-24 of the sum of
            // magnitudes (one more rounding for the scale).
            // Scores: q (M x D) against keys (n x D); the output row stride n + 3.
            std::vector<float> scores(size_t(M * (n + 3)), -7.0f);
            flash::avx512_quantized_scores(chunk, M, n, D, q.data(), scores.data(), n + 3);
            for (int64_t r = 0; r < M; ++r) {
              for (int64_t j = 0; j < n + 3; ++j) {
                const float got = scores[size_t(r * (n + 3) + j)];
                if (j >= n) {
                  REQUIRE(got == -7.0f);  // past the keys: untouched
                  continue;
                }
                double expected = 0, magnitude = 0;
                for (int64_t d = 0; d < D; ++d) {
                  expected += double(q[size_t(r * D + d)]) * value(j, d);
                  magnitude += std::abs(double(q[size_t(r * D + d)]) * value(j, d));
                }
                if (nan_row && j == 1) {
                  REQUIRE(std::isnan(got));
                } else {
                  REQUIRE(std::abs(double(got) - expected) <= double(D + 4) * 0x1p-24 * magnitude);
                }
              }
            }
            // Values: p (M x n, row stride n + 2) times value rows (n x D) into out (M x D).
            const int64_t ld_out = D + 4;
            std::vector<float> out(size_t(M * ld_out), -7.0f);
            flash::avx512_quantized_values(chunk, M, n, D, p.data(), n + 2, out.data(), ld_out);
            for (int64_t r = 0; r < M; ++r) {
              for (int64_t d = 0; d < ld_out; ++d) {
                const float got = out[size_t(r * ld_out + d)];
                if (d >= D) {
                  REQUIRE(got == -7.0f);
                  continue;
                }
                double expected = 0, magnitude = 0;
                for (int64_t j = 0; j < n; ++j) {
                  expected += double(p[size_t(r * (n + 2) + j)]) * value(j, d);
                  magnitude += std::abs(double(p[size_t(r * (n + 2) + j)]) * value(j, d));
                }
                if (nan_row && d == 0) {
                  REQUIRE(std::isnan(got));
                } else {
                  REQUIRE(std::abs(double(got) - expected) <= double(n + 4) * 0x1p-24 * magnitude);
                }
              }
            }
          }
        }
      }
    }
  }
}
#endif

TEST_CASE("timing: a decoding step over quantized caches against a float32 cache", "[.timing]") {
  // B8 H32 Hkv8 D128, 4096 valid positions, one query (the benchmark shape), kernels
  // only (no write). Median of 15 runs each, interleaved.
  const CacheCase c{8, 32, 8, 1, 4096, 4096, 128, true};
  at::Generator gen = testing::seeded(9);
  const at::Tensor query = at::randn({c.B, c.H, c.L, c.D}, gen, at::kFloat);
  const at::Tensor key = at::randn({c.B, c.Hkv, c.S, c.D}, gen, at::kFloat);
  const at::Tensor value = at::randn({c.B, c.Hkv, c.S, c.D}, gen, at::kFloat);
  at::Tensor output = at::empty({c.B, c.H, c.L, c.D}, at::kFloat);
  at::Tensor logsumexp = at::empty({c.B, c.H, c.L}, at::kFloat);
  std::vector<QuantCache> ks, vs;
  for (at::ScalarType dtype : kCacheDtypes) {
    ks.push_back(make_cache(c, key, dtype));
    vs.push_back(make_cache(c, value, dtype));
  }
  auto float_step = [&] {
    auto p = quantized_params<float>(query, ks[0], vs[0], c.S, true, output, logsumexp);
    p.quantized_key = p.quantized_value = QuantizedRows{};
    p.key = key.const_data_ptr<float>();
    p.value = value.const_data_ptr<float>();
    p.key_strides = strides_of(key);
    p.value_strides = strides_of(value);
    cpu::attention_forward_kernel(p);
  };
  auto seconds = [](const auto& fn) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  std::vector<std::vector<double>> times(4);
  for (int run = 0; run < 15; ++run) {
    times[0].push_back(seconds(float_step));
    for (size_t f = 0; f < 3; ++f) {
      times[f + 1].push_back(seconds([&] {
        cpu::attention_forward_kernel(
            quantized_params<float>(query, ks[f], vs[f], c.S, true, output, logsumexp));
      }));
    }
  }
  const char* names[] = {"float32", "int8", "float8_e4m3fn", "float8_e5m2"};
  const double elements = 2.0 * double(c.B * c.Hkv * c.S * c.D);
  for (size_t f = 0; f < 4; ++f) {
    std::sort(times[f].begin(), times[f].end());
    const double t = times[f][times[f].size() / 2];
    const double bytes = f == 0 ? 4 * elements : elements + 2.0 * double(c.B * c.Hkv * c.S) * 4;
    WARN(names[f] << " cache: " << t * 1e3 << " ms, " << bytes / t / 1e9 << " GB/s of cache read");
  }
}
