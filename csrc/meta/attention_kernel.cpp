// Shape-only kernels of the attention operators: what torch.compile, torch.export and
// FakeTensor see. The call becomes the same problem as on the CPU (ops/attention_problem.h),
// checked on symbolic sizes.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "ops/attention.h"
#include "ops/attention_problem.h"
#include "ops/attention_signatures.h"
#include "ops/operators.h"
#include "ops/optional_tensor.h"

namespace qkv_attention::meta {
namespace {

AttentionForwardOutputs attention_forward_meta(AttentionProblem problem) {
  check_attention_problem(problem);
  const at::Tensor& query = problem.query;
  const c10::SymInt B = query.sym_size(0), H = query.sym_size(1), L = query.sym_size(2);
  const c10::SymInt S = problem.key.sym_size(2);
  at::Tensor output = at::empty_symint(output_shape(problem), query.options());
  at::Tensor logsumexp = at::empty_symint(
      logsumexp_shape(problem), query.options().dtype(at::toOpMathType(query.scalar_type())));
  at::Tensor weights = !problem.need_weights     ? no_gradient(query)
                       : problem.average_weights ? at::empty_symint({B, L, S}, query.options())
                                                 : at::empty_symint({B, H, L, S}, query.options());
  return {output, logsumexp, weights};
}

AttentionGrads attention_backward_meta(AttentionBackwardCall call) {
  check_attention_backward(call);
  const AttentionProblem& p = call.problem;
  auto empty_like_given = [&](const std::optional<at::Tensor>& t, bool wanted) {
    return wanted ? at::empty_symint(t->sym_sizes(), t->options()) : no_gradient(p.query);
  };
  return {at::empty_symint(p.query.sym_sizes(), p.query.options()),
          at::empty_symint(p.key.sym_sizes(), p.key.options()),
          at::empty_symint(p.value.sym_sizes(), p.value.options()),
          empty_like_given(p.attn_mask,
                           attention_mask_gets_grad(p.attn_mask, call.attn_mask_requires_grad)),
          empty_like_given(
              p.key_padding_mask,
              attention_mask_gets_grad(p.key_padding_mask, call.key_padding_mask_requires_grad)),
          empty_like_given(p.variants.sinks, given(p.variants.sinks))};
}

at::Tensor attention_dropout_mask_meta(const at::Tensor& rng_state, c10::SymInt batch,
                                       c10::SymInt heads, c10::SymInt q_len, c10::SymInt kv_len,
                                       double dropout_p) {
  check_dropout_mask_inputs(rng_state, batch, heads, q_len, kv_len, dropout_p);
  return at::empty_symint({batch, heads, q_len, kv_len}, rng_state.options().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, Meta, m) {
  m.impl("_attention_forward", TORCH_FN(attention_forward_op<&attention_forward_meta>));
  m.impl("_attention_backward", TORCH_FN(attention_backward_op<&attention_backward_meta>));
  m.impl("_attention_dropout_mask", TORCH_FN(attention_dropout_mask_meta));
}

}  // namespace qkv_attention::meta
