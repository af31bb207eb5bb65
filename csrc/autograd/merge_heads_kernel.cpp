// Autograd of merge_heads, registered at the Autograd dispatch key. The backward op's own
// Autograd kernel makes double backward work: merge_heads is bilinear in (x, out_weight), so its
// backward written with ATen ops (ops/merge_heads_math.h) is differentiable as it stands.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd/functorch_check.h"
#include "ops/checks.h"
#include "ops/merge_heads.h"
#include "ops/merge_heads_math.h"
#include "ops/optional_tensor.h"

namespace qkv_attention::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class MergeHeadsFunction : public torch::autograd::Function<MergeHeadsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& out_weight,
                               const std::optional<at::Tensor>& out_bias) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = merge_heads(x, out_weight, out_bias);
    ctx->save_for_backward({x, out_weight});
    ctx->saved_data["has_bias"] = given(out_bias);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_x, grad_weight, grad_bias] = merge_heads_backward(grads[0], saved[0], saved[1]);
    // A bias that was None gets no gradient (autograd insists on an undefined one).
    return {grad_x, grad_weight, ctx->saved_data["has_bias"].toBool() ? grad_bias : at::Tensor()};
  }
};

at::Tensor merge_heads_autograd(const at::Tensor& x, const at::Tensor& out_weight,
                                const std::optional<at::Tensor>& out_bias) {
  check_no_functorch_autodiff("merge_heads");
  check_defined("merge_heads", "x", x);
  check_defined("merge_heads", "out_weight", out_weight);
  return MergeHeadsFunction::apply(x, out_weight, out_bias)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_heads_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& out_weight) {
  const bool differentiate =
      at::GradMode::is_enabled() &&
      (grad_output.requires_grad() || x.requires_grad() || out_weight.requires_grad());
  if (differentiate) {
    check_merge_heads_backward_inputs(grad_output, x, out_weight);
    return merge_heads_backward_math(grad_output, x, out_weight);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return merge_heads_backward(grad_output, x, out_weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, Autograd, m) {
  m.impl("merge_heads", TORCH_FN(merge_heads_autograd));
  m.impl("merge_heads_backward", TORCH_FN(merge_heads_backward_autograd));
}

}  // namespace qkv_attention::autograd
