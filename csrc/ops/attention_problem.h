// One attention call of the family — attention, attention_with_weights, attention_varlen,
// attention_with_kv_cache, and their backward ops — described once, checked once.
//
// How a call reaches the kernels (docs/design.md section 5):
//   1. The op's kernel (CPU or Meta, forward or backward) builds an AttentionProblem from its
//      arguments: dense_problem, packed_problem or cache_problem. Nothing else is read from the
//      arguments afterwards.
//   2. check_attention_problem runs every rule on the (possibly symbolic) sizes, with one
//      wording per rule; check_attention_backward adds the backward's tensors.
//   3. The CPU kernels read the data-dependent parts once (attention_sequences: the offsets of
//      a packed batch, the valid lengths of a cache) and cpu/flash/params.h turns the problem
//      (and one sequence of it) into the kernels' parameter struct.
// A new variant of attention is a field here, a rule in check_attention_problem, a line in
// set_params and the kernel's code; the ops' glue only passes the argument along.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <vector>

namespace qkv_attention {

// The variants of attention every op of the family takes, its four trailing arguments
// (window_size, softcap, alibi_slopes, sinks); the defaults are plain attention. With o the
// causal alignment (0 for the dense and packed ops, n_b - L for a cache's sequence):
struct AttentionVariants {
  // (left, right): query i sees key j only if i + o - left <= j <= i + o + right; -1 leaves
  // that side open.
  std::vector<int64_t> window_size{-1, -1};
  // > 0: the scaled scores become softcap * tanh(score / softcap), before ALiBi and the masks.
  double softcap = 0.0;
  // (H,) or (B, H), float32 or the inputs' dtype: -slope * |i + o - j| added after the cap. Not
  // differentiable.
  std::optional<at::Tensor> alibi_slopes{};
  // (H,), float32 or the inputs' dtype: one extra logit per head in each row's softmax
  // denominator, with no value. Differentiable.
  std::optional<at::Tensor> sinks{};

  bool has_window() const {
    return window_size.size() == 2 && (window_size[0] >= 0 || window_size[1] >= 0);
  }
};

enum class AttentionLayout {
  kDense,   // query (B, H, L, D), key (B, Hkv, S, D), value (B, Hkv, S, Dv)
  kPacked,  // query (total_q, H, D), key (total_k, Hkv, D), value (total_k, Hkv, Dv), offsets
  kCache,   // query (B, H, L, D), key/value = the caches (B, Hkv, S_max, D / Dv)
};

struct AttentionProblem {
  // The first nine members are a dense call's arguments, in the schema's order, so that
  // AttentionProblem{query, key, value, attn_mask, ...} describes one (tests build them so).
  at::Tensor query;
  at::Tensor key;                              // kCache: k_cache
  at::Tensor value;                            // kCache: v_cache
  std::optional<at::Tensor> attn_mask;         // broadcastable to (B, H, L, S) (kCache: S_max)
  std::optional<at::Tensor> key_padding_mask;  // (B, S), kDense only
  double dropout_p = 0.0;
  bool is_causal = false;
  std::optional<double> scale;
  std::optional<at::Tensor> rng_state;  // (2,) int64: the dropout stream's seed and offset
  AttentionVariants variants{};

  AttentionLayout layout = AttentionLayout::kDense;
  const char* op = "attention";  // the label messages give the op (ops/operators.h)
  // Whether a missing rng_state with dropout_p > 0 is an error: true for the kernel ops, false
  // for the composites, which check before they draw the state.
  bool rng_state_required = true;
  // Whether the call allocates a (B, H, L, S) tensor (returned weights, a mask's gradient),
  // whose size is then checked like a tensor's.
  bool scores_materialised = false;
  // kDense forward: whether the weights (B, H, L, S) are returned, or their mean over the
  // heads (B, L, S) with average_weights.
  bool need_weights = false, average_weights = false;

  // kPacked: (B + 1,) offsets of the sequences' query and key rows, and bounds of the lengths.
  at::Tensor cu_seqlens_q{}, cu_seqlens_k{};
  c10::SymInt max_seqlen_q = 0, max_seqlen_k = 0;

  // kCache: the new entries written into the caches (B, Hkv, L_new, D / Dv), and each
  // sequence's valid length before the call ((B,) int32/int64; none: all S_max are valid).
  std::optional<at::Tensor> new_key{}, new_value{}, cache_seqlens{};
  // kCache with quantized caches (int8, float8_e4m3fn, float8_e5m2): their float32 scales
  // (B, Hkv, S_max), one per cached position and head; a cached element is stored * scale, and
  // the new entries (query's dtype) are quantized as they are written (cpu/kv_quantize.h).
  // None for float caches.
  std::optional<at::Tensor> k_cache_scale{}, v_cache_scale{};

