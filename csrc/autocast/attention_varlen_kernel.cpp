// AutocastCPU kernels of attention_varlen and _attention_varlen_forward: inside
// torch.autocast("cpu", dtype=...) they compute in the lower precision, as attention does
// (autocast/attention_kernel.cpp); query, key and value are cast, the offsets (integers) and
// rng_state pass as they are.
#include <torch/library.h>

#include "autocast/cast.h"
#include "ops/attention_varlen.h"

namespace qkv_attention::autocast {
namespace {

at::Tensor attention_varlen_autocast(const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                                     const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
                                     c10::SymInt max_seqlen_k, double dropout_p, bool is_causal,
                                     std::optional<double> scale) {
  BelowAutocast below;
  return attention_varlen(cast(query), cast(key), cast(value), cu_seqlens_q, cu_seqlens_k,
                          std::move(max_seqlen_q), std::move(max_seqlen_k), dropout_p, is_causal,
                          scale);
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_forward_autocast(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
    c10::SymInt max_seqlen_k, double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state) {
  BelowAutocast below;
  return _attention_varlen_forward(cast(query), cast(key), cast(value), cu_seqlens_q, cu_seqlens_k,
                                   std::move(max_seqlen_q), std::move(max_seqlen_k), dropout_p,
                                   is_causal, scale, rng_state);
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, AutocastCPU, m) {
  m.impl("attention_varlen", TORCH_FN(attention_varlen_autocast));
  m.impl("_attention_varlen_forward", TORCH_FN(attention_varlen_forward_autocast));
}

}  // namespace qkv_attention::autocast
