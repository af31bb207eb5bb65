// merge_heads: concatenate the heads, then the output projection.
//
//   x (B, H, L, D), out_weight (Eout, H*D), out_bias (Eout) or None -> (B, L, Eout)
//
// out[b, l] = out_weight · concat_h(x[b, h, l]) + out_bias
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace qkv_attention {

at::Tensor merge_heads(const at::Tensor& x, const at::Tensor& out_weight,
                       const std::optional<at::Tensor>& out_bias);

// (grad_x, grad_out_weight, grad_out_bias); the bias gradient is returned whether or not the
// forward had a bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_heads_backward(const at::Tensor& grad_output,
                                                                    const at::Tensor& x,
                                                                    const at::Tensor& out_weight);

// ---- shared by the kernels of every dispatch key ----

void check_merge_heads_inputs(const char* op, const at::Tensor& x, const at::Tensor& out_weight,
                              const std::optional<at::Tensor>& out_bias);

void check_merge_heads_backward_inputs(const at::Tensor& grad_output, const at::Tensor& x,
                                       const at::Tensor& out_weight);

}  // namespace qkv_attention
