// The dropout stream as keep bits for the blocked kernels: bit j of a row's words says whether
// element first + j of the Philox stream (cpu/philox.h) is kept. The scalar definition lives in
// dropout_bits.cpp (compiled for the baseline ISA); AVX-512 has a vectorised one (avx512_ops.h).
#pragma once

#include <cstdint>

#include "cpu/philox.h"

namespace qkv_attention::cpu::flash {

// Philox key, counter offset and keep threshold of one call's dropout stream.
struct DropoutKey {
  uint32_t key0, key1, offset0, offset1, threshold;

  static DropoutKey make(uint64_t seed, uint64_t offset, double dropout_p) {
    return DropoutKey{uint32_t(seed), uint32_t(seed >> 32), uint32_t(offset),
                      uint32_t(offset >> 32), DropoutStream::threshold_for(dropout_p)};
  }
};

// keep[0, ceil(count / 64)): bit j = whether element first + j is kept.
void keep_bits_reference(const DropoutKey& key, uint64_t first, int64_t count, uint64_t* keep);

inline bool keep_bit(const uint64_t* keep, int64_t j) { return (keep[j >> 6] >> (j & 63)) & 1; }

}  // namespace qkv_attention::cpu::flash
