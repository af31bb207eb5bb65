// Shape-only decisions of the blocked kernels: block sizes, which keys a row sees by position
// (causality, the sliding window), how the backward splits its key blocks. Nothing here reads the
// thread count, which must never change what is computed (results are bitwise the same for any
// number of threads).
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/attention_kernel.h"
#include "cpu/flash/level_namespace.h"
#include "cpu/rounding.h"

QKV_FLASH_LEVEL_BEGIN

// Block sizes. keys is a multiple of 16 (one AVX-512 vector of floats).
struct Blocking {
  int64_t queries, keys;
};

// Forward: Ops::kForwardQueries query rows against Ops::kForwardKeys keys. With the AVX-512
// micro-kernels 48 x 256 (512 for the bf16 dot product): about 48 KiB of scores, so the K^T panel
// and the scores share L2 and the rows being streamed stay in L1 (measured on Zen 4 against
// 24..96 x 64..512). Through BLAS and on AMX tiles, larger blocks (128 x 512, vec_ops.h and
// avx512_ops.h) amortise each call's overhead.
template <class Ops, typename T>
Blocking forward_blocking(const AttentionInputs<T>& shape) {
  return Blocking{
      std::min<int64_t>(Ops::kForwardQueries, std::max<int64_t>(shape.q_len, 1)),
      std::min<int64_t>(Ops::kForwardKeys, round_up(std::max<int64_t>(shape.kv_len, 1), 16))};
}

// Backward: 48 x 128. Three Bq x Bk blocks (scores, dP/dS, weights) and the 128-row dK and dV
// accumulators fit L2; 48 x 64 was 5-10% slower (the dK/dV accumulators are loaded and stored
// once per query block), larger blocks no faster.
template <typename T>
Blocking backward_blocking(const AttentionInputs<T>& shape) {
  return Blocking{std::min<int64_t>(48, std::max<int64_t>(shape.q_len, 1)),
                  std::min<int64_t>(128, round_up(std::max<int64_t>(shape.kv_len, 1), 16))};
}

// How many groups the key blocks of one (batch, key/value head) are split into in the backward,
// each group a task with a partial dQ of its own (summed in group order at the end). One group
// when there are enough tasks to share out; more when there are few, so that one head still
// gives 8 tasks.
inline int64_t key_groups(int64_t kv_heads_total, int64_t key_blocks) {
  constexpr int64_t kMinTasks = 8;
  if (kv_heads_total >= kMinTasks) return 1;
  return std::max<int64_t>(1, std::min(key_blocks, ceil_div(kMinTasks, kv_heads_total)));
}

inline double kept_scale_of(double dropout_p) {
  return dropout_p < 1.0 ? 1.0 / (1.0 - dropout_p) : 0.0;
}

// The keys each query row may see by position alone: causality (j <= i + o) and the sliding
// window (i + o - left <= j <= i + o + right), o the causal alignment. Row i sees the keys
// [begin(i), end(i)) (none when end <= begin); both ends grow with i, so the keys a block of rows
// sees, and the rows a block of keys is seen by, are ranges too, and the kernels skip every
// block outside them: with a window, work in proportion to L x window instead of L x S.
struct KeyBand {
  int64_t kv_len = 0, offset = 0;
  int64_t left = -1;   // -1: open below
  int64_t upper = -1;  // row i sees keys j <= i + offset + upper; -1 here: open above
  bool bounded_above = false;

  template <typename T>
  static KeyBand of(const AttentionInputs<T>& p) {
    // Bounds past any distance between a row and a key are as good as open; clamping them keeps
    // i + offset + upper + 1 from overflowing for a huge window.
    constexpr int64_t kFar = int64_t(1) << 60;
    KeyBand band;
    band.kv_len = p.kv_len;
    band.offset = p.causal_offset;
    band.left = p.window_left < 0 ? -1 : std::min(p.window_left, kFar);
    band.bounded_above = p.is_causal || p.window_right >= 0;
    if (p.window_right >= 0) band.upper = std::min(p.window_right, kFar);
    if (p.is_causal) band.upper = p.window_right >= 0 ? std::min<int64_t>(band.upper, 0) : 0;
    return band;
  }

  int64_t begin(int64_t i) const {
    return left < 0 ? 0 : std::clamp<int64_t>(i + offset - left, 0, kv_len);
  }
  int64_t end(int64_t i) const {
    return bounded_above ? std::clamp<int64_t>(i + offset + upper + 1, 0, kv_len) : kv_len;
  }

  // Of keys j0 .. j0 + n, row i sees [first, valid) (relative to j0; valid <= first: none).
  int64_t first_in(int64_t i, int64_t j0, int64_t n) const {
    return std::clamp<int64_t>(begin(i) - j0, 0, n);
  }
  int64_t valid_in(int64_t i, int64_t j0, int64_t n) const {
    return std::clamp<int64_t>(end(i) - j0, 0, n);
  }

  // Of keys j0 .. j0 + n, how many from the start any of rows i0 .. i0 + count may see: the
  // columns past the last row's end are never computed.
  int64_t columns(int64_t i0, int64_t count, int64_t j0, int64_t n) const {
    return valid_in(i0 + count - 1, j0, n);
  }

  // The key blocks of size Bk that rows i0 .. i0 + count see: [first, last).
  void key_blocks(int64_t i0, int64_t count, int64_t Bk, int64_t& first, int64_t& last) const {
    const int64_t lo = begin(i0), hi = end(i0 + count - 1);
    first = lo / Bk;
    last = hi > lo ? ceil_div(hi, Bk) : first;
  }

  // The rows of q_len that see some key of j0 .. j0 + n: [first, last) (n >= 1).
  void rows_seeing(int64_t j0, int64_t n, int64_t q_len, int64_t& first, int64_t& last) const {
    // end(i) > j0 when i >= j0 - offset - upper; begin(i) <= j0 + n - 1 when
    // i <= j0 + n - 1 - offset + left.
    first = bounded_above ? std::clamp<int64_t>(j0 - offset - upper, 0, q_len) : 0;
    last = left >= 0 ? std::clamp<int64_t>(j0 + n - offset + left, 0, q_len) : q_len;
    last = std::max(first, last);
  }
};

QKV_FLASH_LEVEL_END
