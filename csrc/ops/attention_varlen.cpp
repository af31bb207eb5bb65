// Schemas and typed entry points of the variable-length attention operators
// (ops/attention_varlen.h). Their checks are the family's (ops/attention_problem.h).
#include "ops/attention_varlen.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops/attention.h"
#include "ops/attention_problem.h"
#include "ops/operators.h"

namespace qkv_attention {
namespace {

constexpr const char* kOp = op_label("_attention_varlen_forward");

// attention_varlen is a composition, like attention: the dropout stream's state drawn by an
// ATen random op (ops/attention.cpp explains why outside the kernel op), then
// _attention_varlen_forward, which carries autograd, Meta and the CPU kernel.
at::Tensor attention_varlen_composite(const at::Tensor& query, const at::Tensor& key,
                                      const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                                      const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
                                      c10::SymInt max_seqlen_k, double dropout_p, bool is_causal,
                                      std::optional<double> scale) {
  // Bad input raises before the generator is touched.
  check_attention_problem(packed_problem(kOp, query, key, value, cu_seqlens_q, cu_seqlens_k,
                                         max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale,
                                         std::nullopt, /*rng_state_required=*/false));
  const std::optional<at::Tensor> rng_state = draw_dropout_rng_state(dropout_p);
  return std::get<0>(_attention_varlen_forward(query, key, value, cu_seqlens_q, cu_seqlens_k,
                                               std::move(max_seqlen_q), std::move(max_seqlen_k),
                                               dropout_p, is_causal, scale, rng_state));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qkv_attention, m) {
  m.def(
      "attention_varlen(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p=0.0, "
      "bool is_causal=False, float? scale=None) -> Tensor",
      TORCH_FN(attention_varlen_composite));
  m.def(
      "_attention_varlen_forward(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p, "
      "bool is_causal, float? scale, Tensor? rng_state=None) -> "
      "(Tensor output, Tensor logsumexp)");
  m.def(
      "_attention_varlen_backward(Tensor grad_output, Tensor query, Tensor key, Tensor value, "
      "Tensor output, Tensor logsumexp, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p, bool is_causal, "
      "float? scale, Tensor? rng_state) -> "
      "(Tensor grad_query, Tensor grad_key, Tensor grad_value)");
}

at::Tensor attention_varlen(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                            c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k, double dropout_p,
                            bool is_causal, std::optional<double> scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::attention_varlen", "")
                       .typed<decltype(attention_varlen)>();
  return op.call(query, key, value, cu_seqlens_q, cu_seqlens_k, std::move(max_seqlen_q),
                 std::move(max_seqlen_k), dropout_p, is_causal, scale);
}

std::tuple<at::Tensor, at::Tensor> _attention_varlen_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
    c10::SymInt max_seqlen_k, double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::_attention_varlen_forward", "")
                       .typed<decltype(_attention_varlen_forward)>();
  return op.call(query, key, value, cu_seqlens_q, cu_seqlens_k, std::move(max_seqlen_q),
                 std::move(max_seqlen_k), dropout_p, is_causal, scale, rng_state);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> _attention_varlen_backward(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& logsumexp,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
    c10::SymInt max_seqlen_k, double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::_attention_varlen_backward", "")
                       .typed<decltype(_attention_varlen_backward)>();
  return op.call(grad_output, query, key, value, output, logsumexp, cu_seqlens_q, cu_seqlens_k,
                 std::move(max_seqlen_q), std::move(max_seqlen_k), dropout_p, is_causal, scale,
                 rng_state);
}

}  // namespace qkv_attention
