// Shape-only kernels of the variable-length attention operators. The shapes follow from the
// packed sizes alone, never from the offsets' values (which a FakeTensor does not have), so
// torch.compile traces a call whatever its lengths; the CPU kernel checks the values.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "ops/attention_problem.h"
#include "ops/attention_signatures.h"
#include "ops/operators.h"
#include "ops/optional_tensor.h"

namespace qkv_attention::meta {
namespace {

VarlenForwardOutputs attention_varlen_forward_meta(AttentionProblem problem) {
  check_attention_problem(problem);
  const at::Tensor& query = problem.query;
  return {at::empty_symint(output_shape(problem), query.options()),
          at::empty_symint(logsumexp_shape(problem),
                           query.options().dtype(at::toOpMathType(query.scalar_type())))};
}

VarlenGrads attention_varlen_backward_meta(AttentionBackwardCall call) {
  check_attention_backward(call);
  const AttentionProblem& p = call.problem;
  const std::optional<at::Tensor>& sinks = p.variants.sinks;
  return {at::empty_symint(p.query.sym_sizes(), p.query.options()),
          at::empty_symint(p.key.sym_sizes(), p.key.options()),
          at::empty_symint(p.value.sym_sizes(), p.value.options()),
          given(sinks) ? at::empty_symint(sinks->sym_sizes(), sinks->options())
                       : at::empty({0}, p.query.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, Meta, m) {
  m.impl("_attention_varlen_forward",
         TORCH_FN(attention_varlen_forward_op<&attention_varlen_forward_meta>));
  m.impl("_attention_varlen_backward",
         TORCH_FN(attention_varlen_backward_op<&attention_varlen_backward_meta>));
}

}  // namespace qkv_attention::meta
