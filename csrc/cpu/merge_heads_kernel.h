// The merge_heads backward written with ATen ops (one GEMM each way). The CPU kernels use tiled
// GEMMs of their own (cpu/head_gemm.h); the backward's Autograd kernel runs this math with
// autograd recording for double backward.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace qkv_attention::cpu {

// grad_output (B, L, Eout) -> (grad_x (B, H, L, D), grad_out_weight, grad_out_bias)
std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_heads_backward_math(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& out_weight);

}  // namespace qkv_attention::cpu
