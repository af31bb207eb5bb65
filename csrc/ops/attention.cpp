// Schemas and typed entry points of the attention operators; the composites attention and
// attention_with_weights; the dropout stream's draw. The input checks are the family's
// (ops/attention_problem.h).
#include "ops/attention.h"

#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/randint.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "ops/attention_problem.h"
#include "ops/attention_signatures.h"
#include "ops/checks.h"
#include "ops/operators.h"

namespace qkv_attention {
namespace {

// attention and attention_with_weights are compositions: the dropout stream's seed and offset
// drawn by an ATen random op, then _attention_forward. Autograd, Meta and the CPU kernel all
// live on _attention_forward, and torch.compile sees these two ops in their place.
//
// The draw happens here, outside the kernel op, so that _attention_forward is a pure function
// of its inputs: torch.compile may recompute it (activation checkpointing, the partitioner) and
// get the same dropout mask, because the random op is one the compiler knows (it keeps the
// drawn state for the recomputation instead of drawing again), and vmap's randomness modes
// apply to it ("error" raises, "same" draws one state, "different" one per sample).
AttentionProblem with_rng_state(AttentionProblem problem) {
  // Bad input raises before the generator is touched.
  check_attention_problem(problem);
  problem.rng_state = draw_dropout_rng_state(problem.dropout_p);
  problem.rng_state_required = true;
  return problem;
}

at::Tensor attention_composite(AttentionProblem problem) {
  return std::get<0>(attention_forward_call(with_rng_state(std::move(problem))));
}

std::tuple<at::Tensor, at::Tensor> attention_with_weights_composite(AttentionProblem problem) {
  auto [output, logsumexp, weights] = attention_forward_call(with_rng_state(std::move(problem)));
  return {output, weights};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qkv_attention, m) {
  m.def(
      "attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
      "float dropout_p=0.0, bool is_causal=False, float? scale=None, "
      "Tensor? key_padding_mask=None, " QKV_VARIANT_ARGUMENTS ") -> Tensor",
      TORCH_FN(attention_op<&attention_composite>));
  m.def(
      "attention_with_weights(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
      "float dropout_p=0.0, bool is_causal=False, float? scale=None, "
      "Tensor? key_padding_mask=None, bool average_attn_weights=False, " QKV_VARIANT_ARGUMENTS
      ") -> (Tensor, Tensor)",
      TORCH_FN(attention_with_weights_op<&attention_with_weights_composite>));
  m.def(
      "_attention_forward(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
      "Tensor? key_padding_mask, float dropout_p, bool is_causal, float? scale, "
      "bool need_weights, Tensor? rng_state=None, bool "
      "average_attn_weights=False, " QKV_VARIANT_ARGUMENTS
      ") -> (Tensor output, Tensor logsumexp, Tensor weights)");
  m.def(
      "_attention_backward(Tensor grad_output, Tensor? grad_weights, Tensor query, Tensor key, "
      "Tensor value, Tensor output, Tensor logsumexp, Tensor? attn_mask, "
      "Tensor? key_padding_mask, float dropout_p, bool is_causal, float? scale, "
      "Tensor? rng_state, bool attn_mask_requires_grad, bool "
      "key_padding_mask_requires_grad, " QKV_VARIANT_ARGUMENTS
      ") -> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_attn_mask, "
      "Tensor grad_key_padding_mask, Tensor grad_sinks)");
  m.def(
      "_attention_dropout_mask(Tensor rng_state, SymInt batch, SymInt heads, SymInt q_len, "
      "SymInt kv_len, float dropout_p) -> Tensor");
}

at::Tensor attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
                     std::optional<double> scale, const std::optional<at::Tensor>& key_padding_mask,
                     at::IntArrayRef window_size, double softcap,
                     const std::optional<at::Tensor>& alibi_slopes,
                     const std::optional<at::Tensor>& sinks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::attention", "")
                       .typed<decltype(attention)>();
  return op.call(query, key, value, attn_mask, dropout_p, is_causal, scale, key_padding_mask,
                 window_size, softcap, alibi_slopes, sinks);
}

std::tuple<at::Tensor, at::Tensor> attention_with_weights(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    std::optional<double> scale, const std::optional<at::Tensor>& key_padding_mask,
    bool average_attn_weights, at::IntArrayRef window_size, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::attention_with_weights", "")
                       .typed<decltype(attention_with_weights)>();
  return op.call(query, key, value, attn_mask, dropout_p, is_causal, scale, key_padding_mask,
                 average_attn_weights, window_size, softcap, alibi_slopes, sinks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> _attention_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool need_weights,
    const std::optional<at::Tensor>& rng_state, bool average_attn_weights,
    at::IntArrayRef window_size, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& sinks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::_attention_forward", "")
                       .typed<decltype(_attention_forward)>();
  return op.call(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal, scale,
                 need_weights, rng_state, average_attn_weights, window_size, softcap, alibi_slopes,
                 sinks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_call(const AttentionProblem& p) {
  const AttentionVariants& v = p.variants;
  return _attention_forward(p.query, p.key, p.value, p.attn_mask, p.key_padding_mask, p.dropout_p,
                            p.is_causal, p.scale, p.need_weights, p.rng_state, p.average_weights,
                            v.window_size, v.softcap, v.alibi_slopes, v.sinks);
}

AttentionGrads _attention_backward(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& output, const at::Tensor& logsumexp,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state, bool attn_mask_requires_grad,
    bool key_padding_mask_requires_grad, at::IntArrayRef window_size, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::_attention_backward", "")
                       .typed<decltype(_attention_backward)>();
  return op.call(grad_output, grad_weights, query, key, value, output, logsumexp, attn_mask,
                 key_padding_mask, dropout_p, is_causal, scale, rng_state, attn_mask_requires_grad,
                 key_padding_mask_requires_grad, window_size, softcap, alibi_slopes, sinks);
}

AttentionGrads attention_backward_call(const AttentionBackwardCall& call) {
  const AttentionProblem& p = call.problem;
  const AttentionVariants& v = p.variants;
  return _attention_backward(call.grad_output, call.grad_weights, p.query, p.key, p.value,
                             call.output, call.logsumexp, p.attn_mask, p.key_padding_mask,
                             p.dropout_p, p.is_causal, p.scale, p.rng_state,
                             call.attn_mask_requires_grad, call.key_padding_mask_requires_grad,
                             v.window_size, v.softcap, v.alibi_slopes, v.sinks);
}

at::Tensor _attention_dropout_mask(const at::Tensor& rng_state, c10::SymInt batch,
                                   c10::SymInt heads, c10::SymInt q_len, c10::SymInt kv_len,
                                   double dropout_p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::_attention_dropout_mask", "")
                       .typed<decltype(_attention_dropout_mask)>();
  return op.call(rng_state, batch, heads, q_len, kv_len, dropout_p);
}

std::optional<at::Tensor> draw_dropout_rng_state(double dropout_p) {
  if (!(dropout_p > 0)) return std::nullopt;
  // (2,) int64 on the CPU, where the kernels read it: the seed and the offset of the stream,
  // each uniform in [0, 2^63 - 1), from torch's default CPU generator.
  // The device is named (not left to the default): torch.compile's activation checkpointing
  // replays random ops per device, and finds the device of one without tensor inputs only
  // there ("Backend not supported for None" otherwise, under aot_eager).
  return at::randint(std::numeric_limits<int64_t>::max(), {2},
                     at::TensorOptions().dtype(at::kLong).device(at::kCPU));
}

bool attention_mask_gets_grad(const std::optional<at::Tensor>& mask, bool requires_grad) {
  return requires_grad && mask.has_value() && mask->defined() && mask->scalar_type() != at::kBool;
}

at::Tensor no_gradient(const at::Tensor& like) { return at::empty({0}, like.options()); }

void check_dropout_mask_inputs(const at::Tensor& rng_state, const c10::SymInt& batch,
                               const c10::SymInt& heads, const c10::SymInt& q_len,
                               const c10::SymInt& kv_len, double dropout_p) {
  constexpr const char* op = op_label("_attention_dropout_mask");
  check_rng_state(op, rng_state);
  const std::pair<const char*, const c10::SymInt*> sizes[] = {
      {"batch", &batch}, {"heads", &heads}, {"q_len", &q_len}, {"kv_len", &kv_len}};
  for (const auto& [name, size] : sizes) {
    TORCH_CHECK(*size >= 0, op, ": ", name, " must be non-negative, but is ", *size);
  }
  check_dropout_p(op, dropout_p);
  check_element_count(op, "the mask (batch, heads, q_len, kv_len)", {batch, heads, q_len, kv_len});
}

}  // namespace qkv_attention
