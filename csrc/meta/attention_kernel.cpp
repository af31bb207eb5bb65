// Shape-only kernels of the attention operators: what torch.compile, torch.export and
// FakeTensor see. They run the same input checks as the CPU kernels, on symbolic sizes.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "ops/attention.h"

namespace qkv_attention::meta {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_meta(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool need_weights,
    const std::optional<at::Tensor>& rng_state, bool average_attn_weights) {
  check_attention_inputs("attention", query, key, value, attn_mask, key_padding_mask, dropout_p,
                         scale, rng_state, /*rng_state_required=*/true, need_weights);
  const c10::SymInt B = query.sym_size(0), H = query.sym_size(1), L = query.sym_size(2);
  const c10::SymInt S = key.sym_size(2), Dv = value.sym_size(3);
  at::Tensor output = at::empty_symint({B, H, L, Dv}, query.options());
  at::Tensor logsumexp =
      at::empty_symint({B, H, L}, query.options().dtype(at::toOpMathType(query.scalar_type())));
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
  check_attention_backward_inputs(
      grad_output, grad_weights, query, key, value, output, logsumexp, attn_mask, key_padding_mask,
      dropout_p, scale, rng_state,
      (grad_weights.has_value() && grad_weights->defined()) ||
          attention_mask_gets_grad(attn_mask, attn_mask_requires_grad) ||
          attention_mask_gets_grad(key_padding_mask, key_padding_mask_requires_grad));
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
