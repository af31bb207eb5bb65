// CPU kernels of merge_heads: tiled GEMMs that read the heads in place.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/large_tensor.h"

#include "cpu/head_gemm.h"
#include "cpu/head_rows.h"
#include "cpu/tiled_gemm.h"
#include "ops/merge_heads.h"

namespace qkv_attention::cpu {

namespace {

// The CPU kernels run tiled GEMMs (cpu/head_gemm.h): the bits do not depend on the thread count,
// and the heads are read (and their gradient written) in place, with no transpose copy.

at::Tensor merge_heads_cpu(const at::Tensor& x, const at::Tensor& out_weight,
                           const std::optional<at::Tensor>& out_bias) {
  check_merge_heads_inputs("merge_heads", x, out_weight, out_bias);
  const int64_t B = x.size(0), L = x.size(2), Eout = out_weight.size(0);
  at::Tensor out = empty_output({B, L, Eout}, x.options());
  // Nothing to compute (x may still be a huge expanded view, whose rows would be gathered).
  if (out.numel() == 0) return out;
  // (B*L, H*D) head rows @ out_weight.T (H*D, Eout) + out_bias
  gemm_heads_into_rows(HeadRows({HeadRows::with_unit_last_stride(x)}, RowOrder::kBatchMajor),
                       out_weight.t(), out_bias, out.view({B * L, Eout}));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_heads_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& out_weight) {
  check_merge_heads_backward_inputs(grad_output, x, out_weight);
  if (grad_output.numel() == 0) {
    // No output (B*L = 0 or Eout = 0): every gradient is a sum of no terms.
    return {at::zeros(x.sizes(), x.options()), at::zeros(out_weight.sizes(), out_weight.options()),
            at::zeros({out_weight.size(0)}, out_weight.options())};
  }
  const RowMatrix grad = as_row_matrix(grad_output);  // (B*L, Eout)
  // grad_x (B, H, L, D) <- grad (B*L, Eout) @ out_weight (Eout, H*D)
  at::Tensor grad_x = empty_output(x.sizes(), x.options());
  gemm_rows_into_heads(grad.matrix, out_weight, std::nullopt, HeadRows({grad_x}, grad.order));
  // grad_out_weight (Eout, H*D) = gradᵀ x_rows; computed as its transpose x_rowsᵀ grad.
  at::Tensor grad_weight = at::empty(out_weight.sizes(), out_weight.options());
  gemm_heads_transposed(HeadRows({HeadRows::with_unit_last_stride(x)}, grad.order), grad.matrix,
                        grad_weight.t());
  at::Tensor grad_bias = at::empty({out_weight.size(0)}, out_weight.options());
  column_sums(grad_bias, grad.matrix);
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, CPU, m) {
  m.impl("merge_heads", TORCH_FN(merge_heads_cpu));
  m.impl("merge_heads_backward", TORCH_FN(merge_heads_backward_cpu));
}

}  // namespace qkv_attention::cpu
