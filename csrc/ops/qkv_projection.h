// qkv_projection: the three input projections of multi-head attention, split into heads.
//
//   query (B, L, Eq), key (B, S, Ek), value (B, S, Ev)
//   q_weight (E, Eq), k_weight (E, Ek), v_weight (E, Ev), biases (E) or None
//   -> q (B, H, L, E/H), k (B, H, S, E/H), v (B, H, S, E/H)
//
// q = (query q_weightᵀ + q_bias) with its E features split into H heads of E/H; likewise k, v.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace qkv_attention {

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_projection(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& q_bias, const std::optional<at::Tensor>& k_bias,
    const std::optional<at::Tensor>& v_bias, c10::SymInt num_heads);

// The gradients of the nine inputs (query, key, value, the weights, the biases) from those of
// q, k and v; a missing grad_q (grad_k, grad_v) counts as zeros. Bias gradients are returned
// whether or not the forward had biases.
using QKVProjectionGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                      at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
QKVProjectionGrads qkv_projection_backward(const std::optional<at::Tensor>& grad_q,
                                           const std::optional<at::Tensor>& grad_k,
                                           const std::optional<at::Tensor>& grad_v,
                                           const at::Tensor& query, const at::Tensor& key,
                                           const at::Tensor& value, const at::Tensor& q_weight,
                                           const at::Tensor& k_weight, const at::Tensor& v_weight,
                                           c10::SymInt num_heads);

// ---- shared by the kernels of every dispatch key ----

void check_qkv_projection_inputs(const char* op, const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& q_weight,
                                 const at::Tensor& k_weight, const at::Tensor& v_weight,
                                 const std::optional<at::Tensor>& q_bias,
                                 const std::optional<at::Tensor>& k_bias,
                                 const std::optional<at::Tensor>& v_bias,
                                 const c10::SymInt& num_heads);

// The forward's checks, and each given gradient against the shape the forward gave it.
void check_qkv_projection_backward_inputs(const std::optional<at::Tensor>& grad_q,
                                          const std::optional<at::Tensor>& grad_k,
                                          const std::optional<at::Tensor>& grad_v,
                                          const at::Tensor& query, const at::Tensor& key,
                                          const at::Tensor& value, const at::Tensor& q_weight,
                                          const at::Tensor& k_weight, const at::Tensor& v_weight,
                                          const c10::SymInt& num_heads);

}  // namespace qkv_attention
