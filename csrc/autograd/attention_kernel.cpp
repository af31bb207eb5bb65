// Autograd of the attention operators, registered at the Autograd dispatch key.
//
// _attention_forward's backward calls _attention_backward through the dispatcher. That op has
// an Autograd kernel of its own: when the backward itself is being differentiated
// (create_graph=True), it recomputes the gradients with differentiable ATen ops so that
// autograd can take second derivatives; otherwise it runs the fused CPU kernel.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <limits>

#include "ops/attention.h"
#include "autograd/functorch_check.h"
#include "ops/checks.h"

namespace qkv_attention::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
bool requires_grad(const std::optional<at::Tensor>& t) { return t.has_value() && requires_grad(*t); }

std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query,
                               const at::Tensor& key, const at::Tensor& value,
                               const std::optional<at::Tensor>& attn_mask,
                               const std::optional<at::Tensor>& key_padding_mask,
                               double dropout_p, bool is_causal, std::optional<double> scale,
                               bool need_weights, const std::optional<at::Tensor>& rng_state,
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
    std::optional<at::Tensor> grad_weights =
        grads[2].defined() ? std::optional<at::Tensor>(grads[2]) : std::nullopt;
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
        grad_output, grad_weights, query, key, value, output, logsumexp, optional(mask),
        optional(padding), ctx->saved_data["dropout_p"].toDouble(),
        ctx->saved_data["is_causal"].toBool(), ctx->saved_data["scale"].toOptional<double>(),
        optional(rng_state), mask_needs_grad, padding_needs_grad);
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
  variable_list out = AttentionFunction::apply(query, key, value, attn_mask, key_padding_mask,
                                               dropout_p, is_causal, scale, need_weights,
                                               rng_state, average_attn_weights);
  return {out[0], out[1], out[2]};
}

