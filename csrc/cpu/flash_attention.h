// Blocked ("flash") attention on the CPU: forward and backward, templated over the element type
// T and a set of building blocks (cpu/flash_ops.h), so that one algorithm serves AVX-512 and
// portable builds, float accumulation and float64.
//
// Forward, per task = (batch*head, block of Bq queries): for each block of Bk keys, the
// Bq x Bk scores (a GEMM against the prepacked K^T panel), masks, then an online softmax
// (running max m and sum l per row, the output accumulator rescaled when m grows) and
// O += P V (a GEMM). Only Bq x Bk scores exist at a time; the logsumexp m + log(l) is saved.
// Causal blocks above the diagonal are skipped whole.
//
// Backward, recomputing P = exp(s - logsumexp) block by block (no L x S tensor), in two passes
// that both split the work finely enough to keep every core busy even when B * H = 1:
//   pass A, per (batch*head, key block):   dV = sum_i W^T dO, dK = scale * sum_i dS^T Q;
//   pass B, per (batch*head, query block): dQ = scale * sum_j dS K (and dS for mask gradients).
// Each task owns its outputs and walks its loop in a fixed order, so the results are bitwise
// the same whatever the number of threads and whichever thread runs a task.
//
// Dropout: element n = ((b * H + h) * L + i) * S + j of the Philox stream (cpu/philox.h), the
// numbering _attention_dropout_mask uses, regenerated wherever it is needed.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/attention_kernel.h"
#include "cpu/flash_ops.h"
#include "cpu/large_buffer.h"

namespace qkv_attention::cpu::flash {

// Block sizes, chosen from the shape only (never from the thread count, which must not change
// the results). keys is a multiple of 16 (one vector of floats).
struct Blocking {
  int64_t queries, keys;
};

inline int64_t round_up(int64_t x, int64_t multiple) {
  return (x + multiple - 1) / multiple * multiple;
}
inline int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

// Forward: Bq = 48 query rows (8 register tiles of 6) against Ops::kForwardKeys keys (256
// floats, 512 bfloat16: about 48 KiB of scores, so the GEMM's K^T panel and the scores share L2
// and the rows being streamed stay in L1). Measured on Zen 4 against 24..96 x 64..512.
template <class Ops>
Blocking forward_blocking(const AttentionShape& shape) {
  return Blocking{std::min<int64_t>(48, std::max<int64_t>(shape.q_len, 1)),
                  std::min<int64_t>(Ops::kForwardKeys,
                                    round_up(std::max<int64_t>(shape.kv_len, 1), 16))};
}

// Backward: 48 x 128. Three Bq x Bk blocks (scores, dP/dS, weights) and the 128-row dK and dV
// accumulators fit L2; 48 x 64 was 5-10% slower (the dK/dV accumulators are loaded and stored
// once per query block), larger blocks no faster.
inline Blocking backward_blocking(const AttentionShape& shape) {
  return Blocking{std::min<int64_t>(48, std::max<int64_t>(shape.q_len, 1)),
                  std::min<int64_t>(128, round_up(std::max<int64_t>(shape.kv_len, 1), 16))};
}

// Runs fn(task, slot) for every task in [0, tasks): the threads take tasks one at a time from a
// shared counter (so uneven tasks, e.g. causal ones, balance), and `slot` < slots() names the
// running thread's scratch. Which thread runs a task never changes what the task computes.
class TaskPool {
 public:
  explicit TaskPool(int64_t tasks)
      : tasks_(tasks),
        slots_(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks))) {}

  int64_t slots() const { return slots_; }

  template <typename F>
  void run(const F& fn) {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, slots_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t slot = begin; slot < end; ++slot) {
        for (int64_t task = next++; task < tasks_; task = next++) fn(task, slot);
      }
    });
  }

 private:
  int64_t tasks_, slots_;
};

// A matrix of rows per (batch, head): element (b, h, row, col) at
// data[b * batch + h * head + row * ld + col].
template <typename Acc>
struct RowsView {
  const Acc* data = nullptr;
  int64_t batch = 0, head = 0, ld = 0;
  const Acc* rows(int64_t b, int64_t h, int64_t row) const {
    return data + b * batch + h * head + row * ld;
  }
};

// dst[0, n) = src[c * col_stride] converted to Acc.
template <typename Ops, typename T, typename Acc>
void convert_row(const T* src, int64_t col_stride, int64_t n, Acc* dst) {
  if (col_stride == 1) {
    if constexpr (std::is_same_v<T, Acc>) {
      std::copy(src, src + n, dst);
    } else {
      Ops::to_acc(src, n, dst);
    }
    return;
  }
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<Acc>(src[c * col_stride]);
}

// Where the keep bits start in a slot: the first 8-byte boundary at or after `p`.
template <typename Acc>
uint64_t* keep_bits_at(Acc* p) {
  const uintptr_t address = (reinterpret_cast<uintptr_t>(p) + 7) & ~uintptr_t(7);
  return reinterpret_cast<uint64_t*>(address);
}

