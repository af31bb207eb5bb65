// The dropout stream as keep bits for the blocked kernels: bit j of a row's words says whether
// element first + j of the Philox stream (cpu/philox.h) is kept. The scalar definition lives in
// dropout_bits.cpp (compiled for the baseline ISA); AVX-512 has a vectorised one (avx512_ops.h).
#pragma once

#include <cstdint>

#include "cpu/philox.h"

namespace qkv_attention::cpu::flash {

// The stream's key, offset and threshold (cpu/philox.h).
using ::qkv_attention::DropoutKey;

// keep[0, ceil(count / 64)): bit j = whether element first + j is kept.
void keep_bits_reference(const DropoutKey& key, uint64_t first, int64_t count, uint64_t* keep);

inline bool keep_bit(const uint64_t* keep, int64_t j) { return (keep[j >> 6] >> (j & 63)) & 1; }

}  // namespace qkv_attention::cpu::flash