// The attention backward written with differentiable ATen ops, computed in the accumulation
// dtype. Same math as the CPU kernel (cpu/attention_kernel.h), materialising (B, H, L, S).
AttentionGrads attention_backward_differentiable(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state, bool attn_mask_grad, bool padding_mask_grad) {
  const at::ScalarType dtype = query.scalar_type();
  const at::ScalarType acc = at::toOpMathType(dtype);
  const c10::SymInt B = query.sym_size(0), H = query.sym_size(1), L = query.sym_size(2);
  const c10::SymInt S = key.sym_size(2);
  const double scale_value =
      attention_scale(scale, query.sym_size(3).guard_int(__FILE__, __LINE__));
  // Grouped-query attention: each key/value head serves `group` query heads; repeated here
  // (B, Hkv, S, D) -> (B, H, S, D), so autograd sums their gradients over each group.
  const c10::SymInt kv_heads = key.sym_size(1);
  const c10::SymInt group = kv_heads != 0 ? H / kv_heads : c10::SymInt(1);
  const bool grouped = group != 1;
  const at::Tensor q = query.to(acc);
  const at::Tensor k = grouped ? key.to(acc).repeat_interleave_symint(group, 1) : key.to(acc);
  const at::Tensor v = grouped ? value.to(acc).repeat_interleave_symint(group, 1) : value.to(acc);
  const at::Tensor grad_out = grad_output.to(acc);

  at::Tensor scores = at::matmul(q, k.transpose(-2, -1)) * scale_value;  // (B, H, L, S)
  auto apply_mask = [&](const at::Tensor& mask) {  // broadcastable to (B, H, L, S)
    scores = mask.scalar_type() == at::kBool
                 ? scores.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity())
                 : scores + mask.to(acc);
  };
  if (attn_mask.has_value() && attn_mask->defined()) apply_mask(*attn_mask);
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    apply_mask(key_padding_mask->unsqueeze(1).unsqueeze(1));  // (B, S) -> (B, 1, 1, S)
  }
  if (is_causal) {
    const at::Tensor future = at::ones_symint({L, S}, query.options().dtype(at::kBool)).triu(1);
    scores = scores.masked_fill(future, -std::numeric_limits<double>::infinity());
  }
  // A softmax that gives zeros, not NaN, for a row with no finite score.
  // amax, not max(dim): max also computes indices, and its CPU kernel enters an OpenMP region
  // even for tiny inputs (milliseconds per call on a busy machine).
  at::Tensor row_max = scores.detach().amax(-1, /*keepdim=*/true);
  row_max = row_max.masked_fill(row_max.isneginf(), 0);
  const at::Tensor exps = (scores - row_max).exp();
  const at::Tensor sums = exps.sum(-1, /*keepdim=*/true);
  const at::Tensor prob = exps / sums.masked_fill(sums == 0, 1);

  at::Tensor weights = prob, grad_prob_factor;
  if (dropout_p > 0) {
    const double kept_scale = dropout_p < 1 ? 1.0 / (1.0 - dropout_p) : 0.0;
    grad_prob_factor =
        _attention_dropout_mask(*rng_state, B, H, L, S, dropout_p).to(acc) * kept_scale;
    weights = prob * grad_prob_factor;
  }
  at::Tensor grad_weights_total = at::matmul(grad_out, v.transpose(-2, -1));
  if (grad_weights.has_value() && grad_weights->defined()) {
    grad_weights_total = grad_weights_total + grad_weights->to(acc);
  }
  // (B, H, S, Dv) -> (B, Hkv, S, Dv): summed over each group of query heads.
  auto per_kv_head = [&](const at::Tensor& grad) {
    return grouped ? grad.unflatten_symint(1, {kv_heads, group}).sum(2) : grad;
  };
  const at::Tensor grad_value = per_kv_head(at::matmul(weights.transpose(-2, -1), grad_out));
  const at::Tensor grad_prob =
      grad_prob_factor.defined() ? grad_weights_total * grad_prob_factor : grad_weights_total;
  const at::Tensor delta = (prob * grad_prob).sum(-1, /*keepdim=*/true);
  const at::Tensor grad_scores = prob * (grad_prob - delta);
  const at::Tensor grad_query = at::matmul(grad_scores, k) * scale_value;
  const at::Tensor grad_key =
      per_kv_head(at::matmul(grad_scores.transpose(-2, -1), q) * scale_value);
  const at::Tensor grad_mask =
      attn_mask_grad
          ? grad_scores.sum_to_size_symint(attn_mask->sym_sizes()).to(attn_mask->scalar_type())
          : at::empty({0}, query.options());
  const at::Tensor grad_padding =
      padding_mask_grad ? grad_scores.sum({1, 2}).to(key_padding_mask->scalar_type())
                        : at::empty({0}, query.options());
  return {grad_query.to(dtype), grad_key.to(dtype), grad_value.to(dtype), grad_mask,
          grad_padding};
}

AttentionGrads attention_backward_autograd(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& output, const at::Tensor& logsumexp,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state, bool attn_mask_requires_grad,
    bool key_padding_mask_requires_grad) {
  const bool differentiate =
      at::GradMode::is_enabled() &&
      (requires_grad(grad_output) || requires_grad(grad_weights) || requires_grad(query) ||
       requires_grad(key) || requires_grad(value) || requires_grad(attn_mask) ||
       requires_grad(key_padding_mask));
  if (differentiate) {
    // An empty output and no gradient of the weights, or no query or no key at all (the
    // output is empty or all zeros, whatever the inputs): every gradient is zero, and so are
    // their derivatives; returned at once (the formulation below would also take the max of
    // empty rows). Otherwise it materialises the (B, H, L, S) scores.
    const bool shaped = value.defined() && value.dim() == 4 && query.defined() &&
                        query.dim() == 4 && key.defined() && key.dim() == 4;
    const bool empty_output =
        shaped && ((value.sym_size(3) == 0 && !(grad_weights.has_value() && grad_weights->defined())) ||
                   query.sym_size(2) == 0 || key.sym_size(2) == 0);
    check_attention_backward_inputs(grad_output, grad_weights, query, key, value, output,
                                    logsumexp, attn_mask, key_padding_mask, dropout_p, scale,
                                    rng_state, /*scores_materialised=*/!empty_output);
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
    return attention_backward_differentiable(
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
