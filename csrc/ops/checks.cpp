#include "ops/checks.h"

#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace qkv_attention {

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 ||
         dtype == at::kHalf;
}

void check_defined(const char* op, const char* name, const at::Tensor& tensor) {
  // TypeError, as Python gives for a missing required argument: None where a tensor must be.
  TORCH_CHECK_TYPE(tensor.defined(), op, ": ", name,
                   " is an undefined tensor (None); it must be a tensor");
  check_dense(op, name, tensor);
}

void check_dense(const char* op, const char* name, const at::Tensor& tensor) {
  if (!tensor.defined()) return;
  // Nested and quantized tensors report the strided layout; ask for them first.
  TORCH_CHECK_NOT_IMPLEMENTED(!tensor.is_nested(), op, ": ", name,
                              " must be a dense tensor, but is a nested tensor");
  TORCH_CHECK_NOT_IMPLEMENTED(!tensor.is_quantized(), op, ": ", name,
                              " must be a dense tensor, but is a quantized tensor (dtype ",
                              tensor.scalar_type(), ")");
  TORCH_CHECK_NOT_IMPLEMENTED(tensor.layout() == at::kStrided, op, ": ", name,
                              " must be a dense tensor (layout torch.strided), but has layout ",
                              tensor.layout());
}

void check_input(const char* op, const char* name, const at::Tensor& tensor, int64_t dim,
                 const char* layout) {
  check_defined(op, name, tensor);
  TORCH_CHECK_TYPE(is_supported_dtype(tensor.scalar_type()), op, ": ", name,
                   " must be float64, float32, bfloat16 or float16, but has dtype ",
                   tensor.scalar_type());
  TORCH_CHECK(tensor.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout,
              ", but has shape ", tensor.sym_sizes());
}

void check_same_dtype_and_device(const char* op, const char* name, const at::Tensor& tensor,
                                 const char* reference_name, const at::Tensor& reference) {
  TORCH_CHECK_TYPE(tensor.scalar_type() == reference.scalar_type(), op, ": ", name, " has dtype ",
                   tensor.scalar_type(), " but ", reference_name, " has dtype ",
                   reference.scalar_type(), "; all tensors must share one dtype");
  TORCH_CHECK(tensor.device() == reference.device(), op, ": ", name, " is on ", tensor.device(),
              " but ", reference_name, " is on ", reference.device());
}

void check_logsumexp(const char* op, const at::Tensor& logsumexp, const at::Tensor& query,
                     int64_t rank, const char* layout) {
  check_defined(op, "logsumexp", logsumexp);
  check_dense(op, "logsumexp", logsumexp);
  const at::ScalarType lse_dtype = at::toOpMathType(query.scalar_type());
  TORCH_CHECK_TYPE(logsumexp.scalar_type() == lse_dtype, op, ": logsumexp must be ", lse_dtype,
                   " (the accumulation dtype of ", query.scalar_type(), "), but is ",
                   logsumexp.scalar_type());
  TORCH_CHECK(logsumexp.device() == query.device(), op, ": logsumexp is on ", logsumexp.device(),
              " but query is on ", query.device());
  TORCH_CHECK(logsumexp.dim() == rank &&
                  logsumexp.sym_sizes() == query.sym_sizes().slice(0, static_cast<size_t>(rank)),
              op, ": logsumexp must have shape ", layout, " = ",
              query.sym_sizes().slice(0, static_cast<size_t>(rank)), ", but has shape ",
              logsumexp.sym_sizes());
}

void check_dropout_p(const char* op, double dropout_p) {
  TORCH_CHECK(std::isfinite(dropout_p) && dropout_p >= 0.0 && dropout_p <= 1.0, op,
              ": dropout_p must be in [0, 1], but is ", dropout_p);
}

void check_rng_state(const char* op, const at::Tensor& rng_state) {
  check_defined(op, "rng_state", rng_state);
  TORCH_CHECK_TYPE(rng_state.scalar_type() == at::kLong, op, ": rng_state must be int64, but is ",
                   rng_state.scalar_type());
  TORCH_CHECK(rng_state.dim() == 1 && rng_state.sym_size(0) == 2, op,
              ": rng_state must have shape (2,), but has shape ", rng_state.sym_sizes());
}

