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
#include "ops/attention_signatures.h"
#include "ops/checks.h"
#include "ops/operators.h"
#include "ops/optional_tensor.h"

namespace qkv_attention::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  // The problem's tensors that may carry gradients come first, so that autograd records them
  // as the node's inputs; the rest of the call is read from `problem`.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                               const std::optional<at::Tensor>& key_padding_mask,
                               const std::optional<at::Tensor>& sinks,
                               const AttentionProblem* problem) {
    // Gradients we are not given stay undefined (no zeros of shape (B, H, L, S) for the weights).
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, logsumexp, weights] = attention_forward_call(*problem);
    // The backward regenerates the dropout mask from the same rng_state: it is saved, never
    // drawn again.
    const AttentionVariants& variants = problem->variants;
    ctx->save_for_backward(
        {query, key, value, output, logsumexp, problem->rng_state.value_or(at::Tensor()),
         attn_mask.value_or(at::Tensor()), key_padding_mask.value_or(at::Tensor()),
         variants.alibi_slopes.value_or(at::Tensor()), sinks.value_or(at::Tensor())});
    ctx->saved_data["dropout_p"] = problem->dropout_p;
    ctx->saved_data["is_causal"] = problem->is_causal;
    ctx->saved_data["scale"] = problem->scale;
    ctx->saved_data["average_attn_weights"] = problem->average_weights;
    ctx->saved_data["window_size"] = variants.window_size;
    ctx->saved_data["softcap"] = variants.softcap;
    ctx->mark_non_differentiable({logsumexp});
    if (!problem->need_weights) ctx->mark_non_differentiable({weights});
    return {output, logsumexp, weights};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &query = saved[0], &key = saved[1], &value = saved[2], &output = saved[3],
                     &logsumexp = saved[4], &rng_state = saved[5], &mask = saved[6],
                     &padding = saved[7], &slopes = saved[8], &sinks = saved[9];
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
    // masks and sinks that are not None.
    int64_t input = 3;
    const bool mask_needs_grad = mask.defined() && ctx->needs_input_grad(input++);
    const bool padding_needs_grad = padding.defined() && ctx->needs_input_grad(input++);
    const bool sinks_need_grad = sinks.defined() && ctx->needs_input_grad(input);
    AttentionVariants variants{ctx->saved_data["window_size"].toIntVector(),
                               ctx->saved_data["softcap"].toDouble(), optional_if_defined(slopes),
                               optional_if_defined(sinks)};
    AttentionBackwardCall call{
        dense_problem(op_label("_attention_backward"), query, key, value, optional_if_defined(mask),
                      optional_if_defined(padding), ctx->saved_data["dropout_p"].toDouble(),
                      ctx->saved_data["is_causal"].toBool(),
                      ctx->saved_data["scale"].toOptional<double>(), optional_if_defined(rng_state),
                      std::move(variants),
                      /*rng_state_required=*/true, /*scores_materialised=*/false),
        grad_output,
        output,
        logsumexp,
        grad_weights,
        mask_needs_grad,
        padding_needs_grad};
    auto [grad_query, grad_key, grad_value, grad_mask, grad_padding, grad_sinks] =
        attention_backward_call(call);
    return {grad_query,
            grad_key,
            grad_value,
            mask_needs_grad ? grad_mask : at::Tensor(),
            padding_needs_grad ? grad_padding : at::Tensor(),
            sinks_need_grad ? grad_sinks : at::Tensor(),
            at::Tensor()};  // the problem
  }
};

AttentionForwardOutputs attention_forward_autograd(AttentionProblem problem) {
  constexpr const char* op = "attention";
  check_no_functorch_autodiff(op);
  check_defined(op, "query", problem.query);
  check_defined(op, "key", problem.key);
  check_defined(op, "value", problem.value);
  // Function::apply reads the tensors' sizes too (a nested mask would fail there, unnamed).
  const std::pair<const char*, const std::optional<at::Tensor>*> optional_inputs[] = {
      {"attn_mask", &problem.attn_mask},
      {"key_padding_mask", &problem.key_padding_mask},
      {"rng_state", &problem.rng_state},
      {"alibi_slopes", &problem.variants.alibi_slopes},
      {"sinks", &problem.variants.sinks}};
  for (const auto& [name, tensor] : optional_inputs) {
    if (given(*tensor)) check_dense(op, name, **tensor);
  }
  variable_list out =
      AttentionFunction::apply(problem.query, problem.key, problem.value, problem.attn_mask,
                               problem.key_padding_mask, problem.variants.sinks, &problem);
  return {out[0], out[1], out[2]};
}

AttentionGrads attention_backward_autograd(AttentionBackwardCall call) {
  const AttentionProblem& p = call.problem;
  const bool differentiate = at::GradMode::is_enabled() &&
                             (requires_grad(call.grad_output) || requires_grad(call.grad_weights) ||
                              requires_grad(p.query) || requires_grad(p.key) ||
                              requires_grad(p.value) || requires_grad(p.attn_mask) ||
                              requires_grad(p.key_padding_mask) || requires_grad(p.variants.sinks));
  if (!differentiate) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return attention_backward_call(call);
  }
  const at::Tensor &query = p.query, &key = p.key, &value = p.value;
  // An empty output and no gradient of the weights, or no query or no key at all (the output
  // is empty or all zeros, whatever the inputs): every gradient is zero, and so are their
  // derivatives; returned at once (the formulation below would also take the max of empty
  // rows). Otherwise it materialises the (B, H, L, S) scores.
  const bool shaped = value.defined() && value.dim() == 4 && query.defined() && query.dim() == 4 &&
                      key.defined() && key.dim() == 4;
  const bool empty_output = shaped && ((value.sym_size(3) == 0 && !given(call.grad_weights)) ||
                                       query.sym_size(2) == 0 || key.sym_size(2) == 0);
  call.problem.scores_materialised = !empty_output;
  check_attention_backward(call);
  const bool attn_mask_grad = attention_mask_gets_grad(p.attn_mask, call.attn_mask_requires_grad);
  const bool padding_grad =
      attention_mask_gets_grad(p.key_padding_mask, call.key_padding_mask_requires_grad);
  if (empty_output) {
    auto zeros_like_given = [&](const std::optional<at::Tensor>& t, bool wanted) {
      return wanted ? at::zeros_symint(t->sym_sizes(), t->options()) : no_gradient(query);
    };
    return {at::zeros_symint(query.sym_sizes(), query.options()),
            at::zeros_symint(key.sym_sizes(), key.options()),
            at::zeros_symint(value.sym_sizes(), value.options()),
            zeros_like_given(p.attn_mask, attn_mask_grad),
            zeros_like_given(p.key_padding_mask, padding_grad),
            zeros_like_given(p.variants.sinks, given(p.variants.sinks))};
  }
  return attention_backward_math(call, attn_mask_grad, padding_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, Autograd, m) {
  m.impl("_attention_forward", TORCH_FN(attention_forward_op<&attention_forward_autograd>));
  m.impl("_attention_backward", TORCH_FN(attention_backward_op<&attention_backward_autograd>));
}

}  // namespace qkv_attention::autograd
