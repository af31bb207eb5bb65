// The qkv_projection backward written with ATen ops (GEMMs through at::mm). The CPU kernels use
// tiled GEMMs of their own (cpu/head_gemm.h); the backward's Autograd kernel runs this math with
// autograd recording when the backward itself is differentiated (create_graph=True).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "ops/qkv_projection.h"

namespace qkv_attention::cpu {

// All nine gradients of qkv_projection (see ops/qkv_projection.h).
QKVProjectionGrads qkv_projection_backward_math(
    const std::optional<at::Tensor>& grad_q, const std::optional<at::Tensor>& grad_k,
    const std::optional<at::Tensor>& grad_v, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& q_weight, const at::Tensor& k_weight,
    const at::Tensor& v_weight);

}  // namespace qkv_attention::cpu
