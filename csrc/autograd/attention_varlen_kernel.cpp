// Autograd of the variable-length attention operators, registered at the Autograd dispatch key.
//
// _attention_varlen_forward's backward calls _attention_varlen_backward through the
// dispatcher. When that backward is itself differentiated (create_graph=True), its Autograd
// kernel computes each sequence's gradients with the dense _attention_backward on views of the
// packed tensors, whose own Autograd kernel then computes with differentiable ATen ops (see
// autograd/attention_kernel.cpp), and concatenates them: a graph autograd can differentiate
// again. Otherwise it runs the fused CPU kernel.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "autograd/functorch_check.h"
#include "ops/attention.h"
#include "ops/attention_problem.h"
#include "ops/attention_signatures.h"
#include "ops/attention_varlen.h"
#include "ops/checks.h"
#include "ops/operators.h"
#include "ops/optional_tensor.h"

namespace qkv_attention::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class AttentionVarlenFunction : public torch::autograd::Function<AttentionVarlenFunction> {
 public:
  // The problem's tensors that may carry gradients come first, so that autograd records them
  // as the node's inputs; the rest of the call is read from `problem`.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const std::optional<at::Tensor>& sinks,
                               const AttentionProblem* problem) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, logsumexp] = attention_varlen_forward_call(*problem);
    // The backward regenerates the dropout masks from the same rng_state.
    const AttentionVariants& variants = problem->variants;
    ctx->save_for_backward({query, key, value, output, logsumexp, problem->cu_seqlens_q,
                            problem->cu_seqlens_k, problem->rng_state.value_or(at::Tensor()),
                            variants.alibi_slopes.value_or(at::Tensor()),
                            sinks.value_or(at::Tensor())});
    ctx->saved_data["max_seqlen_q"] = problem->max_seqlen_q;
    ctx->saved_data["max_seqlen_k"] = problem->max_seqlen_k;
    ctx->saved_data["dropout_p"] = problem->dropout_p;
    ctx->saved_data["is_causal"] = problem->is_causal;
    ctx->saved_data["scale"] = problem->scale;
    ctx->saved_data["window_size"] = variants.window_size;
    ctx->saved_data["softcap"] = variants.softcap;
    ctx->mark_non_differentiable({logsumexp});
    return {output, logsumexp};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &query = saved[0], &key = saved[1], &value = saved[2], &output = saved[3],
                     &logsumexp = saved[4], &rng_state = saved[7], &slopes = saved[8],
                     &sinks = saved[9];
    const at::Tensor grad_output = grads[0].defined() ? grads[0] : at::zeros_like(output);
    AttentionVariants variants{ctx->saved_data["window_size"].toIntVector(),
                               ctx->saved_data["softcap"].toDouble(), optional_if_defined(slopes),
                               optional_if_defined(sinks)};
    const AttentionBackwardCall call{
        packed_problem(
            op_label("_attention_varlen_backward"), query, key, value, saved[5], saved[6],
            ctx->saved_data["max_seqlen_q"].toSymInt(), ctx->saved_data["max_seqlen_k"].toSymInt(),
            ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["is_causal"].toBool(),
            ctx->saved_data["scale"].toOptional<double>(), optional_if_defined(rng_state),
            std::move(variants),
            /*rng_state_required=*/true),
        grad_output, output, logsumexp};
    auto [grad_query, grad_key, grad_value, grad_sinks] = attention_varlen_backward_call(call);
    // query, key, value, sinks (when given: autograd numbers the given tensors only); the
    // problem has none.
    const bool sinks_need_grad = sinks.defined() && ctx->needs_input_grad(3);
    return {grad_query, grad_key, grad_value, sinks_need_grad ? grad_sinks : at::Tensor(),
            at::Tensor()};
  }
};

VarlenForwardOutputs attention_varlen_forward_autograd(AttentionProblem problem) {
  constexpr const char* op = "attention_varlen";
  check_no_functorch_autodiff(op);
  check_defined(op, "query", problem.query);
  check_defined(op, "key", problem.key);
  check_defined(op, "value", problem.value);
  check_defined(op, "cu_seqlens_q", problem.cu_seqlens_q);
  check_defined(op, "cu_seqlens_k", problem.cu_seqlens_k);
  const std::pair<const char*, const std::optional<at::Tensor>*> optional_inputs[] = {
      {"rng_state", &problem.rng_state},
      {"alibi_slopes", &problem.variants.alibi_slopes},
      {"sinks", &problem.variants.sinks}};
  for (const auto& [name, tensor] : optional_inputs) {
    if (given(*tensor)) check_dense(op, name, **tensor);
  }
  variable_list out = AttentionVarlenFunction::apply(problem.query, problem.key, problem.value,
                                                     problem.variants.sinks, &problem);
  return {out[0], out[1]};
}

