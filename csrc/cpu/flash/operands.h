// The kernels' view of their inputs: rows of a (B, heads, N, C) operand in the accumulation type
// (the operand itself when it already is, else converted, or dequantized from a quantized KV
// cache), and the B operands of the block GEMMs (views, or panels packed the way the level's
// GEMM wants them).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/attention_kernel.h"
#include "cpu/flash/blocking.h"
#include "cpu/flash/dequantize.h"
#include "cpu/flash/level_namespace.h"
#include "cpu/large_buffer.h"

QKV_FLASH_LEVEL_BEGIN

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
    Ops::to_acc(src, n, dst);
    return;
  }
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<Acc>(src[c * col_stride]);
}

// Rows (b, h, row0 .. row0 + count) of a (B, heads, N, C) operand as Acc, ld returned: the
// operand itself when it already is Acc with unit column stride, else converted into `scratch`.
template <typename Ops, typename T, typename Acc>
const Acc* rows_as_acc(const T* base, const Strides4& st, int64_t b, int64_t h, int64_t row0,
                       int64_t count, int64_t cols, Acc* scratch, int64_t& ld) {
  const T* first = base + b * st.batch + h * st.head + row0 * st.row;
  if constexpr (std::is_same_v<T, Acc>) {
    if ((st.col == 1 || cols <= 1) && st.row >= cols) {
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

// Rows row0 .. row0 + count of (b, h) of a key or value operand as Acc, into dst (row stride
// cols): converted from T, or dequantized when the operand is quantized.
template <typename Ops, typename T, typename Acc>
void load_rows(const T* base, const QuantizedRows& quantized, const Strides4& st, int64_t b,
               int64_t h, int64_t row0, int64_t count, int64_t cols, Acc* dst) {
  if (quantized.quantized()) {
    dequantize_rows(quantized, st, b, h, row0, count, cols, dst);
    return;
  }
  const T* first = base + b * st.batch + h * st.head + row0 * st.row;
  for (int64_t r = 0; r < count; ++r) {
    convert_row<Ops>(first + r * st.row, st.col, cols, dst + r * cols);
  }
}

// The whole (B, heads, N, C) operand as Acc rows: a view of it, or a packed copy in `storage`.
// (A view needs unit column stride and a row stride of at least C, what BLAS asks of a matrix.)
template <typename Ops, typename T, typename Acc>
RowsView<Acc> operand_rows(const T* base, const Strides4& st, int64_t B, int64_t H, int64_t N,
                           int64_t C, LargeBuffer<Acc>& storage) {
  if constexpr (std::is_same_v<T, Acc>) {
    if ((st.col == 1 || C <= 1) && st.row >= C) {
      return RowsView<Acc>{base, st.batch, st.head, st.row};
    }
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

// Whether op set Ops packs B operands straight from T's rows: bfloat16 rows for the AMX set.
template <class Ops, typename T>
constexpr bool packs_bf16_rows() {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return requires { Ops::kPacksBf16Rows; };
  } else {
    return false;
  }
}

// B operands of the GEMMs, one per (batch*head, block): either views of Acc rows (when the op
// set takes plain row-major B) or packed copies.
template <class Ops>
class BOperands {
 public:
  using Acc = typename Ops::acc_t;
  using Elem = typename Ops::b_elem;

  // Blocks of `block` rows of `rows` (N rows per batch*head, C columns): B = the block itself
  // (K = rows in the block, N = C), for P V, W^T dO, dS^T Q and dS K.
  static BOperands row_blocks(const RowsView<Acc>& rows, int64_t B, int64_t H, int64_t N, int64_t C,
                              int64_t block) {
    BOperands op(B, H, N, block);
    if constexpr (Ops::kPlainB) {
      op.view_ = rows;
      op.plain_ = true;
      return op;
    }
    op.pack(op.view_source(rows), C, /*transposed=*/false);
    return op;
  }

  // Blocks transposed: B = block^T (K = C, N = rows in the block), for Q K^T.
  static BOperands transposed_blocks(const RowsView<Acc>& rows, int64_t B, int64_t H, int64_t N,
                                     int64_t C, int64_t block) {
    BOperands op(B, H, N, block);
    op.pack(op.view_source(rows), C, /*transposed=*/true);
    return op;
  }

  // The blocks (transposed or not, as above) of a quantized (B, H, N, C) operand, packed from
  // its rows dequantized one block at a time: no dequantized copy of the whole operand exists.
  static BOperands quantized_blocks(const QuantizedRows& quantized, const Strides4& st, int64_t B,
                                    int64_t H, int64_t N, int64_t C, int64_t block,
                                    bool transposed) {
    BOperands op(B, H, N, block);
    auto dequantized = [&](int64_t bh, int64_t r0, int64_t count, Acc* buffer, int64_t& ld) {
      dequantize_rows(quantized, st, bh / H, bh % H, r0, count, C, buffer);
      ld = C;
      return static_cast<const Acc*>(buffer);
    };
    op.pack(dequantized, C, transposed, /*buffer_rows=*/block);
    return op;
  }

  // The blocks (transposed or not, as above) of a bfloat16 (B, H, N, C) operand whose columns
  // are contiguous, packed straight from its rows by an op set that takes them
  // (packs_bf16_rows below): no float copy of the operand exists.
  static BOperands bf16_blocks(const c10::BFloat16* base, const Strides4& st, int64_t B, int64_t H,
                               int64_t N, int64_t C, int64_t block, bool transposed) {
    BOperands op(B, H, N, block);
    auto rows = [&](int64_t bh, int64_t r0, int64_t, Acc*, int64_t& ld) {
      ld = st.row;
      const c10::BFloat16* first = base + (bh / H) * st.batch + (bh % H) * st.head + r0 * st.row;
      return reinterpret_cast<const uint16_t*>(first);
    };
    op.pack(rows, C, transposed);
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

  // A view's rows (bh, r0 ..) and their row stride (no buffer needed).
  auto view_source(const RowsView<Acc>& rows) const {
    return [&rows, H = H_](int64_t bh, int64_t r0, int64_t, Acc*, int64_t& ld) {
      ld = rows.ld;
      return rows.rows(bh / H, bh % H, r0);
    };
  }

  // source(bh, r0, count, buffer, ld) gives rows r0 .. r0 + count of (batch*head) bh as Acc and
  // their row stride ld, using `buffer` (buffer_rows x C per thread) if it needs room.
  template <class RowSource>
  void pack(const RowSource& source, int64_t C, bool transposed, int64_t buffer_rows = 0) {
    // Every panel has the layout of a full block; the last one is packed with its true size.
    ld_ = Ops::packed_ld(transposed ? block_ : C);
    panel_ = transposed ? Ops::packed_size(C, block_) : Ops::packed_size(block_, C);
    packed_.assign_zeros(size_t(std::max<int64_t>(B_ * H_ * blocks_ * panel_, 1)));
    at::parallel_for(0, B_ * H_ * blocks_, 1, [&](int64_t begin, int64_t end) {
      std::vector<Acc> buffer(size_t(buffer_rows * C));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / blocks_, blk = task % blocks_;
        const int64_t r0 = blk * block_, count = std::min(block_, N_ - r0);
        int64_t ld = 0;
        const auto* src = source(bh, r0, count, buffer.data(), ld);  // Acc, or bfloat16 bits
        Elem* dst = packed_.data() + task * panel_;
        if (transposed) {
          Ops::pack_b(src, 1, ld, C, count, dst, ld_);  // B[c, r] = rows[r, c]
        } else {
          Ops::pack_b(src, ld, 1, count, C, dst, ld_);
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

QKV_FLASH_LEVEL_END
