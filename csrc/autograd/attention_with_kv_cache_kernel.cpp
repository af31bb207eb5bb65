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
#include "ops/attention_with_kv_cache.h"
#include "ops/operators.h"

namespace qkv_attention::autograd {
namespace {

const char* first_requiring_grad(const at::Tensor& query, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const std::optional<at::Tensor>& key,
                                 const std::optional<at::Tensor>& value,
                                 const std::optional<at::Tensor>& attn_mask) {
  auto wants_grad = [](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() && t->requires_grad();
  };
  if (query.requires_grad()) return "query";
  if (k_cache.requires_grad()) return "k_cache";
  if (v_cache.requires_grad()) return "v_cache";
  if (wants_grad(key)) return "key";
  if (wants_grad(value)) return "value";
  if (wants_grad(attn_mask)) return "attn_mask";
  return nullptr;
}

at::Tensor attention_with_kv_cache_autograd(const at::Tensor& query, const at::Tensor& k_cache,
                                            const at::Tensor& v_cache,
                                            const std::optional<at::Tensor>& key,
                                            const std::optional<at::Tensor>& value,
                                            const std::optional<at::Tensor>& cache_seqlens,
                                            const std::optional<at::Tensor>& attn_mask,
                                            bool is_causal, std::optional<double> scale) {
  if (at::GradMode::is_enabled()) {
    const char* name = first_requiring_grad(query, k_cache, v_cache, key, value, attn_mask);
    if (name != nullptr) {
      check_attention_problem(cache_problem(op_label("attention_with_kv_cache"), query, k_cache,
                                            v_cache, key, value, cache_seqlens, attn_mask,
                                            is_causal, scale));
      TORCH_CHECK(false, "attention_with_kv_cache: ", name,
                  " requires grad, but this op is for inference and has no derivative. Call it "
                  "under torch.no_grad() or torch.inference_mode(), or pass detached tensors "
                  "(for training, use qkv_attention.ops.attention on the keys and values)");
    }
  }
  at::Tensor output;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    output = attention_with_kv_cache(query, k_cache, v_cache, key, value, cache_seqlens, attn_mask,
                                     is_causal, scale);
  }
  if (key.has_value() && key->defined()) {
    torch::autograd::impl::bump_version(k_cache);
    torch::autograd::impl::bump_version(v_cache);
  }
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, Autograd, m) {
  m.impl("attention_with_kv_cache", TORCH_FN(attention_with_kv_cache_autograd));
}

}  // namespace qkv_attention::autograd