  // kCache: whether k_cache has a quantized dtype.
  bool quantized_cache() const;

  // The names of key and value in messages ("k_cache" for a cache).
  const char* key_name() const;
  const char* value_name() const;
  bool has_dropout() const { return dropout_p > 0; }
};

AttentionProblem dense_problem(const char* op, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                               const std::optional<at::Tensor>& key_padding_mask, double dropout_p,
                               bool is_causal, std::optional<double> scale,
                               const std::optional<at::Tensor>& rng_state,
                               AttentionVariants variants, bool rng_state_required,
                               bool scores_materialised);

AttentionProblem packed_problem(const char* op, const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                                const at::Tensor& cu_seqlens_k, const c10::SymInt& max_seqlen_q,
                                const c10::SymInt& max_seqlen_k, double dropout_p, bool is_causal,
                                std::optional<double> scale,
                                const std::optional<at::Tensor>& rng_state,
                                AttentionVariants variants, bool rng_state_required);

AttentionProblem cache_problem(const char* op, const at::Tensor& query, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const std::optional<at::Tensor>& key,
                               const std::optional<at::Tensor>& value,
                               const std::optional<at::Tensor>& cache_seqlens,
                               const std::optional<at::Tensor>& attn_mask, bool is_causal,
                               std::optional<double> scale, AttentionVariants variants,
                               const std::optional<at::Tensor>& k_cache_scale = std::nullopt,
                               const std::optional<at::Tensor>& v_cache_scale = std::nullopt);

// The dtypes a KV cache may be stored in besides the inputs' own: int8, float8_e4m3fn and
// float8_e5m2, each with a float32 scale per cached position and head.
bool is_quantized_cache_dtype(at::ScalarType dtype);

// Every rule of the family on the problem's (possibly symbolic) sizes: ranks, dtypes, devices,
// layouts, sizes that must agree, grouped-query heads, masks, dropout_p, scale, rng_state, the
// variants (window bounds, softcap, the slopes' and sinks' shapes, dtypes and devices), the
// size limits of ops/checks.h for everything read or allocated, the offsets' and lengths'
// tensors. The values of offsets and lengths are data: attention_sequences checks them.
void check_attention_problem(const AttentionProblem& problem);

// A backward op's call: the forward's problem and what the backward receives besides it, the
// forward's output and logsumexp and the gradient of the output and (kDense, optional) of the
// weights; which masks (kDense, additive ones) the caller wants a gradient for.
struct AttentionBackwardCall {
  AttentionProblem problem;
  at::Tensor grad_output, output, logsumexp;
  std::optional<at::Tensor> grad_weights{};
  bool attn_mask_requires_grad = false, key_padding_mask_requires_grad = false;
};

// check_attention_problem, then the backward's own tensors against it.
void check_attention_backward(const AttentionBackwardCall& call);

// The shapes of the forward's output and logsumexp (the accumulation dtype): (B, H, L, Dv) and
// (B, H, L); packed (total_q, H, Dv) and (total_q, H); for a cache, the logsumexp is the
// kernel's scratch and not returned.
std::vector<c10::SymInt> output_shape(const AttentionProblem& problem);
std::vector<c10::SymInt> logsumexp_shape(const AttentionProblem& problem);

// The scale the kernels use: `scale`, or 1/sqrt(D) (1 when D is 0).
double attention_scale(std::optional<double> scale, int64_t head_dim);

// One sequence of a packed batch or of a cache: query rows q_begin .. q_begin + q_len and key
// rows k_begin .. k_begin + k_len (a cache: positions 0 .. valid length after the write),
// causal_offset = the diagonal's shift (query i sees keys j <= i + causal_offset): 0 top-left
// (dense and packed), k_len - q_len bottom-right (a cache's new queries follow its keys).
struct SequenceSpan {
  int64_t index = 0, q_begin = 0, q_len = 0, k_begin = 0, k_len = 0, causal_offset = 0;
  // kCache: where the new entries go (the valid length before the call) and how many.
  int64_t write_at = 0, write_len = 0;
  // kCache: how many consecutive sequences from `index`, all of this k_len, the span covers
  // (set_params reads them as one batch).
  int64_t count = 1;
};

// The sequences of a packed or cache problem, their values read (on the CPU) and checked:
// offsets start at 0, never decrease, end at the packed totals and stay within max_seqlen;
// cache lengths are non-negative and leave room for the new entries. A problem that passed
// check_attention_problem; the tensors hold real data.
std::vector<SequenceSpan> attention_sequences(const AttentionProblem& problem);

// The rng_state of sequence b of a packed batch: (seed, offset + b), wrapping as the kernels'
// 64-bit counters do, so each sequence has a part of the stream of its own.
at::Tensor sequence_rng_state(const at::Tensor& rng_state, int64_t b);

}  // namespace qkv_attention