// Acc cells that hold the keep bits of Bk keys, with room for the alignment.
template <typename Acc>
int64_t keep_cells(int64_t Bk) {
  return (ceil_div(Bk, 64) * 8 + 8 + int64_t(sizeof(Acc)) - 1) / int64_t(sizeof(Acc));
}

// Rows (b, h, row0 .. row0 + count) of a (B, H, N, C) operand as Acc, ld returned: the operand
// itself when it already is Acc with unit column stride, else converted into `scratch`.
template <typename Ops, typename T, typename Acc>
const Acc* rows_as_acc(const T* base, const Strides4& st, int64_t b, int64_t h, int64_t row0,
                       int64_t count, int64_t cols, Acc* scratch, int64_t& ld) {
  const T* first = base + b * st.batch + h * st.head + row0 * st.row;
  if constexpr (std::is_same_v<T, Acc>) {
    if (st.col == 1 || cols <= 1) {
      ld = st.row;
      return first;
    }
  }
  for (int64_t r = 0; r < count; ++r) {
    convert_row<Ops>(first + r * st.row, st.col, cols, scratch + r * cols);
  }
  ld = cols;
  return scratch;
}

// The whole (B, H, N, C) operand as Acc rows: a view of it, or a packed copy in `storage`.
template <typename Ops, typename T, typename Acc>
RowsView<Acc> operand_rows(const T* base, const Strides4& st, int64_t B, int64_t H, int64_t N,
                           int64_t C, LargeBuffer<Acc>& storage) {
  if constexpr (std::is_same_v<T, Acc>) {
    if (st.col == 1 || C <= 1) return RowsView<Acc>{base, st.batch, st.head, st.row};
  }
  storage.assign_zeros(size_t(std::max<int64_t>(B * H * N * C, 1)));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      int64_t ld = 0;
      rows_as_acc<Ops>(base, st, bh / H, bh % H, 0, N, C, storage.data() + bh * N * C, ld);
    }
  });
  return RowsView<Acc>{storage.data(), H * N * C, N * C, C};
}

// B operands of the GEMMs, one per (batch*head, block): either views of Acc rows (when the op
// set takes plain row-major B and the rows have unit column stride) or packed copies.
template <class Ops>
class BOperands {
 public:
  using Acc = typename Ops::acc_t;
  using Elem = typename Ops::b_elem;

  // Blocks of `block` rows of `rows` (N rows per batch*head, C columns): B = the block itself
  // (K = rows in the block, N = C), for P V, W^T dO, dS^T Q and dS K.
  static BOperands row_blocks(const RowsView<Acc>& rows, int64_t B, int64_t H, int64_t N,
                              int64_t C, int64_t block) {
    BOperands op(B, H, N, block);
    if constexpr (Ops::kPlainB) {
      op.view_ = rows;
      op.plain_ = true;
      return op;
    }
    op.pack(rows, C, /*transposed=*/false);
    return op;
  }

  // Blocks transposed: B = block^T (K = C, N = rows in the block), for Q K^T and dO V^T.
  static BOperands transposed_blocks(const RowsView<Acc>& rows, int64_t B, int64_t H, int64_t N,
                                     int64_t C, int64_t block) {
    BOperands op(B, H, N, block);
    op.pack(rows, C, /*transposed=*/true);
    return op;
  }

  // Block `blk` of (batch*head) bh, and its leading dimension.
  const Elem* at(int64_t bh, int64_t blk) const {
    if constexpr (Ops::kPlainB) {
      if (plain_) return view_.rows(bh / H_, bh % H_, blk * block_);
    }
    return packed_.data() + (bh * blocks_ + blk) * panel_;
  }
  int64_t ld() const { return plain_ ? view_.ld : ld_; }

 private:
  BOperands(int64_t B, int64_t H, int64_t N, int64_t block)
      : B_(B), H_(H), N_(N), block_(block), blocks_(ceil_div(N, block)) {}

  void pack(const RowsView<Acc>& rows, int64_t C, bool transposed) {
    // Every panel has the layout of a full block; the last one is packed with its true size.
    ld_ = Ops::packed_ld(transposed ? block_ : C);
    panel_ = transposed ? Ops::packed_size(C, block_) : Ops::packed_size(block_, C);
    packed_.assign_zeros(size_t(std::max<int64_t>(B_ * H_ * blocks_ * panel_, 1)));
    at::parallel_for(0, B_ * H_ * blocks_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / blocks_, blk = task % blocks_;
        const int64_t r0 = blk * block_, count = std::min(block_, N_ - r0);
        const Acc* src = rows.rows(bh / H_, bh % H_, r0);
        Elem* dst = packed_.data() + task * panel_;
        if (transposed) {
          Ops::pack_b(src, 1, rows.ld, C, count, dst, ld_);  // B[c, r] = rows[r, c]
        } else {
          Ops::pack_b(src, rows.ld, 1, count, C, dst, ld_);
        }
      }
    });
  }

  int64_t B_, H_, N_, block_, blocks_;
  bool plain_ = false;
  RowsView<Acc> view_;
  LargeBuffer<Elem> packed_;
  int64_t ld_ = 0, panel_ = 0;
};

