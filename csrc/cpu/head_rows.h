// Rows of (B, N, F) tensors and of head-layout (B, H, N, D) tensors, for GEMMs over the B*N
// positions without copying whole tensors into the layout a GEMM wants.
//
// A GEMM over positions sees a (B*N, F) matrix. A (B, N, F) input is one without a copy when its
// positions have a common stride, batch-major (row r = b*N + n: contiguous, or batch_first) or
// position-major (r = n*B + b: the (N, B, F) layout of nn.MultiheadAttention without batch_first).
// A head-layout tensor (B, H, N, D) is the (B*N, H*D) matrix whose row (b, n) holds the heads of
// position n side by side; it is never one strided matrix, so blocks of its rows and columns are
// copied in (gather) and out (scatter) of small scratch matrices, in the row order of the other
// operand.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace qkv_attention::cpu {

enum class RowOrder { kBatchMajor, kPositionMajor };

// A (B, N, F) tensor as a (B*N, F) matrix with one row stride (a view; a contiguous copy only
// when the positions have no common stride).
struct RowMatrix {
  at::Tensor matrix;  // (B*N, F)
  RowOrder order = RowOrder::kBatchMajor;
};
RowMatrix as_row_matrix(const at::Tensor& t);

// Head-layout tensors (B, H, N, D), `parts` of them side by side: the (B*N, parts*H*D) matrix
// whose row r = (b, n) (in `order`) is [part 0: heads 0..H-1 | part 1 | ...]. The tensors must
// stay alive; only their last dimension needs unit stride (with_unit_last_stride gives such a
// tensor).
class HeadRows {
 public:
  HeadRows(std::vector<at::Tensor> parts, RowOrder order);

  int64_t rows() const { return B_ * N_; }
  int64_t cols() const { return int64_t(parts_.size()) * H_ * D_; }

  // dst (row r - row_begin, column c - col_begin), row stride ld elements, <- this matrix.
  void gather(int64_t row_begin, int64_t row_end, int64_t col_begin, int64_t col_end, void* dst,
              int64_t ld) const;
  // This matrix <- src, laid out as gather's dst.
  void scatter(const void* src, int64_t ld, int64_t row_begin, int64_t row_end, int64_t col_begin,
               int64_t col_end) const;

  // t itself when its last dimension has unit stride, else a contiguous copy.
  static at::Tensor with_unit_last_stride(const at::Tensor& t);

 private:
  template <bool kGather>
  void copy(void* matrix, int64_t ld, int64_t row_begin, int64_t row_end, int64_t col_begin,
            int64_t col_end) const;

  std::vector<at::Tensor> parts_;
  RowOrder order_;
  int64_t B_, H_, N_, D_;
  int64_t item_size_;
};

}  // namespace qkv_attention::cpu
