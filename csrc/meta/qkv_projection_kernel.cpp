// Shape-only kernels of qkv_projection, on symbolic sizes.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/qkv_projection.h"

namespace qkv_attention::meta {
namespace {

// (B, N, Ein) projected by (E, Ein) -> (B, H, N, E/H)
at::Tensor heads_like(const at::Tensor& x, const at::Tensor& weight, const c10::SymInt& heads) {
  return at::empty_symint({x.sym_size(0), heads, x.sym_size(1), weight.sym_size(0) / heads},
                          x.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_projection_meta(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& q_bias, const std::optional<at::Tensor>& k_bias,
    const std::optional<at::Tensor>& v_bias, c10::SymInt num_heads) {
  check_qkv_projection_inputs("qkv_projection", query, key, value, q_weight, k_weight, v_weight,
                              q_bias, k_bias, v_bias, num_heads);
  return {heads_like(query, q_weight, num_heads), heads_like(key, k_weight, num_heads),
          heads_like(value, v_weight, num_heads)};
}

QKVProjectionGrads qkv_projection_backward_meta(const std::optional<at::Tensor>& grad_q,
                                                const std::optional<at::Tensor>& grad_k,
                                                const std::optional<at::Tensor>& grad_v,
                                                const at::Tensor& query, const at::Tensor& key,
                                                const at::Tensor& value, const at::Tensor& q_weight,
                                                const at::Tensor& k_weight,
                                                const at::Tensor& v_weight, c10::SymInt num_heads) {
  check_qkv_projection_backward_inputs(grad_q, grad_k, grad_v, query, key, value, q_weight,
                                       k_weight, v_weight, num_heads);
  auto like = [](const at::Tensor& t) { return at::empty_symint(t.sym_sizes(), t.options()); };
  auto bias_like = [](const at::Tensor& w) {
    return at::empty_symint({w.sym_size(0)}, w.options());
  };
  return {like(query),         like(key),           like(value),
          like(q_weight),      like(k_weight),      like(v_weight),
          bias_like(q_weight), bias_like(k_weight), bias_like(v_weight)};
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, Meta, m) {
  m.impl("qkv_projection", TORCH_FN(qkv_projection_meta));
  m.impl("qkv_projection_backward", TORCH_FN(qkv_projection_backward_meta));
}

}  // namespace qkv_attention::meta
