// Integer rounding for block counts and padded sizes, in one place for every kernel.
// constexpr (so inline): each CPU level's objects may carry a copy of these, and any copy is
// the same plain integer arithmetic.
#pragma once

#include <cstdint>

namespace qkv_attention::cpu {

// ceil(x / y) for x >= 0, y > 0: how many blocks of y cover x.
constexpr int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

// x rounded up to a multiple of `multiple` (> 0).
constexpr int64_t round_up(int64_t x, int64_t multiple) { return ceil_div(x, multiple) * multiple; }

}  // namespace qkv_attention::cpu
