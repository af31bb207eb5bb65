// Shape-only kernels of merge_heads, on symbolic sizes.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/merge_heads.h"

namespace qkv_attention::meta {
namespace {

at::Tensor merge_heads_meta(const at::Tensor& x, const at::Tensor& out_weight,
                            const std::optional<at::Tensor>& out_bias) {
  check_merge_heads_inputs("merge_heads", x, out_weight, out_bias);
  return at::empty_symint({x.sym_size(0), x.sym_size(2), out_weight.sym_size(0)}, x.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_heads_backward_meta(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& out_weight) {
  check_merge_heads_backward_inputs(grad_output, x, out_weight);
  return {at::empty_symint(x.sym_sizes(), x.options()),
          at::empty_symint(out_weight.sym_sizes(), out_weight.options()),
          at::empty_symint({out_weight.sym_size(0)}, out_weight.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, Meta, m) {
  m.impl("merge_heads", TORCH_FN(merge_heads_meta));
  m.impl("merge_heads_backward", TORCH_FN(merge_heads_backward_meta));
}

}  // namespace qkv_attention::meta
