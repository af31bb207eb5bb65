// Reading a quantized key or value operand (cpu/attention_kernel.h's QuantizedRows): the stored
// codes decoded and multiplied by their row's scale, block by block as the kernels use the rows.
//
// The logical value of an element is float32(decode(stored) * scale) (one float32 rounding, the
// value torch computes as stored.float() * scale), converted to the accumulation type. The
// decoders below are exact for every code, written as branch-free integer operations so that
// the compiler vectorises them at every level: a float8 code's exponent and mantissa bits are
// moved into a float32's, rebiased; subnormal codes go through a normal float and one exact
// subtraction, so no float32 subnormal (which a flush-to-zero setting would lose) is formed.
#pragma once

#include <bit>
#include <cstdint>
#include <limits>

#include "cpu/attention_kernel.h"
#include "cpu/flash/level_namespace.h"

QKV_FLASH_LEVEL_BEGIN

// float8 e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; S.1111.111 is NaN, no inf.
inline float decode_e4m3(uint8_t code) {
  const uint32_t magnitude = code & 0x7Fu, sign = uint32_t(code & 0x80u) << 24;
  const bool subnormal = magnitude < 8;  // exponent bits 0: m * 2^-9
  // Normal: exponent e + 120 (bias 127 - 7). Subnormal: 2^-6 (1 + m / 8) - 2^-6 = m 2^-9.
  const uint32_t bits = (magnitude << 20) + (subnormal ? 121u << 23 : 120u << 23);
  float value = std::bit_cast<float>(bits) - (subnormal ? 0x1p-6f : 0.0f);
  value = magnitude == 0x7Fu ? std::numeric_limits<float>::quiet_NaN() : value;
  return std::bit_cast<float>(std::bit_cast<uint32_t>(value) | sign);
}

// float8 e5m2: sign, 5 exponent bits (bias 15), 2 mantissa bits; exponent 31 is inf or NaN.
inline float decode_e5m2(uint8_t code) {
  const uint32_t magnitude = code & 0x7Fu, sign = uint32_t(code & 0x80u) << 24;
  const bool subnormal = magnitude < 4;  // exponent bits 0: m * 2^-16
  // Normal: exponent e + 112 (bias 127 - 15). Subnormal: 2^-14 (1 + m / 4) - 2^-14 = m 2^-16.
  const uint32_t bits = (magnitude << 21) + (subnormal ? 113u << 23 : 112u << 23);
  float value = std::bit_cast<float>(bits) - (subnormal ? 0x1p-14f : 0.0f);
  value = magnitude == 0x7Cu  ? std::numeric_limits<float>::infinity()
          : magnitude > 0x7Cu ? std::numeric_limits<float>::quiet_NaN()
                              : value;
  return std::bit_cast<float>(std::bit_cast<uint32_t>(value) | sign);
}

// dst[0, n) = float32(decode(codes[c * col_stride]) * scale), as Acc. One loop per storage and
// stride kind, so that the unit-stride loops vectorise.
template <typename Acc>
void dequantize_row(CacheStorage storage, const uint8_t* codes, int64_t col_stride, int64_t n,
                    float scale, Acc* dst) {
  auto run = [&](auto decode) {
    if (col_stride == 1) {
      for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<Acc>(decode(codes[c]) * scale);
    } else {
      for (int64_t c = 0; c < n; ++c) {
        dst[c] = static_cast<Acc>(decode(codes[c * col_stride]) * scale);
      }
    }
  };
  switch (storage) {
    case CacheStorage::kInt8:
      return run([](uint8_t code) { return static_cast<float>(static_cast<int8_t>(code)); });
    case CacheStorage::kFloat8E4M3:
      return run(decode_e4m3);
    case CacheStorage::kFloat8E5M2:
      return run(decode_e5m2);
    case CacheStorage::kPlain:
      break;
  }
}

constexpr int64_t kPrefetchRows = 16;

// Rows row0 .. row0 + count of (b, h) of a quantized operand, dequantized into dst (row stride
// cols).
template <typename Acc>
void dequantize_rows(const QuantizedRows& q, const Strides4& st, int64_t b, int64_t h, int64_t row0,
                     int64_t count, int64_t cols, Acc* dst) {
  const QuantizedChunk rows = q.rows(st, b, h, row0);
  const uint8_t* first = rows.codes;
  for (int64_t r = 0; r < count; ++r) {
    // The codes 16 rows ahead asked for early: the reads are short runs (a chunk of rows) the
    // hardware prefetchers barely warm up to, and the conversion leaves the loads little to
    // overlap with (measured: 10-20% of a decoding step over an int8 or float8 cache).
    if (st.col == 1 && r + kPrefetchRows < count) {
      const uint8_t* ahead = first + (r + kPrefetchRows) * st.row;
      for (int64_t c = 0; c < cols; c += 64) __builtin_prefetch(ahead + c, 0, 3);
    }
    dequantize_row(q.storage, first + r * st.row, st.col, cols, rows.scales[r * rows.scale_stride],
                   dst + r * cols);
  }
}

QKV_FLASH_LEVEL_END
