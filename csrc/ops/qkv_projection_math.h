// The qkv_projection backward written with differentiable ATen ops (GEMMs through at::mm), for
// any device. The Autograd kernel of qkv_projection_backward runs it with autograd recording
// when the backward itself is differentiated (create_graph=True): the projection is linear, so
// this math is differentiable as it stands. The CPU kernels compute the same gradients with
// GEMM tiles of their own (cpu/head_gemm.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "ops/qkv_projection.h"

namespace qkv_attention {

// All nine gradients of qkv_projection (see ops/qkv_projection.h).
QKVProjectionGrads qkv_projection_backward_math(const std::optional<at::Tensor>& grad_q,
                                                const std::optional<at::Tensor>& grad_k,
                                                const std::optional<at::Tensor>& grad_v,
                                                const at::Tensor& query, const at::Tensor& key,
                                                const at::Tensor& value, const at::Tensor& q_weight,
                                                const at::Tensor& k_weight,
                                                const at::Tensor& v_weight);

}  // namespace qkv_attention
