// Shape-only kernels of the attention operators: what torch.compile, torch.export and
// FakeTensor see. The call becomes the same problem as on the CPU (ops/attention_problem.h),
// checked on symbolic sizes.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "ops/attention.h"
#include "ops/attention_problem.h"
#include "ops/operators.h"
#include "ops/optional_tensor.h"

namespace qkv_attention::meta {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_meta(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool need_weights,
    const std::optional<at::Tensor>& rng_state, bool average_attn_weights) {
  const AttentionProblem problem =
      dense_problem(op_label("_attention_forward"), query, key, value, attn_mask, key_padding_mask,
                    dropout_p, is_causal, scale, rng_state, /*rng_state_required=*/true,
                    /*scores_materialised=*/need_weights);
  check_attention_problem(problem);
  const c10::SymInt B = query.sym_size(0), H = query.sym_size(1), L = query.sym_size(2);
  const c10::SymInt S = key.sym_size(2);
  at::Tensor output = at::empty_symint(output_shape(problem), query.options());
  at::Tensor logsumexp = at::empty_symint(
      logsumexp_shape(problem), query.options().dtype(at::toOpMathType(query.scalar_type())));
  at::Tensor weights = !need_weights          ? at::empty({0}, query.options())
                       : average_attn_weights ? at::empty_symint({B, L, S}, query.options())
                                              : at::empty_symint({B, H, L, S}, query.options());
  return {output, logsumexp, weights};
}

AttentionGrads attention_backward_meta(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& output, const at::Tensor& logsumexp,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state, bool attn_mask_requires_grad,
    bool key_padding_mask_requires_grad) {
  const AttentionProblem problem =
      dense_problem(op_label("_attention_backward"), query, key, value, attn_mask, key_padding_mask,
                    dropout_p, is_causal, scale, rng_state, /*rng_state_required=*/true,
                    /*scores_materialised=*/given(grad_weights) ||
                        attention_mask_gets_grad(attn_mask, attn_mask_requires_grad) ||
                        attention_mask_gets_grad(key_padding_mask, key_padding_mask_requires_grad));
  check_attention_backward(problem, {grad_output, output, logsumexp, grad_weights});
  auto mask_grad = [&](const std::optional<at::Tensor>& mask, bool requires_grad) {
    return attention_mask_gets_grad(mask, requires_grad)
               ? at::empty_symint(mask->sym_sizes(), mask->options())
               : at::empty({0}, query.options());
  };
  return {at::empty_symint(query.sym_sizes(), query.options()),
          at::empty_symint(key.sym_sizes(), key.options()),
          at::empty_symint(value.sym_sizes(), value.options()),
          mask_grad(attn_mask, attn_mask_requires_grad),
          mask_grad(key_padding_mask, key_padding_mask_requires_grad)};
}

at::Tensor attention_dropout_mask_meta(const at::Tensor& rng_state, c10::SymInt batch,
                                       c10::SymInt heads, c10::SymInt q_len, c10::SymInt kv_len,
                                       double dropout_p) {
  check_dropout_mask_inputs(rng_state, batch, heads, q_len, kv_len, dropout_p);
  return at::empty_symint({batch, heads, q_len, kv_len}, rng_state.options().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, Meta, m) {
  m.impl("_attention_forward", TORCH_FN(attention_forward_meta));
  m.impl("_attention_backward", TORCH_FN(attention_backward_meta));
  m.impl("_attention_dropout_mask", TORCH_FN(attention_dropout_mask_meta));
}

}  // namespace qkv_attention::meta