// The masks of one query row over keys j0 .. j0 + n, as segments for Ops::prepare_row. A mask
// broadcast along the keys (stride 0) becomes a constant (`bias`, or no valid key at all); one
// with another stride is gathered into `gathered`.
template <typename T, typename Acc>
class RowMasks {
 public:
  explicit RowMasks(const AttentionShape& shape) : shape_(shape) {}

  // Returns the number of segments written to `segments` (at most kMasks); adds to `bias` (in
  // natural units) and sets `valid` to 0 when a broadcast bool mask forbids every key.
  int segments(int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, MaskSegment* segments,
               Acc* gathered, Acc& bias, int64_t& valid) const {
    int count = 0;
    for (int m = 0; m < AttentionShape::kMasks; ++m) {
      const MaskOperand& mask = shape_.masks[m];
      if (mask.kind == MaskKind::kNone) continue;
      const Strides4& st = mask.strides;
      const int64_t elem = b * st.batch + h * st.head + i * st.row + j0 * st.col;
      if (mask.kind == MaskKind::kBool) {
        const bool* data = static_cast<const bool*>(mask.data) + elem;
        if (st.col == 1) {
          segments[count++] = MaskSegment{MaskSegmentKind::kBool, data};
        } else if (st.col == 0) {
          if (!data[0]) valid = 0;
        } else {
          Acc* row = gathered + m * n;
          for (int64_t j = 0; j < n; ++j) {
            row[j] = data[j * st.col] ? Acc(0) : -std::numeric_limits<Acc>::infinity();
          }
          segments[count++] = MaskSegment{additive_kind<Acc>(), row};
        }
      } else {
        const T* data = static_cast<const T*>(mask.data) + elem;
        if (st.col == 1) {
          segments[count++] = MaskSegment{additive_kind<T>(), data};
        } else if (st.col == 0) {
          bias += static_cast<Acc>(data[0]);
        } else {
          Acc* row = gathered + m * n;
          for (int64_t j = 0; j < n; ++j) row[j] = static_cast<Acc>(data[j * st.col]);
          segments[count++] = MaskSegment{additive_kind<Acc>(), row};
        }
      }
    }
    return count;
  }

 private:
  template <typename U>
  static MaskSegmentKind additive_kind() {
    if constexpr (std::is_same_v<U, double>) return MaskSegmentKind::kDouble;
    else if constexpr (std::is_same_v<U, c10::BFloat16>) return MaskSegmentKind::kBFloat16;
    else if constexpr (std::is_same_v<U, c10::Half>) return MaskSegmentKind::kHalf;
    else return MaskSegmentKind::kFloat;
  }

  const AttentionShape& shape_;
};

inline double kept_scale_of(double dropout_p) {
  return dropout_p < 1.0 ? 1.0 / (1.0 - dropout_p) : 0.0;
}

// Keys that query row i sees inside the block j0 .. j0 + n (causal: keys <= i).
inline int64_t visible_in_block(const AttentionShape& shape, int64_t i, int64_t j0, int64_t n) {
  return shape.is_causal ? std::clamp<int64_t>(i - j0 + 1, 0, n) : n;
}

// Of keys j0 .. j0 + nk, how many any of the query rows i0 .. i0 + nq may see: causal rows
// stop at their diagonal, so the columns past the last row's diagonal are never computed.
inline int64_t columns_for(const AttentionShape& shape, int64_t i0, int64_t nq, int64_t j0,
                           int64_t nk) {
  return shape.is_causal ? std::clamp<int64_t>(i0 + nq - j0, 0, nk) : nk;
}

// Key blocks query rows i0 .. i0 + count see (causal: up to the last row's diagonal).
inline int64_t key_blocks_for(const AttentionShape& shape, int64_t i0, int64_t count, int64_t Bk) {
  const int64_t keys = shape.is_causal ? std::min(shape.kv_len, i0 + count) : shape.kv_len;
  return ceil_div(keys, Bk);
}

// Per-thread scratch, carved from one allocation per call.
template <typename Acc>
class Scratch {
 public:
  Scratch(int64_t slots, int64_t floats_per_slot)
      : per_slot_(round_up(std::max<int64_t>(floats_per_slot, 1), 16)),
        storage_(size_t(slots * per_slot_ + 16)) {}
  Acc* slot(int64_t s) { return storage_.data() + s * per_slot_; }

 private:
  int64_t per_slot_;
  LargeBuffer<Acc> storage_;
};

// ---------------------------------------------------------------------------------------------
// Forward

