// Schema, typed entry points and input checks of merge_heads.
#include "ops/merge_heads.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops/checks.h"
#include "ops/operators.h"

namespace qkv_attention {

TORCH_LIBRARY_FRAGMENT(qkv_attention, m) {
  m.def("merge_heads(Tensor x, Tensor out_weight, Tensor? out_bias) -> Tensor");
  m.def(
      "merge_heads_backward(Tensor grad_output, Tensor x, Tensor out_weight) -> "
      "(Tensor grad_x, Tensor grad_out_weight, Tensor grad_out_bias)");
}

at::Tensor merge_heads(const at::Tensor& x, const at::Tensor& out_weight,
                       const std::optional<at::Tensor>& out_bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::merge_heads", "")
                       .typed<decltype(merge_heads)>();
  return op.call(x, out_weight, out_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_heads_backward(const at::Tensor& grad_output,
                                                                    const at::Tensor& x,
                                                                    const at::Tensor& out_weight) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::merge_heads_backward", "")
                       .typed<decltype(merge_heads_backward)>();
  return op.call(grad_output, x, out_weight);
}

void check_merge_heads_inputs(const char* op, const at::Tensor& x, const at::Tensor& out_weight,
                              const std::optional<at::Tensor>& out_bias) {
  check_input(op, "x", x, 4, "(B, H, L, D)");
  check_input(op, "out_weight", out_weight, 2, "(Eout, H*D)");
  check_same_dtype_and_device(op, "out_weight", out_weight, "x", x);
  const c10::SymInt features = x.sym_size(1) * x.sym_size(3);
  TORCH_CHECK(out_weight.sym_size(1) == features, op, ": out_weight has ", out_weight.sym_size(1),
              " input features but x has H*D = ", x.sym_size(1), "*", x.sym_size(3), " = ",
              features, " (out_weight has shape ", out_weight.sym_sizes(), ", x has shape ",
              x.sym_sizes(), ")");
  // Sizes, before the kernels compute any count from them (ops/checks.h).
  check_tensor_elements(op, "x", x);
  check_tensor_elements(op, "out_weight", out_weight);
  check_element_count(op, "the output (B, L, Eout)",
                      {x.sym_size(0), x.sym_size(2), out_weight.sym_size(0)});
  if (!out_bias.has_value() || !out_bias->defined()) return;
  check_input(op, "out_bias", *out_bias, 1, "(Eout,)");
  check_same_dtype_and_device(op, "out_bias", *out_bias, "x", x);
  check_size(op, "out_bias", *out_bias, 0, out_weight.sym_size(0), "features", "out_weight");
  check_tensor_elements(op, "out_bias", *out_bias);
}

void check_merge_heads_backward_inputs(const at::Tensor& grad_output, const at::Tensor& x,
                                       const at::Tensor& out_weight) {
  constexpr const char* op = op_label("merge_heads_backward");
  check_merge_heads_inputs(op, x, out_weight, std::nullopt);
  check_input(op, "grad_output", grad_output, 3, "(B, L, Eout)");
  check_same_dtype_and_device(op, "grad_output", grad_output, "x", x);
  const c10::SymInt expected[3] = {x.sym_size(0), x.sym_size(2), out_weight.sym_size(0)};
  TORCH_CHECK(grad_output.sym_sizes() == c10::SymIntArrayRef(expected), op,
              ": grad_output must have the output's shape (B, L, Eout) = (", expected[0], ", ",
              expected[1], ", ", expected[2], ") from x of shape ", x.sym_sizes(),
              " and out_weight of shape ", out_weight.sym_sizes(), ", but has shape ",
              grad_output.sym_sizes());
  check_tensor_elements(op, "grad_output", grad_output);
}

}  // namespace qkv_attention
