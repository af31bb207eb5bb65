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

// The gradients of _attention_backward (see ops/attention.h) for the same call, less the
// forward's output and logsumexp (recomputed here); attn_mask_grad and padding_mask_grad say
// whether each mask gets a gradient (attention_mask_gets_grad), else an empty tensor stands.
// The variants as the fused kernel applies them: softcap, ALiBi, the window, and sinks (whose
// gradient is returned when they are given). A dense problem (causal alignment 0).
AttentionGrads attention_backward_math(const AttentionBackwardCall& call, bool attn_mask_grad,
                                       bool padding_mask_grad);

}  // namespace qkv_attention