template <typename T, class Ops>
void flash_forward(const AttentionForwardParams<T>& p) {
  using Acc = typename Ops::acc_t;
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  const int64_t B = p.batch, H = p.heads, L = p.q_len, S = p.kv_len;
  const int64_t D = p.head_dim, Dv = p.value_dim, BH = B * H;
  Acc* logsumexp = static_cast<Acc*>(p.logsumexp);
  if (BH == 0 || L == 0) return;
  if (S == 0) {  // no key at all: every row is empty
    std::fill(p.output, p.output + BH * L * Dv, T(0));
    std::fill(logsumexp, logsumexp + BH * L, kNegInf);
    return;
  }
  const Blocking blocking = forward_blocking<Ops>(p);
  const int64_t Bq = blocking.queries, Bk = blocking.keys;
  const int64_t query_blocks = ceil_div(L, Bq), key_blocks = ceil_div(S, Bk);

  // K^T and V per key block, as the GEMMs' B operands.
  LargeBuffer<Acc> key_storage, value_storage;
  const RowsView<Acc> key_rows = operand_rows<Ops>(p.key, p.key_strides, B, H, S, D, key_storage);
  const auto key_t = BOperands<Ops>::transposed_blocks(key_rows, B, H, S, D, Bk);
  key_storage.release();
  const RowsView<Acc> value_rows =
      operand_rows<Ops>(p.value, p.value_strides, B, H, S, Dv, value_storage);
  const auto values = BOperands<Ops>::row_blocks(value_rows, B, H, S, Dv, Bk);

  const Acc scale = static_cast<Acc>(p.scale);
  const Acc kept_scale = static_cast<Acc>(kept_scale_of(p.dropout_p));
  const bool dropout = p.dropout_p > 0;
  const DropoutKey dropout_key = DropoutKey::make(p.seed, p.offset, p.dropout_p);
  const RowMasks<T, Acc> masks(p);

  // scores (Bq x Bk), output accumulator (Bq x Dv), query rows (Bq x D), row max, row sum and
  // block max (Bq each), gathered masks (2 x Bk), keep bits.
  const int64_t slot_size = Bq * Bk + Bq * Dv + Bq * D + 3 * Bq + 2 * Bk + keep_cells<Acc>(Bk);
  TaskPool pool(BH * query_blocks);
  Scratch<Acc> scratch(pool.slots(), slot_size);

  pool.run([&](int64_t task, int64_t slot) {
    // Causal: the longest tasks (last query blocks) first, so the tail of the run is short.
    const int64_t qb = query_blocks - 1 - task / BH, bh = task % BH;
    const int64_t b = bh / H, h = bh % H;
    const int64_t i0 = qb * Bq, nq = std::min(Bq, L - i0);
    Acc* scores = scratch.slot(slot);
    Acc* out_acc = scores + Bq * Bk;
    Acc* q_buf = out_acc + Bq * Dv;
    Acc* row_max = q_buf + Bq * D;
    Acc* row_sum = row_max + Bq;
    Acc* block_max = row_sum + Bq;
    Acc* gathered = block_max + Bq;
    uint64_t* keep = keep_bits_at(gathered + 2 * Bk);

    int64_t ldq = 0;
    const Acc* q = rows_as_acc<Ops>(p.query, p.query_strides, b, h, i0, nq, D, q_buf, ldq);
    std::fill(row_max, row_max + nq, kNegInf);
    std::fill(row_sum, row_sum + nq, Acc(0));
    std::fill(out_acc, out_acc + nq * Dv, Acc(0));
    const int64_t visible_blocks = key_blocks_for(p, i0, nq, Bk);

    // Scores of the first nc keys of block kb for every row, masked; row
    // maxima to block_max. Returns nc (keys past it are hidden from all rows by causality).
    auto block_scores = [&](int64_t kb) {
      const int64_t j0 = kb * Bk, nc = columns_for(p, i0, nq, j0, std::min(Bk, S - j0));
      Ops::gemm(nq, nc, D, q, ldq, 1, key_t.at(bh, kb), key_t.ld(), scores, Bk, false);
      for (int64_t r = 0; r < nq; ++r) {
        MaskSegment segments[AttentionShape::kMasks];
        Acc bias = 0;
        int64_t valid = visible_in_block(p, i0 + r, j0, nc);
        const int count = masks.segments(b, h, i0 + r, j0, nc, segments, gathered, bias, valid);
        block_max[r] = Ops::prepare_row(scores + r * Bk, nc, scale, bias, valid, segments, count);
      }
      return nc;
    };

    for (int64_t kb = 0; kb < visible_blocks; ++kb) {
      const int64_t j0 = kb * Bk, nk = block_scores(kb);
      for (int64_t r = 0; r < nq; ++r) {
        const Acc m_old = row_max[r];
        const Acc m_new = block_max[r] > m_old ? block_max[r] : m_old;
        // exp is taken relative to a finite value, 0 while the row has seen only -inf.
        const Acc m_use = m_new == kNegInf ? Acc(0) : m_new;
        const Acc alpha = m_old == kNegInf ? Acc(0) : std::exp(m_old - m_use);
        if (dropout) Ops::keep_bits(dropout_key, uint64_t((bh * L + i0 + r) * S + j0), nk, keep);
        const Acc sum = Ops::exp_row(scores + r * Bk, nk, m_use, dropout ? keep : nullptr);
        row_sum[r] = row_sum[r] * alpha + sum;
        row_max[r] = m_new;
        if (alpha != Acc(1)) {
          Acc* o = out_acc + r * Dv;
          for (int64_t d = 0; d < Dv; ++d) o[d] *= alpha;
        }
      }
      Ops::gemm(nq, Dv, nk, scores, Bk, 1, values.at(bh, kb), values.ld(), out_acc, Dv, true);
    }

    // out = acc / l (times the dropout scale); logsumexp = m + log(l). A row with l = 0 saw no
    // key: zeros and -inf. NaN in l (a NaN score) gives NaN out.
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t row = bh * L + i0 + r;
      const Acc l = row_sum[r];
      T* out_row = p.output + row * Dv;
      if (l == Acc(0)) {
        std::fill(out_row, out_row + Dv, T(0));
        logsumexp[row] = kNegInf;
        row_max[r] = std::numeric_limits<Acc>::infinity();  // the logsumexp, for the weights
        continue;
      }
      const Acc m_use = row_max[r] == kNegInf ? Acc(0) : row_max[r];
      Ops::from_acc(out_acc + r * Dv, Dv, kept_scale / l, out_row);
      row_max[r] = m_use + std::log(l);
      logsumexp[row] = row_max[r];
    }

    // The weights on request: recomputed from q, k and the logsumexp, with the same dropout.
    if (p.weights) {
      for (int64_t kb = 0; kb < key_blocks; ++kb) {
        const int64_t j0 = kb * Bk, nk = std::min(Bk, S - j0);
        const int64_t nc = kb < visible_blocks ? block_scores(kb) : 0;
        for (int64_t r = 0; r < nq; ++r) {
          T* w_row = p.weights + (bh * L + i0 + r) * S + j0;
          std::fill(w_row + nc, w_row + nk, T(0));
          if (nc == 0) continue;
          if (dropout) Ops::keep_bits(dropout_key, uint64_t((bh * L + i0 + r) * S + j0), nc, keep);
          Ops::exp_row(scores + r * Bk, nc, row_max[r], dropout ? keep : nullptr);
          Ops::from_acc(scores + r * Bk, nc, kept_scale, w_row);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward

// How many groups the key blocks of one (batch*head) are split into, each group a task with a
// partial dQ of its own (summed in group order at the end). One group per head when there are
// enough heads to share out; more when there are few, so that B * H = 1 still gives 8 tasks.
// From the shape only: the thread count must not change the summation order.
inline int64_t key_groups(int64_t heads_total, int64_t key_blocks) {
  constexpr int64_t kMinTasks = 8;
  if (heads_total >= kMinTasks) return 1;
  return std::max<int64_t>(1, std::min(key_blocks, ceil_div(kMinTasks, heads_total)));
}

template <typename T, class Ops>
void flash_backward(const AttentionBackwardParams<T>& p) {
  using Acc = typename Ops::acc_t;
  constexpr Acc kInf = std::numeric_limits<Acc>::infinity();
  const int64_t B = p.batch, H = p.heads, L = p.q_len, S = p.kv_len;
  const int64_t D = p.head_dim, Dv = p.value_dim, BH = B * H;
  Acc* grad_scores = static_cast<Acc*>(p.grad_scores);
  if (BH == 0) return;
  if (L == 0 || S == 0) {  // nothing attends to anything: all gradients are zero
    std::fill(p.grad_query, p.grad_query + BH * L * D, T(0));
    std::fill(p.grad_key, p.grad_key + BH * S * D, T(0));
    std::fill(p.grad_value, p.grad_value + BH * S * Dv, T(0));
    return;
  }
  const Blocking blocking = backward_blocking(p);
  const int64_t Bq = blocking.queries, Bk = blocking.keys;
  const int64_t query_blocks = ceil_div(L, Bq), key_blocks = ceil_div(S, Bk);

  // A operands (rows of Q and dO) and B operands (K, Q, dO per block; K^T and V^T are packed
  // per key block by the task that owns it, so they never exist for the whole sequence).
  LargeBuffer<Acc> key_storage, value_storage, query_storage, grad_out_storage;
  const RowsView<Acc> query_rows =
      operand_rows<Ops>(p.query, p.query_strides, B, H, L, D, query_storage);
  const RowsView<Acc> grad_out_rows =
      operand_rows<Ops>(p.grad_output, p.grad_output_strides, B, H, L, Dv, grad_out_storage);
  const RowsView<Acc> key_rows = operand_rows<Ops>(p.key, p.key_strides, B, H, S, D, key_storage);
  const RowsView<Acc> value_rows =
      operand_rows<Ops>(p.value, p.value_strides, B, H, S, Dv, value_storage);
  const auto keys = BOperands<Ops>::row_blocks(key_rows, B, H, S, D, Bk);
  const auto queries = BOperands<Ops>::row_blocks(query_rows, B, H, L, D, Bq);
  const auto grad_outs = BOperands<Ops>::row_blocks(grad_out_rows, B, H, L, Dv, Bq);

  // K^T and V^T of one key block, packed as B operands (ld = panel_ld).
  using Elem = typename Ops::b_elem;
  const int64_t panel_ld = Ops::packed_ld(Bk);
  const int64_t kt_size = Ops::packed_size(D, Bk), vt_size = Ops::packed_size(Dv, Bk);
  auto pack_key_block = [&](int64_t bh, int64_t kb, Elem* kt, Elem* vt) {
    const int64_t b = bh / H, h = bh % H, j0 = kb * Bk, nk = std::min(Bk, S - j0);
    Ops::pack_b(key_rows.rows(b, h, j0), 1, key_rows.ld, D, nk, kt, panel_ld);
    Ops::pack_b(value_rows.rows(b, h, j0), 1, value_rows.ld, Dv, nk, vt, panel_ld);
  };

  const Acc scale = static_cast<Acc>(p.scale);
  const Acc kept_scale = static_cast<Acc>(kept_scale_of(p.dropout_p));
  const bool dropout = p.dropout_p > 0;
  const DropoutKey dropout_key = DropoutKey::make(p.seed, p.offset, p.dropout_p);
  const RowMasks<T, Acc> masks(p);
  const Acc* logsumexp = static_cast<const Acc*>(p.logsumexp);

  // Per row: the logsumexp (+inf for a row that saw no key, so that its P is 0), and
  // delta = sum_j P_ij dP'_ij = dO_i . O_i (+ the weights' own gradient term, below).
  LargeBuffer<Acc> lse2(size_t(BH * L)), delta(size_t(BH * L));
  at::parallel_for(0, BH * L, 256, [&](int64_t begin, int64_t end) {
    std::vector<Acc> o_row(size_t(std::max<int64_t>(Dv, 1)));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / L, i = row % L, b = bh / H, h = bh % H;
      const Acc lse = logsumexp[row];
      lse2[row] = lse == -kInf ? kInf : lse;
      int64_t ld = 0;
      const Acc* o = rows_as_acc<Ops>(p.output, p.output_strides, b, h, i, 1, Dv, o_row.data(), ld);
      const Acc* d_o = grad_out_rows.rows(b, h, i);
      Acc sum = 0;
      for (int64_t d = 0; d < Dv; ++d) sum += o[d] * d_o[d];
      delta[row] = sum;
    }
  });

  // Scratch per thread: scores/P, dP/dS, W (Bq x Bk each); the dK and dV accumulators; per-row
  // sums; gathered masks and the grad_weights row; keep bits.
  const int64_t slot_floats = 3 * Bq * Bk + Bk * D + Bk * Dv + Bq + 3 * Bk + keep_cells<Acc>(Bk);
  struct Block {  // one slot's buffers
    Acc *scores, *grad_p, *weights, *dk, *dv, *row_extra, *gathered, *gw_row;
    uint64_t* keep;
  };
  auto carve = [&](Acc* base) {
    Block blk;
    blk.scores = base;                        // Bq x Bk
    blk.grad_p = blk.scores + Bq * Bk;        // Bq x Bk
    blk.weights = blk.grad_p + Bq * Bk;       // Bq x Bk
    blk.dk = blk.weights + Bq * Bk;           // Bk x D
    blk.dv = blk.dk + Bk * D;                 // Bk x Dv
    blk.row_extra = blk.dv + Bk * Dv;         // Bq
    blk.gathered = blk.row_extra + Bq;        // 2 x Bk
    blk.gw_row = blk.gathered + 2 * Bk;       // Bk
    blk.keep = keep_bits_at(blk.gw_row + Bk);
    return blk;
  };

  // Masked scores of rows i0 .. i0 + nq against the first nc keys of block kb, then
  // P = exp(s - lse) (times the keep bits when `apply_keep`), in blk.scores. Returns nc (the
  // keys past it are hidden from all these rows by causality).
  auto probabilities = [&](Block& blk, int64_t bh, int64_t i0, int64_t nq, int64_t kb,
                           const Elem* kt, bool apply_keep) {
    const int64_t b = bh / H, h = bh % H;
    const int64_t j0 = kb * Bk, nk = columns_for(p, i0, nq, j0, std::min(Bk, S - j0));
    Ops::gemm(nq, nk, D, query_rows.rows(b, h, i0), query_rows.ld, 1, kt, panel_ld, blk.scores,
              Bk, false);
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t i = i0 + r, row = bh * L + i;
      Acc* s_row = blk.scores + r * Bk;
      MaskSegment segments[AttentionShape::kMasks];
      Acc bias = 0;
      int64_t valid = visible_in_block(p, i, j0, nk);
      const int count = masks.segments(b, h, i, j0, nk, segments, blk.gathered, bias, valid);
      Ops::prepare_row(s_row, nk, scale, bias, valid, segments, count);
      if (apply_keep) Ops::keep_bits(dropout_key, uint64_t(row * S + j0), nk, blk.keep);
      Ops::exp_row(s_row, nk, lse2[row], apply_keep ? blk.keep : nullptr);
    }
    return nk;
  };

  // The grad_weights row (b, h, i) over keys j0 .. j0 + nk, as Acc, in blk.gw_row.
  auto grad_weights_row = [&](Block& blk, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t nk) {
    const Strides4& gs = p.grad_weights_strides;
    convert_row<Ops>(p.grad_weights + b * gs.batch + h * gs.head + i * gs.row + j0 * gs.col,
                     gs.col, nk, blk.gw_row);
  };

  // Runs body(task, block scratch, K^T panel, V^T panel) for tasks [0, count): the scratch and
  // the panels are allocated once per pool slot, not per task.
  auto run_with_panels = [&](int64_t count, const auto& body) {
    TaskPool pool(count);
    Scratch<Acc> scratch(pool.slots(), slot_floats);
    LargeBuffer<Elem> panels(size_t(pool.slots() * (kt_size + vt_size)));
    pool.run([&](int64_t task, int64_t slot) {
      Block blk = carve(scratch.slot(slot));
      Elem* kt = panels.data() + slot * (kt_size + vt_size);
      body(task, blk, kt, kt + kt_size);
    });
  };

  // A second look at delta, per query block, recomputing P:
  //  - when the weights have a gradient of their own, delta also carries sum_j W_ij gW_ij;
  //  - when a mask gradient (dS itself, summed over broadcast dimensions) is asked for a half
  //    type, delta is recomputed as sum_j W_ij dP_ij instead of dO . O: the output was rounded
  //    to the half type, and the rows of dS would then no longer sum to 0 (for a scalar mask,
  //    an error of 2^-9 |delta| per row, summed over every row).
  const bool exact_delta = grad_scores != nullptr && !std::is_same_v<T, Acc>;
  if (p.grad_weights || exact_delta) {
    run_with_panels(BH * query_blocks, [&](int64_t task, Block& blk, Elem* kt, Elem* vt) {
      const int64_t bh = task / query_blocks, qb = task % query_blocks;
      const int64_t b = bh / H, h = bh % H, i0 = qb * Bq, nq = std::min(Bq, L - i0);
      std::fill(blk.row_extra, blk.row_extra + nq, Acc(0));
      for (int64_t kb = 0; kb < key_blocks_for(p, i0, nq, Bk); ++kb) {
        // (This rarely needed pass packs K^T and V^T again for each query block.)
        pack_key_block(bh, kb, kt, vt);
        // P * keep in blk.scores; with exact_delta, dP = dO V^T in blk.grad_p.
        const int64_t j0 = kb * Bk, nk = probabilities(blk, bh, i0, nq, kb, kt, dropout);
        if (exact_delta) {
          Ops::gemm(nq, nk, Dv, grad_out_rows.rows(b, h, i0), grad_out_rows.ld, 1, vt, panel_ld,
                    blk.grad_p, Bk, false);
        }
        for (int64_t r = 0; r < nq; ++r) {
          Acc* dp_row = blk.grad_p + r * Bk;
          if (!exact_delta) std::fill(dp_row, dp_row + nk, Acc(0));
          if (p.grad_weights) {
            grad_weights_row(blk, b, h, i0 + r, j0, nk);
            for (int64_t j = 0; j < nk; ++j) dp_row[j] += blk.gw_row[j];
          }
          const Acc* s_row = blk.scores + r * Bk;
          Acc sum = 0;
          for (int64_t j = 0; j < nk; ++j) sum += s_row[j] * dp_row[j];
          blk.row_extra[r] += sum;
        }
      }
      for (int64_t r = 0; r < nq; ++r) {
        Acc& d = delta[bh * L + i0 + r];
        d = (exact_delta ? Acc(0) : d) + blk.row_extra[r] * kept_scale;
      }
    });
  }

  // The main pass: one task per (batch*head, group of key blocks). For each of its key blocks
  // it owns dK and dV, summing over the query blocks; dQ goes to the group's partial sum.
  const int64_t groups = key_groups(BH, key_blocks);
  // With one group and float gradients, dQ is accumulated in the output itself.
  constexpr bool kGradIsAcc = std::is_same_v<T, Acc>;
  const bool dq_in_place = kGradIsAcc && groups == 1;
  LargeBuffer<Acc> dq_partial(dq_in_place ? 0 : size_t(BH * groups * L * D));
  auto dq_of = [&](int64_t bh, int64_t g) -> Acc* {
    if constexpr (kGradIsAcc) {
      if (dq_in_place) return reinterpret_cast<Acc*>(p.grad_query) + bh * L * D;
    }
    return dq_partial.data() + (bh * groups + g) * L * D;
  };
  {
    run_with_panels(BH * groups, [&](int64_t task, Block& blk, Elem* kt, Elem* vt) {
      const int64_t bh = task / groups, g = task % groups;
      const int64_t b = bh / H, h = bh % H;
      Acc* dq = dq_of(bh, g);
      std::fill(dq, dq + L * D, Acc(0));
      // Key blocks g, g + groups, ...: interleaved, so that causal groups get equal work.
      for (int64_t kb = g; kb < key_blocks; kb += groups) {
        const int64_t j0 = kb * Bk, nk = std::min(Bk, S - j0);
        pack_key_block(bh, kb, kt, vt);
        std::fill(blk.dk, blk.dk + nk * D, Acc(0));
        std::fill(blk.dv, blk.dv + nk * Dv, Acc(0));
        // Causal: rows before j0 see none of these keys.
        const int64_t first_qb = p.is_causal ? std::min(j0 / Bq, query_blocks) : 0;
        if (grad_scores) {
          for (int64_t i = 0; i < std::min(first_qb * Bq, L); ++i) {
            Acc* row = grad_scores + (bh * L + i) * S + j0;
            std::fill(row, row + nk, Acc(0));
          }
        }
        for (int64_t qb = first_qb; qb < query_blocks; ++qb) {
          const int64_t i0 = qb * Bq, nq = std::min(Bq, L - i0);
          const Acc* d_o = grad_out_rows.rows(b, h, i0);
          // nc <= nk: the keys this query block sees (all but causal ones past its diagonal).
          const int64_t nc = probabilities(blk, bh, i0, nq, kb, kt, false);
          // dP = dO V^T (+ grad_weights), then W = P * keep * kept_scale and
          // dS = P * (dP * keep * kept_scale - delta).
          Ops::gemm(nq, nc, Dv, d_o, grad_out_rows.ld, 1, vt, panel_ld, blk.grad_p, Bk, false);
          // Without dropout the weights are P itself (the kept scale is 1).
          Acc* w = dropout ? blk.weights : nullptr;
          for (int64_t r = 0; r < nq; ++r) {
            const int64_t i = i0 + r, row = bh * L + i;
            Acc* dp_row = blk.grad_p + r * Bk;
            if (p.grad_weights) {
              grad_weights_row(blk, b, h, i, j0, nc);
              for (int64_t j = 0; j < nc; ++j) dp_row[j] += blk.gw_row[j];
            }
            if (dropout) Ops::keep_bits(dropout_key, uint64_t(row * S + j0), nc, blk.keep);
            Ops::softmax_grad_row(blk.scores + r * Bk, dp_row, dropout ? blk.keep : nullptr,
                                  kept_scale, delta[row], nc, w ? w + r * Bk : nullptr, dp_row);
            if (grad_scores) {
              Acc* out = grad_scores + row * S + j0;
              std::copy(dp_row, dp_row + nc, out);
              std::fill(out + nc, out + nk, Acc(0));
            }
          }
          if (nc == 0) continue;
          const Acc* weights = dropout ? blk.weights : blk.scores;
          Ops::gemm(nc, Dv, nq, weights, 1, Bk, grad_outs.at(bh, qb), grad_outs.ld(), blk.dv, Dv,
                    true);  // dV += W^T dO
          Ops::gemm(nc, D, nq, blk.grad_p, 1, Bk, queries.at(bh, qb), queries.ld(), blk.dk, D,
                    true);  // dK += dS^T Q
          Ops::gemm(nq, D, nc, blk.grad_p, Bk, 1, keys.at(bh, kb), keys.ld(), dq + i0 * D, D,
                    true);  // dQ += dS K
        }
        for (int64_t r = 0; r < nk; ++r) {
          Ops::from_acc(blk.dk + r * D, D, scale, p.grad_key + (bh * S + j0 + r) * D);
          Ops::from_acc(blk.dv + r * Dv, Dv, Acc(1), p.grad_value + (bh * S + j0 + r) * Dv);
        }
      }
    });
  }

  // dQ = scale * (sum of the groups' partial sums, in group order).
  at::parallel_for(0, BH * L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / L, i = row % L;
      Acc* first = dq_of(bh, 0) + i * D;
      for (int64_t g = 1; g < groups; ++g) {
        const Acc* part = dq_of(bh, g) + i * D;
        for (int64_t d = 0; d < D; ++d) first[d] += part[d];
      }
      Ops::from_acc(first, D, scale, p.grad_query + row * D);
    }
  });
}

}  // namespace qkv_attention::cpu::flash
