// cpu/memory_overlap.h.
#include "cpu/memory_overlap.h"

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <functional>
#include <numeric>
#include <vector>

namespace qkv_attention::cpu {
namespace {

// The lowest and highest element offsets (in elements from the storage's start) of `t`, which
// has elements.
std::pair<int64_t, int64_t> offset_range(const at::Tensor& t) {
  int64_t low = t.storage_offset(), high = t.storage_offset();
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t extent = (t.size(d) - 1) * t.stride(d);
    (extent < 0 ? low : high) += extent;
  }
  return {low, high};
}

// Calls visit(offset) for every element of `t` (a row-major walk of its sizes and strides).
void for_each_offset(const at::Tensor& t, const std::function<bool(int64_t)>& visit) {
  const int64_t dims = t.dim();
  std::vector<int64_t> index(size_t(dims), 0);
  int64_t offset = t.storage_offset();
  const int64_t count = t.numel();
  for (int64_t n = 0; n < count; ++n) {
    if (!visit(offset)) return;
    for (int64_t d = dims - 1; d >= 0; --d) {
      if (++index[size_t(d)] < t.size(d)) {
        offset += t.stride(d);
        break;
      }
      offset -= (t.size(d) - 1) * t.stride(d);
      index[size_t(d)] = 0;
    }
  }
}

// A sufficient condition for no repeated element: sorted by stride, each dimension's stride
// exceeds the largest offset the smaller dimensions reach.
bool strides_nest(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (|stride|, size) of the dims of size > 1
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(std::abs(t.stride(d)), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return false;
    reach += stride * (size - 1);
  }
  return true;
}

}  // namespace

bool has_repeated_elements(const at::Tensor& t) {
  if (t.numel() <= 1) return false;
  switch (at::has_internal_overlap(t)) {
    case at::MemOverlap::No:
      return false;
    case at::MemOverlap::Yes:
      return true;
    case at::MemOverlap::TooHard:
      break;
  }
  if (strides_nest(t)) return false;
  const auto [low, high] = offset_range(t);
  std::vector<bool> seen(size_t(high - low + 1), false);
  bool repeated = false;
  for_each_offset(t, [&](int64_t offset) {
    const size_t at = size_t(offset - low);
    repeated = seen[at];
    seen[at] = true;
    return !repeated;
  });
  return repeated;
}

bool share_elements(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  if (!a.storage().is_alias_of(b.storage())) return false;
  switch (at::get_overlap_status(a, b)) {
    case at::MemOverlapStatus::No:
      return false;
    case at::MemOverlapStatus::Full:
    case at::MemOverlapStatus::Partial:
      return true;
    case at::MemOverlapStatus::TooHard:
      break;
  }
  // Offsets count elements of each tensor's own size; compare bytes when the sizes differ.
  const int64_t a_bytes = a.element_size(), b_bytes = b.element_size();
  const auto [a_low, a_high] = offset_range(a);
  const auto [b_low, b_high] = offset_range(b);
  const int64_t a_begin = a_low * a_bytes, a_end = (a_high + 1) * a_bytes;
  const int64_t b_begin = b_low * b_bytes, b_end = (b_high + 1) * b_bytes;
  if (a_end <= b_begin || b_end <= a_begin) return false;
  // Mark a's bytes, then look for b's.
  std::vector<bool> marked(size_t(a_end - a_begin), false);
  for_each_offset(a, [&](int64_t offset) {
    const int64_t first = offset * a_bytes - a_begin;
    std::fill_n(marked.begin() + first, a_bytes, true);
    return true;
  });
  bool shared = false;
  for_each_offset(b, [&](int64_t offset) {
    for (int64_t byte = offset * b_bytes; byte < (offset + 1) * b_bytes && !shared; ++byte) {
      shared = byte >= a_begin && byte < a_end && marked[size_t(byte - a_begin)];
    }
    return !shared;
  });
  return shared;
}

}  // namespace qkv_attention::cpu
