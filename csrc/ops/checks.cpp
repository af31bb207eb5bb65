#include "ops/checks.h"

#include <c10/util/Exception.h>

namespace qkv_attention {

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 ||
         dtype == at::kHalf;
}

void check_defined(const char* op, const char* name, const at::Tensor& tensor) {
  TORCH_CHECK(tensor.defined(), op, ": ", name, " is an undefined tensor");
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
  TORCH_CHECK_TYPE(tensor.scalar_type() == reference.scalar_type(), op, ": ", name,
                   " has dtype ", tensor.scalar_type(), " but ", reference_name, " has dtype ",
                   reference.scalar_type(), "; all tensors must share one dtype");
  TORCH_CHECK(tensor.device() == reference.device(), op, ": ", name, " is on ", tensor.device(),
              " but ", reference_name, " is on ", reference.device());
}

void check_size(const char* op, const char* name, const at::Tensor& tensor, int64_t dim,
                const c10::SymInt& expected, const char* what, const char* expected_from) {
  const c10::SymInt& found = tensor.sym_size(dim);
  TORCH_CHECK(found == expected, op, ": ", name, " has ", found, " ", what, " but ",
              expected_from, " has ", expected, " (", name, " has shape ", tensor.sym_sizes(),
              ")");
}

}  // namespace qkv_attention
