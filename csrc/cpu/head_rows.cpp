// Row views of (B, N, F) tensors and gathers/scatters of head-layout rows (see head_rows.h).
#include "cpu/head_rows.h"

#include <ATen/ATen.h>

#include <cstring>

namespace qkv_attention::cpu {

RowMatrix as_row_matrix(const at::Tensor& t) {
  const int64_t B = t.size(0), N = t.size(1), F = t.size(2);
  const auto view = [&](const at::Tensor& base, int64_t row_stride, RowOrder order) {
    return RowMatrix{
        base.as_strided({B * N, F}, {row_stride, base.stride(2)}, base.storage_offset()), order};
  };
  if (N <= 1) return view(t, t.stride(0), RowOrder::kBatchMajor);  // rows are the batch entries
  if (B <= 1 || t.stride(0) == N * t.stride(1)) return view(t, t.stride(1), RowOrder::kBatchMajor);
  if (t.stride(1) == B * t.stride(0)) return view(t, t.stride(0), RowOrder::kPositionMajor);
  const at::Tensor contiguous = t.contiguous();
  return view(contiguous, contiguous.stride(1), RowOrder::kBatchMajor);
}

HeadRows::HeadRows(std::vector<at::Tensor> parts, RowOrder order)
    : parts_(std::move(parts)), order_(order) {
  TORCH_INTERNAL_ASSERT(!parts_.empty());
  const at::Tensor& first = parts_.front();
  B_ = first.size(0);
  H_ = first.size(1);
  N_ = first.size(2);
  D_ = first.size(3);
  item_size_ = int64_t(first.element_size());
  for (const at::Tensor& part : parts_) {
    TORCH_INTERNAL_ASSERT(part.sizes() == first.sizes() && part.dtype() == first.dtype());
    TORCH_INTERNAL_ASSERT(part.numel() == 0 || part.size(3) <= 1 || part.stride(3) == 1);
  }
}

at::Tensor HeadRows::with_unit_last_stride(const at::Tensor& t) {
  // An empty tensor counts as contiguous whatever its strides; it is never read.
  return t.numel() == 0 || t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous();
}

template <bool kGather>
void HeadRows::copy(void* matrix, int64_t ld, int64_t row_begin, int64_t row_end, int64_t col_begin,
                    int64_t col_end) const {
  if (row_begin >= row_end || col_begin >= col_end) return;
  const int64_t part_cols = H_ * D_;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const bool batch_major = order_ == RowOrder::kBatchMajor;
    const int64_t b = batch_major ? r / N_ : r % B_;
    const int64_t n = batch_major ? r % N_ : r / B_;
    char* row = static_cast<char*>(matrix) + (r - row_begin) * ld * item_size_;
    // Walk the columns head by head: each piece is a run of one head's D features.
    for (int64_t c = col_begin; c < col_end;) {
      const int64_t p = c / part_cols, h = (c % part_cols) / D_, d = c % D_;
      const int64_t len = std::min(D_ - d, col_end - c);
      const at::Tensor& part = parts_[size_t(p)];
      char* element =
          static_cast<char*>(part.data_ptr()) +
          (b * part.stride(0) + h * part.stride(1) + n * part.stride(2) + d) * item_size_;
      char* slot = row + (c - col_begin) * item_size_;
      if constexpr (kGather) {
        std::memcpy(slot, element, size_t(len * item_size_));
      } else {
        std::memcpy(element, slot, size_t(len * item_size_));
      }
      c += len;
    }
  }
}

void HeadRows::gather(int64_t row_begin, int64_t row_end, int64_t col_begin, int64_t col_end,
                      void* dst, int64_t ld) const {
  copy<true>(dst, ld, row_begin, row_end, col_begin, col_end);
}

void HeadRows::scatter(const void* src, int64_t ld, int64_t row_begin, int64_t row_end,
                       int64_t col_begin, int64_t col_end) const {
  copy<false>(const_cast<void*>(src), ld, row_begin, row_end, col_begin, col_end);
}

}  // namespace qkv_attention::cpu