// (rows, heads, features) rows first .. first + count -> (1, heads, count, features), a view.
at::Tensor sequence_view(const at::Tensor& packed, int64_t first, int64_t count) {
  return packed.narrow(0, first, count).transpose(0, 1).unsqueeze(0);
}

// (1, heads, count, features) -> (count, heads, features).
at::Tensor packed_rows(const at::Tensor& per_sequence) {
  return per_sequence.squeeze(0).transpose(0, 1);
}

VarlenGrads attention_varlen_backward_differentiable(const AttentionBackwardCall& call,
                                                     const std::vector<SequenceSpan>& sequences) {
  const AttentionProblem& p = call.problem;
  const std::optional<at::Tensor>& slopes = p.variants.alibi_slopes;
  std::vector<at::Tensor> grad_queries, grad_keys, grad_values;
  at::Tensor grad_sinks;
  for (const SequenceSpan& sequence : sequences) {
    const int64_t b = sequence.index;
    const int64_t q0 = sequence.q_begin, L = sequence.q_len;
    const int64_t k0 = sequence.k_begin, S = sequence.k_len;
    const std::optional<at::Tensor> sequence_state =
        p.has_dropout() ? std::optional<at::Tensor>(sequence_rng_state(*p.rng_state, b))
                        : std::nullopt;
    AttentionVariants variants = p.variants;
    if (given(slopes) && slopes->dim() == 2) variants.alibi_slopes = slopes->select(0, b);
    // The dense backward of the sequence as a batch of one; its Autograd kernel takes the
    // differentiable path (grad mode is on and an input requires grad).
    const AttentionBackwardCall dense{
        dense_problem(op_label("_attention_backward"), sequence_view(p.query, q0, L),
                      sequence_view(p.key, k0, S), sequence_view(p.value, k0, S), std::nullopt,
                      std::nullopt, p.dropout_p, p.is_causal, p.scale, sequence_state,
                      std::move(variants), /*rng_state_required=*/true,
                      /*scores_materialised=*/true),
        sequence_view(call.grad_output, q0, L), sequence_view(call.output, q0, L),
        call.logsumexp.narrow(0, q0, L).t().unsqueeze(0)};  // (L, H) -> (1, H, L)
    auto [grad_q, grad_k, grad_v, grad_mask, grad_padding, grad_s] = attention_backward_call(dense);
    grad_queries.push_back(packed_rows(grad_q));
    grad_keys.push_back(packed_rows(grad_k));
    grad_values.push_back(packed_rows(grad_v));
    if (given(p.variants.sinks)) grad_sinks = grad_sinks.defined() ? grad_sinks + grad_s : grad_s;
  }
  const at::Tensor no_sinks_gradient = at::empty({0}, p.query.options());
  if (sequences.empty()) {  // no sequence: the packed tensors have no rows
    return {at::zeros_like(p.query), at::zeros_like(p.key), at::zeros_like(p.value),
            given(p.variants.sinks) ? at::zeros_like(*p.variants.sinks) : no_sinks_gradient};
  }
  return {at::cat(grad_queries, 0), at::cat(grad_keys, 0), at::cat(grad_values, 0),
          grad_sinks.defined() ? grad_sinks : no_sinks_gradient};
}

VarlenGrads attention_varlen_backward_autograd(AttentionBackwardCall call) {
  const AttentionProblem& p = call.problem;
  const bool differentiate =
      at::GradMode::is_enabled() &&
      (requires_grad(call.grad_output) || requires_grad(p.query) || requires_grad(p.key) ||
       requires_grad(p.value) || requires_grad(p.variants.sinks));
  if (!differentiate) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return attention_varlen_backward_call(call);
  }
  check_attention_backward(call);
  // The differentiable form loops over the sequences, so it reads the offsets' values: a
  // tracer's tensors (FakeTensor, functional wrappers under torch.compile) have none.
  for (const at::Tensor* offsets : {&p.cu_seqlens_q, &p.cu_seqlens_k}) {
    const bool traced = offsets->key_set().has_any(c10::DispatchKeySet(
                            {c10::DispatchKey::Python, c10::DispatchKey::Functionalize})) ||
                        offsets->sym_size(0).is_symbolic();
    TORCH_CHECK_NOT_IMPLEMENTED(
        !traced,
        "attention_varlen backward: differentiating the backward (create_graph=True, double "
        "backward) reads the offsets' values, which a traced tensor (torch.compile, "
        "FakeTensor) does not have; take second derivatives of attention_varlen in eager "
        "mode");
  }
  return attention_varlen_backward_differentiable(call, attention_sequences(p));
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, Autograd, m) {
  m.impl("_attention_varlen_forward",
         TORCH_FN(attention_varlen_forward_op<&attention_varlen_forward_autograd>));
  m.impl("_attention_varlen_backward",
         TORCH_FN(attention_varlen_backward_op<&attention_varlen_backward_autograd>));
}

}  // namespace qkv_attention::autograd
