// What the AutocastCPU kernels share: torch's CPU autocast policy for attention and linear
// layers ("lower_precision_fp"), as torch applies it to scaled_dot_product_attention and
// linear: every floating CPU tensor other than float64 is cast to the autocast dtype
// (torch.get_autocast_dtype("cpu"), bfloat16 by default); float64, bool and integer tensors
// pass unchanged. The casts are differentiable, so gradients flow back to the original dtype
// (float32 parameters get float32 gradients).
#pragma once

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>

#include "ops/attention_problem.h"

namespace qkv_attention::autocast {

// The dtype the ops compute in inside a CPU autocast region.
inline at::ScalarType lower_precision() {
  return at::autocast::get_lower_precision_fp_from_device_type(c10::DeviceType::CPU);
}

inline at::Tensor cast(const at::Tensor& tensor) {
  return at::autocast::cached_cast(lower_precision(), tensor, c10::DeviceType::CPU);
}

inline std::optional<at::Tensor> cast(const std::optional<at::Tensor>& tensor) {
  return at::autocast::cached_cast(lower_precision(), tensor, c10::DeviceType::CPU);
}

// A per-head tensor of the variants (alibi_slopes, sinks): float32 when it is a half type, as it
// is otherwise. The ops take these in float32 or in the inputs' dtype, and a parameter of a
// model in float16 meets inputs in bfloat16 under autocast; float32 holds both exactly and the
// cast is differentiable.
inline std::optional<at::Tensor> cast_per_head(const std::optional<at::Tensor>& tensor) {
  if (!tensor.has_value() || !tensor->defined()) return tensor;
  const at::ScalarType dtype = tensor->scalar_type();
  const bool half = dtype == at::kBFloat16 || dtype == at::kHalf;
  return half && !tensor->is_nested() && tensor->layout() == at::kStrided ? tensor->to(at::kFloat)
                                                                          : *tensor;
}

// A problem of attention or attention_varlen with its floating inputs (query, key, value, float
// masks) in the autocast dtype and its per-head variant tensors in float32.
inline AttentionProblem cast_problem(AttentionProblem p) {
  p.query = cast(p.query);
  p.key = cast(p.key);
  p.value = cast(p.value);
  p.attn_mask = cast(p.attn_mask);
  p.key_padding_mask = cast(p.key_padding_mask);
  p.variants.alibi_slopes = cast_per_head(p.variants.alibi_slopes);
  p.variants.sinks = cast_per_head(p.variants.sinks);
  return p;
}

// Held while an autocast kernel calls the op again: the call goes on to Autograd and CPU
// instead of coming back here. Ops called inside (the composites' _attention_forward) are not
// cast a second time.
struct BelowAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::DispatchKey::AutocastCPU};
};

}  // namespace qkv_attention::autocast
