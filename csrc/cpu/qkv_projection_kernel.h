// The qkv_projection math, written with ATen ops (GEMMs through at::mm/at::addmm). The CPU
// kernels run it below autograd; the backward's Autograd kernel runs the same functions with
// autograd recording when the backward itself is differentiated (create_graph=True).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "ops/qkv_projection.h"

namespace qkv_attention::cpu {

// x (B, N, Ein), weight (E, Ein), bias (E) or None -> (B, H, N, E/H), contiguous.
at::Tensor project_into_heads(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t num_heads);

// All nine gradients of qkv_projection (see ops/qkv_projection.h).
QKVProjectionGrads qkv_projection_backward_math(
    const std::optional<at::Tensor>& grad_q, const std::optional<at::Tensor>& grad_k,
    const std::optional<at::Tensor>& grad_v, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& q_weight, const at::Tensor& k_weight,
    const at::Tensor& v_weight);

}  // namespace qkv_attention::cpu
