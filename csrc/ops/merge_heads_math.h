// The merge_heads backward written with differentiable ATen ops (one GEMM each way), for any
// device. The Autograd kernel of merge_heads_backward runs it with autograd recording for double
// backward: merge_heads is bilinear in (x, out_weight), so this math is differentiable as it
// stands. The CPU kernels compute the same gradients with GEMM tiles of their own
// (cpu/head_gemm.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace qkv_attention {

// grad_output (B, L, Eout) -> (grad_x (B, H, L, D), grad_out_weight, grad_out_bias)
std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_heads_backward_math(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& out_weight);

}  // namespace qkv_attention
