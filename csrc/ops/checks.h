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

// A backward op's `logsumexp`: defined, dense, in the accumulation dtype of query's dtype, on
// query's device, with query's first `rank` sizes; `layout` names them for the message, e.g.
// "(B, H, L)".
void check_logsumexp(const char* op, const at::Tensor& logsumexp, const at::Tensor& query,
                     int64_t rank, const char* layout);

// dropout_p is a probability: finite and in [0, 1].
void check_dropout_p(const char* op, double dropout_p);

// The dropout stream's state (draw_dropout_rng_state): defined, int64, shape (2,).
void check_rng_state(const char* op, const at::Tensor& rng_state);

// Size `dim` of `tensor` equals `expected`, which comes from `expected_from`; `what` says what
// the size means. The message reads "attention: key has 7 features per head but query has 8
// (key has shape [2, 4, 5, 7])".
void check_size(const char* op, const char* name, const at::Tensor& tensor, int64_t dim,
                const c10::SymInt& expected, const char* what, const char* expected_from);

// ---- sizes, before any element or byte count is computed from them ----
//
// A stride-0 (expanded) tensor may have any sizes at all, and the kernels compute element and
// byte counts from them (outputs, packed copies of operands, per-thread blocks): a count that
// wraps around makes a buffer too small for what is written into it. So every op checks,
// before its kernel sizes anything, every tensor it reads, writes or allocates against two
// limits, which keep every count the kernels derive far below 2^63:
//   - at most kMaxElements = 2^47 elements, counted as if the tensor were contiguous (1 PiB
//     at 8 bytes: more than any machine holds, so no call that could run is refused);
//   - no size above kMaxSize = 2^36: the kernels allocate per-thread blocks of up to 2^10 rows
//     of one dimension, for each of up to 2^10 threads, at up to 8 bytes an element.
// A tensor with no elements passes whatever its other sizes (empty work returns at once), as
// long as torch can represent it (its strides fit an int64).
constexpr int64_t kMaxElements = int64_t(1) << 47;
constexpr int64_t kMaxSize = int64_t(1) << 36;

// Raises, naming `name` and the shape, when a tensor of `sizes` breaks either limit. `name`
// is an argument ("query") or what the kernel would allocate ("the attention weights
// (B, H, L, S)"). Sizes that are symbolic (torch.compile with dynamic shapes) are not checked
// here; the kernel that runs on the real sizes checks them.
void check_element_count(const char* op, const char* name, c10::SymIntArrayRef sizes);

// A count that is computed (scores, dropout-stream positions), never allocated: the product of
// `sizes` must fit an int64. Passes when a size is 0 or symbolic (the kernel checks real sizes).
void check_count_fits(const char* op, const char* what, c10::SymIntArrayRef sizes);

// check_element_count on a tensor's own sizes (a defined tensor; an undefined one passes).
void check_tensor_elements(const char* op, const char* name, const at::Tensor& tensor);

// `value` (an argument such as `scale`) must be representable in the dtype `compute_dtype`
// that the kernels convert it to: a finite double above float32's range would become inf
// there, and inf times a score of 0 is NaN.
void check_representable(const char* op, const char* name, double value,
                         at::ScalarType compute_dtype, at::ScalarType input_dtype);

}  // namespace qkv_attention
