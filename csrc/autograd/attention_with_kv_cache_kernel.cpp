// The Autograd kernel of attention_with_kv_cache, an inference op without a derivative.
//
// With grad mode on and an input that requires grad, the call raises (after the input checks,
// so a bad input is still named first) instead of returning an output silently cut off from
// the graph. Otherwise it calls the kernels below autograd and then bumps the version counters
// of the caches it wrote, as ATen's in-place ops do (ADInplaceOrView is skipped together with
// Autograd), so autograd notices if a cache was saved for some other backward.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "ops/attention_problem.h"
#include "ops/attention_signatures.h"
#include "ops/attention_with_kv_cache.h"
#include "ops/operators.h"
#include "ops/optional_tensor.h"

namespace qkv_attention::autograd {
namespace {

// The first input, in schema order, that requires grad, or null.
const char* first_requiring_grad(const AttentionProblem& p) {
  const std::pair<const char*, const std::optional<at::Tensor>> inputs[] = {
      {"query", p.query},
      {"k_cache", p.key},
      {"v_cache", p.value},
      {"key", p.new_key},
      {"value", p.new_value},
      {"attn_mask", p.attn_mask},
      {"alibi_slopes", p.variants.alibi_slopes},
      {"sinks", p.variants.sinks},
      {"k_cache_scale", p.k_cache_scale},
      {"v_cache_scale", p.v_cache_scale}};
  for (const auto& [name, tensor] : inputs) {
    if (requires_grad(tensor)) return name;
  }
  return nullptr;
}

at::Tensor attention_with_kv_cache_autograd(AttentionProblem problem) {
  if (at::GradMode::is_enabled()) {
    const char* name = first_requiring_grad(problem);
    if (name != nullptr) {
      check_attention_problem(problem);
      TORCH_CHECK(false, "attention_with_kv_cache: ", name,
                  " requires grad, but this op is for inference and has no derivative. Call it "
                  "under torch.no_grad() or torch.inference_mode(), or pass detached tensors "
                  "(for training, use qkv_attention.ops.attention on the keys and values)");
    }
  }
  at::Tensor output;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    output = attention_with_kv_cache_call(problem);
  }
  if (given(problem.new_key)) {
    torch::autograd::impl::bump_version(problem.key);
    torch::autograd::impl::bump_version(problem.value);
    if (given(problem.k_cache_scale)) torch::autograd::impl::bump_version(*problem.k_cache_scale);
    if (given(problem.v_cache_scale)) torch::autograd::impl::bump_version(*problem.v_cache_scale);
  }
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, Autograd, m) {
  m.impl("attention_with_kv_cache",
         TORCH_FN(attention_with_kv_cache_op<&attention_with_kv_cache_autograd>));
}

}  // namespace qkv_attention::autograd
