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

// Held while an autocast kernel calls the op again: the call goes on to Autograd and CPU
// instead of coming back here. Ops called inside (the composites' _attention_forward) are not
// cast a second time.
struct BelowAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::DispatchKey::AutocastCPU};
};

}  // namespace qkv_attention::autocast
