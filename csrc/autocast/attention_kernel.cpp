// AutocastCPU kernels of attention and attention_with_weights: inside
// torch.autocast("cpu", dtype=...) they compute in the lower precision, as torch's
// scaled_dot_product_attention does, and return it. query, key, value and a float attn_mask or
// key_padding_mask are cast (cast.h: float64 and bool stay as they are); alibi_slopes and sinks
// in a half type become float32 (the ops take float32 or the inputs' dtype for them).
//
// _attention_forward gets the same kernel: torch.compile and torch.export may decompose the
// two composites into it before autocast is applied, and its outputs must not depend on that.
#include <torch/library.h>

#include "autocast/cast.h"
#include "ops/attention.h"
#include "ops/attention_signatures.h"

namespace qkv_attention::autocast {
namespace {

at::Tensor attention_autocast(AttentionProblem problem) {
  BelowAutocast below;
  const AttentionProblem p = cast_problem(std::move(problem));
  const AttentionVariants& v = p.variants;
  return attention(p.query, p.key, p.value, p.attn_mask, p.dropout_p, p.is_causal, p.scale,
                   p.key_padding_mask, v.window_size, v.softcap, v.alibi_slopes, v.sinks);
}

std::tuple<at::Tensor, at::Tensor> attention_with_weights_autocast(AttentionProblem problem) {
  BelowAutocast below;
  const AttentionProblem p = cast_problem(std::move(problem));
  const AttentionVariants& v = p.variants;
  return attention_with_weights(p.query, p.key, p.value, p.attn_mask, p.dropout_p, p.is_causal,
                                p.scale, p.key_padding_mask, p.average_weights, v.window_size,
                                v.softcap, v.alibi_slopes, v.sinks);
}

AttentionForwardOutputs attention_forward_autocast(AttentionProblem problem) {
  BelowAutocast below;
  // rng_state (int64) is not a floating tensor: passed as it is.
  return attention_forward_call(cast_problem(std::move(problem)));
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, AutocastCPU, m) {
  m.impl("attention", TORCH_FN(attention_op<&attention_autocast>));
  m.impl("attention_with_weights",
         TORCH_FN(attention_with_weights_op<&attention_with_weights_autocast>));
  m.impl("_attention_forward", TORCH_FN(attention_forward_op<&attention_forward_autocast>));
}

}  // namespace qkv_attention::autocast
