// The attention operator's CPU dispatch-key kernels: the call as a dense problem
// (ops/attention_problem.h), checked; allocation; the early return of calls with nothing to
// compute; and the plain-pointer kernels of cpu/attention_kernel.h (parameters from
// cpu/flash/params.h, kernels chosen per CPU level by cpu/flash/levels.h). The dropout stream's
// seed and offset come in as the rng_state input (drawn by the composite ops).
#include "cpu/attention_kernel.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/flash/params.h"
#include "cpu/large_tensor.h"

#include <limits>
#include <tuple>
#include <utility>

#include "ops/attention.h"
#include "ops/attention_problem.h"
#include "ops/attention_signatures.h"
#include "ops/operators.h"
#include "ops/optional_tensor.h"

namespace qkv_attention::cpu {

// ---------------------------------------------------------------------------------------------
// Tensor glue: checks, allocation, and the CPU registrations.
namespace {

AttentionForwardOutputs attention_forward_cpu(AttentionProblem problem) {
  check_attention_problem(problem);
  flash::convert_variant_tensors(problem);
  const at::Tensor &query = problem.query, &key = problem.key, &value = problem.value;
  const bool need_weights = problem.need_weights, average = problem.average_weights;
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2);
  const int64_t S = key.size(2), Dv = value.size(3);
  at::Tensor output = empty_output({B, H, L, Dv}, query.options());
  at::Tensor logsumexp =
      at::empty({B, H, L}, query.options().dtype(at::toOpMathType(query.scalar_type())));
  at::Tensor weights = !need_weights ? no_gradient(query)
                       : average     ? empty_output({B, L, S}, query.options())
                                     : empty_output({B, H, L, S}, query.options());
  if (Dv == 0 && !need_weights) {
    // Nothing to compute: the output is empty and nothing else is asked for. (The kernel would
    // still compute all B*H*L*S scores for the logsumexp, which only the backward reads, and
    // the backward of an empty output is zero without it.)
    logsumexp.fill_(-std::numeric_limits<double>::infinity());
    return {output, logsumexp, weights};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, query.scalar_type(), "attention_forward", [&] {
        const auto p = flash::set_forward_params<scalar_t>(
            problem, output, logsumexp, need_weights ? &weights : nullptr, average);
        attention_forward_kernel(p);
      });
  return {output, logsumexp, weights};
}

// The gradient of a float mask: d loss / d score summed over the dimensions it was broadcast in.
at::Tensor reduce_grad_scores(const at::Tensor& grad_scores, const at::Tensor& mask,
                              bool is_key_padding) {
  at::Tensor grad = is_key_padding ? grad_scores.sum({1, 2})  // (B, H, L, S) -> (B, S)
                                   : grad_scores.sum_to_size(mask.sizes());
  return grad.to(mask.scalar_type()).contiguous();
}

AttentionGrads attention_backward_cpu(AttentionBackwardCall call) {
  check_attention_backward(call);
  AttentionProblem& problem = call.problem;
  // The gradient of sinks has their dtype; the kernels compute it in the accumulation dtype.
  const std::optional<at::ScalarType> sinks_dtype = flash::convert_variant_tensors(problem);
  const at::Tensor &query = problem.query, &key = problem.key, &value = problem.value;
  const std::optional<at::Tensor>&attn_mask = problem.attn_mask,
        &key_padding_mask = problem.key_padding_mask;
  const bool has_grad_weights = given(call.grad_weights);
  const bool attn_mask_grad = attention_mask_gets_grad(attn_mask, call.attn_mask_requires_grad);
  const bool padding_mask_grad =
      attention_mask_gets_grad(key_padding_mask, call.key_padding_mask_requires_grad);
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2);
  const int64_t S = key.size(2), Dv = value.size(3);
  const at::TensorOptions acc_options =
      query.options().dtype(at::toOpMathType(query.scalar_type()));
  if (Dv == 0 && !has_grad_weights) {
    // An empty output and no gradient of the weights: nothing depends on anything, every
    // gradient is zero (the forward computed nothing either).
    auto zeros_like_mask = [&](bool wanted, const std::optional<at::Tensor>& mask) {
      return wanted ? at::zeros(mask->sizes(), mask->options()) : no_gradient(query);
    };
    return {at::zeros(query.sizes(), query.options()),
            at::zeros(key.sizes(), key.options()),
            at::zeros(value.sizes(), value.options()),
            zeros_like_mask(attn_mask_grad, attn_mask),
            zeros_like_mask(padding_mask_grad, key_padding_mask),
            sinks_dtype ? at::zeros({H}, query.options().dtype(*sinks_dtype)) : no_gradient(query)};
  }
  at::Tensor grad_query = empty_output(query.sizes(), query.options());
  at::Tensor grad_key = empty_output(key.sizes(), key.options());
  at::Tensor grad_value = empty_output(value.sizes(), value.options());
  // d loss / d score: the gradient of an additive mask before it is summed to the mask's shape.
  at::Tensor grad_scores =
      attn_mask_grad || padding_mask_grad ? empty_output({B, H, L, S}, acc_options) : at::Tensor();
  at::Tensor grad_sinks = sinks_dtype ? at::empty({H}, acc_options) : at::Tensor();
  const at::Tensor lse = call.logsumexp.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, query.scalar_type(), "attention_backward", [&] {
        auto p = flash::set_backward_params<scalar_t>(
            problem, call.output, call.grad_output, call.grad_weights, lse, grad_query, grad_key,
            grad_value, grad_scores.defined() ? &grad_scores : nullptr);
        if (grad_sinks.defined()) p.grad_sinks = grad_sinks.mutable_data_ptr<AccType<scalar_t>>();
        attention_backward_kernel(p);
      });
  return {grad_query,
          grad_key,
          grad_value,
          attn_mask_grad ? reduce_grad_scores(grad_scores, *attn_mask, false) : no_gradient(query),
          padding_mask_grad ? reduce_grad_scores(grad_scores, *key_padding_mask, true)
                            : no_gradient(query),
          sinks_dtype ? grad_sinks.to(*sinks_dtype) : no_gradient(query)};
}

at::Tensor attention_dropout_mask_cpu(const at::Tensor& rng_state, int64_t batch, int64_t heads,
                                      int64_t q_len, int64_t kv_len, double dropout_p) {
  check_dropout_mask_inputs(rng_state, batch, heads, q_len, kv_len, dropout_p);
  at::Tensor keep = at::empty({batch, heads, q_len, kv_len}, at::kBool);
  // No element, no work: the kernel walks the batch*heads*q_len rows even when they are empty.
  if (keep.numel() == 0) return keep;
  const auto [seed, offset] = flash::seed_and_offset(rng_state);
  attention_dropout_mask_kernel(batch, heads, q_len, kv_len, seed, offset, dropout_p,
                                keep.data_ptr<bool>());
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, CPU, m) {
  m.impl("_attention_forward", TORCH_FN(attention_forward_op<&attention_forward_cpu>));
  m.impl("_attention_backward", TORCH_FN(attention_backward_op<&attention_backward_cpu>));
  m.impl("_attention_dropout_mask", TORCH_FN(attention_dropout_mask_cpu));
}

}  // namespace qkv_attention::cpu
