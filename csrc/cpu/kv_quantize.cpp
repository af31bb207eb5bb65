// cpu/kv_quantize.h.
#include "cpu/kv_quantize.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace qkv_attention::cpu {
namespace {

// The code of q (already saturated to [-top, top]), rounded to nearest, ties to even.
template <CacheStorage kStorage>
uint8_t encode(float q) {
  if constexpr (kStorage == CacheStorage::kInt8) {
    // std::nearbyint rounds in the current mode: to nearest, ties to even, unless a caller
    // changed it, which nothing in torch does.
    return static_cast<uint8_t>(static_cast<int8_t>(std::nearbyint(q)));
  } else if constexpr (kStorage == CacheStorage::kFloat8E4M3) {
    return c10::Float8_e4m3fn(q).x;  // c10's conversion rounds to nearest even
  } else {
    return c10::Float8_e5m2(q).x;
  }
}

// One row: D elements of src (column stride src_col) into codes (column stride dst_col).
template <CacheStorage kStorage, typename T>
void quantize_row(const T* src, int64_t src_col, int64_t D, uint8_t* codes, int64_t dst_col,
                  float* scale) {
  constexpr float kTop = kStorage == CacheStorage::kInt8         ? 127.0f
                         : kStorage == CacheStorage::kFloat8E4M3 ? 448.0f
                                                                 : 57344.0f;
  float amax = 0.0f;
  bool finite = true;
  for (int64_t d = 0; d < D; ++d) {
    const float a = std::abs(static_cast<float>(src[d * src_col]));
    finite = finite && a <= std::numeric_limits<float>::max();  // false for inf and NaN
    amax = std::max(amax, a);
  }
  const float s = finite ? amax / kTop : std::numeric_limits<float>::quiet_NaN();
  if (!(s > 0.0f)) {  // zero, underflowed, or not finite: zeros
    for (int64_t d = 0; d < D; ++d) codes[d * dst_col] = 0;
    *scale = s;
    return;
  }
  for (int64_t d = 0; d < D; ++d) {
    // |x / s| <= top up to the quotient's rounding: saturate, then round.
    const float q = std::clamp(static_cast<float>(src[d * src_col]) / s, -kTop, kTop);
    codes[d * dst_col] = encode<kStorage>(q);
  }
  *scale = s;
}

template <CacheStorage kStorage, typename T>
void quantize_all(const at::Tensor& rows, const at::Tensor& stored, const at::Tensor& scales) {
  const int64_t H = rows.size(0), N = rows.size(1), D = rows.size(2);
  const T* src = rows.const_data_ptr<T>();
  // The codes as bytes: int8_t and both float8 types are one byte each.
  uint8_t* codes = static_cast<uint8_t*>(stored.mutable_data_ptr());
  float* scale = scales.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, H * N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row / N, n = row % N;
      quantize_row<kStorage>(src + h * rows.stride(0) + n * rows.stride(1), rows.stride(2), D,
                             codes + h * stored.stride(0) + n * stored.stride(1), stored.stride(2),
                             scale + h * scales.stride(0) + n * scales.stride(1));
    }
  });
}

template <typename T>
void quantize_as(CacheStorage storage, const at::Tensor& rows, const at::Tensor& stored,
                 const at::Tensor& scales) {
  switch (storage) {
    case CacheStorage::kInt8:
      return quantize_all<CacheStorage::kInt8, T>(rows, stored, scales);
    case CacheStorage::kFloat8E4M3:
      return quantize_all<CacheStorage::kFloat8E4M3, T>(rows, stored, scales);
    case CacheStorage::kFloat8E5M2:
      return quantize_all<CacheStorage::kFloat8E5M2, T>(rows, stored, scales);
    case CacheStorage::kPlain:
      break;
  }
}

}  // namespace

std::optional<CacheStorage> quantized_storage_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kChar:
      return CacheStorage::kInt8;
    case at::kFloat8_e4m3fn:
      return CacheStorage::kFloat8E4M3;
    case at::kFloat8_e5m2:
      return CacheStorage::kFloat8E5M2;
    default:
      return std::nullopt;
  }
}

float quantized_top(CacheStorage storage) {
  switch (storage) {
    case CacheStorage::kInt8:
      return 127.0f;
    case CacheStorage::kFloat8E4M3:
      return 448.0f;
    case CacheStorage::kFloat8E5M2:
      return 57344.0f;
    case CacheStorage::kPlain:
      break;
  }
  TORCH_CHECK(false, "quantized_top: a plain storage has no top");
}

void quantize_rows(const at::Tensor& rows, const at::Tensor& stored, const at::Tensor& scales) {
  const std::optional<CacheStorage> storage = quantized_storage_of(stored.scalar_type());
  TORCH_CHECK(storage.has_value(), "quantize_rows: stored must be int8, float8_e4m3fn or ",
              "float8_e5m2, found ", stored.scalar_type());
  TORCH_CHECK(rows.dim() == 3 && stored.sizes() == rows.sizes(),
              "quantize_rows: rows and stored must be (H, N, D) of one shape, found ", rows.sizes(),
              " and ", stored.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat &&
                  scales.sizes() == at::IntArrayRef(rows.sizes().data(), 2),
              "quantize_rows: scales must be float32 (H, N) = ", rows.sizes().slice(0, 2),
              ", found ", scales.scalar_type(), " ", scales.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "quantize_rows",
                                  [&] { quantize_as<scalar_t>(*storage, rows, stored, scales); });
}

}  // namespace qkv_attention::cpu
