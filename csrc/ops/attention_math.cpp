// The differentiable attention backward of ops/attention_math.h.
#include "ops/attention_math.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <limits>

#include "ops/attention_problem.h"
#include "ops/optional_tensor.h"

namespace qkv_attention {

AttentionGrads attention_backward_math(
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
  if (given(attn_mask)) apply_mask(*attn_mask);
  if (given(key_padding_mask)) {
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
  if (given(grad_weights)) {
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
  const at::Tensor grad_padding = padding_mask_grad
                                      ? grad_scores.sum({1, 2}).to(key_padding_mask->scalar_type())
                                      : at::empty({0}, query.options());
  return {grad_query.to(dtype), grad_key.to(dtype), grad_value.to(dtype), grad_mask, grad_padding};
}

}  // namespace qkv_attention
