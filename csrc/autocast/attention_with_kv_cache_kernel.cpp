// The AutocastCPU kernel of attention_with_kv_cache: inside torch.autocast("cpu", ...) the op
// computes in the dtype of its caches.
//
// The caches are written in place, so they cannot be cast: a cast copy would receive the new
// entries and be thrown away, and the caller's cache would miss them. Their dtype is the one
// the user chose for inference (a bfloat16 cache is the usual way to use lower precision here),
// so the floating inputs (query, key, value, a float attn_mask) are cast to it and the output
// has it. Bool masks, the int lengths, and everything outside autocast pass as they are.
#include <torch/library.h>

#include "autocast/cast.h"
#include "ops/attention_with_kv_cache.h"
#include "ops/checks.h"

namespace qkv_attention::autocast {
namespace {

bool is_dense(const at::Tensor& t) {
  return t.defined() && t.layout() == at::kStrided && !t.is_nested() && !t.is_quantized();
}

// A dense floating tensor in `dtype`; anything else as it is (the op's checks name it).
at::Tensor to_dtype(const at::Tensor& t, at::ScalarType dtype) {
  if (!is_dense(t) || !t.is_floating_point() || t.scalar_type() == dtype) return t;
  return t.to(dtype);
}

std::optional<at::Tensor> to_dtype(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value()) return t;
  return to_dtype(*t, dtype);
}

at::Tensor attention_with_kv_cache_autocast(const at::Tensor& query, const at::Tensor& k_cache,
                                            const at::Tensor& v_cache,
                                            const std::optional<at::Tensor>& key,
                                            const std::optional<at::Tensor>& value,
                                            const std::optional<at::Tensor>& cache_seqlens,
                                            const std::optional<at::Tensor>& attn_mask,
                                            bool is_causal, std::optional<double> scale) {
  BelowAutocast below;
  // A cache of a dtype the op does not compute in: nothing is cast, the checks name it.
  if (!is_dense(k_cache) || !is_supported_dtype(k_cache.scalar_type())) {
    return attention_with_kv_cache(query, k_cache, v_cache, key, value, cache_seqlens, attn_mask,
                                   is_causal, scale);
  }
  const at::ScalarType dtype = k_cache.scalar_type();
  return attention_with_kv_cache(to_dtype(query, dtype), k_cache, v_cache, to_dtype(key, dtype),
                                 to_dtype(value, dtype), cache_seqlens, to_dtype(attn_mask, dtype),
                                 is_causal, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, AutocastCPU, m) {
  m.impl("attention_with_kv_cache", TORCH_FN(attention_with_kv_cache_autocast));
}

}  // namespace qkv_attention::autocast