void check_size(const char* op, const char* name, const at::Tensor& tensor, int64_t dim,
                const c10::SymInt& expected, const char* what, const char* expected_from) {
  const c10::SymInt& found = tensor.sym_size(dim);
  TORCH_CHECK(found == expected, op, ": ", name, " has ", found, " ", what, " but ", expected_from,
              " has ", expected, " (", name, " has shape ", tensor.sym_sizes(), ")");
}

void check_element_count(const char* op, const char* name, c10::SymIntArrayRef sizes) {
  // The sizes as integers (maybe_as_int: a SymInt may hold a constant as a node, whose raw
  // bits are not the value).
  std::vector<int64_t> values;
  values.reserve(sizes.size());
  bool empty = false;
  for (const c10::SymInt& size : sizes) {
    const std::optional<int64_t> value = size.maybe_as_int();
    if (!value.has_value()) return;  // symbolic: checked by the kernel on the real sizes
    values.push_back(*value);
    empty = empty || *value == 0;
  }
  uint64_t count = 1;
  if (empty) {
    // Nothing is ever computed from an empty tensor; its strides still are (the products of
    // the sizes after each dimension, zeros counted as 1), and torch refuses to allocate one
    // whose strides overflow ("Storage size calculation overflowed", naming no argument).
    for (const int64_t value : values) {
      const uint64_t factor = uint64_t(std::max<int64_t>(value, 1));
      TORCH_CHECK(!c10::mul_overflows(count, factor, &count) &&
                      count <= uint64_t(std::numeric_limits<int64_t>::max()),
                  op, ": ", name, " of shape ", sizes,
                  " has no elements, but its nonzero sizes multiply to more than an int64 holds; "
                  "torch cannot represent such a tensor");
    }
    return;
  }
  for (size_t d = 0; d < values.size(); ++d) {
    const int64_t size = values[d];
    TORCH_CHECK(size <= kMaxSize, op, ": ", name, " has size ", size, " in dimension ", d,
                " (shape ", sizes, "); sizes above 2^36 = ", kMaxSize,
                " are not supported, even for expanded (stride-0) tensors");
    const bool wrapped = c10::mul_overflows(count, uint64_t(size), &count);
    TORCH_CHECK(!wrapped && count <= uint64_t(kMaxElements), op, ": ", name, " of shape ", sizes,
                " has more than 2^47 = ", kMaxElements,
                " elements (counted as if contiguous); such a tensor cannot be computed, even "
                "when it is an expanded (stride-0) view");
  }
}

void check_count_fits(const char* op, const char* what, c10::SymIntArrayRef sizes) {
  uint64_t product = 1;
  bool wrapped = false;
  for (const c10::SymInt& size : sizes) {
    const std::optional<int64_t> value = size.maybe_as_int();
    if (!value.has_value() || *value == 0) return;
    wrapped = wrapped || c10::mul_overflows(product, uint64_t(*value), &product);
  }
  TORCH_CHECK(!wrapped && product <= uint64_t(std::numeric_limits<int64_t>::max()), op, ": ", what,
              " of shape ", sizes, " has more elements than an int64 can count");
}

void check_tensor_elements(const char* op, const char* name, const at::Tensor& tensor) {
  if (tensor.defined()) check_element_count(op, name, tensor.sym_sizes());
}

void check_representable(const char* op, const char* name, double value,
                         at::ScalarType compute_dtype, at::ScalarType input_dtype) {
  const double largest = compute_dtype == at::kDouble ? std::numeric_limits<double>::max()
                                                      : double(std::numeric_limits<float>::max());
  TORCH_CHECK(!(std::abs(value) > largest), op, ": ", name, " = ", value, " overflows ",
              compute_dtype, ", in which ", input_dtype, " inputs are computed (largest finite ",
              "value ", largest, "); it would become inf there and turn the scores into NaN");
}

}  // namespace qkv_attention
