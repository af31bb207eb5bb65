// The dropout stream's generator against the known-answer vectors of Random123's
// philox4x32-10, and the keep rate of the stream built on it.
#include <catch2/catch.hpp>

#include "cpu/philox.h"

using qkv_attention::DropoutStream;
using qkv_attention::Philox4x32;

TEST_CASE("philox4x32_10 matches the Random123 known-answer vectors", "[philox]") {
  const Philox4x32 zeros = Philox4x32::generate(0, 0, 0, 0, 0, 0);
  CHECK(zeros.v[0] == 0x6627e8d5u);
  CHECK(zeros.v[1] == 0xe169c58du);
  CHECK(zeros.v[2] == 0xbc57ac4cu);
  CHECK(zeros.v[3] == 0x9b00dbd8u);

  const uint32_t ones = 0xffffffffu;
  const Philox4x32 all_ones = Philox4x32::generate(ones, ones, ones, ones, ones, ones);
  CHECK(all_ones.v[0] == 0x408f276du);
  CHECK(all_ones.v[1] == 0x41c83b0eu);
  CHECK(all_ones.v[2] == 0xa20bc7c6u);
  CHECK(all_ones.v[3] == 0x6d5451fdu);

  const Philox4x32 pi = Philox4x32::generate(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u,
                                             0xa4093822u, 0x299f31d0u);
  CHECK(pi.v[0] == 0xd16cfe09u);
  CHECK(pi.v[1] == 0x94fdccebu);
  CHECK(pi.v[2] == 0x5001e420u);
  CHECK(pi.v[3] == 0x24126ea1u);
}

TEST_CASE("dropout stream keeps about 1 - p of the elements, the same ones every time",
          "[philox]") {
  const DropoutStream stream(1234, 99, 0.25);
  constexpr int64_t n = 1 << 20;
  std::vector<char> bulk(n);
  stream.fill_keep(7, n, reinterpret_cast<bool*>(bulk.data()));
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    kept += bulk[i];
    if (i % 4099 == 0) REQUIRE(stream.keep(7 + i) == static_cast<bool>(bulk[i]));
  }
  // Binomial(n, 0.75): the standard deviation is about 443, so 5 sigma is about 0.2%.
  CHECK(std::abs(static_cast<double>(kept) / n - 0.75) < 0.0025);
}

TEST_CASE("dropout stream with p = 0 keeps everything and with p = 1 nothing", "[philox]") {
  const DropoutStream keep_all(5, 0, 0.0), drop_all(5, 0, 1.0);
  for (uint64_t i = 0; i < 4096; ++i) {
    REQUIRE(keep_all.keep(i));
    REQUIRE_FALSE(drop_all.keep(i));
  }
}
