// Helpers for the operators' optional tensor arguments (Tensor? in a schema), shared by the
// kernels of every dispatch key. A Tensor? may arrive as std::nullopt or as an undefined tensor
// (autograd's missing gradients); both mean "not given".
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace qkv_attention {

// Whether an optional argument was given (present and defined).
inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// An undefined tensor (a gradient autograd did not compute) as std::nullopt.
inline std::optional<at::Tensor> optional_if_defined(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// An optional argument as std::nullopt when it was not given.
inline std::optional<at::Tensor> optional_if_given(const std::optional<at::Tensor>& t) {
  return given(t) ? t : std::nullopt;
}

inline bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() && requires_grad(*t);
}

}  // namespace qkv_attention
