// The differentiable attention backward of ops/attention_math.h.
#include "ops/attention_math.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <limits>

#include "ops/attention_problem.h"
#include "ops/optional_tensor.h"

namespace qkv_attention {

AttentionGrads attention_backward_math(const AttentionBackwardCall& call, bool attn_mask_grad,
                                       bool padding_mask_grad) {
  const AttentionProblem& p = call.problem;
  const AttentionVariants& variants = p.variants;
  const at::Tensor &query = p.query, &key = p.key, &value = p.value;
  const std::optional<at::Tensor>&attn_mask = p.attn_mask, &key_padding_mask = p.key_padding_mask;
  const double inf = std::numeric_limits<double>::infinity();
  const at::ScalarType dtype = query.scalar_type();
  const at::ScalarType acc = at::toOpMathType(dtype);
  const c10::SymInt B = query.sym_size(0), H = query.sym_size(1), L = query.sym_size(2);
  const c10::SymInt S = key.sym_size(2);
  const double scale_value =
      attention_scale(p.scale, query.sym_size(3).guard_int(__FILE__, __LINE__));
  // Grouped-query attention: each key/value head serves `group` query heads; repeated here
  // (B, Hkv, S, D) -> (B, H, S, D), so autograd sums their gradients over each group.
  const c10::SymInt kv_heads = key.sym_size(1);
  const c10::SymInt group = kv_heads != 0 ? H / kv_heads : c10::SymInt(1);
  const bool grouped = group != 1;
  const at::Tensor q = query.to(acc);
  const at::Tensor k = grouped ? key.to(acc).repeat_interleave_symint(group, 1) : key.to(acc);
  const at::Tensor v = grouped ? value.to(acc).repeat_interleave_symint(group, 1) : value.to(acc);
  const at::Tensor grad_out = call.grad_output.to(acc);

  const at::Tensor raw = at::matmul(q, k.transpose(-2, -1)) * scale_value;  // (B, H, L, S)
  // softcap: score = cap * tanh(raw / cap), whose derivative is 1 - tanh^2.
  at::Tensor capped_tanh;
  at::Tensor scores = raw;
  if (variants.softcap > 0) {
    capped_tanh = (raw / variants.softcap).tanh();
    scores = capped_tanh * variants.softcap;
  }
  // |i - j| for ALiBi, and the window's bounds, on (L, S) positions.
  const at::TensorOptions index_options = query.options().dtype(at::kLong);
  const at::Tensor rows = at::arange(c10::Scalar(L), index_options).unsqueeze(1);  // (L, 1)
  const at::Tensor cols = at::arange(c10::Scalar(S), index_options).unsqueeze(0);  // (1, S)
  if (given(variants.alibi_slopes)) {
    const at::Tensor& slopes = *variants.alibi_slopes;  // (H,) or (B, H) -> (B or 1, H, 1, 1)
    const at::Tensor per_score =
        (slopes.dim() == 1 ? slopes.unsqueeze(0) : slopes).to(acc).unsqueeze(-1).unsqueeze(-1);
    scores = scores - per_score * (rows - cols).abs().to(acc);
  }
  auto apply_mask = [&](const at::Tensor& mask) {  // broadcastable to (B, H, L, S)
    scores = mask.scalar_type() == at::kBool ? scores.masked_fill(mask.logical_not(), -inf)
                                             : scores + mask.to(acc);
  };
  if (given(attn_mask)) apply_mask(*attn_mask);
  if (given(key_padding_mask)) {
    apply_mask(key_padding_mask->unsqueeze(1).unsqueeze(1));  // (B, S) -> (B, 1, 1, S)
  }
  at::Tensor hidden = at::zeros_symint({L, S}, query.options().dtype(at::kBool));
  if (p.is_causal) hidden = hidden.logical_or(cols > rows);
  if (variants.window_size[0] >= 0)
    hidden = hidden.logical_or(cols < rows - variants.window_size[0]);
  if (variants.window_size[1] >= 0)
    hidden = hidden.logical_or(cols > rows + variants.window_size[1]);
  if (p.is_causal || variants.has_window()) scores = scores.masked_fill(hidden, -inf);

  // A softmax that gives zeros, not NaN, for a row with no finite score. With sinks, the sink
  // is one more logit of the row (B, H, L, 1), with no value.
  // amax, not max(dim): max also computes indices, and its CPU kernel enters an OpenMP region
  // even for tiny inputs (milliseconds per call on a busy machine).
  at::Tensor row_max = scores.detach().amax(-1, /*keepdim=*/true);
  at::Tensor sink_logits;
  if (given(variants.sinks)) {
    sink_logits = variants.sinks->to(acc).view_symint({1, H, 1, 1});
    row_max = at::maximum(row_max, sink_logits.detach());
  }
  row_max = row_max.masked_fill(row_max.isneginf(), 0);
  const at::Tensor exps = (scores - row_max).exp();
  at::Tensor sums = exps.sum(-1, /*keepdim=*/true);
  at::Tensor sink_exp;
  if (sink_logits.defined()) {
    sink_exp = (sink_logits - row_max).exp();  // (B, H, L, 1)
    sums = sums + sink_exp;
  }
  const at::Tensor denominators = sums.masked_fill(sums == 0, 1);
  const at::Tensor prob = exps / denominators;

  at::Tensor weights = prob, grad_prob_factor;
  if (p.dropout_p > 0) {
    const double kept_scale = p.dropout_p < 1 ? 1.0 / (1.0 - p.dropout_p) : 0.0;
    grad_prob_factor =
        _attention_dropout_mask(*p.rng_state, B, H, L, S, p.dropout_p).to(acc) * kept_scale;
    weights = prob * grad_prob_factor;
  }
  at::Tensor grad_weights_total = at::matmul(grad_out, v.transpose(-2, -1));
  if (given(call.grad_weights)) {
    grad_weights_total = grad_weights_total + call.grad_weights->to(acc);
  }
  // (B, H, S, Dv) -> (B, Hkv, S, Dv): summed over each group of query heads.
  auto per_kv_head = [&](const at::Tensor& grad) {
    return grouped ? grad.unflatten_symint(1, {kv_heads, group}).sum(2) : grad;
  };
  const at::Tensor grad_value = per_kv_head(at::matmul(weights.transpose(-2, -1), grad_out));
  const at::Tensor grad_prob =
      grad_prob_factor.defined() ? grad_weights_total * grad_prob_factor : grad_weights_total;
  const at::Tensor delta = (prob * grad_prob).sum(-1, /*keepdim=*/true);
  const at::Tensor grad_scores = prob * (grad_prob - delta);  // d loss / d score
  // Through the cap: d loss / d raw.
  const at::Tensor grad_raw =
      capped_tanh.defined() ? grad_scores * (1 - capped_tanh * capped_tanh) : grad_scores;
  const at::Tensor grad_query = at::matmul(grad_raw, k) * scale_value;
  const at::Tensor grad_key = per_kv_head(at::matmul(grad_raw.transpose(-2, -1), q) * scale_value);
  const at::Tensor grad_mask =
      attn_mask_grad
          ? grad_scores.sum_to_size_symint(attn_mask->sym_sizes()).to(attn_mask->scalar_type())
          : no_gradient(query);
  const at::Tensor grad_padding = padding_mask_grad
                                      ? grad_scores.sum({1, 2}).to(key_padding_mask->scalar_type())
                                      : no_gradient(query);
  // The sink's probability p_sink = sink_exp / sums takes part in the row's softmax with a
  // zero upstream gradient: d loss / d sink = -p_sink * delta, summed over batch and rows.
  const at::Tensor grad_sinks =
      sink_exp.defined()
          ? (-(sink_exp / denominators) * delta).sum({0, 2, 3}).to(variants.sinks->scalar_type())
          : no_gradient(query);
  return {grad_query.to(dtype), grad_key.to(dtype), grad_value.to(dtype), grad_mask,
          grad_padding,         grad_sinks};
}

}  // namespace qkv_attention
