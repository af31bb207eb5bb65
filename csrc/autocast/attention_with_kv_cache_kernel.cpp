// The AutocastCPU kernel of attention_with_kv_cache: inside torch.autocast("cpu", ...) the op
// computes in the dtype of its caches.
//
// The caches are written in place, so they cannot be cast: a cast copy would receive the new
// entries and be thrown away, and the caller's cache would miss them. Their dtype is the one
// the user chose for inference (a bfloat16 cache is the usual way to use lower precision here),
// so the floating inputs (query, key, value, a float attn_mask) are cast to it and the output
// has it. Bool masks, the int lengths, and everything outside autocast pass as they are;
// alibi_slopes and sinks in a half type become float32 (cast.h). Quantized caches (int8,
// float8) and their scales are never cast: the floating inputs go to the autocast dtype.
#include <torch/library.h>

#include "autocast/cast.h"
#include "ops/attention_signatures.h"
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

at::Tensor attention_with_kv_cache_autocast(AttentionProblem p) {
  BelowAutocast below;
  // The dtype the floating inputs are cast to: a float cache's (it is written as it is); for
  // quantized caches (kept, with their float32 scales, as they are) the autocast dtype, from
  // which the new rows are quantized and in which the output comes. A cache of any other dtype:
  // nothing is cast, the checks name it.
  std::optional<at::ScalarType> dtype;
  if (is_dense(p.key) && is_supported_dtype(p.key.scalar_type())) {
    dtype = p.key.scalar_type();
  } else if (p.quantized_cache()) {
    dtype = lower_precision();
  }
  if (dtype.has_value()) {
    p.query = to_dtype(p.query, *dtype);
    p.new_key = to_dtype(p.new_key, *dtype);
    p.new_value = to_dtype(p.new_value, *dtype);
    p.attn_mask = to_dtype(p.attn_mask, *dtype);
    p.variants.alibi_slopes = cast_per_head(p.variants.alibi_slopes);
    p.variants.sinks = cast_per_head(p.variants.sinks);
  }
  return attention_with_kv_cache_call(p);
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, AutocastCPU, m) {
  m.impl("attention_with_kv_cache",
         TORCH_FN(attention_with_kv_cache_op<&attention_with_kv_cache_autocast>));
}

}  // namespace qkv_attention::autocast
