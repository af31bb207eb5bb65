// Shape-only decisions of the blocked kernels: block sizes, which keys a causal row sees, how the
// backward splits its key blocks. Nothing here reads the thread count, which must never change
// what is computed (results are bitwise the same for any number of threads).
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
// 24..96 x 64..512). Through BLAS, larger blocks (vec_ops.h) amortise each call's overhead.
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

// Keys that query row i sees inside the block j0 .. j0 + n (causal: keys <= i).
inline int64_t visible_in_block(bool is_causal, int64_t i, int64_t j0, int64_t n) {
  return is_causal ? std::clamp<int64_t>(i - j0 + 1, 0, n) : n;
}

// Of keys j0 .. j0 + nk, how many any of the query rows i0 .. i0 + nq may see: causal rows
// stop at their diagonal, so the columns past the last row's diagonal are never computed.
inline int64_t columns_for(bool is_causal, int64_t i0, int64_t nq, int64_t j0, int64_t nk) {
  return is_causal ? std::clamp<int64_t>(i0 + nq - j0, 0, nk) : nk;
}

// Key blocks query rows i0 .. i0 + count see (causal: up to the last row's diagonal; none when
// the diagonal is shifted before the first key).
inline int64_t key_blocks_for(bool is_causal, int64_t kv_len, int64_t i0, int64_t count,
                              int64_t Bk) {
  const int64_t keys = is_causal ? std::clamp<int64_t>(i0 + count, 0, kv_len) : kv_len;
  return ceil_div(keys, Bk);
}

QKV_FLASH_LEVEL_END
