// Schema and typed entry point of attention_with_kv_cache. Its checks are the family's
// (ops/attention_problem.h, cache_problem).
#include "ops/attention_with_kv_cache.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops/attention_signatures.h"

namespace qkv_attention {
TORCH_LIBRARY_FRAGMENT(qkv_attention, m) {
  m.def(
      "attention_with_kv_cache(Tensor query, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor? key=None, Tensor? value=None, Tensor? cache_seqlens=None, "
      "Tensor? attn_mask=None, bool is_causal=True, float? scale=None, " QKV_VARIANT_ARGUMENTS
      ", Tensor(c!)? k_cache_scale=None, Tensor(d!)? v_cache_scale=None) -> Tensor");
}

at::Tensor attention_with_kv_cache(const at::Tensor& query, const at::Tensor& k_cache,
                                   const at::Tensor& v_cache, const std::optional<at::Tensor>& key,
                                   const std::optional<at::Tensor>& value,
                                   const std::optional<at::Tensor>& cache_seqlens,
                                   const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                   std::optional<double> scale, at::IntArrayRef window_size,
                                   double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                   const std::optional<at::Tensor>& sinks,
                                   const std::optional<at::Tensor>& k_cache_scale,
                                   const std::optional<at::Tensor>& v_cache_scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::attention_with_kv_cache", "")
                       .typed<decltype(attention_with_kv_cache)>();
  // The typed call takes the caches by const reference, as ATen's in-place ops do.
  return op.call(query, k_cache, v_cache, key, value, cache_seqlens, attn_mask, is_causal, scale,
                 window_size, softcap, alibi_slopes, sinks, k_cache_scale, v_cache_scale);
}

at::Tensor attention_with_kv_cache_call(const AttentionProblem& p) {
  const AttentionVariants& v = p.variants;
  return attention_with_kv_cache(p.query, p.key, p.value, p.new_key, p.new_value, p.cache_seqlens,
                                 p.attn_mask, p.is_causal, p.scale, v.window_size, v.softcap,
                                 v.alibi_slopes, v.sinks, p.k_cache_scale, p.v_cache_scale);
}

}  // namespace qkv_attention
