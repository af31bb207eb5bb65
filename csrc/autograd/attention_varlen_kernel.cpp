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
#include "ops/attention_varlen.h"
#include "ops/checks.h"
#include "ops/operators.h"

namespace qkv_attention::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }

class AttentionVarlenFunction : public torch::autograd::Function<AttentionVarlenFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                               const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
                               c10::SymInt max_seqlen_k, double dropout_p, bool is_causal,
                               std::optional<double> scale,
                               const std::optional<at::Tensor>& rng_state) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, logsumexp] =
        _attention_varlen_forward(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, dropout_p, is_causal, scale, rng_state);
    // The backward regenerates the dropout masks from the same rng_state.
    ctx->save_for_backward({query, key, value, output, logsumexp, cu_seqlens_q, cu_seqlens_k,
                            rng_state.value_or(at::Tensor())});
    ctx->saved_data["max_seqlen_q"] = max_seqlen_q;
    ctx->saved_data["max_seqlen_k"] = max_seqlen_k;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({logsumexp});
    return {output, logsumexp};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &query = saved[0], &key = saved[1], &value = saved[2], &output = saved[3],
                     &logsumexp = saved[4], &cu_seqlens_q = saved[5], &cu_seqlens_k = saved[6],
                     &rng_state = saved[7];
    const at::Tensor grad_output = grads[0].defined() ? grads[0] : at::zeros_like(output);
    auto [grad_query, grad_key, grad_value] = _attention_varlen_backward(
        grad_output, query, key, value, output, logsumexp, cu_seqlens_q, cu_seqlens_k,
        ctx->saved_data["max_seqlen_q"].toSymInt(), ctx->saved_data["max_seqlen_k"].toSymInt(),
        ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["is_causal"].toBool(),
        ctx->saved_data["scale"].toOptional<double>(),
        rng_state.defined() ? std::optional<at::Tensor>(rng_state) : std::nullopt);
    // query, key, value; the offsets, sizes, flags and rng_state have none.
    return {grad_query,   grad_key,     grad_value,   at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_varlen_forward_autograd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
    c10::SymInt max_seqlen_k, double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state) {
  constexpr const char* op = "attention_varlen";
  check_no_functorch_autodiff(op);
  check_defined(op, "query", query);
  check_defined(op, "key", key);
  check_defined(op, "value", value);
  check_defined(op, "cu_seqlens_q", cu_seqlens_q);
  check_defined(op, "cu_seqlens_k", cu_seqlens_k);
  if (rng_state.has_value()) check_dense(op, "rng_state", *rng_state);
  variable_list out = AttentionVarlenFunction::apply(
      query, key, value, cu_seqlens_q, cu_seqlens_k, std::move(max_seqlen_q),
      std::move(max_seqlen_k), dropout_p, is_causal, scale, rng_state);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_differentiable(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& logsumexp,
    const std::vector<SequenceSpan>& sequences, double dropout_p, bool is_causal,
    std::optional<double> scale, const std::optional<at::Tensor>& rng_state) {
  std::vector<at::Tensor> grad_queries, grad_keys, grad_values;
  for (const SequenceSpan& sequence : sequences) {
    const int64_t b = sequence.index;
    const int64_t q0 = sequence.q_begin, L = sequence.q_len;
    const int64_t k0 = sequence.k_begin, S = sequence.k_len;
    const std::optional<at::Tensor> sequence_state =
        dropout_p > 0 ? std::optional<at::Tensor>(sequence_rng_state(*rng_state, b)) : std::nullopt;
    // The dense backward of the sequence as a batch of one; its Autograd kernel takes the
    // differentiable path (grad mode is on and an input requires grad).
    auto [grad_q, grad_k, grad_v, grad_mask, grad_padding] = _attention_backward(
        sequence_view(grad_output, q0, L), std::nullopt, sequence_view(query, q0, L),
        sequence_view(key, k0, S), sequence_view(value, k0, S), sequence_view(output, q0, L),
        logsumexp.narrow(0, q0, L).t().unsqueeze(0),  // (L, H) -> (1, H, L)
        std::nullopt, std::nullopt, dropout_p, is_causal, scale, sequence_state, false, false);
    grad_queries.push_back(packed_rows(grad_q));
    grad_keys.push_back(packed_rows(grad_k));
    grad_values.push_back(packed_rows(grad_v));
  }
  if (sequences.empty()) {  // no sequence: the packed tensors have no rows
    return {at::zeros_like(query), at::zeros_like(key), at::zeros_like(value)};
  }
  return {at::cat(grad_queries, 0), at::cat(grad_keys, 0), at::cat(grad_values, 0)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& logsumexp,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
    c10::SymInt max_seqlen_k, double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state) {
  const bool differentiate =
      at::GradMode::is_enabled() && (requires_grad(grad_output) || requires_grad(query) ||
                                     requires_grad(key) || requires_grad(value));
  if (differentiate) {
    const AttentionProblem problem = packed_problem(
        op_label("_attention_varlen_backward"), query, key, value, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale, rng_state,
        /*rng_state_required=*/true);
    check_attention_backward(problem, {grad_output, output, logsumexp, std::nullopt});
    // The differentiable form loops over the sequences, so it reads the offsets' values: a
    // tracer's tensors (FakeTensor, functional wrappers under torch.compile) have none.
    for (const at::Tensor* offsets : {&cu_seqlens_q, &cu_seqlens_k}) {
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
    return attention_varlen_backward_differentiable(grad_output, query, key, value, output,
                                                    logsumexp, attention_sequences(problem),
                                                    dropout_p, is_causal, scale, rng_state);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return _attention_varlen_backward(grad_output, query, key, value, output, logsumexp, cu_seqlens_q,
                                    cu_seqlens_k, std::move(max_seqlen_q), std::move(max_seqlen_k),
                                    dropout_p, is_causal, scale, rng_state);
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, Autograd, m) {
  m.impl("_attention_varlen_forward", TORCH_FN(attention_varlen_forward_autograd));
  m.impl("_attention_varlen_backward", TORCH_FN(attention_varlen_backward_autograd));
}

}  // namespace qkv_attention::autograd
