// Philox4x32-10, the counter-based generator of Salmon et al., "Parallel random numbers: as
// easy as 1, 2, 3" (SC 2011), and the dropout stream built on it.
//
// A counter-based generator turns (key, counter) into random bits with no state in between, so
// any element of the dropout mask can be regenerated on its own: the forward pass, the backward
// pass and the attention-weights path all agree on the mask without storing it, whatever order
// or thread visits the elements. Plain C++, no ATen, so the math is testable on its own.
#pragma once

#include <cmath>
#include <cstdint>

namespace qkv_attention {

struct Philox4x32 {
  uint32_t v[4];

  // Ten rounds of Philox4x32 over `counter` with the 64-bit `key`.
  static inline Philox4x32 generate(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                    uint32_t k1) {
    constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
    constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = uint64_t(kMul0) * c0;
      const uint64_t p1 = uint64_t(kMul1) * c2;
      const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
      const uint32_t n1 = uint32_t(p1);
      const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
      const uint32_t n3 = uint32_t(p0);
      c0 = n0, c1 = n1, c2 = n2, c3 = n3;
      k0 += kWeyl0, k1 += kWeyl1;
    }
    return Philox4x32{{c0, c1, c2, c3}};
  }
};

// The dropout mask of one attention call. Element n (the row-major index into the logical
// (B, H, L, S) weights) is kept when the top 24 bits of word n % 4 of
// Philox(key = seed, counter = (n / 4, offset)) are at least p * 2^24, so an element survives
// with probability 1 - p (exactly, for p a multiple of 2^-24).
//
// DropoutKey is the stream's whole state: the Philox key, the counter offset and the keep
// threshold. The blocked kernels read its fields (cpu/flash/dropout_bits.h, and the AVX-512 keep
// bits); DropoutStream answers element by element.
struct DropoutKey {
  uint32_t key0, key1, offset0, offset1, threshold;

  static DropoutKey make(uint64_t seed, uint64_t offset, double dropout_p) {
    return DropoutKey{uint32_t(seed), uint32_t(seed >> 32), uint32_t(offset),
                      uint32_t(offset >> 32), threshold_for(dropout_p)};
  }

  // Top 24 bits a word must reach to be kept: ceil(p * 2^24), so p = 0 keeps all, p = 1 none.
  static uint32_t threshold_for(double dropout_p) {
    const double t = std::ceil(dropout_p * 16777216.0);
    return t <= 0 ? 0u : (t >= 16777216.0 ? 16777216u : uint32_t(t));
  }

  // The four words of Philox block `counter` (elements 4 * counter .. 4 * counter + 3).
  Philox4x32 block(uint64_t counter) const {
    return Philox4x32::generate(uint32_t(counter), uint32_t(counter >> 32), offset0, offset1, key0,
                                key1);
  }

  bool kept(uint32_t word) const { return (word >> 8) >= threshold; }

  // visit(j, kept) for elements first .. first + count - 1 in order, one Philox block per four.
  template <class Visit>
  void for_each(uint64_t first, int64_t count, Visit&& visit) const {
    int64_t j = 0;
    while (j < count) {
      const uint64_t n = first + uint64_t(j);
      const Philox4x32 r = block(n >> 2);
      for (uint64_t lane = n & 3; lane < 4 && j < count; ++lane, ++j) visit(j, kept(r.v[lane]));
    }
  }
};

class DropoutStream {
 public:
  DropoutStream(uint64_t seed, uint64_t offset, double dropout_p)
      : key_(DropoutKey::make(seed, offset, dropout_p)) {}

  bool keep(uint64_t n) const { return key_.kept(key_.block(n >> 2).v[n & 3]); }

  // keep[j] for elements first .. first + count - 1.
  void fill_keep(uint64_t first, int64_t count, bool* keep_out) const {
    key_.for_each(first, count, [keep_out](int64_t j, bool kept) { keep_out[j] = kept; });
  }

 private:
  DropoutKey key_;
};

}  // namespace qkv_attention
