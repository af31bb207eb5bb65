// CPU kernels of the attention operator. They see plain pointers, sizes and strides (in
// elements, (B, H, L, D) order, stride 0 where a dimension is broadcast), never tensors.
//
// Semantics, shared by forward and backward:
//   score[i, j] = scale * q_i . k_j + masks[i, j]     (bool mask: -inf where it is false;
//                                                      causal: -inf where j > i)
//   p[i, j]     = softmax_j(score[i, :]); a row with no finite score gives p = 0
//   w[i, j]     = p[i, j] * keep[i, j] / (1 - dropout_p)     (the returned weights)
//   out_i       = sum_j w[i, j] v_j
// Accumulation is in at::opmath_type<T> (float for bfloat16/float16); with AVX-512 BF16 the
// bfloat16 GEMMs also round P, W and dS to bfloat16 before multiplying, as torch's kernels do.
// Implemented in cpu/flash_attention.cpp (the blocked algorithm: cpu/flash_attention.h).
#pragma once

#include <cstdint>

namespace qkv_attention::cpu {

enum class MaskKind { kNone, kBool, kAdditive };

// Strides of a 4-D operand in elements, (B, H, rows, cols) order.
struct Strides4 {
  int64_t batch = 0, head = 0, row = 0, col = 0;
};

// A mask read in place through strides that broadcast it to (B, H, L, S).
struct MaskOperand {
  MaskKind kind = MaskKind::kNone;
  const void* data = nullptr;  // const bool* (true = may attend) or const T* (added)
  Strides4 strides;
};

struct AttentionShape {
  int64_t batch = 0, heads = 0, q_len = 0, kv_len = 0, head_dim = 0, value_dim = 0;
  double scale = 1.0;
  bool is_causal = false;
  double dropout_p = 0.0;
  uint64_t seed = 0, offset = 0;  // the dropout stream (cpu/philox.h)

  // attn_mask and key_padding_mask; both apply to every score.
  static constexpr int kMasks = 2;
  MaskOperand masks[kMasks];
  Strides4 mask_strides;
};

template <typename T>
struct AttentionForwardParams : AttentionShape {
  const T* query = nullptr;  // (B, H, L, D)
  const T* key = nullptr;    // (B, H, S, D)
  const T* value = nullptr;  // (B, H, S, Dv)
  Strides4 query_strides, key_strides, value_strides;

  T* output = nullptr;          // (B, H, L, Dv), contiguous
  void* logsumexp = nullptr;    // (B, H, L), contiguous, at::opmath_type<T>; -inf for empty rows
  T* weights = nullptr;         // (B, H, L, S), contiguous, or null when not requested
};

template <typename T>
struct AttentionBackwardParams : AttentionShape {
  const T* query = nullptr;
  const T* key = nullptr;
  const T* value = nullptr;
  const T* output = nullptr;       // (B, H, L, Dv)
  const T* grad_output = nullptr;  // (B, H, L, Dv)
  const T* grad_weights = nullptr; // (B, H, L, S), or null
  const void* logsumexp = nullptr; // (B, H, L), contiguous, at::opmath_type<T>
  Strides4 query_strides, key_strides, value_strides, output_strides, grad_output_strides,
      grad_weights_strides;

  T* grad_query = nullptr;  // (B, H, L, D), contiguous
  T* grad_key = nullptr;    // (B, H, S, D), contiguous
  T* grad_value = nullptr;  // (B, H, S, Dv), contiguous
  // d loss / d score, (B, H, L, S) contiguous, at::opmath_type<T>; null unless a mask
  // needs a gradient (the caller reduces it to the mask's shape).
  void* grad_scores = nullptr;
};

template <typename T>
void attention_forward_kernel(const AttentionForwardParams<T>& params);

template <typename T>
void attention_backward_kernel(const AttentionBackwardParams<T>& params);

// keep[b, h, i, j] of the dropout stream, (B, H, L, S) contiguous.
void attention_dropout_mask_kernel(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len,
                                   uint64_t seed, uint64_t offset, double dropout_p, bool* keep);

}  // namespace qkv_attention::cpu
