// Input checks shared by the operators' CPU and Meta kernels.
//
// Every message names the operator, the argument and what was found, e.g.
//   "attention: key has 7 features per head but query has 8".
// Sizes are read as SymInts so the same checks run on real tensors and on the symbolic
// tensors that torch.compile traces with.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace qkv_attention {

// The dtypes every operator computes in: float64, float32, bfloat16, float16.
bool is_supported_dtype(at::ScalarType dtype);

// `tensor` must be defined and dense. The Autograd kernels call this first:
// torch::autograd::Function::apply reads every tensor argument's device and sizes, and would
// otherwise fail on an undefined one with "tensor does not have a device" and on a nested one
// with "Internal error: NestedTensorImpl doesn't support sizes", naming no argument.
void check_defined(const char* op, const char* name, const at::Tensor& tensor);

// A defined `tensor` must be dense: strided layout, neither sparse, mkldnn, quantized nor
// nested. Raises NotImplementedError (a RuntimeError) naming the argument and what it is.
void check_dense(const char* op, const char* name, const at::Tensor& tensor);

// `tensor` must be defined, dense, have a supported floating dtype and exactly `dim`
// dimensions; `layout` names the dimensions for the message, e.g. "(B, L, E)".
void check_input(const char* op, const char* name, const at::Tensor& tensor, int64_t dim,
                 const char* layout);

// `tensor` has `reference`'s dtype and device.
void check_same_dtype_and_device(const char* op, const char* name, const at::Tensor& tensor,
                                 const char* reference_name, const at::Tensor& reference);

// Size `dim` of `tensor` equals `expected`, which comes from `expected_from`; `what` says what
// the size means. The message reads "attention: key has 7 features per head but query has 8
// (key has shape [2, 4, 5, 7])".
void check_size(const char* op, const char* name, const at::Tensor& tensor, int64_t dim,
                const c10::SymInt& expected, const char* what, const char* expected_from);

}  // namespace qkv_attention
