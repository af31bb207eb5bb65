// AutocastCPU kernels of attention_varlen and _attention_varlen_forward: inside
// torch.autocast("cpu", dtype=...) they compute in the lower precision, as attention does
// (autocast/attention_kernel.cpp); query, key and value are cast, the offsets (integers) and
// rng_state pass as they are; alibi_slopes and sinks in a half type become float32.
#include <torch/library.h>

#include "autocast/cast.h"
#include "ops/attention_signatures.h"
#include "ops/attention_varlen.h"

namespace qkv_attention::autocast {
namespace {

at::Tensor attention_varlen_autocast(AttentionProblem problem) {
  BelowAutocast below;
  const AttentionProblem p = cast_problem(std::move(problem));
  const AttentionVariants& v = p.variants;
  return attention_varlen(p.query, p.key, p.value, p.cu_seqlens_q, p.cu_seqlens_k, p.max_seqlen_q,
                          p.max_seqlen_k, p.dropout_p, p.is_causal, p.scale, v.window_size,
                          v.softcap, v.alibi_slopes, v.sinks);
}

VarlenForwardOutputs attention_varlen_forward_autocast(AttentionProblem problem) {
  BelowAutocast below;
  return attention_varlen_forward_call(cast_problem(std::move(problem)));
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, AutocastCPU, m) {
  m.impl("attention_varlen", TORCH_FN(attention_varlen_op<&attention_varlen_autocast>));
  m.impl("_attention_varlen_forward",
         TORCH_FN(attention_varlen_forward_op<&attention_varlen_forward_autocast>));
}

}  // namespace qkv_attention::autocast
