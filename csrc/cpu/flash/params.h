// The one place where the kernels' parameter structs (cpu/attention_kernel.h) are filled from
// the op's tensors: sizes, strides, masks read in place through their broadcast strides, the
// dropout stream and the data pointers. The tensors must already have passed the op's checks.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <utility>

#include "cpu/attention_kernel.h"

namespace qkv_attention::cpu::flash {

struct AttentionArguments {
  const at::Tensor& query;  // (B, H, L, D)
  const at::Tensor& key;    // (B, Hkv, S, D)
  const at::Tensor& value;  // (B, Hkv, S, Dv)
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
                                             const at::Tensor& output,
                                             const at::Tensor& logsumexp,
                                             const at::Tensor* weights,
                                             bool average_weights = false);

template <typename T>
AttentionBackwardParams<T> set_backward_params(
    const AttentionArguments& args, const at::Tensor& output, const at::Tensor& grad_output,
    const std::optional<at::Tensor>& grad_weights, const at::Tensor& logsumexp,
    const at::Tensor& grad_query, const at::Tensor& grad_key, const at::Tensor& grad_value,
    const at::Tensor* grad_scores);

}  // namespace qkv_attention::cpu::flash
