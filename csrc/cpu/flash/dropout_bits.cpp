// The scalar keep bits of cpu/flash/dropout_bits.h.
#include "cpu/flash/dropout_bits.h"

#include <cstring>

namespace qkv_attention::cpu::flash {

void keep_bits_reference(const DropoutKey& key, uint64_t first, int64_t count, uint64_t* keep) {
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

}  // namespace qkv_attention::cpu::flash
