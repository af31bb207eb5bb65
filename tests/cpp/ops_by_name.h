// The operators as a user of the dispatcher reaches them: looked up BY NAME
// (Dispatcher::findSchemaOrThrow("qkv_attention::<op>", "")) and called through a typed handle.
// Nothing here includes csrc/: if a schema and the C++ signature written below disagree,
// typed<>() throws, and the tests that use the op fail.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/randint.h>

#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace qkv_attention::testing::by_name {

using OptionalTensor = std::optional<at::Tensor>;
using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// The attention family's four trailing arguments: window_size, softcap, alibi_slopes, sinks.
#define QKV_TEST_VARIANT_TYPES \
  at::IntArrayRef, double, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&
inline const std::vector<int64_t> kNoWindow{-1, -1};
using Tensor9 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor, at::Tensor>;

inline c10::OperatorHandle handle(const char* qualified_name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified_name, "");
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> typed(const char* qualified_name) {
  return handle(qualified_name).typed<Signature>();
}

inline at::Tensor attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const OptionalTensor& attn_mask = {}, double dropout_p = 0.0,
                            bool is_causal = false, std::optional<double> scale = {},
                            const OptionalTensor& key_padding_mask = {}) {
  static const auto op =
      typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const OptionalTensor&, double, bool, std::optional<double>,
                       const OptionalTensor&, QKV_TEST_VARIANT_TYPES)>("qkv_attention::attention");
  return op.call(query, key, value, attn_mask, dropout_p, is_causal, scale, key_padding_mask,
                 kNoWindow, 0.0, std::nullopt, std::nullopt);
}

inline Tensor2 attention_with_weights(const at::Tensor& query, const at::Tensor& key,
                                      const at::Tensor& value, const OptionalTensor& attn_mask = {},
                                      double dropout_p = 0.0, bool is_causal = false,
                                      std::optional<double> scale = {},
                                      const OptionalTensor& key_padding_mask = {},
                                      bool average_attn_weights = false) {
  static const auto op =
      typed<Tensor2(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                    double, bool, std::optional<double>, const OptionalTensor&, bool,
                    QKV_TEST_VARIANT_TYPES)>("qkv_attention::attention_with_weights");
  return op.call(query, key, value, attn_mask, dropout_p, is_causal, scale, key_padding_mask,
                 average_attn_weights, kNoWindow, 0.0, std::nullopt, std::nullopt);
}

// (output, logsumexp, weights or empty, rng_state). rng_state is drawn as the composite ops
// draw it (at::randint on torch's default generator; undefined without dropout) and passed to
// _attention_forward, which is a pure function of it.
inline Tensor4 attention_forward(const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const OptionalTensor& attn_mask,
                                 const OptionalTensor& key_padding_mask, double dropout_p,
                                 bool is_causal, std::optional<double> scale, bool need_weights) {
  static const auto op =
      typed<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                    const OptionalTensor&, double, bool, std::optional<double>, bool,
                    const OptionalTensor&, bool, QKV_TEST_VARIANT_TYPES)>(
          "qkv_attention::_attention_forward");
  const at::Tensor rng_state =
      dropout_p > 0 ? at::randint(std::numeric_limits<int64_t>::max(), {2},
                                  at::TensorOptions().dtype(at::kLong).device(at::kCPU))
                    : at::Tensor();
  auto [output, logsumexp, weights] =
      op.call(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal, scale,
              need_weights, rng_state.defined() ? OptionalTensor(rng_state) : std::nullopt,
              /*average_attn_weights=*/false, kNoWindow, 0.0, std::nullopt, std::nullopt);
  return {output, logsumexp, weights, rng_state};
}

// (grad_query, grad_key, grad_value, grad_attn_mask or empty, grad_key_padding_mask or empty,
//  grad_sinks or empty)
inline Tensor6 attention_backward(const at::Tensor& grad_output, const OptionalTensor& grad_weights,
                                  const at::Tensor& query, const at::Tensor& key,
                                  const at::Tensor& value, const at::Tensor& output,
                                  const at::Tensor& logsumexp, const OptionalTensor& attn_mask,
                                  const OptionalTensor& key_padding_mask, double dropout_p,
                                  bool is_causal, std::optional<double> scale,
                                  const OptionalTensor& rng_state, bool attn_mask_requires_grad,
                                  bool key_padding_mask_requires_grad) {
  static const auto op =
      typed<Tensor6(const at::Tensor&, const OptionalTensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                    const OptionalTensor&, double, bool, std::optional<double>,
                    const OptionalTensor&, bool, bool, QKV_TEST_VARIANT_TYPES)>(
          "qkv_attention::_attention_backward");
  return op.call(grad_output, grad_weights, query, key, value, output, logsumexp, attn_mask,
                 key_padding_mask, dropout_p, is_causal, scale, rng_state, attn_mask_requires_grad,
                 key_padding_mask_requires_grad, kNoWindow, 0.0, std::nullopt, std::nullopt);
}

inline at::Tensor attention_dropout_mask(const at::Tensor& rng_state, int64_t batch, int64_t heads,
                                         int64_t q_len, int64_t kv_len, double dropout_p) {
  static const auto op =
      typed<at::Tensor(const at::Tensor&, c10::SymInt, c10::SymInt, c10::SymInt, c10::SymInt,
                       double)>("qkv_attention::_attention_dropout_mask");
  return op.call(rng_state, batch, heads, q_len, kv_len, dropout_p);
}

inline Tensor3 qkv_projection(const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value, const at::Tensor& q_weight,
                              const at::Tensor& k_weight, const at::Tensor& v_weight,
                              const OptionalTensor& q_bias, const OptionalTensor& k_bias,
                              const OptionalTensor& v_bias, int64_t num_heads) {
  static const auto op =
      typed<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                    const OptionalTensor&, const OptionalTensor&, c10::SymInt)>(
          "qkv_attention::qkv_projection");
  return op.call(query, key, value, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias,
                 num_heads);
}

// (grad_query, grad_key, grad_value, grad_q_weight, grad_k_weight, grad_v_weight,
//  grad_q_bias, grad_k_bias, grad_v_bias)
inline Tensor9 qkv_projection_backward(const OptionalTensor& grad_q, const OptionalTensor& grad_k,
                                       const OptionalTensor& grad_v, const at::Tensor& query,
                                       const at::Tensor& key, const at::Tensor& value,
                                       const at::Tensor& q_weight, const at::Tensor& k_weight,
                                       const at::Tensor& v_weight, int64_t num_heads) {
  static const auto op =
      typed<Tensor9(const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const at::Tensor&, c10::SymInt)>(
          "qkv_attention::qkv_projection_backward");
  return op.call(grad_q, grad_k, grad_v, query, key, value, q_weight, k_weight, v_weight,
                 num_heads);
}

inline at::Tensor merge_heads(const at::Tensor& x, const at::Tensor& out_weight,
                              const OptionalTensor& out_bias) {
  static const auto op =
      typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&)>(
          "qkv_attention::merge_heads");
  return op.call(x, out_weight, out_bias);
}

// (grad_x, grad_out_weight, grad_out_bias)
inline Tensor3 merge_heads_backward(const at::Tensor& grad_output, const at::Tensor& x,
                                    const at::Tensor& out_weight) {
  static const auto op = typed<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "qkv_attention::merge_heads_backward");
  return op.call(grad_output, x, out_weight);
}

}  // namespace qkv_attention::testing::by_name
