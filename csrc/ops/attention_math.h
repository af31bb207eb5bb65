// The attention backward written with differentiable ATen ops, for any device. The Autograd
// kernel of _attention_backward runs it with autograd recording when the backward itself is
// differentiated (create_graph=True), so that autograd can take second derivatives. It is the
// fused kernel's math (cpu/attention_kernel.h) in the accumulation dtype, but materialises the
// (B, H, L, S) scores, and repeats grouped key/value heads so autograd sums their gradients.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "ops/attention.h"

namespace qkv_attention {

// The gradients of _attention_backward (see ops/attention.h) for the same arguments, less the
// forward's output and logsumexp (recomputed here); attn_mask_grad and padding_mask_grad say
// whether each mask gets a gradient (attention_mask_gets_grad), else an empty tensor stands.
AttentionGrads attention_backward_math(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state, bool attn_mask_grad, bool padding_mask_grad);

}  // namespace qkv_attention
