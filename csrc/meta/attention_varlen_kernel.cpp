// Shape-only kernels of the variable-length attention operators. The shapes follow from the
// packed sizes alone, never from the offsets' values (which a FakeTensor does not have), so
// torch.compile traces a call whatever its lengths; the CPU kernel checks the values.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "ops/attention_problem.h"
#include "ops/operators.h"

namespace qkv_attention::meta {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_varlen_forward_meta(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
    c10::SymInt max_seqlen_k, double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state) {
  const AttentionProblem problem = packed_problem(
      op_label("_attention_varlen_forward"), query, key, value, cu_seqlens_q, cu_seqlens_k,
      max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale, rng_state,
      /*rng_state_required=*/true);
  check_attention_problem(problem);
  return {at::empty_symint(output_shape(problem), query.options()),
          at::empty_symint(logsumexp_shape(problem),
                           query.options().dtype(at::toOpMathType(query.scalar_type())))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_meta(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& logsumexp,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
    c10::SymInt max_seqlen_k, double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state) {
  const AttentionProblem problem = packed_problem(
      op_label("_attention_varlen_backward"), query, key, value, cu_seqlens_q, cu_seqlens_k,
      max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale, rng_state,
      /*rng_state_required=*/true);
  check_attention_backward(problem, {grad_output, output, logsumexp, std::nullopt});
  return {at::empty_symint(query.sym_sizes(), query.options()),
          at::empty_symint(key.sym_sizes(), key.options()),
          at::empty_symint(value.sym_sizes(), value.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, Meta, m) {
  m.impl("_attention_varlen_forward", TORCH_FN(attention_varlen_forward_meta));
  m.impl("_attention_varlen_backward", TORCH_FN(attention_varlen_backward_meta));
}

}  // namespace qkv_attention::meta
