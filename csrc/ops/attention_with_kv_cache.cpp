// Schema and typed entry point of attention_with_kv_cache. Its checks are the family's
// (ops/attention_problem.h, cache_problem).
#include "ops/attention_with_kv_cache.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace qkv_attention {
TORCH_LIBRARY_FRAGMENT(qkv_attention, m) {
  m.def(
      "attention_with_kv_cache(Tensor query, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor? key=None, Tensor? value=None, Tensor? cache_seqlens=None, "
      "Tensor? attn_mask=None, bool is_causal=True, float? scale=None) -> Tensor");
}

at::Tensor attention_with_kv_cache(const at::Tensor& query, const at::Tensor& k_cache,
                                   const at::Tensor& v_cache, const std::optional<at::Tensor>& key,
                                   const std::optional<at::Tensor>& value,
                                   const std::optional<at::Tensor>& cache_seqlens,
                                   const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                   std::optional<double> scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::attention_with_kv_cache", "")
                       .typed<decltype(attention_with_kv_cache)>();
  // The typed call takes the caches by const reference, as ATen's in-place ops do.
  return op.call(query, k_cache, v_cache, key, value, cache_seqlens, attn_mask, is_causal, scale);
}

}  // namespace qkv_attention
