// CPU kernels of the attention operator. They see plain pointers, sizes and strides (in
// elements, (B, H, L, D) order, stride 0 where a dimension is broadcast), never tensors; the
// structs below are filled in one place (cpu/flash/params.cpp) from the op's tensors.
//
// Semantics, shared by forward and backward (o = causal_offset, the causal alignment):
//   raw[i, j]   = scale * q_i . k_j
//   score[i, j] = cap(raw[i, j]) - slope[b, h] * |i + o - j| + masks[i, j]
//                 cap(x) = softcap * tanh(x / softcap) when softcap > 0, else x; bool mask:
//                 -inf where it is false; causal: -inf where j > i + o; sliding window: -inf
//                 unless i + o - window_left <= j <= i + o + window_right
//   p[i, j]     = exp(score[i, j]) / (exp(sink[h]) + sum_k exp(score[i, k])), the sink term
//                 only with sinks; a row with no finite score gives p = 0
//   w[i, j]     = p[i, j] * keep[i, j] / (1 - dropout_p)     (the returned weights)
//   out_i       = sum_j w[i, j] v_j
// The logsumexp saved for the backward is log(exp(sink[h]) + sum_k exp(score[i, k])) (the sink
// term only with sinks), so that exp(score - logsumexp) recomputes p, and exp(sink - logsumexp)
// the sink's share; -inf for a row with no finite score and no sink.
// A sliding window skips the key blocks outside the band: work in proportion to L x window.
// Query head h reads key/value head h / (heads / kv_heads) (grouped-query attention; kv_heads
// equals heads for plain multi-head attention).
// A KV cache's key and value may be stored quantized (int8, float8 e4m3fn or e5m2) with a float32
// scale per (batch, head, row): the forward then reads key/value as stored * scale, converting
// each block of rows as it uses it (QuantizedRows below; the backward takes plain operands only).
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

// How a key or value operand is stored: as the query's T, or quantized (cpu/kv_quantize.h).
enum class CacheStorage { kPlain, kInt8, kFloat8E4M3, kFloat8E5M2 };

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

// A quantized key or value operand: element (b, h, row, col) is
//   stored[b, h, row, col] * scales[b * scale_batch + h * scale_head + row * scale_row],
// stored read through the operand's Strides4 (in elements of one byte). storage == kPlain: the
// operand is plain T and nothing here is read.
// Rows row0, row0 + 1, ... of one (b, h) of a quantized operand: row j's codes start at
// codes + j * row_stride (their column stride is the operand's), its scale is
// scales[j * scale_stride].
struct QuantizedChunk {
  CacheStorage storage = CacheStorage::kPlain;
  const uint8_t* codes = nullptr;
  int64_t row_stride = 0;
  const float* scales = nullptr;
  int64_t scale_stride = 0;
};

struct QuantizedRows {
  CacheStorage storage = CacheStorage::kPlain;
  const void* data = nullptr;  // int8_t, c10::Float8_e4m3fn or c10::Float8_e5m2
  const float* scales = nullptr;
  int64_t scale_batch = 0, scale_head = 0, scale_row = 0;
  bool quantized() const { return storage != CacheStorage::kPlain; }
  // The rows from row0 of (b, h), `st` being the operand's strides.
  QuantizedChunk rows(const Strides4& st, int64_t b, int64_t h, int64_t row0) const {
    return QuantizedChunk{
        storage, static_cast<const uint8_t*>(data) + b * st.batch + h * st.head + row0 * st.row,
        st.row, scales + b * scale_batch + h * scale_head + row0 * scale_row, scale_row};
  }
};

// What forward and backward share: sizes, scale, causality, dropout stream, masks and inputs.
template <typename T>
struct AttentionInputs {
  int64_t batch = 0, heads = 0, kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0, value_dim = 0;
  double scale = 1.0;
  bool is_causal = false;
  // The causal alignment o: causal rows see keys j <= i + o, and the window and ALiBi are
  // centred on i + o. 0 is the ops' top-left alignment; S - L aligns the last query with the
  // last key (bottom-right, as a KV cache's new queries follow the keys already cached). Rows
  // that see no key give zeros. The backward must be given the forward's value.
  int64_t causal_offset = 0;
  // Sliding window: query i sees key j only if i + o - window_left <= j <= i + o + window_right;
  // -1 leaves that side open (both -1: no window).
  int64_t window_left = -1, window_right = -1;
  // > 0: raw scores become softcap * tanh(raw / softcap) (after the scale, before ALiBi and the
  // masks); 0: no cap.
  double softcap = 0.0;
  // ALiBi: score[b, h, i, j] -= alibi_slopes[b * alibi_batch_stride + h] * |i + o - j|;
  // alibi_batch_stride is 0 for (H,) slopes, H for (B, H). Null: no ALiBi. AccType<T> (float
  // for half types, double for double) so that float64 problems keep float64 slopes.
  const AccType<T>* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;
  // Attention sinks, (H,): one extra logit per query head in each row's softmax denominator,
  // with no value; not scaled, capped, masked or dropped out. Null: none. AccType<T>, as above.
  const AccType<T>* sinks = nullptr;
  double dropout_p = 0.0;
  uint64_t seed = 0, offset = 0;  // the dropout stream (cpu/philox.h)

  // attn_mask and key_padding_mask; both apply to every score.
  static constexpr int kMasks = 2;
  MaskOperand<T> masks[kMasks];

  const T* query = nullptr;  // (B, H, L, D)
  const T* key = nullptr;    // (B, Hkv, S, D); null when quantized_key is set
  const T* value = nullptr;  // (B, Hkv, S, Dv); null when quantized_value is set
  Strides4 query_strides, key_strides, value_strides;
  // Quantized key/value (forward only): read instead of key/value, through key_strides and
  // value_strides.
  QuantizedRows quantized_key, quantized_value;

  // Query heads per key/value head.
  int64_t group_size() const { return kv_heads > 0 ? heads / kv_heads : 1; }
};

template <typename T>
struct AttentionForwardParams : AttentionInputs<T> {
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
  // d loss / d sinks, (H,); written when sinks is set and this is not null. Summed over the
  // batch and the rows in one fixed order, so bitwise the same for any thread count.
  AccType<T>* grad_sinks = nullptr;
};

template <typename T>
void attention_forward_kernel(const AttentionForwardParams<T>& params);

template <typename T>
void attention_backward_kernel(const AttentionBackwardParams<T>& params);

// keep[b, h, i, j] of the dropout stream, (B, H, L, S) contiguous.
void attention_dropout_mask_kernel(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len,
                                   uint64_t seed, uint64_t offset, double dropout_p, bool* keep);

}  // namespace qkv_attention::cpu
