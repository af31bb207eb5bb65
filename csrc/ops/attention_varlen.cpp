// Schemas and typed entry points of the variable-length attention operators
// (ops/attention_varlen.h). Their checks are the family's (ops/attention_problem.h).
#include "ops/attention_varlen.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops/attention.h"
#include "ops/attention_problem.h"
#include "ops/attention_signatures.h"
#include "ops/operators.h"

namespace qkv_attention {
namespace {

// attention_varlen is a composition, like attention: the dropout stream's state drawn by an
// ATen random op (ops/attention.cpp explains why outside the kernel op), then
// _attention_varlen_forward, which carries autograd, Meta and the CPU kernel.
at::Tensor attention_varlen_composite(AttentionProblem problem) {
  // Bad input raises before the generator is touched.
  check_attention_problem(problem);
  problem.rng_state = draw_dropout_rng_state(problem.dropout_p);
  return std::get<0>(attention_varlen_forward_call(problem));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qkv_attention, m) {
  m.def(
      "attention_varlen(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p=0.0, "
      "bool is_causal=False, float? scale=None, " QKV_VARIANT_ARGUMENTS ") -> Tensor",
      TORCH_FN(attention_varlen_op<&attention_varlen_composite>));
  m.def(
      "_attention_varlen_forward(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p, "
      "bool is_causal, float? scale, Tensor? rng_state=None, " QKV_VARIANT_ARGUMENTS
      ") -> (Tensor output, Tensor logsumexp)");
  m.def(
      "_attention_varlen_backward(Tensor grad_output, Tensor query, Tensor key, Tensor value, "
      "Tensor output, Tensor logsumexp, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p, bool is_causal, "
      "float? scale, Tensor? rng_state, " QKV_VARIANT_ARGUMENTS
      ") -> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_sinks)");
}

at::Tensor attention_varlen(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                            c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k, double dropout_p,
                            bool is_causal, std::optional<double> scale,
                            at::IntArrayRef window_size, double softcap,
                            const std::optional<at::Tensor>& alibi_slopes,
                            const std::optional<at::Tensor>& sinks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::attention_varlen", "")
                       .typed<decltype(attention_varlen)>();
  return op.call(query, key, value, cu_seqlens_q, cu_seqlens_k, std::move(max_seqlen_q),
                 std::move(max_seqlen_k), dropout_p, is_causal, scale, window_size, softcap,
                 alibi_slopes, sinks);
}

std::tuple<at::Tensor, at::Tensor> _attention_varlen_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
    c10::SymInt max_seqlen_k, double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state, at::IntArrayRef window_size, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::_attention_varlen_forward", "")
                       .typed<decltype(_attention_varlen_forward)>();
  return op.call(query, key, value, cu_seqlens_q, cu_seqlens_k, std::move(max_seqlen_q),
                 std::move(max_seqlen_k), dropout_p, is_causal, scale, rng_state, window_size,
                 softcap, alibi_slopes, sinks);
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_forward_call(const AttentionProblem& p) {
  const AttentionVariants& v = p.variants;
  return _attention_varlen_forward(p.query, p.key, p.value, p.cu_seqlens_q, p.cu_seqlens_k,
                                   p.max_seqlen_q, p.max_seqlen_k, p.dropout_p, p.is_causal,
                                   p.scale, p.rng_state, v.window_size, v.softcap, v.alibi_slopes,
                                   v.sinks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> _attention_varlen_backward(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& logsumexp,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
    c10::SymInt max_seqlen_k, double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state, at::IntArrayRef window_size, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::_attention_varlen_backward", "")
                       .typed<decltype(_attention_varlen_backward)>();
  return op.call(grad_output, query, key, value, output, logsumexp, cu_seqlens_q, cu_seqlens_k,
                 std::move(max_seqlen_q), std::move(max_seqlen_k), dropout_p, is_causal, scale,
                 rng_state, window_size, softcap, alibi_slopes, sinks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_call(
    const AttentionBackwardCall& call) {
  const AttentionProblem& p = call.problem;
  const AttentionVariants& v = p.variants;
  return _attention_varlen_backward(call.grad_output, p.query, p.key, p.value, call.output,
                                    call.logsumexp, p.cu_seqlens_q, p.cu_seqlens_k, p.max_seqlen_q,
                                    p.max_seqlen_k, p.dropout_p, p.is_causal, p.scale, p.rng_state,
                                    v.window_size, v.softcap, v.alibi_slopes, v.sinks);
}

}  // namespace qkv_attention
