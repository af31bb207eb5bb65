// The merge_heads math, written with ATen ops (one GEMM each way). The CPU kernels run it below
// autograd; the backward's Autograd kernel runs it with autograd recording for double backward.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace qkv_attention::cpu {

// x (B, H, L, D) -> (B, L, Eout)
at::Tensor merge_heads_math(const at::Tensor& x, const at::Tensor& out_weight,
                            const std::optional<at::Tensor>& out_bias);

// grad_output (B, L, Eout) -> (grad_x (B, H, L, D), grad_out_weight, grad_out_bias)
std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_heads_backward_math(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& out_weight);

}  // namespace qkv_attention::cpu
