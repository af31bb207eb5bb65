// The masks of one query row over a run of keys, as the element-wise code reads them: a run of
// contiguous values per mask (gathered when the mask's key stride is not 1), a constant for a
// mask broadcast along the keys.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/attention_kernel.h"
#include "cpu/flash/level_namespace.h"

QKV_FLASH_LEVEL_BEGIN

// One mask's values for a run of consecutive keys of one query row, contiguous in memory:
// bool (false = -inf) or additive values of type T or Acc.
template <typename T, typename Acc>
struct MaskSegment {
  const bool* bools = nullptr;    // set for a bool run
  const T* values = nullptr;      // set for an additive run in the mask's own dtype
  const Acc* gathered = nullptr;  // set for an additive run gathered into Acc
};

template <typename T, typename Acc>
class RowMasks {
 public:
  explicit RowMasks(const AttentionInputs<T>& inputs) : inputs_(inputs) {}

  // Writes the segments of row (b, h, i) over keys j0 .. j0 + n and returns how many (at most
  // kMasks); adds a broadcast additive mask to `bias` and sets `valid` to 0 when a broadcast bool
  // mask forbids every key. `gathered` has room for kMasks x n values.
  int segments(int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n,
               MaskSegment<T, Acc>* segments, Acc* gathered, Acc& bias, int64_t& valid) const {
    int count = 0;
    for (int m = 0; m < AttentionInputs<T>::kMasks; ++m) {
      const MaskOperand<T>& mask = inputs_.masks[m];
      if (mask.kind == MaskKind::kNone) continue;
      const Strides4& st = mask.strides;
      const int64_t elem = b * st.batch + h * st.head + i * st.row + j0 * st.col;
      MaskSegment<T, Acc> segment;
      if (mask.kind == MaskKind::kBool) {
        const bool* data = mask.bool_data + elem;
        if (st.col == 0) {
          if (!data[0]) valid = 0;
          continue;
        }
        if (st.col == 1) {
          segment.bools = data;
        } else {
          Acc* row = gathered + m * n;
          for (int64_t j = 0; j < n; ++j) {
            row[j] = data[j * st.col] ? Acc(0) : -std::numeric_limits<Acc>::infinity();
          }
          segment.gathered = row;
        }
      } else {
        const T* data = mask.additive_data + elem;
        if (st.col == 0) {
          bias += static_cast<Acc>(data[0]);
          continue;
        }
        if (st.col == 1) {
          segment.values = data;
        } else {
          Acc* row = gathered + m * n;
          for (int64_t j = 0; j < n; ++j) row[j] = static_cast<Acc>(data[j * st.col]);
          segment.gathered = row;
        }
      }
      segments[count++] = segment;
    }
    return count;
  }

 private:
  const AttentionInputs<T>& inputs_;
};

QKV_FLASH_LEVEL_END
