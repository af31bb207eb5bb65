// CPU kernels of the attention operator. They see plain pointers, sizes and strides (in
// elements, (B, H, L, D) order, stride 0 where a dimension is broadcast), never tensors; the
// structs below are filled in one place (cpu/flash/params.cpp) from the op's tensors.
//
// Semantics, shared by forward and backward:
//   score[i, j] = scale * q_i . k_j + masks[i, j]     (bool mask: -inf where it is false;
//                                                      causal: -inf where j > i, or
//                                                      j > i + causal_offset in the forward)
//   p[i, j]     = softmax_j(score[i, :]); a row with no finite score gives p = 0
//   w[i, j]     = p[i, j] * keep[i, j] / (1 - dropout_p)     (the returned weights)
//   out_i       = sum_j w[i, j] v_j
// Query head h reads key/value head h / (heads / kv_heads) (grouped-query attention; kv_heads
// equals heads for plain multi-head attention).
// Accumulation is in AccType<T> (float for bfloat16/float16); with AVX-512 BF16 the bfloat16
// GEMMs also round P, W and dS to bfloat16 before multiplying, as torch's kernels do.
// The kernels are compiled once per CPU level and dispatched at run time (cpu/flash/levels.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace qkv_attention::cpu {

// The accumulation type of element type T.
template <typename T>
using AccType = std::conditional_t<std::is_same_v<T, double>, double, float>;

enum class MaskKind { kNone, kBool, kAdditive };

// Strides of a 4-D operand in elements, (B, H, rows, cols) order.
struct Strides4 {
  int64_t batch = 0, head = 0, row = 0, col = 0;
};

// A mask read in place through strides that broadcast it to (B, H, L, S): bool (true = may
// attend) or of the query's dtype (added to the scores).
template <typename T>
struct MaskOperand {
  MaskKind kind = MaskKind::kNone;
  const bool* bool_data = nullptr;   // kind == kBool
  const T* additive_data = nullptr;  // kind == kAdditive
  Strides4 strides;
};

// What forward and backward share: sizes, scale, causality, dropout stream, masks and inputs.
template <typename T>
struct AttentionInputs {
  int64_t batch = 0, heads = 0, kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0, value_dim = 0;
  double scale = 1.0;
  bool is_causal = false;
  double dropout_p = 0.0;
  uint64_t seed = 0, offset = 0;  // the dropout stream (cpu/philox.h)

  // attn_mask and key_padding_mask; both apply to every score.
  static constexpr int kMasks = 2;
  MaskOperand<T> masks[kMasks];

  const T* query = nullptr;  // (B, H, L, D)
  const T* key = nullptr;    // (B, Hkv, S, D)
  const T* value = nullptr;  // (B, Hkv, S, Dv)
  Strides4 query_strides, key_strides, value_strides;

  // Query heads per key/value head.
  int64_t group_size() const { return kv_heads > 0 ? heads / kv_heads : 1; }
};

template <typename T>
struct AttentionForwardParams : AttentionInputs<T> {
  // Causal: query i sees keys j <= i + causal_offset. 0 is the ops' top-left alignment;
  // S - L aligns the last query with the last key (bottom-right, as a KV cache's new queries
  // follow the keys already cached). Rows that see no key give zeros. Forward only.
  int64_t causal_offset = 0;
  T* output = nullptr;              // (B, H, L, Dv), contiguous
  AccType<T>* logsumexp = nullptr;  // (B, H, L), contiguous; -inf for empty rows
  T* weights = nullptr;             // (B, H, L, S), contiguous, or null when not requested
  bool average_weights = false;     // weights is (B, L, S): the mean over the heads
};

template <typename T>
struct AttentionBackwardParams : AttentionInputs<T> {
  const T* output = nullptr;              // (B, H, L, Dv)
  const T* grad_output = nullptr;         // (B, H, L, Dv)
  const T* grad_weights = nullptr;        // (B, H, L, S), or null
  const AccType<T>* logsumexp = nullptr;  // (B, H, L), contiguous
  Strides4 output_strides, grad_output_strides, grad_weights_strides;

  T* grad_query = nullptr;  // (B, H, L, D), contiguous
  T* grad_key = nullptr;    // (B, Hkv, S, D), contiguous
  T* grad_value = nullptr;  // (B, Hkv, S, Dv), contiguous
  // d loss / d score, (B, H, L, S) contiguous; null unless a mask needs a gradient (the caller
  // reduces it to the mask's shape).
  AccType<T>* grad_scores = nullptr;
};

template <typename T>
void attention_forward_kernel(const AttentionForwardParams<T>& params);

template <typename T>
void attention_backward_kernel(const AttentionBackwardParams<T>& params);

// keep[b, h, i, j] of the dropout stream, (B, H, L, S) contiguous.
void attention_dropout_mask_kernel(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len,
                                   uint64_t seed, uint64_t offset, double dropout_p, bool* keep);

}  // namespace qkv_attention::cpu
