// The scalar keep bits of cpu/flash/dropout_bits.h.
#include "cpu/flash/dropout_bits.h"

#include <cstring>

#include "cpu/rounding.h"

namespace qkv_attention::cpu::flash {

void keep_bits_reference(const DropoutKey& key, uint64_t first, int64_t count, uint64_t* keep) {
  std::memset(keep, 0, sizeof(uint64_t) * size_t(ceil_div(count, 64)));
  key.for_each(first, count, [keep](int64_t j, bool kept) {
    if (kept) keep[j >> 6] |= uint64_t(1) << (j & 63);
  });
}

}  // namespace qkv_attention::cpu::flash
