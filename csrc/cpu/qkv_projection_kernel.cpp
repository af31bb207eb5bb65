// CPU kernels of qkv_projection: one GEMM per projection, then the head split.
#include "cpu/qkv_projection_kernel.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace qkv_attention::cpu {

at::Tensor project_into_heads(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t num_heads) {
  const int64_t B = x.size(0), N = x.size(1), E = weight.size(0);
  const at::Tensor rows = x.reshape({B * N, x.size(2)});  // (B*N, Ein)
  const at::Tensor projected = bias.has_value() && bias->defined()
                                   ? at::addmm(*bias, rows, weight.t())
                                   : at::mm(rows, weight.t());  // (B*N, E)
  return projected.view({B, N, num_heads, E / num_heads})  // (B, N, H, E/H)
      .permute({0, 2, 1, 3})  // (B, H, N, E/H)
      .contiguous();
}

namespace {

// Gradients of one projection: input (B, N, Ein), weight (E, Ein), bias (E).
// Sizes are SymInts: the backward's differentiable path may run under torch.compile tracing.
std::tuple<at::Tensor, at::Tensor, at::Tensor> project_back(
    const std::optional<at::Tensor>& grad_heads, const at::Tensor& x, const at::Tensor& weight) {
  const c10::SymInt B = x.sym_size(0), N = x.sym_size(1), Ein = x.sym_size(2);
  const c10::SymInt E = weight.sym_size(0);
  if (!grad_heads.has_value() || !grad_heads->defined()) {
    return {at::zeros_like(x, at::MemoryFormat::Contiguous),
            at::zeros_like(weight, at::MemoryFormat::Contiguous),
            at::zeros_symint({E}, weight.options())};
  }
  const at::Tensor grad =
      grad_heads->permute({0, 2, 1, 3}).reshape_symint({B * N, E});  // (B*N, E)
  const at::Tensor grad_x = at::mm(grad, weight).view_symint({B, N, Ein});
  const at::Tensor grad_weight = at::mm(grad.t(), x.reshape_symint({B * N, Ein}));  // (E, Ein)
  const at::Tensor grad_bias = grad.sum(0);
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

QKVProjectionGrads qkv_projection_backward_math(
    const std::optional<at::Tensor>& grad_q, const std::optional<at::Tensor>& grad_k,
    const std::optional<at::Tensor>& grad_v, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& q_weight, const at::Tensor& k_weight,
    const at::Tensor& v_weight) {
  auto [grad_query, grad_q_weight, grad_q_bias] = project_back(grad_q, query, q_weight);
  auto [grad_key, grad_k_weight, grad_k_bias] = project_back(grad_k, key, k_weight);
  auto [grad_value, grad_v_weight, grad_v_bias] = project_back(grad_v, value, v_weight);
  return {grad_query,    grad_key,    grad_value,  grad_q_weight, grad_k_weight,
          grad_v_weight, grad_q_bias, grad_k_bias, grad_v_bias};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_projection_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& q_bias, const std::optional<at::Tensor>& k_bias,
    const std::optional<at::Tensor>& v_bias, int64_t num_heads) {
  check_qkv_projection_inputs("qkv_projection", query, key, value, q_weight, k_weight, v_weight,
                              q_bias, k_bias, v_bias, num_heads);
  return {project_into_heads(query, q_weight, q_bias, num_heads),
          project_into_heads(key, k_weight, k_bias, num_heads),
          project_into_heads(value, v_weight, v_bias, num_heads)};
}

QKVProjectionGrads qkv_projection_backward_cpu(
    const std::optional<at::Tensor>& grad_q, const std::optional<at::Tensor>& grad_k,
    const std::optional<at::Tensor>& grad_v, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& q_weight, const at::Tensor& k_weight,
    const at::Tensor& v_weight, int64_t num_heads) {
  check_qkv_projection_backward_inputs(grad_q, grad_k, grad_v, query, key, value, q_weight,
                                       k_weight, v_weight, num_heads);
  return qkv_projection_backward_math(grad_q, grad_k, grad_v, query, key, value, q_weight,
                                      k_weight, v_weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, CPU, m) {
  m.impl("qkv_projection", TORCH_FN(qkv_projection_cpu));
  m.impl("qkv_projection_backward", TORCH_FN(qkv_projection_backward_cpu));
}

}  // namespace qkv_attention::cpu
