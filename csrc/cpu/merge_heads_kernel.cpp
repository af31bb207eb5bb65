// CPU kernels of merge_heads: the head concatenation feeds one GEMM.
#include "cpu/merge_heads_kernel.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/merge_heads.h"

namespace qkv_attention::cpu {

// Sizes are SymInts: the backward's differentiable path may run under torch.compile tracing.
at::Tensor merge_heads_math(const at::Tensor& x, const at::Tensor& out_weight,
                            const std::optional<at::Tensor>& out_bias) {
  const c10::SymInt B = x.sym_size(0), L = x.sym_size(2);
  const c10::SymInt features = x.sym_size(1) * x.sym_size(3);
  const at::Tensor rows = x.transpose(1, 2).reshape_symint({B * L, features});  // (B*L, H*D)
  const at::Tensor out = out_bias.has_value() && out_bias->defined()
                             ? at::addmm(*out_bias, rows, out_weight.t())
                             : at::mm(rows, out_weight.t());  // (B*L, Eout)
  return out.view_symint({B, L, out_weight.sym_size(0)});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_heads_backward_math(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& out_weight) {
  const c10::SymInt B = x.sym_size(0), H = x.sym_size(1), L = x.sym_size(2), D = x.sym_size(3);
  const at::Tensor grad = grad_output.reshape_symint({B * L, out_weight.sym_size(0)});
  const at::Tensor grad_x = at::mm(grad, out_weight)  // (B*L, H*D)
                                .view_symint({B, L, H, D})
                                .transpose(1, 2)  // (B, H, L, D)
                                .contiguous();
  const at::Tensor rows = x.transpose(1, 2).reshape_symint({B * L, H * D});
  return {grad_x, at::mm(grad.t(), rows), grad.sum(0)};
}

namespace {

at::Tensor merge_heads_cpu(const at::Tensor& x, const at::Tensor& out_weight,
                           const std::optional<at::Tensor>& out_bias) {
  check_merge_heads_inputs("merge_heads", x, out_weight, out_bias);
  return merge_heads_math(x, out_weight, out_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_heads_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& out_weight) {
  check_merge_heads_backward_inputs(grad_output, x, out_weight);
  return merge_heads_backward_math(grad_output, x, out_weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, CPU, m) {
  m.impl("merge_heads", TORCH_FN(merge_heads_cpu));
  m.impl("merge_heads_backward", TORCH_FN(merge_heads_backward_cpu));
}

}  // namespace qkv_attention::cpu
