// Autograd of qkv_projection, registered at the Autograd dispatch key. The backward op's own
// Autograd kernel makes double backward work: the projection is linear, so its backward written
// with ATen ops (ops/qkv_projection_math.h) is differentiable as it stands.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd/functorch_check.h"
#include "ops/checks.h"
#include "ops/optional_tensor.h"
#include "ops/qkv_projection.h"
#include "ops/qkv_projection_math.h"

namespace qkv_attention::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class QKVProjectionFunction : public torch::autograd::Function<QKVProjectionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const at::Tensor& q_weight,
                               const at::Tensor& k_weight, const at::Tensor& v_weight,
                               const std::optional<at::Tensor>& q_bias,
                               const std::optional<at::Tensor>& k_bias,
                               const std::optional<at::Tensor>& v_bias, c10::SymInt num_heads) {
    ctx->set_materialize_grads(false);  // a missing grad_q (k, v) is skipped, not zero-filled
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [q, k, v] = qkv_projection(query, key, value, q_weight, k_weight, v_weight, q_bias, k_bias,
                                    v_bias, num_heads);
    ctx->save_for_backward({query, key, value, q_weight, k_weight, v_weight});
    ctx->saved_data["num_heads"] = num_heads;
    ctx->saved_data["q_bias"] = given(q_bias);
    ctx->saved_data["k_bias"] = given(k_bias);
    ctx->saved_data["v_bias"] = given(v_bias);
    return {q, k, v};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_query, grad_key, grad_value, grad_q_weight, grad_k_weight, grad_v_weight,
          grad_q_bias, grad_k_bias, grad_v_bias] =
        qkv_projection_backward(optional_if_defined(grads[0]), optional_if_defined(grads[1]),
                                optional_if_defined(grads[2]), saved[0], saved[1], saved[2],
                                saved[3], saved[4], saved[5],
                                ctx->saved_data["num_heads"].toSymInt());
    // An input that was None gets no gradient (autograd insists on an undefined one).
    auto if_given = [&](const char* bias, const at::Tensor& grad) {
      return ctx->saved_data[bias].toBool() ? grad : at::Tensor();
    };
    return {grad_query,
            grad_key,
            grad_value,
            grad_q_weight,
            grad_k_weight,
            grad_v_weight,
            if_given("q_bias", grad_q_bias),
            if_given("k_bias", grad_k_bias),
            if_given("v_bias", grad_v_bias),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_projection_autograd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& q_bias, const std::optional<at::Tensor>& k_bias,
    const std::optional<at::Tensor>& v_bias, c10::SymInt num_heads) {
  constexpr const char* op = "qkv_projection";
  check_no_functorch_autodiff(op);
  check_defined(op, "query", query);
  check_defined(op, "key", key);
  check_defined(op, "value", value);
  check_defined(op, "q_weight", q_weight);
  check_defined(op, "k_weight", k_weight);
  check_defined(op, "v_weight", v_weight);
  variable_list out = QKVProjectionFunction::apply(query, key, value, q_weight, k_weight, v_weight,
                                                   q_bias, k_bias, v_bias, num_heads);
  return {out[0], out[1], out[2]};
}

QKVProjectionGrads qkv_projection_backward_autograd(
    const std::optional<at::Tensor>& grad_q, const std::optional<at::Tensor>& grad_k,
    const std::optional<at::Tensor>& grad_v, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& q_weight, const at::Tensor& k_weight,
    const at::Tensor& v_weight, c10::SymInt num_heads) {
  const bool differentiate =
      at::GradMode::is_enabled() &&
      (requires_grad(grad_q) || requires_grad(grad_k) || requires_grad(grad_v) ||
       query.requires_grad() || key.requires_grad() || value.requires_grad() ||
       q_weight.requires_grad() || k_weight.requires_grad() || v_weight.requires_grad());
  if (differentiate) {
    check_qkv_projection_backward_inputs(grad_q, grad_k, grad_v, query, key, value, q_weight,
                                         k_weight, v_weight, num_heads);
    return qkv_projection_backward_math(grad_q, grad_k, grad_v, query, key, value, q_weight,
                                        k_weight, v_weight);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return qkv_projection_backward(grad_q, grad_k, grad_v, query, key, value, q_weight, k_weight,
                                 v_weight, std::move(num_heads));
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, Autograd, m) {
  m.impl("qkv_projection", TORCH_FN(qkv_projection_autograd));
  m.impl("qkv_projection_backward", TORCH_FN(qkv_projection_backward_autograd));
}

}  // namespace qkv_attention::autograd
