// The differentiable merge_heads backward of ops/merge_heads_math.h.
#include "ops/merge_heads_math.h"

#include <ATen/ATen.h>

namespace qkv_attention {

// Sizes are SymInts: this path may run under torch.compile tracing.
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

}  // namespace qkv_attention
