// Autograd of the attention operators, registered at the Autograd dispatch key.
//
// _attention_forward's backward calls _attention_backward through the dispatcher. That op has
// an Autograd kernel of its own: when the backward itself is being differentiated
// (create_graph=True), it recomputes the gradients with differentiable ATen ops so that
// autograd can take second derivatives (ops/attention_math.h); otherwise it runs the op's
// kernel below autograd.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd/functorch_check.h"
#include "ops/attention.h"
#include "ops/attention_math.h"
#include "ops/attention_problem.h"
#include "ops/checks.h"
#include "ops/operators.h"
#include "ops/optional_tensor.h"

namespace qkv_attention::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                               const std::optional<at::Tensor>& key_padding_mask, double dropout_p,
                               bool is_causal, std::optional<double> scale, bool need_weights,
                               const std::optional<at::Tensor>& rng_state,
                               bool average_attn_weights) {
    // Gradients we are not given stay undefined (no zeros of shape (B, H, L, S) for the weights).
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, logsumexp, weights] =
        _attention_forward(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal,
                           scale, need_weights, rng_state, average_attn_weights);
    // The backward regenerates the dropout mask from the same rng_state: it is saved, never
    // drawn again.
    ctx->save_for_backward({query, key, value, output, logsumexp, rng_state.value_or(at::Tensor()),
                            attn_mask.value_or(at::Tensor()),
                            key_padding_mask.value_or(at::Tensor())});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["average_attn_weights"] = need_weights && average_attn_weights;
    ctx->mark_non_differentiable({logsumexp});
    if (!need_weights) ctx->mark_non_differentiable({weights});
    return {output, logsumexp, weights};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &query = saved[0], &key = saved[1], &value = saved[2], &output = saved[3],
                     &logsumexp = saved[4], &rng_state = saved[5], &mask = saved[6],
                     &padding = saved[7];
    at::Tensor grad_output = grads[0].defined() ? grads[0] : at::zeros_like(output);
    std::optional<at::Tensor> grad_weights = optional_if_defined(grads[2]);
    if (grad_weights.has_value() && ctx->saved_data["average_attn_weights"].toBool()) {
      // The weights were the mean over the heads: each head's weights receive 1/H of the
      // gradient, (B, L, S) -> (B, H, L, S) as a view with a zero head stride.
      const c10::SymInt heads = query.sym_size(1);
      grad_weights = grad_weights->div(c10::Scalar(heads))
                         .unsqueeze(1)
                         .expand_symint({grad_weights->sym_size(0), heads,
                                         grad_weights->sym_size(1), grad_weights->sym_size(2)});
    }
    // Autograd numbers only the tensor inputs that were given: query, key, value, then the
    // masks that are not None.
    const bool mask_needs_grad = mask.defined() && ctx->needs_input_grad(3);
    const bool padding_needs_grad =
        padding.defined() && ctx->needs_input_grad(mask.defined() ? 4 : 3);
    auto [grad_query, grad_key, grad_value, grad_mask, grad_padding] = _attention_backward(
        grad_output, grad_weights, query, key, value, output, logsumexp, optional_if_defined(mask),
        optional_if_defined(padding), ctx->saved_data["dropout_p"].toDouble(),
        ctx->saved_data["is_causal"].toBool(), ctx->saved_data["scale"].toOptional<double>(),
        optional_if_defined(rng_state), mask_needs_grad, padding_needs_grad);
    return {grad_query,
            grad_key,
            grad_value,
            mask_needs_grad ? grad_mask : at::Tensor(),
            padding_needs_grad ? grad_padding : at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),   // rng_state
            at::Tensor()};  // average_attn_weights
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_autograd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool need_weights,
    const std::optional<at::Tensor>& rng_state, bool average_attn_weights) {
  check_no_functorch_autodiff("attention");
  check_defined("attention", "query", query);
  check_defined("attention", "key", key);
  check_defined("attention", "value", value);
  // Function::apply reads the masks' sizes too (a nested mask would fail there, unnamed).
  if (attn_mask.has_value()) check_dense("attention", "attn_mask", *attn_mask);
  if (key_padding_mask.has_value()) check_dense("attention", "key_padding_mask", *key_padding_mask);
  if (rng_state.has_value()) check_dense("attention", "rng_state", *rng_state);
  variable_list out =
      AttentionFunction::apply(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal,
                               scale, need_weights, rng_state, average_attn_weights);
  return {out[0], out[1], out[2]};
}

AttentionGrads attention_backward_autograd(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& output, const at::Tensor& logsumexp,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state, bool attn_mask_requires_grad,
    bool key_padding_mask_requires_grad) {
  const bool differentiate = at::GradMode::is_enabled() &&
                             (requires_grad(grad_output) || requires_grad(grad_weights) ||
                              requires_grad(query) || requires_grad(key) || requires_grad(value) ||
                              requires_grad(attn_mask) || requires_grad(key_padding_mask));
  if (differentiate) {
    // An empty output and no gradient of the weights, or no query or no key at all (the
    // output is empty or all zeros, whatever the inputs): every gradient is zero, and so are
    // their derivatives; returned at once (the formulation below would also take the max of
    // empty rows). Otherwise it materialises the (B, H, L, S) scores.
    const bool shaped = value.defined() && value.dim() == 4 && query.defined() &&
                        query.dim() == 4 && key.defined() && key.dim() == 4;
    const bool empty_output = shaped && ((value.sym_size(3) == 0 && !given(grad_weights)) ||
                                         query.sym_size(2) == 0 || key.sym_size(2) == 0);
    check_attention_backward(
        dense_problem(op_label("_attention_backward"), query, key, value, attn_mask,
                      key_padding_mask, dropout_p, is_causal, scale, rng_state,
                      /*rng_state_required=*/true, /*scores_materialised=*/!empty_output),
        {grad_output, output, logsumexp, grad_weights});
    if (empty_output) {
      auto zeros_like_mask = [&](const std::optional<at::Tensor>& mask, bool requires_grad) {
        return attention_mask_gets_grad(mask, requires_grad)
                   ? at::zeros_symint(mask->sym_sizes(), mask->options())
                   : at::empty({0}, query.options());
      };
      return {at::zeros_symint(query.sym_sizes(), query.options()),
              at::zeros_symint(key.sym_sizes(), key.options()),
              at::zeros_symint(value.sym_sizes(), value.options()),
              zeros_like_mask(attn_mask, attn_mask_requires_grad),
              zeros_like_mask(key_padding_mask, key_padding_mask_requires_grad)};
    }
    return attention_backward_math(
        grad_output, grad_weights, query, key, value, attn_mask, key_padding_mask, dropout_p,
        is_causal, scale, rng_state, attention_mask_gets_grad(attn_mask, attn_mask_requires_grad),
        attention_mask_gets_grad(key_padding_mask, key_padding_mask_requires_grad));
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return _attention_backward(grad_output, grad_weights, query, key, value, output, logsumexp,
                             attn_mask, key_padding_mask, dropout_p, is_causal, scale, rng_state,
                             attn_mask_requires_grad, key_padding_mask_requires_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, Autograd, m) {
  m.impl("_attention_forward", TORCH_FN(attention_forward_autograd));
  m.impl("_attention_backward", TORCH_FN(attention_backward_autograd));
}

}  // namespace qkv_attention::autograd
