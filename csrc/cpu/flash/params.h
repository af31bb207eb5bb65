// The one place where the kernels' parameter structs (cpu/attention_kernel.h) are filled from
// the op's tensors: sizes, strides, masks read in place through their broadcast strides, the
// dropout stream and the data pointers. The tensors must already have passed the op's checks.
// Also for one sequence of a packed variable-length batch (attention_varlen): a batch of one,
// read in place from the packed tensors through their strides.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <utility>

#include "cpu/attention_kernel.h"

namespace qkv_attention::cpu::flash {

struct AttentionArguments {
  const at::Tensor& query;                            // (B, H, L, D)
  const at::Tensor& key;                              // (B, Hkv, S, D)
  const at::Tensor& value;                            // (B, Hkv, S, Dv)
  const std::optional<at::Tensor>& attn_mask;         // broadcastable to (B, H, L, S)
  const std::optional<at::Tensor>& key_padding_mask;  // (B, S)
  double dropout_p;
  bool is_causal;
  std::optional<double> scale;
  const std::optional<at::Tensor>& rng_state;  // (2,) int64 seed and offset; none: no dropout
};

// The seed and offset in rng_state ((2,) int64 on the CPU, any stride).
std::pair<uint64_t, uint64_t> seed_and_offset(const at::Tensor& rng_state);

template <typename T>
AttentionForwardParams<T> set_forward_params(const AttentionArguments& args,
                                             const at::Tensor& output, const at::Tensor& logsumexp,
                                             const at::Tensor* weights,
                                             bool average_weights = false);

template <typename T>
AttentionBackwardParams<T> set_backward_params(
    const AttentionArguments& args, const at::Tensor& output, const at::Tensor& grad_output,
    const std::optional<at::Tensor>& grad_weights, const at::Tensor& logsumexp,
    const at::Tensor& grad_query, const at::Tensor& grad_key, const at::Tensor& grad_value,
    const at::Tensor* grad_scores);

// The packed tensors of attention_varlen, and its scalar arguments.
struct PackedArguments {
  const at::Tensor& query;  // (total_q, H, D)
  const at::Tensor& key;    // (total_k, Hkv, D)
  const at::Tensor& value;  // (total_k, Hkv, Dv)
  double dropout_p;
  bool is_causal;
  std::optional<double> scale;
  uint64_t seed, offset;  // the call's dropout stream; sequence b uses (seed, offset + b)
};

// Sequence `index`: query rows q_begin .. q_begin + q_len, key/value rows k_begin .. + k_len.
struct PackedSequence {
  int64_t index, q_begin, q_len, k_begin, k_len;
};

// The sequence as a (1, H, q_len, D) attention call reading the packed tensors in place. Its
// output (1, H, q_len, Dv) and logsumexp (1, H, q_len) go to the contiguous buffers given.
template <typename T>
AttentionForwardParams<T> set_sequence_forward_params(const PackedArguments& args,
                                                      const PackedSequence& sequence, T* output,
                                                      AccType<T>* logsumexp);

// Its backward: output and grad_output read in place from the packed (total_q, H, Dv) tensors,
// logsumexp (1, H, q_len) contiguous; the gradients go to contiguous (1, heads, rows, features)
// buffers.
template <typename T>
AttentionBackwardParams<T> set_sequence_backward_params(const PackedArguments& args,
                                                        const PackedSequence& sequence,
                                                        const at::Tensor& output,
                                                        const at::Tensor& grad_output,
                                                        const AccType<T>* logsumexp, T* grad_query,
                                                        T* grad_key, T* grad_value);

}  // namespace qkv_attention::cpu::flash
