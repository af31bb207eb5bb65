// The differentiable qkv_projection backward of ops/qkv_projection_math.h.
#include "ops/qkv_projection_math.h"

#include <ATen/ATen.h>

#include <tuple>

#include "ops/optional_tensor.h"

namespace qkv_attention {

namespace {

// Gradients of one projection: input (B, N, Ein), weight (E, Ein), bias (E).
// Sizes are SymInts: the backward's differentiable path may run under torch.compile tracing.
std::tuple<at::Tensor, at::Tensor, at::Tensor> project_back(
    const std::optional<at::Tensor>& grad_heads, const at::Tensor& x, const at::Tensor& weight) {
  const c10::SymInt B = x.sym_size(0), N = x.sym_size(1), Ein = x.sym_size(2);
  const c10::SymInt E = weight.sym_size(0);
  if (!given(grad_heads)) {
    return {at::zeros_like(x, at::MemoryFormat::Contiguous),
            at::zeros_like(weight, at::MemoryFormat::Contiguous),
            at::zeros_symint({E}, weight.options())};
  }
  const at::Tensor grad = grad_heads->permute({0, 2, 1, 3}).reshape_symint({B * N, E});  // (B*N, E)
  const at::Tensor grad_x = at::mm(grad, weight).view_symint({B, N, Ein});
  const at::Tensor grad_weight = at::mm(grad.t(), x.reshape_symint({B * N, Ein}));  // (E, Ein)
  const at::Tensor grad_bias = grad.sum(0);
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

QKVProjectionGrads qkv_projection_backward_math(const std::optional<at::Tensor>& grad_q,
                                                const std::optional<at::Tensor>& grad_k,
                                                const std::optional<at::Tensor>& grad_v,
                                                const at::Tensor& query, const at::Tensor& key,
                                                const at::Tensor& value, const at::Tensor& q_weight,
                                                const at::Tensor& k_weight,
                                                const at::Tensor& v_weight) {
  auto [grad_query, grad_q_weight, grad_q_bias] = project_back(grad_q, query, q_weight);
  auto [grad_key, grad_k_weight, grad_k_bias] = project_back(grad_k, key, k_weight);
  auto [grad_value, grad_v_weight, grad_v_bias] = project_back(grad_v, value, v_weight);
  return {grad_query,    grad_key,    grad_value,  grad_q_weight, grad_k_weight,
          grad_v_weight, grad_q_bias, grad_k_bias, grad_v_bias};
}

}  // namespace qkv_attention
